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
"""

from jax_mxfp4.checkpoint.compressed_tensors import (
    CheckpointError,
    CompressedTensorsCheckpoint,
    LoadReport,
    MXFP4_FORMAT,
    Mxfp4Layer,
    checkpoint_from_model,
    load_compressed_tensors,
    load_params,
    quantization_config,
    save_compressed_tensors,
    swap_arguments,
)

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
