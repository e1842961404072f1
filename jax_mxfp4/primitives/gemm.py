"""The ``mxfp4_gemm`` primitive: y[..., N] = x[..., K] @ dequantize(w)^T.

Weights in the canonical layout (``w_packed uint8[N, K/2]``, linear
``w_scales uint8[N, K/32]``), float32 accumulation, output in x's dtype.
Lowers to the CPU handler in ``csrc/ffi_cpu.cc``; GPUs use the kernels in
``jax_mxfp4.kernels`` (Marlin, XLA) instead, so there is no CUDA lowering.

Sharding (``partition``, ``sharding_rule``; the mechanism is in ``base``):
tokens (x's leading dims) split -> local; N split (column-parallel) -> local,
both weight arrays split by rows; K split (row-parallel) -> each device
multiplies its K slice (weights split by columns in whole 32-element blocks)
and the partial products are summed by one all-reduce over the K mesh axes.
That sum runs in float32 and the result is rounded to x's dtype once, after
it, so a row-parallel GEMM differs from the unsharded one only by float32
accumulation order (within ``reference.matmul_tolerance``), not by an extra
rounding of each partial to bfloat16.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import core, lax
from jax.interpreters import batching

from jax_mxfp4 import sharding, validation
from jax_mxfp4.formats import BLOCK_SIZE
from jax_mxfp4.primitives.base import FfiPrimitive, Partition, register_primitive

__all__ = ["GemmPrimitive", "gemm"]


@register_primitive
class GemmPrimitive(FfiPrimitive):
    name = "mxfp4_gemm"
    target = "jax_mxfp4_gemm"
    platforms = ("cpu",)
    operand_names = ("x", "w_packed", "w_scales")

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

    @classmethod
    def sharding_rule(cls, mesh, in_shapes, out_shapes):
        # K is k blocks of 32 elements = 16 packed bytes = 1 scale byte: sharing
        # the factor k makes x and both weight arrays split K alike, in whole
        # blocks. K is contracted: its factors are reduction factors (a split K
        # is summed by partition(), never passed on to y).
        kb = in_shapes[0][-1] // BLOCK_SIZE
        rb = sharding.RuleBuilder()
        x = rb.dim(("k", kb), ("b", BLOCK_SIZE))
        packed = rb.dim(("k", kb), ("h", BLOCK_SIZE // 2))
        scales = rb.dim(("k", kb))
        rule = f"... {x}, n {packed}, n {scales} -> ... n"
        return rule, {**rb.sizes(), "reduction_factors": rb.used("k", "b", "h")}

    @classmethod
    def partition(cls, mesh, args):
        x, w_packed, _ = args
        n, k = int(w_packed.shape[0]), int(x.shape[-1])
        w_n, w_k = sharding.spec_axes(w_packed.sharding, 2)
        plan = sharding.plan_linear(mesh, x.shape, x.sharding, n, k, w_n, w_k)
        local = None
        if plan.k:
            local = functools.partial(_row_parallel, k_axes=plan.k)
        return Partition((plan.x_spec, plan.w_spec, plan.w_spec), (plan.y_spec,), local, plan.notes)


def _row_parallel(x, w_packed, w_scales, *, k_axes):
    """One K shard's partial product, summed over ``k_axes`` in float32, then rounded once."""
    # The handler accumulates in float32 whatever x's dtype; giving it float32 x
    # (exact) makes it return the float32 partial instead of rounding it.
    part = GemmPrimitive.inner_primitive.bind(x.astype(jnp.float32), w_packed, w_scales)
    return lax.psum(part, k_axes).astype(x.dtype)


def gemm(x, w_packed, w_scales):
    """Binds ``mxfp4_gemm`` after validating the arguments."""
    k = validation.check_activations(x)
    validation.check_linear_weights(w_packed, w_scales, k)
    return GemmPrimitive.bind(x, w_packed, w_scales)
