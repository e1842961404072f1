"""Weight preparation for the SM100 CUTLASS W4A4 GEMM (``csrc/sm100/w4a4_gemm.cu``).

What the kernel reads (``csrc/sm100/w4a4_gemm.h``):

* ``packed``: ``uint8[N, K/2]``, E2M1 codes, element ``2i`` in the low nibble,
  K-major. This *is* the canonical checkpoint layout, so it passes through
  unchanged and unpadded: the kernel loads it with TMA, which zero-fills rows
  beyond ``N`` and columns beyond ``K`` itself. The only requirement is that
  a row of ``K/2`` bytes be a multiple of 16 bytes (``K % 32 == 0``), which
  every MXFP4 tensor meets.
* ``scales``: the padded ``swizzled_128x4`` buffer
  ``scale_shape(N, K, "swizzled_128x4") = [ceil(N/128)*128, ceil(K/32/4)*4]``,
  zero bytes in the padding. CUTLASS's ``Sm1xxBlkScaledConfig`` reads exactly
  this layout; ``_ext.cutlass_scale_factor_offsets`` (built from CUTLASS's own
  layout code on the host) is tested against ``layout.swizzled_offset``.

The padded shape comes only from ``layout.scale_shape`` and the permutation
only from ``layout.swizzle_scales``: nothing here recomputes either. In
particular nothing reshapes with the unpadded ``N`` after padding (the bug
caught in the vLLM review, DESIGN.md section 3); the result's shape is checked
against ``scale_shape`` before it is returned.

Everything is ``jnp`` on static shapes, so it runs under ``jax.jit`` (and on
sharded weights, as a once-per-load step).
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp4.layout import ScaleLayout, scale_shape, swizzle_scales
from jax_mxfp4.sharding import to_spec

__all__ = ["prepare_sm100_weights", "prepared_specs"]


def prepare_sm100_weights(w_packed, w_scales) -> dict[str, jnp.ndarray]:
    """Canonical MXFP4 weights -> the arrays the SM100 W4A4 GEMM reads.

    Args:
      w_packed: ``uint8[N, K/2]`` packed E2M1 weights (row = output feature).
      w_scales: ``uint8[N, K/32]`` E8M0 scales in the linear layout.

    Returns:
      ``{"packed": uint8[N, K/2], "scales": uint8[ceil(N/128)*128, ceil(K/128)*4]}``;
      ``packed`` is ``w_packed`` itself, ``scales`` the swizzled, zero-padded copy.

    Raises:
      ValueError: on a wrong rank, dtype or a scale shape that does not match
        ``w_packed``.
    """
    w_packed = jnp.asarray(w_packed)
    w_scales = jnp.asarray(w_scales)
    if w_packed.ndim != 2 or jnp.dtype(w_packed.dtype) != jnp.uint8:
        raise ValueError(
            f"w_packed must be uint8[N, K/2]; got {w_packed.dtype}{list(w_packed.shape)}."
        )
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    expected_linear = scale_shape(n, k, ScaleLayout.LINEAR)  # raises unless K % 32 == 0
    if tuple(w_scales.shape) != expected_linear or jnp.dtype(w_scales.dtype) != jnp.uint8:
        raise ValueError(
            f"w_scales must be linear uint8{list(expected_linear)} for w_packed of shape "
            f"{list(w_packed.shape)} (N={n}, K={k}); got {w_scales.dtype}{list(w_scales.shape)}."
        )

    scales = swizzle_scales(w_scales)
    expected = scale_shape(n, k, ScaleLayout.SWIZZLED_128X4)
    if tuple(scales.shape) != expected:  # the single shape function and the swizzle must agree
        raise AssertionError(f"swizzle_scales gave {tuple(scales.shape)}, scale_shape says {expected}.")
    return {"packed": w_packed, "scales": scales}


def prepared_specs(n_axes: tuple[str, ...], k_axes: tuple[str, ...]) -> dict:
    """``PartitionSpec`` of ``packed`` and ``scales`` for a weight split along N over mesh
    axes ``n_axes`` and along K over ``k_axes``: both by rows along N (the swizzled scales
    in whole 128-row tiles), ``packed`` along K too; the swizzled scales stay whole along
    K (each device takes its K tiles, ``primitives.sm100_gemm.k_shard_swizzled``)."""
    return {"packed": to_spec((n_axes, k_axes)), "scales": to_spec((n_axes, ()))}
