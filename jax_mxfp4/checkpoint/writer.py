"""Writing a checkpoint folder: ``save_compressed_tensors``."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import jax
import numpy as np
from tqdm.auto import tqdm

import jax_mxfp4
from jax_mxfp4.checkpoint.config import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, CheckpointError

if TYPE_CHECKING:
    from jax_mxfp4.checkpoint.model import CompressedTensorsCheckpoint

__all__ = ["save_compressed_tensors"]


def _host(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(a)))


def _checkpoint_arrays(checkpoint: CompressedTensorsCheckpoint) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, layer in checkpoint.layers.items():
        packed, scales = _host(layer.packed), _host(layer.scales)
        try:
            jax_mxfp4.validation.check_linear_weights(packed, scales)
        except ValueError as e:
            raise CheckpointError(f"layer {name!r}: {e}") from e
        out[f"{name}.weight_packed"] = packed
        out[f"{name}.weight_scale"] = scales
        if layer.bias is not None:
            out[f"{name}.bias"] = _host(layer.bias)
    for name, value in checkpoint.tensors.items():
        if name in out:
            raise CheckpointError(f"tensor {name!r} is both an MXFP4 layer part and a plain tensor.")
        out[name] = _host(value)
    return out


def save_compressed_tensors(checkpoint: CompressedTensorsCheckpoint, path, *, max_shard_size: int | None = None,
                            progress: bool = True) -> None:
    """Writes ``checkpoint`` as a compressed-tensors folder the library (and vLLM) reads.

    ``config.json`` is ``checkpoint.config`` written as the library writes it
    (``indent=2, sort_keys=True``); tensors go to ``model.safetensors``, or,
    with ``max_shard_size`` (bytes), to ``model-0000i-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json``.
    """
    from safetensors.numpy import save_file

    if "quantization_config" not in checkpoint.config:
        raise CheckpointError("checkpoint.config has no 'quantization_config'; build the checkpoint with "
                              "checkpoint_from_model or load_compressed_tensors.")
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    arrays = _checkpoint_arrays(checkpoint)
    shards = _plan_shards(arrays, max_shard_size)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(checkpoint.config, f, indent=2, sort_keys=True)
    for stale in (SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    bar = tqdm(total=len(shards), desc=f"saving {os.path.basename(os.path.abspath(folder))}", unit="file",
               disable=not progress)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: arrays[n] for n in shard}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
        bar.update(1)
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in arrays.values()))},
                 "weight_map": weight_map}
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def _plan_shards(arrays: dict[str, np.ndarray], max_shard_size: int | None) -> list[list[str]]:
    """Tensor names, sorted, cut into shards of at most ``max_shard_size`` bytes (a larger tensor alone;
    one shard if None)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(arrays):
        nbytes = arrays[name].nbytes
        if max_shard_size and shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
