"""Offline ("load time") preparation of MXFP4 weights for the Marlin W4A16 kernel.

The prepared layout is specified once, in ``csrc/marlin/marlin_layout.h`` (tile
order, bit placement inside each 32-bit word, block-multiplier bytes, row
factors, accuracy contract). This module implements that spec with ``jnp`` ops
(``prepare_marlin_weights``, run once per weight, on any device) and its
inverse (``unprepare_marlin_weights``, for the large-M path and the tests). The extraction
tables below are checked against the header by ``tests/test_marlin_layout.py``,
which also compares ``prepare_marlin_weights`` byte for byte with the header's
C++ ``PrepareHost`` and emulates the kernel on the prepared buffers.

Shapes, for ``N`` output features and ``K`` inputs (``K % 32 == 0``), with
``Kb = K // 32`` and ``N_pad = ceil(N / 32) * 32``:

* ``tiles``:  ``uint8[Kb, N_pad * 16]``
* ``scales``: ``uint8[Kb + 4, N_pad]`` (``Kb`` rows of block-multiplier bytes,
  then 4 byte planes of the float32 per-feature factor)

Sharding (``prepared_specs``): both arrays keep ``N`` on axis 1 in whole
32-feature units, so a column-parallel (N-split) layer splits them along axis
1 (shards of whole units, so N a multiple of 32 per shard). A row-parallel
(K-split) layer splits ``tiles`` along its ``Kb`` rows and keeps ``scales``
whole along axis 0 (1/16 of the tiles' bytes): its last four rows are the
per-feature row factors, valid for every K slice, and each device takes its
own multiplier rows with ``k_shard_scales``. (``shard_map`` users may instead
prepare each K shard separately: its row factors are then per shard, which is
also correct because each shard's partial product is scaled before the sum.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_mxfp4 import formats
from jax_mxfp4.sharding import to_spec
from jax_mxfp4.layout import ScaleLayout, scale_shape

__all__ = [
    "MarlinLayout",
    "k_shard_scales",
    "marlin_layout",
    "prepare_marlin_weights",
    "prepared_specs",
    "source_bit_table",
    "unprepare_marlin_weights",
]

UNIT_N = 32  # output features per layout unit
BLOCK_K = 32  # k per E8M0 scale block
UNIT_BYTES = 512  # 32 x 32 codes
ROW_FACTOR_PLANES = 4  # float32 bytes appended as rows of `scales`

_DTYPE_NAMES = {jnp.dtype(jnp.bfloat16): "bfloat16", jnp.dtype(jnp.float16): "float16"}

# Bit of code field b (0 = mantissa, 1 = e0, 2 = e1, 3 = sign) inside a 16-bit
# float half: kTargetBitBf16 / kTargetBitF16 in marlin_layout.h.
TARGET_BIT = {"bfloat16": (6, 7, 8, 15), "float16": (9, 10, 11, 15)}

# Extraction groups per B register p: ((rotation, field mask), ...), field mask
# bits 8 = sign, 4 = e1, 2 = e0, 1 = m; kMarlinExtractBf16 / kMarlinExtractF16.
EXTRACT = {
    "bfloat16": (
        ((0, 0xF), (0, 0x0)),
        ((4, 0xF), (0, 0x0)),
        ((10, 0xF), (0, 0x0)),
        ((6, 0x4), (14, 0xB)),
    ),
    "float16": (
        ((4, 0xF), (0, 0x0)),
        ((7, 0xF), (0, 0x0)),
        ((0, 0x4), (11, 0xB)),
        ((0, 0x1), (13, 0xE)),
    ),
}

# Multiplier byte of a NaN block: the infinite multiplier (bf16 0x7F80, f16 0x7C00).
NAN_MULTIPLIER_BYTE = {"bfloat16": 0xFF, "float16": 0x7C}


def _dtype_name(dtype) -> str:
    dt = jnp.dtype(dtype)
    if dt not in _DTYPE_NAMES:
        raise ValueError(
            f"the Marlin kernel computes in bfloat16 or float16 (the activation dtype); got {dt}."
        )
    return _DTYPE_NAMES[dt]


def source_bit_table(dtype) -> np.ndarray:
    """``int[4 p, 2 e, 4 b]``: the word bit holding code bit ``b`` of element
    ``(register p, half e)`` (``SourceBit`` in marlin_layout.h)."""
    name = _dtype_name(dtype)
    table = np.zeros((4, 2, 4), np.int64)
    for p in range(4):
        (rot0, fields0), (rot1, _) = EXTRACT[name][p]
        for e in range(2):
            for b in range(4):
                rot = rot0 if fields0 & (1 << b) else rot1
                table[p, e, b] = (16 * e + TARGET_BIT[name][b] + rot) % 32
    return table


@dataclasses.dataclass(frozen=True)
class MarlinLayout:
    """Static description of a prepared weight (what the kernel call needs
    besides the two arrays)."""

    n: int  # true output features N
    k: int  # true inputs K
    dtype: str  # "bfloat16" or "float16": the activation dtype it was prepared for

    @property
    def n_pad(self) -> int:
        return -(-self.n // UNIT_N) * UNIT_N

    @property
    def kb(self) -> int:
        return self.k // BLOCK_K

    @property
    def tiles_shape(self) -> tuple[int, int]:
        return (self.kb, self.n_pad * (UNIT_BYTES // UNIT_N))

    @property
    def scales_shape(self) -> tuple[int, int]:
        return (self.kb + ROW_FACTOR_PLANES, self.n_pad)


def marlin_layout(n: int, k: int, dtype) -> MarlinLayout:
    """The prepared shapes for an ``[N, K]`` weight (``GetPreparedShape`` in
    marlin_layout.h). Raises ``ValueError`` for shapes the format forbids."""
    if k <= 0 or k % BLOCK_K:
        raise ValueError(f"K = {k} must be a positive multiple of 32 (the MXFP4 block size).")
    if n <= 0:
        raise ValueError(f"N = {n} must be positive.")
    return MarlinLayout(int(n), int(k), _dtype_name(dtype))


def prepared_specs(n_axes: tuple[str, ...], k_axes: tuple[str, ...]) -> dict:
    """``PartitionSpec`` of ``tiles`` and ``scales`` for a weight split along N over mesh
    axes ``n_axes`` and along K over ``k_axes`` (see the module docstring)."""
    return {"tiles": to_spec((k_axes, n_axes)), "scales": to_spec(((), n_axes))}


def k_shard_scales(scales, kb_shard: int, shard):
    """The ``scales`` of K shard ``shard`` (a traced index is fine) of ``kb_shard`` blocks:
    its multiplier rows ``[shard * kb_shard, (shard + 1) * kb_shard)`` and the row factors."""
    rows = jax.lax.dynamic_slice_in_dim(scales, shard * kb_shard, kb_shard, axis=0)
    return jnp.concatenate([rows, scales[-ROW_FACTOR_PLANES:]], axis=0)


def _row_offsets(scales, name):
    """Per-row exponent offset ``off`` and NaN flag (marlin_layout.h, "Scale mapping")."""
    nan_block = scales == formats.E8M0_NAN
    smax = jnp.max(jnp.where(nan_block, -1, scales), axis=1)
    smax = jnp.where(smax < 0, formats.E8M0_BIAS, smax)
    off = jnp.maximum(smax - 128, 0) if name == "bfloat16" else smax - 128
    return off, jnp.any(nan_block, axis=1), nan_block


def prepare_marlin_weights(w_packed, w_scales, dtype):
    """Repacks canonical MXFP4 weights into the Marlin layout (jnp; run once).

    Args:
      w_packed: ``uint8[N, K/2]`` E2M1 codes, element 2i in the low nibble.
      w_scales: ``uint8[N, K/32]`` E8M0 bytes in the ``linear`` scale layout
        (unswizzle a ``swizzled_128x4`` tensor with ``jax_mxfp4.layout`` first).
      dtype: the activation dtype the kernel will run with, ``jnp.bfloat16`` or
        ``jnp.float16`` (the scales are mapped differently for each).

    Returns:
      ``(tiles uint8[Kb, N_pad*16], scales uint8[Kb+4, N_pad], MarlinLayout)``.
      See csrc/marlin/marlin_layout.h for the byte-level specification and the
      accuracy contract.
    """
    w_packed = jnp.asarray(w_packed)
    w_scales = jnp.asarray(w_scales)
    if w_packed.ndim != 2 or jnp.dtype(w_packed.dtype) != jnp.uint8:
        raise ValueError(
            f"w_packed must be uint8[N, K/2]; got {w_packed.dtype}{list(w_packed.shape)}."
        )
    n, half_k = w_packed.shape
    layout = marlin_layout(n, 2 * half_k, dtype)
    expected = scale_shape(n, layout.k, ScaleLayout.LINEAR)
    if tuple(w_scales.shape) != expected or jnp.dtype(w_scales.dtype) != jnp.uint8:
        raise ValueError(
            f"w_scales must be linear uint8{list(expected)} for w_packed of shape "
            f"{list(w_packed.shape)} (N={n}, K={layout.k}); got {w_scales.dtype}{list(w_scales.shape)}. "
            "Unswizzle swizzled_128x4 scales with jax_mxfp4.layout.unswizzle_scales first."
        )
    tiles, scales = _prepare_arrays(w_packed, w_scales, layout.dtype)
    return tiles, scales, layout


@functools.partial(jax.jit, static_argnames=("name",))
def _prepare_arrays(w_packed, w_scales, name):
    """jit-compiled body of prepare_marlin_weights: one XLA program, so the
    32 bit-placement terms fuse instead of materializing N*K*4-byte arrays."""
    n, half_k = w_packed.shape
    layout = MarlinLayout(n, 2 * half_k, name)
    kb, n_pad = layout.kb, layout.n_pad
    units = n_pad // UNIT_N

    # ---- tiles: codes -> [Kb, unit, g, t, j, s, h, e] -> bit-placed words ----
    codes = formats.unpack_nibbles(w_packed)  # [N, K]
    codes = jnp.pad(codes, ((0, n_pad - n), (0, 0)))
    # n = 32 unit + 8 j + g;  k = 32 kb + 16 s + 8 h + 2 t + e
    c = codes.reshape(units, 4, 8, kb, 2, 2, 4, 2)  # unit, j, g, kb, s, h, t, e
    c = c.transpose(3, 0, 2, 6, 1, 4, 5, 7)  # kb, unit, g, t, j, s, h, e
    c = c.reshape(kb, units, 32, 4, 4, 2).astype(jnp.uint32)  # ..., lane, j, p, e
    src = source_bit_table(jnp.dtype(name))
    words = jnp.zeros(c.shape[:4], jnp.uint32)
    for p in range(4):
        for e in range(2):
            for b in range(4):
                words = words | (((c[..., p, e] >> b) & 1) << int(src[p, e, b]))
    word_bytes = jnp.stack([(words >> (8 * i)) & 0xFF for i in range(4)], axis=-1)
    tiles = word_bytes.astype(jnp.uint8).reshape(layout.tiles_shape)

    # ---- scales: multiplier bytes (unit-permuted) + row-factor planes ----
    s = w_scales.astype(jnp.int32)
    off, nan_row, nan_block = _row_offsets(s, name)
    if name == "bfloat16":
        e = s + 126 - off[:, None]
        mult = jnp.where(e < 1, 0, e)
    else:
        e = s - 98 - off[:, None]
        mult = jnp.where(e < 1, 0, e << 2)
    mult = jnp.where(nan_block, NAN_MULTIPLIER_BYTE[name], mult)
    mult = jnp.pad(mult, ((0, n_pad - n), (0, 0)))  # [N_pad, Kb]
    # column 32 unit + 4 g + j holds n = 32 unit + 8 j + g
    mult = mult.reshape(units, 4, 8, kb).transpose(3, 0, 2, 1).reshape(kb, n_pad)
    # float32 bits of 2**off, built with integers (exact under flush-to-zero);
    # off in [-128, 126], 2**-127 and 2**-128 are float32 subnormals.
    factor = jnp.where(
        off >= -126,
        jnp.clip(off + 127, 0, 255).astype(jnp.uint32) << 23,
        jnp.uint32(0x00400000) >> jnp.clip(-127 - off, 0, 31).astype(jnp.uint32),
    )
    # NaN rows: a quiet NaN whose payload keeps off (+128) for unprepare.
    nan_bits = jnp.uint32(0x7FC00000) | jnp.clip(off + 128, 0, 255).astype(jnp.uint32)
    factor = jnp.where(nan_row, nan_bits, factor)
    factor = jnp.pad(factor, (0, n_pad - n))
    planes = jnp.stack([(factor >> (8 * i)) & 0xFF for i in range(ROW_FACTOR_PLANES)], axis=0)
    scales = jnp.concatenate([mult, planes.astype(jnp.int32)], axis=0).astype(jnp.uint8)
    return tiles, scales


def unprepare_marlin_weights(tiles, scales, layout: MarlinLayout):
    """Inverse of ``prepare_marlin_weights`` (jnp, jit-able).

    Returns ``(w_packed uint8[N, K/2], w_scales uint8[N, K/32])``. Codes always
    round-trip exactly. Scale bytes round-trip exactly except for blocks the
    accuracy contract flushes to zero (far below their row's largest scale):
    those come back as 0, which is also what the kernel computes with. Used by
    the Marlin kernel's large-M path (dequantize, then a dense GEMM) and by
    the tests.
    """
    if tuple(tiles.shape) != layout.tiles_shape or tuple(scales.shape) != layout.scales_shape:
        raise ValueError(
            f"shapes {tuple(tiles.shape)}, {tuple(scales.shape)} do not match the prepared layout "
            f"{layout.tiles_shape}, {layout.scales_shape} of N={layout.n}, K={layout.k}"
        )
    return _unprepare_arrays(jnp.asarray(tiles), jnp.asarray(scales), layout)


@functools.partial(jax.jit, static_argnames=("layout",))
def _unprepare_arrays(tiles, scales, layout: MarlinLayout):
    n, kb, n_pad, name = layout.n, layout.kb, layout.n_pad, layout.dtype
    units = n_pad // UNIT_N
    b4 = tiles.reshape(kb, units, 32, 4, 4).astype(jnp.uint32)
    words = b4[..., 0] | (b4[..., 1] << 8) | (b4[..., 2] << 16) | (b4[..., 3] << 24)
    src = source_bit_table(jnp.dtype(name))
    fields = []
    for p in range(4):
        for e in range(2):
            code = jnp.zeros(words.shape, jnp.uint32)
            for b in range(4):
                code = code | (((words >> int(src[p, e, b])) & 1) << b)
            fields.append(code)
    c = jnp.stack(fields, axis=-1).reshape(*words.shape, 4, 2)  # kb, unit, lane, j, p, e
    c = c.reshape(kb, units, 8, 4, 4, 2, 2, 2)  # kb, unit, g, t, j, s, h, e
    codes = c.transpose(1, 4, 2, 0, 5, 6, 3, 7).reshape(n_pad, layout.k)[:n].astype(jnp.uint8)
    w_packed = formats.pack_nibbles(codes)

    mult = scales[:kb].reshape(kb, units, 8, 4).transpose(1, 3, 2, 0).reshape(n_pad, kb)[:n]
    planes = scales[kb:].astype(jnp.uint32)
    factor = (planes[0] | (planes[1] << 8) | (planes[2] << 16) | (planes[3] << 24))[:n]
    exp_field = ((factor >> 23) & 0xFF).astype(jnp.int32)
    off = jnp.where(exp_field > 0, exp_field - 127, 0)
    off = jnp.where(factor == 0x00400000, -127, off)
    off = jnp.where(factor == 0x00200000, -128, off)
    off = jnp.where(exp_field == 0xFF, (factor & 0xFF).astype(jnp.int32) - 128, off)  # NaN rows
    m = mult.astype(jnp.int32)
    if name == "bfloat16":
        s = m - 126 + off[:, None]
    else:
        s = (m >> 2) + 98 + off[:, None]
    s = jnp.where(m == 0, 0, s)
    s = jnp.where(m == NAN_MULTIPLIER_BYTE[name], formats.E8M0_NAN, s)
    return w_packed, s.astype(jnp.uint8)
