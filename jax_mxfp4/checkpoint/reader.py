"""Reading a checkpoint folder: ``load_compressed_tensors``.

Two passes over the safetensors files: the headers first (every tensor's name,
dtype and shape validated against the format before any data is read), then
the tensors, streamed one at a time into host numpy arrays.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tqdm.auto import tqdm

from jax_mxfp4.checkpoint.config import (CONFIG_FILE, INDEX_FILE, SINGLE_FILE, CheckpointError, _group_for,
                                         _Group, _match_name, _parse_quantization_config)
from jax_mxfp4.checkpoint.model import CompressedTensorsCheckpoint, Mxfp4Layer
from jax_mxfp4.formats import BLOCK_SIZE, E8M0_NAN

__all__ = ["load_compressed_tensors"]

#: Tensor name -> (file, dtype name, shape), from the safetensors headers.
_Headers = dict[str, tuple[str, str, tuple[int, ...]]]


def _safe_open(file: str):
    from safetensors import safe_open

    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({e}). It is truncated or corrupt: download or save it "
            "again.") from e


_ST_DTYPES = {"U8": "uint8", "I8": "int8", "BF16": "bfloat16", "F16": "float16", "F32": "float32",
              "F64": "float64", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


def _tensor_files(folder: str) -> dict[str, list[str] | None]:
    """{file: [tensor names]} from the index (sharded) or the single file."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e}); it needs a "
                                  "'weight_map' of tensor name -> shard file.") from e
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(folder, shard), []).append(name)
        for file in files:
            if not os.path.exists(file):
                raise CheckpointError(f"{index_path} lists shard {os.path.basename(file)!r}, which is missing "
                                      f"from {folder}; copy the complete checkpoint.")
        return files
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single):
        return {single: None}
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(found) == 1:
        return {os.path.join(folder, found[0]): None}
    raise CheckpointError(
        f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}" + (f" (found {found}: sharded files need the index)"
                                                               if found else "") + ".")


def load_compressed_tensors(path, *, progress: bool = True) -> CompressedTensorsCheckpoint:
    """Reads a compressed-tensors MXFP4 checkpoint folder.

    Validates ``config.json``'s ``quantization_config`` and every tensor's
    name, dtype and shape from the safetensors headers first, then reads the
    tensors one at a time (``safe_open``; a tqdm bar shows progress) into
    host numpy arrays. Raises ``CheckpointError`` on anything it cannot load
    exactly.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected a directory with {CONFIG_FILE} "
                              "and safetensors files).")
    config_path = os.path.join(folder, CONFIG_FILE)
    config = _read_config(config_path)
    groups, ignore = _parse_quantization_config(config, config_path)

    # Pass 1: headers only (names, dtypes, shapes).
    headers = _read_headers(_tensor_files(folder))
    modules = sorted({k.rsplit(".", 1)[0] for k in headers
                      if k.endswith(".weight_packed") or k.endswith(".weight_scale")})
    layer_groups = {m: _check_layer_headers(m, headers, groups, ignore, config_path) for m in modules}

    # Pass 2: read, one tensor at a time.
    layer_parts, tensors = _read_tensors(folder, headers, modules, progress)

    layers = {m: _assemble_layer(m, layer_parts[m], headers, layer_groups[m]) for m in modules}
    return CompressedTensorsCheckpoint(config, layers, tensors)


def _read_config(config_path: str) -> dict:
    try:
        with open(config_path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{config_path} is missing; a compressed-tensors checkpoint has a config.json "
                              "with its quantization_config.") from e
    except ValueError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}).") from e


def _read_headers(files: dict[str, list[str] | None]) -> _Headers:
    """Every tensor's (file, dtype, shape), checking each shard holds what the index lists."""
    headers: _Headers = {}
    for file, expected in files.items():
        with _safe_open(file) as f:
            keys = list(f.keys())
            if expected is not None:
                missing = sorted(set(expected) - set(keys))
                if missing:
                    raise CheckpointError(f"{file}: the index lists {missing[:3]} in this file, but it does not "
                                          "hold them; the shard is stale or the index is wrong.")
            for key in keys:
                sl = f.get_slice(key)
                dtype = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                headers[key] = (file, dtype, tuple(int(d) for d in sl.get_shape()))
    return headers


def _check_layer_headers(m: str, headers: _Headers, groups: list[_Group], ignore: list[str],
                         config_path: str) -> _Group:
    """Validates MXFP4 layer ``m``'s tensors from their headers; returns its config group."""
    packed_name, scale_name = f"{m}.weight_packed", f"{m}.weight_scale"
    for have, need in ((packed_name, scale_name), (scale_name, packed_name)):
        if have in headers and need not in headers:
            raise CheckpointError(
                f"{headers[have][0]}: {have!r} has no matching {need!r} in the checkpoint; an MXFP4 layer "
                "needs both. The checkpoint is incomplete: save it again.")
    if f"{m}.weight" in headers:
        raise CheckpointError(f"{headers[f'{m}.weight'][0]}: layer {m!r} stores both a dense 'weight' and "
                              "'weight_packed'; the checkpoint is inconsistent.")
    for suffix in ("weight_global_scale", "input_global_scale"):
        if f"{m}.{suffix}" in headers:
            raise CheckpointError(f"{headers[f'{m}.{suffix}'][0]}: {m}.{suffix} is an NVFP4 global scale; "
                                  "MXFP4 has none. This checkpoint is not MXFP4.")
    pfile, pdtype, pshape = headers[packed_name]
    sfile, sdtype, sshape = headers[scale_name]
    if pdtype != "uint8" or len(pshape) != 2:
        raise CheckpointError(f"{pfile}: {packed_name} is {pdtype}{list(pshape)}; it must be uint8[N, K/2] "
                              "(two E2M1 codes per byte).")
    if sdtype != "uint8" or len(sshape) != 2:
        raise CheckpointError(f"{sfile}: {scale_name} is {sdtype}{list(sshape)}; it must be uint8[N, K/32] "
                              "(E8M0 exponent bytes, one per 32 weights).")
    n, k = pshape[0], pshape[1] * 2
    if k % BLOCK_SIZE:
        raise CheckpointError(f"{pfile}: {packed_name} has shape {list(pshape)}, i.e. K={k}, not a multiple "
                              f"of {BLOCK_SIZE}; MXFP4 rows are whole 32-element groups.")
    if sshape != (n, k // BLOCK_SIZE):
        raise CheckpointError(
            f"{sfile}: {scale_name} has shape {list(sshape)}, but {packed_name} {list(pshape)} needs "
            f"[{n}, {k // BLOCK_SIZE}] (one scale per 32 of K={k}, linear layout, no padding).")
    bias_name = f"{m}.bias"
    if bias_name in headers and headers[bias_name][2] != (n,):
        raise CheckpointError(f"{headers[bias_name][0]}: {bias_name} has shape {list(headers[bias_name][2])}; "
                              f"the layer has N={n} outputs.")
    for ign in ignore:
        if _match_name(m, ign):
            raise CheckpointError(f"{pfile}: {packed_name} is stored packed but quantization_config.ignore "
                                  f"entry {ign!r} excludes layer {m!r}; the config and tensors disagree.")
    return _group_for(m, groups, config_path)


def _read_tensors(folder: str, headers: _Headers, modules: list[str], progress: bool):
    """Reads every tensor, file by file: ``({layer: {part: array}}, {other tensor name: array})``."""
    layer_parts: dict[str, dict[str, np.ndarray]] = {m: {} for m in modules}
    tensors: dict[str, np.ndarray] = {}
    order = sorted(headers, key=lambda k: (headers[k][0], k))
    bar = tqdm(total=len(order), desc=f"loading {os.path.basename(os.path.abspath(folder))}", unit="tensor",
               disable=not progress)
    current_file, handle = None, None
    try:
        for key in order:
            file = headers[key][0]
            if file != current_file:
                if handle is not None:
                    handle.__exit__(None, None, None)
                handle = _safe_open(file).__enter__()
                current_file = file
            try:
                value = handle.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{file}: reading tensor {key!r} failed ({e}); the file is corrupt: "
                                      "download or save it again.") from e
            module, _, leaf = key.rpartition(".")
            if module in layer_parts and leaf in ("weight_packed", "weight_scale", "bias"):
                layer_parts[module][leaf] = value
            elif module in layer_parts and leaf == "weight_zero_point":
                if np.any(np.asarray(value) != 0):
                    raise CheckpointError(f"{file}: {key} is nonzero; MXFP4 is symmetric (no zero point).")
            else:
                tensors[key] = value
            bar.update(1)
    finally:
        if handle is not None:
            handle.__exit__(None, None, None)
        bar.close()
    return layer_parts, tensors


def _assemble_layer(m: str, parts: dict[str, np.ndarray], headers: _Headers, group: _Group) -> Mxfp4Layer:
    scales = parts["weight_scale"]
    if np.any(scales == E8M0_NAN):
        rows = np.unique(np.nonzero(scales == E8M0_NAN)[0])[:5].tolist()
        raise CheckpointError(f"{headers[f'{m}.weight_scale'][0]}: {m}.weight_scale holds the E8M0 NaN byte "
                              f"0xFF (rows {rows}...); no valid MXFP4 writer emits it. The file is corrupt.")
    return Mxfp4Layer(m, parts["weight_packed"], scales, parts.get("bias"), group.activation_format)
