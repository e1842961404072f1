"""``xla``: dequantize with jnp, then ``jnp.dot`` — what XLA alone gives.

Runs on every backend; it is the universal fallback and the "XLA-native"
baseline the custom kernels are benchmarked against. The dequantization is
written the way a JAX user would write it for speed (one fused elementwise
pass building the float32 bit patterns), not with the reference's
exhaustively exact bit arithmetic: the two agree exactly for every value of
magnitude >= 2**-126 (scale bytes >= 2); smaller values, which no GEMM can
tell from zero, may flush to zero.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jax_mxfp4.formats import BLOCK_SIZE, E8M0_NAN
from jax_mxfp4.kernels.base import CanonicalLayoutKernel, PreparedWeights, register_kernel
from jax_mxfp4.sharding import explicit_linear_sharding

__all__ = ["XlaDequantKernel", "dequantize_fast"]


def dequantize_fast(packed, scales, dtype):
    """``packed uint8[..., K/2]``, linear ``scales uint8[..., K/32]`` -> ``dtype[..., K]``.

    An E2M1 code ``s e1 e0 m`` is ``(1 + m/2) * 2**(e-1)`` for ``e = e1 e0 > 0``
    and ``m/2`` for ``e = 0``; times the scale ``2**(b - 127)`` that is the
    float32 with exponent field ``e - 1 + b`` and mantissa ``m << 22`` (or
    ``2**(b - 128)`` for the code 0.5), built with integer ops XLA fuses into
    one pass. Scale byte 0xFF gives NaN; overflow (6 * 2**127) gives Inf.
    """
    # Split K/2 into (blocks, 16 bytes) before unpacking the nibbles: only the
    # major factor of a (possibly sharded) K dim is then ever split or merged,
    # which explicit-axes sharding (jax.sharding.AxisType.Explicit) requires.
    blocks = packed.reshape(*packed.shape[:-1], packed.shape[-1] // (BLOCK_SIZE // 2), BLOCK_SIZE // 2)
    codes = jnp.stack([blocks & 0xF, blocks >> 4], axis=-1).astype(jnp.uint32)
    codes = codes.reshape(*blocks.shape[:-1], BLOCK_SIZE)
    b = scales.astype(jnp.int32)[..., None]
    e = ((codes >> 1) & 3).astype(jnp.int32)
    m = codes & 1
    exponent = e - 1 + b
    normal = jnp.where(exponent >= 255, jnp.uint32(0x7F800000),  # overflow: Inf
                       (jnp.maximum(exponent, 0).astype(jnp.uint32) << 23) | (m << 22))
    half = jnp.where(m == 1, jnp.maximum(b - 1, 0).astype(jnp.uint32) << 23, jnp.uint32(0))
    bits = jnp.where(e > 0, normal, half) | ((codes >> 3) << 31)
    bits = jnp.where(b == E8M0_NAN, jnp.uint32(0x7FC00000), bits)
    values = lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@register_kernel
class XlaDequantKernel(CanonicalLayoutKernel):
    name = "xla"
    description = "XLA: jnp dequantize, then jnp.dot (any device)"

    def is_supported(self, device):
        return True, ""

    def matmul(self, x, weights: PreparedWeights):
        w = dequantize_fast(weights.arrays["packed"], weights.arrays["scales"], x.dtype)
        return jnp.einsum("...k,nk->...n", x, w, preferred_element_type=jnp.float32,
                          out_sharding=explicit_linear_sharding(x, w)).astype(x.dtype)
