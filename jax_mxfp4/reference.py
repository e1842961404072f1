"""Pure-jnp MXFP4 quantize, dequantize and matmul: the ground truth.

The functions are jitted (their options are static arguments) so eager calls
in tests and tools compile once per shape instead of once per op.

Every kernel and custom-call handler in this package is tested against these
functions: bit-exact for quantization, within ``matmul_tolerance`` for GEMM.
They are also what the ``xla`` kernel runs (XLA fuses them as it can), and they
run under ``jax.jit`` and ``jax.vmap`` on any backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_mxfp4 import formats, layout

__all__ = [
    "dequantize_reference",
    "matmul_reference",
    "matmul_tolerance",
    "quantize_reference",
]


@functools.partial(jax.jit, static_argnames=("scale_layout", "rounding"))
def quantize_reference(x, *, scale_layout="linear", rounding="floor"):
    """Reference for ``jax_mxfp4.quantize_mxfp4``.

    ``x[..., K]`` (float32/bfloat16/float16, K % 32 == 0) ->
    ``(packed uint8[..., K/2], scales)`` with ``scales`` uint8 ``[..., K/32]``
    (linear) or the padded 2-D swizzled buffer over ``M = prod(x.shape[:-1])``
    rows (``layout.scale_shape``).
    """
    scale_layout = layout.parse_scale_layout(scale_layout)
    codes, scales = formats.quantize_blocks(x, rounding)
    packed = formats.pack_nibbles(codes)
    if scale_layout == layout.ScaleLayout.SWIZZLED_128X4:
        scales = layout.swizzle_scales(scales.reshape(-1, scales.shape[-1]))
    return packed, scales


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_reference(packed, scales, *, dtype=jnp.bfloat16):
    """Reference for ``jax_mxfp4.dequantize_mxfp4``: linear scales only.

    ``packed uint8[..., K/2]``, ``scales uint8[..., K/32]`` -> ``dtype[..., K]``.
    Exact for float32/bfloat16 (every MXFP4 value is representable there).
    """
    codes = formats.unpack_nibbles(packed)
    return formats.dequantize_codes(codes, scales, dtype)


@functools.partial(jax.jit, static_argnames=("rounding",))
def fake_quantize_reference(x, *, rounding="floor"):
    """``dequantize(quantize(x))`` in ``x.dtype``: W4A4 activation numerics."""
    codes, scales = formats.quantize_blocks(x, rounding)
    return formats.dequantize_codes(codes, scales, x.dtype)


@functools.partial(
    jax.jit, static_argnames=("activation_format", "activation_rounding", "out_dtype"))
def matmul_reference(x, w_packed, w_scales, *, activation_format=None, activation_rounding="floor",
                     out_dtype=None):
    """Reference for ``jax_mxfp4.mxfp4_matmul``: ``x @ dequantize(w).T``.

    ``x[..., K]``, ``w_packed uint8[N, K/2]``, ``w_scales uint8[N, K/32]``
    (linear). With ``activation_format="mxfp4"`` x is first fake-quantized with
    ``activation_rounding`` (W4A4 numerics). The product is accumulated in
    float32 at HIGHEST precision and rounded once to ``out_dtype`` (default
    ``x.dtype``).
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if activation_format == "mxfp4":
        x = fake_quantize_reference(x, rounding=activation_rounding)
    elif activation_format is not None:
        raise ValueError(f"activation_format={activation_format!r}; use None (W4A16) or 'mxfp4' (W4A4).")
    w = dequantize_reference(w_packed, w_scales, dtype=jnp.float32)
    y = jnp.einsum(
        "...k,nk->...n",
        x.astype(jnp.float32),
        w,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return y.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "rounded_partials"))
def matmul_tolerance(x, w_packed, w_scales, out_dtype=None, *, rounded_partials: int = 0):
    """Elementwise error bound for an MXFP4 GEMM against ``matmul_reference``.

    Two implementations that both accumulate in float32 differ only by
    accumulation order: at most ``K * eps32 * sum_k |x_k| |w_nk|`` (the
    classical bound for a length-K float32 sum), plus one rounding of the
    output to ``out_dtype`` on each side (one ulp of the result each). Returns
    the bound as a float32 array of the output's shape (computed in float32
    with HIGHEST precision; a bound needs no more).

    ``rounded_partials=P`` is for a GEMM whose K is split into P partial
    products that are each rounded to ``out_dtype`` and summed in
    ``out_dtype`` (a row-parallel layer whose kernel has no float32 output,
    like Marlin): P roundings of the partials and P - 1 of the running sum,
    each within half an ulp of at most ``sum_k |x_k| |w_nk|``, add
    ``(2P - 1) * eps_out / 2 * sum_k |x_k| |w_nk|``.
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    k = x.shape[-1]
    w = dequantize_reference(w_packed, w_scales, dtype=jnp.float32)
    x32 = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    magnitude = jnp.einsum("...k,nk->...n", jnp.abs(x32), jnp.nan_to_num(jnp.abs(w)), precision=hi)
    result = jnp.abs(jnp.einsum("...k,nk->...n", x32, w, precision=hi))
    eps32 = float(jnp.finfo(jnp.float32).eps)
    ulp_out = float(jnp.finfo(out_dtype).eps)
    # 1.01: the bound itself is computed in float32.
    partials = max(2 * rounded_partials - 1, 0) * ulp_out / 2 * magnitude
    return k * eps32 * magnitude * 1.01 + 2 * ulp_out * result + partials + float(jnp.finfo(jnp.float32).tiny)


def dequantize_swizzled_reference(packed, swizzled_scales, *, rows, k, dtype=jnp.bfloat16):
    """Dequantize with scales in the swizzled layout (unswizzles first)."""
    scales = layout.unswizzle_scales(swizzled_scales, rows, k)
    return dequantize_reference(packed.reshape(rows, k // 2), scales, dtype=dtype)

