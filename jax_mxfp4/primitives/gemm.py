"""The ``mxfp4_gemm`` primitive: y[..., N] = x[..., K] @ dequantize(w)^T.

Weights in the canonical layout (``w_packed uint8[N, K/2]``, linear
``w_scales uint8[N, K/32]``), float32 accumulation, output in x's dtype.
Lowers to the CPU handler in ``csrc/ffi_cpu.cc``; GPUs use the kernels in
``jax_mxfp4.kernels`` (Marlin, XLA) instead, so there is no CUDA lowering.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import core, lax
from jax.interpreters import batching

from jax_mxfp4 import validation
from jax_mxfp4.primitives.base import FfiPrimitive, register_primitive

__all__ = ["GemmPrimitive", "gemm"]


@register_primitive
class GemmPrimitive(FfiPrimitive):
    name = "mxfp4_gemm"
    target = "jax_mxfp4_gemm"
    platforms = ("cpu",)

    @classmethod
    def abstract_eval(cls, x, w_packed, w_scales):
        k = validation.check_activations(x)
        n, _ = validation.check_linear_weights(w_packed, w_scales, k)
        return core.ShapedArray((*x.shape[:-1], n), x.dtype)

    @classmethod
    def batch(cls, args, dims):
        x, w_packed, w_scales = args
        dx, dp, ds = dims
        if dp is None and ds is None:
            # Only x is batched: the batch axis is one more leading axis of x.
            return cls.bind(jnp.moveaxis(x, dx, 0), w_packed, w_scales), 0
        # Batched weights (e.g. experts): one GEMM per batch element.
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        x, w_packed, w_scales = (
            batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)
        )
        return lax.map(lambda a: cls.bind(*a), (x, w_packed, w_scales)), 0


def gemm(x, w_packed, w_scales):
    """Binds ``mxfp4_gemm`` after validating the arguments."""
    k = validation.check_activations(x)
    validation.check_linear_weights(w_packed, w_scales, k)
    return GemmPrimitive.bind(x, w_packed, w_scales)
