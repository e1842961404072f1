"""Trace-time checks with errors that name the argument, its shape and the fix.

Used by the public API and by the primitives' abstract evaluation, so a bad
call fails in Python with a ``ValueError`` before anything reaches a kernel.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp4.formats import BLOCK_SIZE, SUPPORTED_INPUT_DTYPES

__all__ = ["check_activations", "check_linear_weights", "check_uint8"]


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def check_activations(x, name: str = "x", dtypes=SUPPORTED_INPUT_DTYPES) -> int:
    """Checks ``x[..., K]`` (dtype in ``dtypes``, K % 32 == 0); returns K."""
    if len(x.shape) == 0:
        raise ValueError(f"{name} must have at least one dimension [..., K]; got a scalar.")
    if jnp.dtype(x.dtype) not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(
            f"{name} has dtype {x.dtype} but must be one of {allowed}; cast it, e.g. "
            f"{name}.astype(jnp.bfloat16)."
        )
    k = int(x.shape[-1])
    if k % BLOCK_SIZE:
        raise ValueError(
            f"{name} has shape {_shape(x)}: its last dimension K={k} is not a multiple of "
            f"{BLOCK_SIZE} (MXFP4 shares one scale per 32 elements); pad K to "
            f"{-(-k // BLOCK_SIZE) * BLOCK_SIZE} with zeros."
        )
    return k


def check_uint8(a, name: str) -> None:
    if jnp.dtype(a.dtype) != jnp.uint8:
        raise ValueError(
            f"{name} has dtype {a.dtype} but must be uint8 (packed E2M1 pairs / raw E8M0 bytes); "
            f"view float4/float8_e8m0fnu data with lax.bitcast_convert_type(..., jnp.uint8)."
        )


def check_linear_weights(w_packed, w_scales, k: int | None = None) -> tuple[int, int]:
    """Checks ``w_packed uint8[N, K/2]`` and ``w_scales uint8[N, K/32]``; returns (N, K).

    If ``k`` is given (the activations' K), the weights must match it.
    """
    check_uint8(w_packed, "w_packed")
    check_uint8(w_scales, "w_scales")
    if len(w_packed.shape) != 2:
        raise ValueError(f"w_packed must be 2-D [N, K/2] (row = output feature); got shape {_shape(w_packed)}.")
    n, half_k = (int(d) for d in w_packed.shape)
    wk = 2 * half_k
    if k is not None and wk != k:
        raise ValueError(
            f"w_packed has shape {_shape(w_packed)}, i.e. K={wk}, but x has K={k}: w_packed must be "
            f"[N, {k // 2}] for these activations (two E2M1 codes per byte)."
        )
    if wk % BLOCK_SIZE:
        raise ValueError(
            f"w_packed has shape {_shape(w_packed)}: K={wk} is not a multiple of {BLOCK_SIZE}; "
            "MXFP4 weights need whole 32-element blocks along K."
        )
    expected = (n, wk // BLOCK_SIZE)
    if _shape(w_scales) != expected:
        raise ValueError(
            f"w_scales has shape {_shape(w_scales)} but w_packed {_shape(w_packed)} needs linear "
            f"scales of shape {expected} (one E8M0 byte per 32 elements of each row); unswizzle "
            "swizzled scales with jax_mxfp4.unswizzle_scales."
        )
    return n, wk
