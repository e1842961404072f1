"""Scale-factor layouts of MXFP4 tensors, their padded shapes, and (un)swizzling.

Two layouts (DESIGN.md section 3; the C++ mirror is ``csrc/scale_layout.h``):

* ``"linear"``: ``scales[rows, K/32]`` row-major, no padding. What checkpoints
  store and what the CPU handlers and Marlin preparation read.
* ``"swizzled_128x4"``: the layout SM100 block-scaled MMA reads (CUTLASS
  ``Sm1xxBlkScaledConfig``; cuBLAS and FlashInfer call it 128x4). Rows are
  padded to a multiple of 128 and scale columns (``Kb = K/32``) to a multiple
  of 4, the padding filled with zero bytes, giving the 2-D buffer
  ``[ceil(rows/128)*128, ceil(Kb/4)*4]``. Scale ``(r, kb)`` lives at byte::

      ((r // 128) * ceil(Kb / 4) + kb // 4) * 512
          + (r % 32) * 16 + ((r // 32) % 4) * 4 + kb % 4

  i.e. pad, reshape to ``(R/128, 4, 32, Kb/4, 4)`` and transpose to
  ``(0, 3, 2, 1, 4)``: each 512-byte tile holds 128 rows x 4 scale columns with
  rows 32 apart interleaved, so one 16-byte load gives a thread its scales for
  4 rows x 4 K-blocks.

``scale_shape`` is the ONE function that gives the padded shape: abstract
evaluation, kernels' preparation, loaders and tests all call it.
"""

from __future__ import annotations

import enum

import jax.numpy as jnp
import numpy as np

from jax_mxfp4.formats import BLOCK_SIZE

__all__ = [
    "SWIZZLE_COLS",
    "SWIZZLE_ROWS",
    "ScaleLayout",
    "parse_scale_layout",
    "scale_shape",
    "swizzle_scales",
    "swizzled_offset",
    "unswizzle_scales",
]

SWIZZLE_ROWS = 128
SWIZZLE_COLS = 4


class ScaleLayout(enum.IntEnum):
    """Scale-factor layouts (values match csrc/scale_layout.h)."""

    LINEAR = 0
    SWIZZLED_128X4 = 1

    @property
    def option(self) -> str:
        return "linear" if self is ScaleLayout.LINEAR else "swizzled_128x4"


def parse_scale_layout(scale_layout: str | ScaleLayout) -> ScaleLayout:
    """Returns the ``ScaleLayout`` named by ``scale_layout`` or raises ``ValueError``."""
    if isinstance(scale_layout, ScaleLayout):
        return scale_layout
    for layout in ScaleLayout:
        if scale_layout == layout.option:
            return layout
    raise ValueError(
        f"scale_layout={scale_layout!r} is not a scale layout; use 'linear' "
        "(scales[rows, K/32]) or 'swizzled_128x4' (the padded SM100 layout)."
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(rows: int, k: int, scale_layout: str | ScaleLayout = "linear") -> tuple[int, int]:
    """Shape of the 2-D scale buffer for ``rows`` rows of ``k`` elements.

    ``k`` is the element count (a multiple of 32). Linear: ``(rows, k/32)``.
    Swizzled: ``(ceil(rows/128)*128, ceil(k/32/4)*4)``.
    """
    layout = parse_scale_layout(scale_layout)
    if k % BLOCK_SIZE:
        raise ValueError(f"k={k} is not a multiple of {BLOCK_SIZE}: MXFP4 shares one scale per 32 elements.")
    kb = k // BLOCK_SIZE
    if layout == ScaleLayout.LINEAR:
        return (rows, kb)
    return (_ceil_div(rows, SWIZZLE_ROWS) * SWIZZLE_ROWS, _ceil_div(kb, SWIZZLE_COLS) * SWIZZLE_COLS)


def swizzled_offset(row, kb, kb_count: int):
    """Byte offset of scale ``(row, kb)`` in a swizzled buffer with ``kb_count = K/32``.

    Works on Python ints and numpy integer arrays alike; the explicit formula
    the reshape/transpose in ``swizzle_scales`` is tested against.
    """
    kb_tiles = _ceil_div(kb_count, SWIZZLE_COLS)
    return (
        ((row // SWIZZLE_ROWS) * kb_tiles + kb // SWIZZLE_COLS) * (SWIZZLE_ROWS * SWIZZLE_COLS)
        + (row % 32) * 16
        + ((row // 32) % 4) * 4
        + kb % SWIZZLE_COLS
    )


def _check_linear_scales(scales, name: str = "scales"):
    if scales.ndim < 2:
        raise ValueError(f"{name} must be at least 2-D [rows, K/32]; got shape {tuple(scales.shape)}.")
    if jnp.dtype(scales.dtype) != jnp.uint8:
        raise ValueError(
            f"{name} must be uint8 E8M0 bytes; got dtype {scales.dtype} (view float8_e8m0fnu data as uint8)."
        )


def swizzle_scales(scales):
    """Linear scales ``[..., rows, K/32]`` -> the padded swizzled 2-D buffer.

    Leading dimensions are folded into rows (as ``quantize_mxfp4`` does). The
    padding is zero bytes.
    """
    scales = jnp.asarray(scales)
    _check_linear_scales(scales)
    kb = scales.shape[-1]
    scales = scales.reshape(-1, kb)
    rows = scales.shape[0]
    padded_rows, padded_kb = scale_shape(rows, kb * BLOCK_SIZE, ScaleLayout.SWIZZLED_128X4)
    padded = jnp.pad(scales, ((0, padded_rows - rows), (0, padded_kb - kb)))
    tiles = padded.reshape(padded_rows // 128, 4, 32, padded_kb // 4, 4)
    return tiles.transpose(0, 3, 2, 1, 4).reshape(padded_rows, padded_kb)


def unswizzle_scales(buf, rows: int, k: int):
    """Inverse of ``swizzle_scales``: the padded buffer -> linear ``[rows, k/32]``.

    ``k`` is the element count K. Raises ``ValueError`` when ``buf`` does not
    have the padded shape ``scale_shape(rows, k, "swizzled_128x4")``.
    """
    buf = jnp.asarray(buf)
    expected = scale_shape(rows, k, ScaleLayout.SWIZZLED_128X4)
    if tuple(buf.shape) != expected:
        raise ValueError(
            f"buf has shape {tuple(buf.shape)} but {rows} rows of K={k} swizzle to {expected}; "
            "pass the rows and K the buffer was made for."
        )
    if jnp.dtype(buf.dtype) != jnp.uint8:
        raise ValueError(f"buf must be uint8 E8M0 bytes; got dtype {buf.dtype}.")
    padded_rows, padded_kb = expected
    tiles = buf.reshape(padded_rows // 128, padded_kb // 4, 32, 4, 4)
    linear = tiles.transpose(0, 3, 2, 1, 4).reshape(padded_rows, padded_kb)
    return linear[:rows, : k // BLOCK_SIZE]


def swizzled_offsets_table(rows: int, k: int) -> np.ndarray:
    """int64 ``[rows, k/32]`` table of ``swizzled_offset`` for every scale (tests, host code)."""
    kb = k // BLOCK_SIZE
    r = np.arange(rows, dtype=np.int64)[:, None]
    c = np.arange(kb, dtype=np.int64)[None, :]
    return swizzled_offset(r, c, kb)
