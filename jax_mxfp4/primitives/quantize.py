"""The ``mxfp4_quantize`` primitive: x[..., K] -> (packed E2M1, E8M0 scales).

Lowers to ``csrc/ffi_cpu.cc`` on CPU and ``csrc/quantize.cu`` on CUDA; other
platforms lower the pure-jnp reference (``reference.quantize_reference``).

Sharding (``partition``, ``sharding_rule``; the mechanism is in ``base``).
Quantization is blockwise along K, so every split that keeps whole blocks is
local, with no communication:

* linear scales: any split of the leading (token) dims; K split in whole
  32-element blocks (packed shards of 16*j bytes, scale shards of j bytes).
* swizzled_128x4 scales: the scale buffer is ONE padded 2-D buffer over all
  rows, not one per shard. Local buffers concatenate into the global one only
  when each holds whole 128-row tiles with no padding, so tokens may be split
  only over one leading dim (all dims before it of size 1) and only when a
  shard holds a multiple of 128 rows; otherwise padding rows would land in
  the middle of the global buffer. K may be split only in whole 4-column
  tiles (a multiple of 128 elements per shard) and only while a shard's
  rows fit one 128-row tile (M <= 128 per shard, e.g. decode): a K shard's
  tiles are then one contiguous band of ``128 / shards`` buffer rows. With
  more rows they interleave with other shards' tiles, which no sharding of a
  2-D buffer can express. The buffer then comes out split along its rows,
  over the token axes (whole row tiles) and then the K axes (bands). Splits
  that break these rules are dropped (x is gathered along them) with a
  ``ShardingWarning`` saying why.
  A row-parallel consumer wants each device's *local* buffer: with at most
  128 rows the K bands above are exactly that (the K-split SM100 GEMM reads
  them as they are); with more rows the buffer is whole along K and the
  consumer takes its K tiles (``sm100_gemm.k_shard_swizzled``), while x is
  gathered along K here (quantizing inside the consumer's per-shard body, or
  under ``shard_map``, avoids that).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import core, lax

from jax_mxfp4 import layout, reference, sharding, validation
from jax_mxfp4.formats import BLOCK_SIZE, Rounding, parse_rounding
from jax_mxfp4.layout import SWIZZLE_COLS, SWIZZLE_ROWS, ScaleLayout, parse_scale_layout
from jax_mxfp4.primitives.base import FfiPrimitive, Partition, register_primitive

__all__ = ["QuantizePrimitive", "quantize", "swizzled_token_split"]


def _output_shapes(x_shape, scale_layout: ScaleLayout):
    k = x_shape[-1]
    rows = int(np.prod(x_shape[:-1], dtype=np.int64))
    packed = (*x_shape[:-1], k // 2)
    if scale_layout == ScaleLayout.LINEAR:
        scales = (*x_shape[:-1], k // 32)
    else:
        scales = layout.scale_shape(rows, k, scale_layout)
    return packed, scales


@register_primitive
class QuantizePrimitive(FfiPrimitive):
    name = "mxfp4_quantize"
    target = "jax_mxfp4_quantize"
    platforms = ("cpu", "cuda")
    multiple_results = True
    operand_names = ("x",)

    @classmethod
    def abstract_eval(cls, x, *, scale_layout: ScaleLayout, rounding: Rounding):
        validation.check_activations(x)
        packed, scales = _output_shapes(x.shape, scale_layout)
        return core.ShapedArray(packed, jnp.uint8), core.ShapedArray(scales, jnp.uint8)

    @classmethod
    def ffi_attributes(cls, *, scale_layout: ScaleLayout, rounding: Rounding):
        return {"scale_layout": np.int32(scale_layout), "rounding": np.int32(rounding)}

    @staticmethod
    def fallback(x, *, scale_layout, rounding):
        return reference.quantize_reference(x, scale_layout=scale_layout, rounding=rounding)

    @classmethod
    def batch(cls, args, dims, *, scale_layout, rounding):
        (x,), (d,) = args, dims
        x = jnp.moveaxis(x, d, 0)
        if scale_layout == ScaleLayout.LINEAR:
            # The batch axis is one more leading axis of x.
            return cls.bind(x, scale_layout=scale_layout, rounding=rounding), (0, 0)
        # Swizzled scales are one padded 2-D buffer per call: quantize each
        # batch element on its own so each gets its own padded buffer.
        out = lax.map(lambda xi: tuple(cls.bind(xi, scale_layout=scale_layout, rounding=rounding)), x)
        return out, (0, 0)

    @classmethod
    def sharding_rule(cls, mesh, in_shapes, out_shapes, *, scale_layout, rounding):
        shape = tuple(in_shapes[0])
        if scale_layout == ScaleLayout.LINEAR:
            # K = k blocks of 32 elements = 16 packed bytes = 1 scale byte.
            kb = shape[-1] // BLOCK_SIZE
            rb = sharding.RuleBuilder()
            x, packed = rb.dim(("k", kb), ("b", BLOCK_SIZE)), rb.dim(("k", kb), ("h", BLOCK_SIZE // 2))
            return f"... {x} -> ... {packed}, ... {rb.dim(('k', kb))}", rb.sizes()
        return _swizzled_rule(mesh, shape)

    @classmethod
    def partition(cls, mesh, args, *, scale_layout, rounding):
        (x,) = args
        if scale_layout == ScaleLayout.LINEAR:
            return _partition_linear(mesh, x)
        return _partition_swizzled(mesh, x, scale_layout, rounding)


def _swizzled_rule(mesh, shape):
    """Shardy rule for swizzled quantize: which splits of x carry over to the scale buffer.

    Buffer rows are x's folded token dims padded to 128, so when the last
    token dim is a multiple of 128, buffer rows are the compound (token
    dims..., row tile, row in tile) and token splits carry over. Within a
    row tile, K's T = K/128 tiles of 4 scale columns are bands of 128/T rows
    when T divides 128, so "row in tile" is (K tile, band) and K splits carry
    over too; with at most 128 rows that holds for the one row tile.
    Otherwise the buffer's factors are its own, and it comes out however XLA
    reshards it. (What runs is partition()'s decision, under the rules in the
    module docstring; the rule only guides propagation.)
    """
    lead, k = shape[:-1], shape[-1]
    rows, kb = int(np.prod(lead, dtype=np.int64)), k // BLOCK_SIZE
    tile_k = SWIZZLE_COLS * BLOCK_SIZE
    tiles = kb // SWIZZLE_COLS
    bands = kb % SWIZZLE_COLS == 0 and SWIZZLE_ROWS % tiles == 0
    row_tiles = bool(lead) and lead[-1] % SWIZZLE_ROWS == 0
    rb = sharding.RuleBuilder()
    if bands:
        x_k, packed_k = rb.dim(("t", tiles), ("w", tile_k)), rb.dim(("t", tiles), ("v", tile_k // 2))
        in_tile = (("t", tiles), ("q", SWIZZLE_ROWS // tiles))
    else:
        x_k, packed_k = rb.dim(("k", kb), ("b", BLOCK_SIZE)), rb.dim(("k", kb), ("h", BLOCK_SIZE // 2))
        in_tile = (("rr", SWIZZLE_ROWS),)
    if row_tiles:
        names = [f"m{i}" for i in range(len(lead) - 1)]
        mt = lead[-1] // SWIZZLE_ROWS
        x_lead = " ".join([*(rb.dim((n, d)) for n, d in zip(names, lead[:-1])),
                           rb.dim(("mt", mt), ("r", SWIZZLE_ROWS))])
        buf_rows = rb.dim(*zip(names, lead[:-1]), ("mt", mt), *in_tile)
        return f"{x_lead} {x_k} -> {x_lead} {packed_k}, {buf_rows} c", rb.sizes()
    if bands and rows <= SWIZZLE_ROWS:
        return f"... {x_k} -> ... {packed_k}, {rb.dim(*in_tile)} c", rb.sizes()
    return f"... {x_k} -> ... {packed_k}, r c", rb.sizes()


def _partition_linear(mesh, x):
    dims = sharding.spec_axes(x.sharding, len(x.shape))
    k = int(x.shape[-1])
    notes = []
    k_axes = sharding.dividing_prefix(mesh, dims[-1], k, BLOCK_SIZE)
    if k_axes != dims[-1]:
        notes.append(f"K={k} split over mesh axes {dims[-1]} does not give whole {BLOCK_SIZE}-element blocks "
                     f"per shard; K is split over {k_axes or 'none'}.")
    lead = []
    for d, axes in enumerate(dims[:-1]):
        kept = sharding.dividing_prefix(mesh, axes, int(x.shape[d]))
        if kept != axes:
            notes.append(f"x's dim {d} (size {x.shape[d]}) does not split evenly over mesh axes {axes}.")
        lead.append(kept)
    spec = sharding.to_spec((*lead, k_axes))
    return Partition((spec,), (spec, spec), None, tuple(notes))


def swizzled_token_split(mesh, shape, dims):
    """How the token (leading) dims of an operand with a swizzled scale buffer may split.

    ``shape``/``dims``: the operand's shape and mesh axes per dim (last = K).
    Returns ``(lead, m_axes, notes)``: the kept axes per leading dim, the axes
    the buffer's rows split over (whole 128-row tiles), and why requested
    splits were dropped (see the module docstring). Shared with the SM100
    GEMM's rule, whose activation scales are this buffer.
    """
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    notes = []
    # Tokens: one leading dim, everything before it of size 1, whole tiles.
    lead: list[tuple[str, ...]] = [()] * (len(shape) - 1)
    m_axes: tuple[str, ...] = ()
    for d, axes in enumerate(dims[:-1]):
        if not axes:
            continue
        if m_axes or any(n != 1 for n in shape[:d]):
            notes.append(f"swizzled scales: x's dim {d} over mesh axes {axes} would interleave the rows of "
                         "different shards in the scale buffer; only the outermost non-trivial token dim "
                         "may be split.")
            continue
        kept = sharding.dividing_prefix(mesh, axes, shape[d])
        while kept and (rows // sharding.axes_size(mesh, kept)) % SWIZZLE_ROWS:
            kept = kept[:-1]
        if kept != axes:
            notes.append(f"swizzled scales: {rows} rows split over mesh axes {axes} give "
                         f"{rows / sharding.axes_size(mesh, axes):g} rows per shard, not a multiple of "
                         f"{SWIZZLE_ROWS}, so local scale buffers would not concatenate into the global one; "
                         f"rows are split over {kept or 'none'}.")
        lead[d], m_axes = kept, kept
    return lead, m_axes, notes


def _partition_swizzled(mesh, x, scale_layout, rounding):
    dims = sharding.spec_axes(x.sharding, len(x.shape))
    shape = tuple(int(d) for d in x.shape)
    k, rows = shape[-1], int(np.prod(shape[:-1], dtype=np.int64))
    lead, m_axes, notes = swizzled_token_split(mesh, shape, dims)
    local_rows = rows // sharding.axes_size(mesh, m_axes)
    # K: whole 4-column tiles per shard, and one row tile per shard.
    tile_k = SWIZZLE_COLS * BLOCK_SIZE
    k_axes = sharding.dividing_prefix(mesh, dims[-1], k, tile_k, exclude=m_axes)
    while k_axes and SWIZZLE_ROWS % sharding.axes_size(mesh, k_axes):
        k_axes = k_axes[:-1]
    if k_axes and local_rows > SWIZZLE_ROWS:
        k_axes = ()
    if k_axes != dims[-1]:
        notes.append(f"swizzled scales: K={k} may be split only into shards of whole {tile_k}-element tiles "
                     f"(4 scale columns), and only while a shard has at most {SWIZZLE_ROWS} rows "
                     f"(it has {local_rows}); K is split over {k_axes or 'none'}.")
    x_spec = sharding.to_spec((*lead, k_axes))
    scales_spec = sharding.to_spec(((*m_axes, *k_axes), ()))
    local = None
    if k_axes:
        band = SWIZZLE_ROWS // sharding.axes_size(mesh, k_axes)

        def local(xl):
            packed, scales = QuantizePrimitive.inner_primitive.bind(
                xl, scale_layout=scale_layout, rounding=rounding)
            # [128, Kb/P] local tiles == a band of 128/P rows of the [128, Kb] global tile.
            return packed, scales.reshape(band, -1)

    return Partition((x_spec,), (x_spec, scales_spec), local, tuple(notes))


def quantize(x, *, scale_layout="linear", rounding="floor"):
    """Binds ``mxfp4_quantize`` after validating the arguments (trace-time ValueErrors)."""
    scale_layout = parse_scale_layout(scale_layout)
    rounding = parse_rounding(rounding)
    validation.check_activations(x)
    packed, scales = QuantizePrimitive.bind(x, scale_layout=scale_layout, rounding=rounding)
    return packed, scales
