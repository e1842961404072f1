"""Checkpoints: compressed-tensors MXFP4 (llm-compressor's format, served by vLLM).

* ``load_compressed_tensors(path) -> CompressedTensorsCheckpoint``
* ``save_compressed_tensors(checkpoint, path)``
* ``checkpoint_from_model(model, variables=None, ...)`` (also
  ``CompressedTensorsCheckpoint.from_flax``)
* ``load_params(checkpoint, target)``: a checkpoint into a (swapped) Flax model;
  ``swap_arguments(checkpoint)``: the swap that matches it.

Typical flow::

    ckpt = load_compressed_tensors("llama-mxfp4/")
    quantize_nnx(model, **swap_arguments(ckpt))   # the checkpoint's layers and scheme
    load_params(ckpt, model)                      # weights in place (name mapping inferred)

Modules: ``config`` (the format: file names, ``quantization_config``,
validation, ``CheckpointError``), ``model`` (``CompressedTensorsCheckpoint``,
``Mxfp4Layer``), ``reader`` / ``writer`` (safetensors folders), ``to_flax``
(``load_params``, ``swap_arguments``) and ``from_flax``
(``checkpoint_from_model``). ``compressed_tensors`` re-exports this API under
its former module path.
"""

from jax_mxfp4.checkpoint.config import MXFP4_FORMAT, CheckpointError, quantization_config
from jax_mxfp4.checkpoint.from_flax import checkpoint_from_model
from jax_mxfp4.checkpoint.model import CompressedTensorsCheckpoint, Mxfp4Layer
from jax_mxfp4.checkpoint.reader import load_compressed_tensors
from jax_mxfp4.checkpoint.to_flax import LoadReport, load_params, swap_arguments
from jax_mxfp4.checkpoint.writer import save_compressed_tensors

__all__ = [
    "CheckpointError",
    "CompressedTensorsCheckpoint",
    "LoadReport",
    "MXFP4_FORMAT",
    "Mxfp4Layer",
    "checkpoint_from_model",
    "load_compressed_tensors",
    "load_params",
    "quantization_config",
    "save_compressed_tensors",
    "swap_arguments",
]
