"""The ``mxfp4_sm100_w4a4_gemm`` primitive: MXFP4 x MXFP4 -> bf16 on Blackwell.

``d[..., N] = a[..., K] @ b[N, K]^T`` with both operands MXFP4: packed E2M1
(``a uint8[..., K/2]``, ``b uint8[N, K/2]``) and E8M0 scales in the padded
``swizzled_128x4`` layout (``a_scales`` over ``M = prod(a.shape[:-1])`` rows,
``b_scales`` over N rows). Lowers to the CUTLASS SM100 block-scaled GEMM in
``csrc/sm100/w4a4_gemm.cu`` (CUDA only; compiled for sm_100a and not yet run
on Blackwell hardware). The kernel's scratch is a second result whose size
comes from the extension at trace time, so XLA owns that memory.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import core, lax

from jax_mxfp4 import _native, layout, validation
from jax_mxfp4.layout import ScaleLayout
from jax_mxfp4.primitives.base import FfiPrimitive, register_primitive

__all__ = ["Sm100W4A4GemmPrimitive", "sm100_w4a4_gemm", "workspace_bytes"]


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
    platforms = ("cuda",)
    multiple_results = True

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
        return lax.map(lambda xs: tuple(cls.bind(*xs)), tuple(args)), (0, 0)


def sm100_w4a4_gemm(a, a_scales, b, b_scales):
    """``a @ b^T`` for MXFP4 operands with swizzled scales; bf16 ``[..., N]``."""
    _check_operands(a, a_scales, b, b_scales)
    d, _workspace = Sm100W4A4GemmPrimitive.bind(a, a_scales, b, b_scales)
    return d
