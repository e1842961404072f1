"""jax_mxfp4: MXFP4 (OCP microscaling FP4) linear layers for JAX.

Public API:

* ``quantize_mxfp4``, ``dequantize_mxfp4``: activations/weights <-> MXFP4.
* ``swizzle_scales``, ``unswizzle_scales``, ``scale_shape``: scale layouts.
* ``mxfp4_matmul``: ``x @ dequantize(w).T`` with the best kernel.
* ``prepare_weights`` + ``mxfp4_linear``: prepare once, apply many times.
* ``jax_mxfp4.kernels``: the kernel interface, registry and selection.
* ``jax_mxfp4.reference``: the pure-jnp ground truth.
"""

from jax_mxfp4 import formats, kernels, layout, reference
from jax_mxfp4.formats import Rounding
from jax_mxfp4.kernels import KernelUnavailableError, PreparedWeights, select_kernel
from jax_mxfp4.layout import ScaleLayout, scale_shape, swizzle_scales, unswizzle_scales
from jax_mxfp4.ops import (
    dequantize_mxfp4,
    explain_selection,
    mxfp4_linear,
    mxfp4_matmul,
    prepare_weights,
    quantize_mxfp4,
)

__version__ = "0.1.0"

__all__ = [
    "KernelUnavailableError",
    "PreparedWeights",
    "Rounding",
    "ScaleLayout",
    "dequantize_mxfp4",
    "explain_selection",
    "formats",
    "kernels",
    "layout",
    "mxfp4_linear",
    "mxfp4_matmul",
    "prepare_weights",
    "quantize_mxfp4",
    "reference",
    "scale_shape",
    "select_kernel",
    "swizzle_scales",
    "unswizzle_scales",
]
