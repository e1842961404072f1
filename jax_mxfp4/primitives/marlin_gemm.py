"""The ``mxfp4_marlin_gemm`` primitive: W4A16 GEMM on SM80/SM90 (Marlin-style).

``y[..., N] = x[..., K] @ dequantize(W)^T`` with ``x`` bfloat16/float16 and
``W`` prepared once by ``kernels.marlin_weights.prepare_marlin_weights``
(layout spec: ``csrc/marlin/marlin_layout.h``). Lowers to the CUDA handler in
``csrc/marlin/marlin_ffi.cc``. The split-K scratch is a second result whose
size the extension computes at trace time for the same SM count the kernel
is launched with (passed as the ``sm_count`` attribute), so XLA owns that
memory and the call is graph-safe.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import core, lax
from jax.interpreters import batching

from jax_mxfp4 import _native, validation
from jax_mxfp4.formats import input_dtype_code
from jax_mxfp4.kernels.marlin_weights import marlin_layout
from jax_mxfp4.primitives.base import FfiPrimitive, register_primitive

__all__ = ["MarlinGemmPrimitive", "marlin_gemm", "workspace_bytes"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def workspace_bytes(m: int, n: int, k: int, sm_count: int) -> int:
    """Scratch bytes of the Marlin GEMM; 0 when this build has no CUDA kernels."""
    if not _native.cuda_enabled():
        return 0
    size = int(_native.ext.marlin_workspace_bytes(m, n, k, sm_count))
    if size < 0:
        raise ValueError(f"the Marlin GEMM has no launch plan for M={m}, N={n}, K={k}")
    return size


@register_primitive
class MarlinGemmPrimitive(FfiPrimitive):
    name = "mxfp4_marlin_gemm"
    target = "jax_mxfp4_marlin_gemm"
    platforms = ("cuda",)
    multiple_results = True

    @classmethod
    def abstract_eval(cls, x, tiles, scales, *, n: int, k: int, sm_count: int, dtype: int):
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
            core.ShapedArray((workspace_bytes(m, n, k, sm_count),), jnp.uint8),
        )

    @classmethod
    def ffi_attributes(cls, *, n: int, k: int, sm_count: int, dtype: int):
        return {"n": np.int64(n), "k": np.int64(k), "sm_count": np.int64(sm_count), "dtype": np.int32(dtype)}


    @classmethod
    def batch(cls, args, dims, **params):
        x, tiles, scales = args
        dx, dt, ds = dims
        if dt is None and ds is None:
            # Only x is batched: one more leading axis of x (folds into M).
            y, ws = cls.bind(jnp.moveaxis(x, dx, 0), tiles, scales, **params)
            return (y, ws), (0, None)
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
        return lax.map(lambda a: tuple(cls.bind(*a, **params)), tuple(args)), (0, 0)


def marlin_gemm(x, tiles, scales, *, n: int, k: int, sm_count: int):
    """Binds ``mxfp4_marlin_gemm``; returns ``y[..., N]`` in x's dtype."""
    y, _workspace = MarlinGemmPrimitive.bind(
        x, tiles, scales, n=n, k=k, sm_count=sm_count, dtype=int(input_dtype_code(x.dtype)))
    return y
