"""The public functional API: quantize, dequantize, prepare and multiply."""

from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp4 import reference, validation
from jax_mxfp4.formats import BLOCK_SIZE, parse_rounding
from jax_mxfp4.kernels import base as kernel_base
from jax_mxfp4.kernels.base import LinearConfig, PreparedWeights
from jax_mxfp4.primitives import quantize as quantize_primitive

__all__ = [
    "dequantize_mxfp4",
    "mxfp4_linear",
    "mxfp4_matmul",
    "prepare_weights",
    "quantize_mxfp4",
]


def quantize_mxfp4(x, *, scale_layout="linear", rounding="floor"):
    """Quantizes ``x[..., K]`` to MXFP4 with the package's custom call.

    Args:
      x: float32, bfloat16 or float16 array; K (last dim) a multiple of 32.
      scale_layout: ``"linear"`` -> scales ``uint8[..., K/32]``;
        ``"swizzled_128x4"`` -> the padded 2-D buffer
        ``[ceil(M/128)*128, ceil(K/32/4)*4]`` with ``M = prod(x.shape[:-1])``.
      rounding: ``"floor"`` (OCP), ``"rceil"`` or ``"compressed_tensors"``
        (see ``jax_mxfp4.formats``).

    Returns:
      ``(packed uint8[..., K/2], scales uint8)``; element 2i in the low nibble.
    """
    return quantize_primitive.quantize(x, scale_layout=scale_layout, rounding=rounding)


def dequantize_mxfp4(packed, scales, *, dtype=jnp.bfloat16):
    """``packed uint8[..., K/2]`` with linear ``scales uint8[..., K/32]`` -> ``dtype[..., K]``."""
    validation.check_uint8(packed, "packed")
    validation.check_uint8(scales, "scales")
    expected = (*packed.shape[:-1], packed.shape[-1] * 2 // BLOCK_SIZE)
    if (packed.shape[-1] * 2) % BLOCK_SIZE or tuple(scales.shape) != expected:
        raise ValueError(
            f"scales has shape {tuple(scales.shape)} but packed {tuple(packed.shape)} needs linear scales "
            f"of shape {expected}; for swizzled scales call jax_mxfp4.unswizzle_scales(buf, rows, k) first."
        )
    return reference.dequantize_reference(packed, scales, dtype=dtype)


def _config(x_shape, x_dtype, w_packed, w_scales, activation_format, activation_rounding) -> LinearConfig:
    k = int(x_shape[-1])
    n, _ = validation.check_linear_weights(w_packed, w_scales, k)
    return LinearConfig(
        in_features=k,
        out_features=n,
        activation_dtype=x_dtype,
        activation_format=activation_format,
        activation_rounding=parse_rounding(activation_rounding),
        tokens=kernel_base.tokens_of(x_shape),
    )


def prepare_weights(w_packed, w_scales, *, activation_dtype=jnp.bfloat16, activation_format=None,
                    activation_rounding="floor", kernel=None, tokens=None, device=None) -> PreparedWeights:
    """Converts canonical MXFP4 weights to the selected kernel's layout, once.

    ``w_packed uint8[N, K/2]`` and ``w_scales uint8[N, K/32]`` as stored in
    checkpoints. The kernel is chosen by ``kernel_base.select_kernel`` for
    this layer (``kernel=`` or ``JAX_MXFP4_KERNEL`` force one); ``tokens`` is
    the expected M if selection should depend on it. Apply the result with
    ``mxfp4_linear``.
    """
    validation.check_linear_weights(w_packed, w_scales)
    n, k = int(w_packed.shape[0]), int(w_packed.shape[1]) * 2
    config = LinearConfig(
        in_features=k,
        out_features=n,
        activation_dtype=activation_dtype,
        activation_format=activation_format,
        activation_rounding=parse_rounding(activation_rounding),
        tokens=tokens,
    )
    selection = kernel_base.select_kernel(config, kernel=kernel, device=device)
    return selection.kernel.prepare_weights(w_packed, w_scales, config)


def mxfp4_linear(x, weights: PreparedWeights, bias=None):
    """``x[..., K] @ W^T (+ bias)`` with weights from ``prepare_weights``."""
    if not isinstance(weights, PreparedWeights):
        raise TypeError(
            f"weights must be PreparedWeights (from jax_mxfp4.prepare_weights); got {type(weights).__name__}. "
            "For canonical (w_packed, w_scales) call jax_mxfp4.mxfp4_matmul."
        )
    k = validation.check_activations(x)
    if k != weights.config.in_features:
        raise ValueError(
            f"x has shape {tuple(x.shape)} (K={k}) but the weights were prepared for "
            f"K={weights.config.in_features}."
        )
    if jnp.dtype(x.dtype) != weights.config.activation_dtype:
        raise ValueError(
            f"x has dtype {x.dtype} but the weights were prepared for {weights.config.activation_dtype} "
            "activations; cast x or prepare again with activation_dtype=x.dtype."
        )
    return kernel_base.get_kernel(weights.kernel).apply(x, weights, bias)


def mxfp4_matmul(x, w_packed, w_scales, *, activation_format=None, activation_rounding="floor",
                 kernel=None):
    """``x @ dequantize(w).T`` with the best kernel for this device and shape.

    Args:
      x: ``[..., K]`` float32/bfloat16/float16 activations.
      w_packed: ``uint8[N, K/2]`` E2M1 pairs (row = output feature).
      w_scales: ``uint8[N, K/32]`` E8M0 scales, linear layout.
      activation_format: None (W4A16) or ``"mxfp4"``: x is quantized to MXFP4
        with ``activation_rounding`` first (W4A4 numerics).
      kernel: force a kernel by name (see ``jax_mxfp4.kernels.REGISTRY``);
        ``JAX_MXFP4_KERNEL`` does the same from the environment.

    Returns ``[..., N]`` in x's dtype, accumulated in float32. Weight
    preparation happens inside this call; for repeated use prepare once with
    ``prepare_weights`` and call ``mxfp4_linear``.
    """
    validation.check_activations(x)
    config = _config(x.shape, x.dtype, w_packed, w_scales, activation_format, activation_rounding)
    selection = kernel_base.select_kernel(config, kernel=kernel)
    weights = selection.kernel.prepare_weights(w_packed, w_scales, config)
    return selection.kernel.apply(x, weights)


def explain_selection(x_shape, x_dtype, w_shape, *, activation_format=None, kernel=None) -> str:
    """Human-readable kernel choice for activations ``x_shape`` and weights ``[N, K]``."""
    n, k = w_shape
    config = LinearConfig(
        in_features=k,
        out_features=n,
        activation_dtype=x_dtype,
        activation_format=activation_format,
        tokens=kernel_base.tokens_of(x_shape),
    )
    return kernel_base.select_kernel(config, kernel=kernel).explain()
