"""The ``mxfp4_sm100_w4a4_gemm`` primitive: MXFP4 x MXFP4 -> bf16 on Blackwell.

``d[..., N] = a[..., K] @ b[N, K]^T`` with both operands MXFP4: packed E2M1
(``a uint8[..., K/2]``, ``b uint8[N, K/2]``) and E8M0 scales in the padded
``swizzled_128x4`` layout (``a_scales`` over ``M = prod(a.shape[:-1])`` rows,
``b_scales`` over N rows). Lowers to the CUTLASS SM100 block-scaled GEMM in
``csrc/sm100/w4a4_gemm.cu`` (compiled for sm_100a and not yet run on
Blackwell hardware) and, on CPU devices, to the CPU handler in
``csrc/ffi_cpu.cc`` (same operands: unswizzle, dequantize, float32 GEMM, one
rounding to bf16). The kernel's scratch is a hidden second result whose size
comes from the extension at trace time, so XLA owns that memory.

Sharding (``sharding_rule``, ``partition``; mechanism in ``base``):

* tokens split -> local, under the rule of the quantize primitive that makes
  ``a_scales`` (``quantize.swizzled_token_split``: one outermost token dim,
  a multiple of 128 rows per shard, ``a_scales`` split along its rows alike);
* N split (column-parallel) -> local: ``b`` and ``b_scales`` split by rows,
  in whole 128-row scale tiles (N a multiple of 128 per shard);
* K split (row-parallel) -> local partial GEMM + one all-reduce (in bf16, the
  kernel's output type), when K splits into whole 128-element scale tiles
  (4 blocks) per shard, with no token split at the same time. A swizzled
  buffer is a row-major grid of 512-byte tiles ``[row tiles, K tiles]``, so a
  K shard's local buffer is a contiguous range of K tiles in every row tile:
  ``b_scales`` stays whole along K (split along N only; 1/16 of the weight
  bytes) and each device takes its tiles (``k_shard_swizzled``); ``a_scales``
  is taken as the quantize primitive leaves it: for at most 128 rows split in
  bands of ``128 / shards`` rows, which are exactly the local buffers, with
  more rows whole (quantize then runs unsplit along K, see its docstring).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import core, lax

from jax_mxfp4 import _native, layout, sharding, validation
from jax_mxfp4.formats import BLOCK_SIZE
from jax_mxfp4.kernels.sm100_weights import prepared_specs
from jax_mxfp4.layout import SWIZZLE_COLS, SWIZZLE_ROWS, ScaleLayout
from jax_mxfp4.primitives.base import FfiPrimitive, Partition, register_primitive
from jax_mxfp4.primitives.quantize import swizzled_token_split

__all__ = ["Sm100W4A4GemmPrimitive", "k_shard_swizzled", "sm100_w4a4_gemm", "workspace_bytes"]


def workspace_bytes(m: int, n: int, k: int) -> int:
    """Size of the kernel's scratch for (M, N, K); 0 when this build has no SM100 kernel."""
    if not _native.ext.has_sm100_gemm:
        return 0
    size = int(_native.ext.sm100_w4a4_workspace_bytes(m, n, k))
    if size < 0:
        ok, reason = _native.ext.sm100_w4a4_can_implement(m, n, k)
        raise ValueError(f"the SM100 W4A4 GEMM cannot run M={m}, N={n}, K={k}: {reason}")
    return size


def _check_operands(a, a_scales, b, b_scales) -> tuple[int, int, int]:
    for arr, name in ((a, "a"), (a_scales, "a_scales"), (b, "b"), (b_scales, "b_scales")):
        validation.check_uint8(arr, name)
    if len(a.shape) < 1 or len(b.shape) != 2 or b.shape[1] != a.shape[-1]:
        raise ValueError(
            f"a {tuple(a.shape)} and b {tuple(b.shape)} must be packed MXFP4 [..., K/2] and [N, K/2] "
            "with the same K."
        )
    k = 2 * int(a.shape[-1])
    m = math.prod(int(d) for d in a.shape[:-1])
    n = int(b.shape[0])
    for arr, rows, name in ((a_scales, m, "a_scales"), (b_scales, n, "b_scales")):
        want = layout.scale_shape(rows, k, ScaleLayout.SWIZZLED_128X4)
        if tuple(arr.shape) != want:
            raise ValueError(
                f"{name} has shape {tuple(arr.shape)} but {rows} rows of K={k} need the padded "
                f"swizzled_128x4 buffer {want} (jax_mxfp4.swizzle_scales / quantize_mxfp4(..., "
                "scale_layout='swizzled_128x4'))."
            )
    return m, n, k


@register_primitive
class Sm100W4A4GemmPrimitive(FfiPrimitive):
    name = "mxfp4_sm100_w4a4_gemm"
    target = "jax_mxfp4_sm100_w4a4_gemm"
    platforms = ("cpu", "cuda")
    num_workspace_results = 1
    operand_names = ("a", "a_scales", "b", "b_scales")

    @classmethod
    def abstract_eval(cls, a, a_scales, b, b_scales):
        m, n, k = _check_operands(a, a_scales, b, b_scales)
        return (
            core.ShapedArray((*a.shape[:-1], n), jnp.bfloat16),
            core.ShapedArray((workspace_bytes(m, n, k),), jnp.uint8),
        )

    @classmethod
    def batch(cls, args, dims):
        # The activations' swizzled scales are one padded buffer per call, so a
        # batch is a sequence of calls.
        size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
        from jax.interpreters import batching

        args = [batching.bdim_at_front(x, d, size) for x, d in zip(args, dims)]
        return lax.map(lambda xs: cls.bind(*xs), tuple(args)), 0

    @classmethod
    def sharding_rule(cls, mesh, in_shapes, out_shapes):
        # Tokens ("...") and N ("n") carry over to d; K and the scale buffers'
        # dims get factors of their own, so propagation never asks for a K
        # split (partition() would undo it) or a split inside a scale tile.
        return "... ka, ra ca, n kb, rb cb -> ... n"

    @classmethod
    def partition(cls, mesh, args):
        a, a_scales, b, b_scales = args
        shape = tuple(int(d) for d in a.shape)
        n, k = int(b.shape[0]), 2 * shape[-1]
        a_dims = sharding.spec_axes(a.sharding, len(shape))
        lead, m_axes, notes = swizzled_token_split(mesh, shape, a_dims)
        b_n, b_k = sharding.spec_axes(b.sharding, 2)
        n_axes = sharding.dividing_prefix(mesh, b_n, n, SWIZZLE_ROWS, exclude=m_axes)
        if n_axes != b_n:
            notes.append(f"N={n} over mesh axes {b_n}: b_scales split only in whole {SWIZZLE_ROWS}-row scale "
                         f"tiles (N a multiple of {SWIZZLE_ROWS} per shard, axes unused by the tokens); N is "
                         f"split over {n_axes or 'none'}.")
        k_wanted = b_k or a_dims[-1]
        tile_k = SWIZZLE_COLS * BLOCK_SIZE
        k_axes = () if m_axes else sharding.dividing_prefix(mesh, k_wanted, k, tile_k, exclude=n_axes)
        one_row_tile = int(a_scales.shape[0]) == SWIZZLE_ROWS
        if k_axes and one_row_tile and SWIZZLE_ROWS % sharding.axes_size(mesh, k_axes):
            k_axes = ()
        if k_axes != k_wanted:
            notes.append(f"K={k} over mesh axes {k_wanted}: the SM100 GEMM splits K only into shards of whole "
                         f"{tile_k}-element scale tiles, not together with a token split; K is split over "
                         f"{k_axes or 'none'}.")
        a_scales_rows = (*m_axes, *k_axes) if one_row_tile else m_axes
        w = prepared_specs(n_axes, k_axes)
        in_specs = (sharding.to_spec((*lead, k_axes)), sharding.to_spec((a_scales_rows, ())), w["packed"], w["scales"])
        local = None
        if k_axes:
            shards = sharding.axes_size(mesh, k_axes)

            def local(a, a_scales, b, b_scales):
                shard = lax.axis_index(k_axes)
                if one_row_tile:  # this shard's band of 128 / shards rows is its local [128, Kb/shards] tile
                    a_scales = a_scales.reshape(SWIZZLE_ROWS, -1)
                else:
                    a_scales = k_shard_swizzled(a_scales, shards, shard)
                d = cls.inner_primitive.bind(a, a_scales, b, k_shard_swizzled(b_scales, shards, shard))[0]
                return lax.psum(d, k_axes)

        return Partition(in_specs, (sharding.to_spec((*lead, n_axes)),), local, tuple(notes))


def k_shard_swizzled(scales, shards: int, shard):
    """The swizzled scale buffer of K shard ``shard`` of ``shards`` (whole 4-column tiles
    each): its range of K tiles in every row tile of the ``[rows, Kb]`` buffer."""
    rows, cols = int(scales.shape[0]), int(scales.shape[1])
    tiles = scales.reshape(rows // SWIZZLE_ROWS, cols // SWIZZLE_COLS, SWIZZLE_ROWS * SWIZZLE_COLS)
    local = lax.dynamic_slice_in_dim(tiles, shard * (tiles.shape[1] // shards), tiles.shape[1] // shards, axis=1)
    return local.reshape(rows, cols // shards)


def sm100_w4a4_gemm(a, a_scales, b, b_scales):
    """``a @ b^T`` for MXFP4 operands with swizzled scales; bf16 ``[..., N]``."""
    _check_operands(a, a_scales, b, b_scales)
    return Sm100W4A4GemmPrimitive.bind(a, a_scales, b, b_scales)
