"""``xla``: dequantize with jnp, then ``jnp.dot`` — what XLA alone gives.

Runs on every backend; it is the universal fallback and the baseline the
custom kernels are benchmarked against (on an H100 it is ~3x slower than a
bf16 GEMM, DESIGN.md section 9).
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp4 import reference
from jax_mxfp4.kernels.base import LinearConfig, Mxfp4LinearKernel, PreparedWeights, register_kernel

__all__ = ["XlaDequantKernel"]


@register_kernel
class XlaDequantKernel(Mxfp4LinearKernel):
    name = "xla"
    description = "XLA: jnp dequantize, then jnp.dot (any device)"

    def is_supported(self, device):
        return True, ""

    def can_implement(self, config: LinearConfig):
        return True, ""

    def prepare_weights(self, w_packed, w_scales, config: LinearConfig) -> PreparedWeights:
        return PreparedWeights({"packed": w_packed, "scales": w_scales}, self.name, config)

    def matmul(self, x, weights: PreparedWeights):
        w = reference.dequantize_reference(
            weights.arrays["packed"], weights.arrays["scales"], dtype=x.dtype
        )
        return jnp.einsum("...k,nk->...n", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


