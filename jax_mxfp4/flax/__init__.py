"""Flax layers with MXFP4 weights, module swap, and prepare-once.

Layers (params named as in compressed-tensors checkpoints: ``weight_packed
uint8[N, K/2]``, ``weight_scale uint8[N, K/32]``, ``bias[N]``):

* ``MxFp4Dense``: linen, the arguments and call of ``nn.Dense``.
* ``MxFp4Linear``: nnx, the arguments and call of ``nnx.Linear``.

Module swap (choose layers like compressed-tensors' ``targets``/``ignore``):

* ``quantize_nnx(model, targets=..., ignore=...)``: in-place graph surgery.
* ``quantize_linen(model, variables, *sample_inputs, ...)`` ->
  ``(SwappedLinen, variables, SwapReport)``, via ``nn.intercept_methods``.
* ``quantize_model``: either, by model type.

Prepare once (kernel-specific weight layout, e.g. Marlin's repack, computed
at load, never per call):

* linen: ``variables, report = prepare(model, variables, *sample_inputs)``
  adds the ``mxfp4_prepared`` collection; ``model.apply(variables, x)`` then
  calls ``jax_mxfp4.mxfp4_linear(x, prepared, bias)`` in each layer.
* nnx: ``report = prepare(model, input_dtype)`` gives each ``MxFp4Linear`` a
  ``MxFp4Prepared`` variable, in place.

Typical flow (nnx)::

    report = jax_mxfp4.flax.quantize_model(model, targets=["Linear"], ignore=["lm_head"])
    print(jax_mxfp4.flax.prepare(model, jnp.bfloat16))   # kernel per layer, and why
    y = nnx.jit(lambda m, x: m(x))(model, x)
"""

from flax import nnx as _nnx

from jax_mxfp4.flax import linen as _linen_mod
from jax_mxfp4.flax import nnx as _nnx_mod
from jax_mxfp4.flax._common import DEFAULT_ROUNDING, LayerOptions
from jax_mxfp4.flax.linen import PREPARED_COLLECTION, MxFp4Dense, PreparedLayer, PrepareReport, canonical_params
from jax_mxfp4.flax.nnx import MxFp4Linear, MxFp4Prepared
from jax_mxfp4.flax.swap import (
    LayerRecord,
    SwappedLinen,
    SwapReport,
    match_layer,
    match_name,
    quantize_linen,
    quantize_model,
    quantize_nnx,
    swap_linen,
)


def prepare(model, *args, **kwargs):
    """Prepares a model's MXFP4 layers for their kernels, once.

    * nnx: ``prepare(model, input_dtype=None, *, tokens=None, kernel_name=None,
      keep_canonical=False) -> PrepareReport`` (in place; see
      ``MxFp4Linear.prepare``).
    * linen (``nn.Module`` or ``SwappedLinen``): ``prepare(model, variables,
      *sample_inputs, method=None, kernel_name=None, keep_canonical=False,
      **sample_kwargs) -> (variables, PrepareReport)`` (see
      ``jax_mxfp4.flax.linen.prepare``).
    """
    if isinstance(model, _nnx.Module):
        return _nnx_mod.prepare(model, *args, **kwargs)
    return _linen_mod.prepare(model, *args, **kwargs)


__all__ = [
    "DEFAULT_ROUNDING",
    "LayerOptions",
    "LayerRecord",
    "MxFp4Dense",
    "MxFp4Linear",
    "MxFp4Prepared",
    "PREPARED_COLLECTION",
    "PrepareReport",
    "PreparedLayer",
    "SwapReport",
    "SwappedLinen",
    "canonical_params",
    "match_layer",
    "match_name",
    "prepare",
    "quantize_linen",
    "quantize_model",
    "quantize_nnx",
    "swap_linen",
]
