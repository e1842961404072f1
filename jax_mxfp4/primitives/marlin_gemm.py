"""The ``mxfp4_marlin_gemm`` primitive: W4A16 GEMM on SM80/SM90 (Marlin-style).

``y[..., N] = x[..., K] @ dequantize(W)^T`` with ``x`` bfloat16/float16 and
``W`` prepared once by ``kernels.marlin_weights.prepare_marlin_weights``
(layout spec: ``csrc/marlin/marlin_layout.h``). Lowers to the CUDA handler in
``csrc/marlin/marlin_ffi.cc`` and, on CPU devices, to the CPU handler in
``csrc/marlin/marlin_cpu.cc`` (same operands and attributes). The split-K
scratch is a hidden second result whose size the extension computes at trace
time for the same SM count and instruction path the kernel is launched with
(the ``sm_count`` and ``use_wgmma`` attributes), so XLA owns that memory and
the call is graph-safe. ``use_wgmma`` (only on compute capability 9.0: the
handler refuses it elsewhere) runs M > 32 on the Hopper ``wgmma`` tile
configurations instead of the ``mma.sync`` ones.

Sharding (``sharding_rule``, ``partition``; mechanism in ``base``): the
prepared arrays keep N on axis 1 in whole 32-feature units and K on the
``Kb`` rows of ``tiles``, so

* tokens (x's leading dims) split -> local;
* N split (column-parallel) -> local, ``tiles`` and ``scales`` split along
  axis 1, when N splits into whole 32-feature units per shard;
* K split (row-parallel) -> ``tiles`` split along its ``Kb`` rows in whole
  blocks, ``x`` along K; ``scales`` stays whole along axis 0 (its last four
  rows are the per-feature row factors, which every K shard needs: each device
  slices its own multiplier rows, ``marlin_weights.k_shard_scales``). Each
  device's partial product comes out of the kernel in x's dtype and the
  partials are summed by one all-reduce in that dtype, as a dense bf16
  row-parallel layer does: one rounding of each partial more than the
  unsharded GEMM (the CPU ``mxfp4_gemm`` sums in float32 instead; the Marlin
  kernel has no float32 output).

``marlin_weights.prepared_specs`` gives the shardings to place prepared
weights with (``jax_mxfp4.sharding.shard_prepared_weights``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import core, lax
from jax.interpreters import batching

from jax_mxfp4 import _native, sharding, validation
from jax_mxfp4.formats import BLOCK_SIZE, input_dtype_code
from jax_mxfp4.kernels.marlin_weights import UNIT_BYTES, UNIT_N, k_shard_scales, marlin_layout, prepared_specs
from jax_mxfp4.primitives.base import FfiPrimitive, Partition, register_primitive

__all__ = ["MarlinGemmPrimitive", "marlin_gemm", "prepared_rule", "workspace_bytes"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def workspace_bytes(m: int, n: int, k: int, sm_count: int, use_wgmma: bool) -> int:
    """Scratch bytes of the Marlin GEMM; 0 when this build has no CUDA kernels."""
    if not _native.cuda_enabled():
        return 0
    size = int(_native.ext.marlin_workspace_bytes(m, n, k, sm_count, bool(use_wgmma)))
    if size < 0:
        raise ValueError(f"the Marlin GEMM has no launch plan for M={m}, N={n}, K={k}")
    return size


def prepared_rule(rb: sharding.RuleBuilder, n: int, k: int) -> tuple[str, str, str]:
    """Shardy rule text of ``tiles``, ``scales`` and of the weight's N dimension.

    ``tiles [Kb, N_pad*16]`` is ``k (u c)``: Kb blocks, then units of 32
    features (512 bytes each); ``scales [Kb+4, N_pad]`` is ``r (u d)``: its
    rows are never split, its columns are units of 32 features. N of a result
    is ``(u d)`` when N has no padding, otherwise a factor of its own (such a
    layer is never split along N).
    """
    layout = marlin_layout(n, k, jnp.bfloat16)
    units = layout.n_pad // UNIT_N
    tiles = f"{rb.dim(('k', layout.kb))} {rb.dim(('u', units), ('c', UNIT_BYTES))}"
    scales = f"{rb.dim(('r', layout.kb + 4))} {rb.dim(('u', units), ('d', UNIT_N))}"
    n_dim = rb.dim(("u", units), ("d", UNIT_N)) if n == layout.n_pad else rb.dim(("o", n))
    return tiles, scales, n_dim


def scales_notes(scales) -> tuple[str, ...]:
    """Why prepared ``scales`` split along their rows are resharded."""
    rows, _ = sharding.spec_axes(scales.sharding, 2)
    if not rows:
        return ()
    return (f"prepared Marlin scales {tuple(scales.shape)} end with 4 rows of per-feature row factors that "
            f"every K shard needs: split them along N only (axis 1), not over {rows} "
            "(jax_mxfp4.sharding.shard_prepared_weights places them so).",)


@register_primitive
class MarlinGemmPrimitive(FfiPrimitive):
    name = "mxfp4_marlin_gemm"
    target = "jax_mxfp4_marlin_gemm"
    platforms = ("cpu", "cuda")
    num_workspace_results = 1
    operand_names = ("x", "tiles", "scales")

    @classmethod
    def abstract_eval(cls, x, tiles, scales, *, n: int, k: int, sm_count: int, use_wgmma: bool, dtype: int):
        validation.check_activations(x, dtypes=_DTYPES)
        layout = marlin_layout(n, k, x.dtype)
        if dtype != input_dtype_code(x.dtype):
            raise ValueError(f"x has dtype {x.dtype} but the weights were prepared for dtype code {dtype}.")
        if int(x.shape[-1]) != k:
            raise ValueError(f"x has shape {tuple(x.shape)} but the weights were prepared for K={k}.")
        for arr, want, name in ((tiles, layout.tiles_shape, "tiles"), (scales, layout.scales_shape, "scales")):
            validation.check_uint8(arr, name)
            if tuple(arr.shape) != want:
                raise ValueError(
                    f"{name} has shape {tuple(arr.shape)} but a Marlin weight of N={n}, K={k} has {want} "
                    "(prepare it with jax_mxfp4.prepare_weights(..., kernel='marlin'))."
                )
        m = math.prod(int(d) for d in x.shape[:-1])
        return (
            core.ShapedArray((*x.shape[:-1], n), x.dtype),
            core.ShapedArray((workspace_bytes(m, n, k, sm_count, use_wgmma),), jnp.uint8),
        )

    @classmethod
    def ffi_attributes(cls, *, n: int, k: int, sm_count: int, use_wgmma: bool, dtype: int):
        return {"n": np.int64(n), "k": np.int64(k), "sm_count": np.int64(sm_count),
                "use_wgmma": np.int32(bool(use_wgmma)), "dtype": np.int32(dtype)}

    @classmethod
    def batch(cls, args, dims, **params):
        x, tiles, scales = args
        dx, dt, ds = dims
        if dt is None and ds is None:
            # Only x is batched: one more leading axis of x (folds into M).
            return cls.bind(jnp.moveaxis(x, dx, 0), tiles, scales, **params), 0
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
        return lax.map(lambda a: cls.bind(*a, **params), tuple(args)), 0

    @classmethod
    def sharding_rule(cls, mesh, in_shapes, out_shapes, *, n, k, sm_count, use_wgmma, dtype):
        rb = sharding.RuleBuilder()
        x = rb.dim(("k", k // BLOCK_SIZE), ("b", BLOCK_SIZE))
        tiles, scales, n_dim = prepared_rule(rb, n, k)
        rule = f"... {x}, {tiles}, {scales} -> ... {n_dim}"
        return rule, {**rb.sizes(), "reduction_factors": rb.used("k", "b")}

    @classmethod
    def partition(cls, mesh, args, *, n, k, sm_count, use_wgmma, dtype):
        x, tiles, scales = args
        t_k, t_n = sharding.spec_axes(tiles.sharding, 2)
        plan = sharding.plan_linear(mesh, x.shape, x.sharding, n, k, t_n, t_k, n_multiple=UNIT_N)
        n_local = n // sharding.axes_size(mesh, plan.n)
        k_local = k // sharding.axes_size(mesh, plan.k)

        def local(x, tiles, scales):
            if plan.k:
                scales = k_shard_scales(scales, k_local // BLOCK_SIZE, lax.axis_index(plan.k))
            y, _ = cls.inner_primitive.bind(x, tiles, scales, n=n_local, k=k_local, sm_count=sm_count,
                                            use_wgmma=use_wgmma, dtype=dtype)
            return lax.psum(y, plan.k) if plan.k else y

        specs = prepared_specs(plan.n, plan.k)
        return Partition((plan.x_spec, specs["tiles"], specs["scales"]), (plan.y_spec,), local, plan.notes + scales_notes(scales))


def marlin_gemm(x, tiles, scales, *, n: int, k: int, sm_count: int, use_wgmma: bool = False):
    """Binds ``mxfp4_marlin_gemm``; returns ``y[..., N]`` in x's dtype.

    ``use_wgmma``: run M > 32 on the Hopper (sm_90a) ``wgmma`` configurations;
    only on a compute capability 9.0 device (the kernel layer decides)."""
    return MarlinGemmPrimitive.bind(x, tiles, scales, n=n, k=k, sm_count=sm_count, use_wgmma=bool(use_wgmma),
                                    dtype=int(input_dtype_code(x.dtype)))
