"""The ``mxfp4_quantize`` primitive: x[..., K] -> (packed E2M1, E8M0 scales).

Lowers to ``csrc/ffi_cpu.cc`` on CPU and ``csrc/quantize.cu`` on CUDA; other
platforms lower the pure-jnp reference (``reference.quantize_reference``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import core, lax

from jax_mxfp4 import layout, reference, validation
from jax_mxfp4.formats import Rounding, parse_rounding
from jax_mxfp4.layout import ScaleLayout, parse_scale_layout
from jax_mxfp4.primitives.base import FfiPrimitive, register_primitive

__all__ = ["QuantizePrimitive", "quantize"]


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


def quantize(x, *, scale_layout="linear", rounding="floor"):
    """Binds ``mxfp4_quantize`` after validating the arguments (trace-time ValueErrors)."""
    scale_layout = parse_scale_layout(scale_layout)
    rounding = parse_rounding(rounding)
    validation.check_activations(x)
    packed, scales = QuantizePrimitive.bind(x, scale_layout=scale_layout, rounding=rounding)
    return packed, scales
