"""compressed-tensors MXFP4 checkpoints (llm-compressor's format, served by vLLM): load and save.

A checkpoint folder holds ``config.json`` whose ``quantization_config`` has
``format: "mxfp4-pack-quantized"`` (presets ``MXFP4A16``: weight-only, and
``MXFP4``: W4A4 with activations quantized on the fly), and safetensors
file(s) (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) where each quantized Linear ``<m>`` stores

* ``<m>.weight_packed``: ``uint8[N, K/2]``, E2M1 codes, element ``2i`` in the low nibble;
* ``<m>.weight_scale``: ``uint8[N, K/32]``, E8M0 bytes, linear layout (no padding);
* ``<m>.bias``: unchanged, if the layer has one;

and every other tensor (embeddings, norms, ignored layers such as ``lm_head``)
is stored unchanged. (Facts verified against compressed-tensors 0.20; see the
tests, which write checkpoints with the real library.)

* ``load_compressed_tensors(path)`` -> ``CompressedTensorsCheckpoint``
  (``.config``, ``.layers``, ``.tensors``), streaming one tensor at a time.
* ``save_compressed_tensors(checkpoint, path)`` writes the same format, with
  ``quantization_config`` exactly as ``ModelCompressor.update_config`` writes it.
* ``checkpoint_from_model(model, ...)`` builds a checkpoint from a quantized
  Flax model (nnx, or linen params); ``load_params(checkpoint, target)`` puts a
  checkpoint's weights into a (swapped) Flax model.

Every problem with the input is a ``CheckpointError`` (a ``ValueError``)
naming the tensor, the file and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jax_mxfp4
from jax_mxfp4.formats import BLOCK_SIZE, E8M0_NAN

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

MXFP4_FORMAT = "mxfp4-pack-quantized"
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: The compressed-tensors release whose output ``save_compressed_tensors`` reproduces.
FORMAT_VERSION = "0.20.0"

# Quantization args exactly as compressed-tensors 0.20 serializes the presets
# (QuantizationArgs' serializer drops unset fields such as observer/zp_dtype).
_WEIGHT_ARGS = {"dynamic": False, "group_size": 32, "num_bits": 4, "scale_dtype": "torch.uint8",
                "strategy": "group", "symmetric": True, "type": "float"}
_INPUT_ARGS = {**_WEIGHT_ARGS, "dynamic": True}


class CheckpointError(ValueError):
    """A checkpoint that jax_mxfp4 cannot load (or save) correctly; the message says why and the fix."""


# ---------------------------------------------------------------------------
# Data model


@dataclasses.dataclass
class Mxfp4Layer:
    """One MXFP4 linear layer of a checkpoint (host numpy arrays).

    Attributes:
      name: module name, e.g. ``model.layers.0.mlp.up_proj``.
      packed: ``uint8[N, K/2]`` (the file's ``weight_packed``).
      scales: ``uint8[N, K/32]`` (the file's ``weight_scale``).
      bias: ``[N]`` or None, in the checkpoint's dtype.
      activation_format: ``"mxfp4"`` when the scheme quantizes input
        activations (the W4A4 ``MXFP4`` preset), else None.
    """

    name: str
    packed: np.ndarray
    scales: np.ndarray
    bias: np.ndarray | None = None
    activation_format: str | None = None

    @property
    def out_features(self) -> int:
        return int(self.packed.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.packed.shape[1]) * 2

    def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
        """The weight ``[N, K]`` in ``dtype`` (exact for float32/bfloat16)."""
        return jax_mxfp4.dequantize_mxfp4(jnp.asarray(self.packed), jnp.asarray(self.scales), dtype=dtype)


@dataclasses.dataclass
class CompressedTensorsCheckpoint:
    """A compressed-tensors MXFP4 checkpoint in memory.

    Attributes:
      config: the parsed ``config.json`` (model config + ``quantization_config``).
      layers: MXFP4 layers by module name.
      tensors: every other tensor, under the checkpoint's names and dtypes.
    """

    config: dict
    layers: dict[str, Mxfp4Layer]
    tensors: dict[str, np.ndarray]

    @property
    def quantization_config(self) -> dict:
        return self.config["quantization_config"]

    @property
    def ignore(self) -> list[str]:
        return list(self.quantization_config.get("ignore") or [])

    def save(self, path, **kwargs) -> None:
        save_compressed_tensors(self, path, **kwargs)

    @classmethod
    def from_flax(cls, model, variables=None, **kwargs) -> "CompressedTensorsCheckpoint":
        """``checkpoint_from_model(model, variables, **kwargs)``."""
        return checkpoint_from_model(model, variables, **kwargs)

    def __repr__(self) -> str:
        w4a4 = sum(layer.activation_format == "mxfp4" for layer in self.layers.values())
        return (f"CompressedTensorsCheckpoint({len(self.layers)} MXFP4 layers ({w4a4} W4A4), "
                f"{len(self.tensors)} other tensors)")


# ---------------------------------------------------------------------------
# quantization_config


def quantization_config(activation_formats: Mapping[str, str | None], ignore: Iterable[str] = (),
                        version: str = FORMAT_VERSION) -> dict:
    """The ``quantization_config`` block compressed-tensors writes for these layers.

    One scheme for all layers gives the library's own output for the
    ``MXFP4A16`` / ``MXFP4`` presets (``targets: ["Linear"]``); mixed schemes
    get one group per scheme, targeting layers by name.
    """
    def group(w4a4: bool, targets):
        return {"format": MXFP4_FORMAT, "input_activations": dict(_INPUT_ARGS) if w4a4 else None,
                "output_activations": None, "targets": list(targets), "weights": dict(_WEIGHT_ARGS)}

    kinds = sorted({fmt == "mxfp4" for fmt in activation_formats.values()})
    if len(kinds) <= 1:
        groups = {"group_0": group(bool(kinds and kinds[0]), ["Linear"])}
    else:
        groups = {f"group_{i}": group(w4a4, sorted(n for n, f in activation_formats.items()
                                                  if (f == "mxfp4") == w4a4))
                  for i, w4a4 in enumerate((False, True))}
    return {"config_groups": groups, "format": MXFP4_FORMAT, "global_compression_ratio": None,
            "ignore": sorted(ignore), "kv_cache_scheme": None, "moe_sparsity_config": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": version}


@dataclasses.dataclass(frozen=True)
class _Group:
    name: str
    targets: tuple[str, ...]
    activation_format: str | None


def _args_error(where: str, args, expected: dict, what: str) -> CheckpointError | None:
    for key in ("num_bits", "type", "strategy", "group_size", "symmetric", "dynamic"):
        if key in args and args[key] != expected[key]:
            fix = ("jax_mxfp4 reads MXFP4 (4-bit float, one E8M0 scale per group of 32, symmetric); "
                   "re-quantize with llm-compressor's MXFP4A16 or MXFP4 scheme")
            return CheckpointError(f"{where}: {what} has {key}={args[key]!r}, MXFP4 needs "
                                   f"{key}={expected[key]!r}. {fix}.")
    if args.get("scale_dtype") not in (None, "torch.uint8"):
        return CheckpointError(f"{where}: {what} has scale_dtype={args['scale_dtype']!r}; MXFP4 scales are "
                               "E8M0 bytes (torch.uint8).")
    return None


def _parse_quantization_config(config: dict, config_path: str):
    qc = config.get("quantization_config")
    if qc is None:
        raise CheckpointError(
            f"{config_path} has no 'quantization_config': this is not a compressed-tensors checkpoint. "
            "Quantize the model first (llm-compressor with scheme MXFP4A16/MXFP4, or "
            "jax_mxfp4.flax.quantize_model + jax_mxfp4.checkpoint.save_compressed_tensors).")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{config_path}: 'quantization_config' must be an object; got {type(qc).__name__}.")
    where = f"{config_path} quantization_config"
    method = qc.get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        raise CheckpointError(
            f"{where}: quant_method={method!r}; jax_mxfp4 reads compressed-tensors checkpoints "
            "(quant_method 'compressed-tensors', format 'mxfp4-pack-quantized'). Convert the checkpoint with "
            "llm-compressor.")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(
            f"{where}: quantization_status={status!r}; only 'compressed' checkpoints store packed MXFP4 "
            "weights. Save the model compressed (llm-compressor's save_pretrained(save_compressed=True)).")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format") not in (None, "dense"):
        raise CheckpointError(f"{where}: sparsity_config {sparsity.get('format')!r} is not supported; save "
                              "the checkpoint without sparsity compression.")
    if qc.get("transform_config"):
        raise CheckpointError(f"{where}: transform_config is set (rotated weights need online transforms, "
                              "which jax_mxfp4 does not apply); quantize without transforms.")
    groups_cfg = qc.get("config_groups")
    if not isinstance(groups_cfg, dict) or not groups_cfg:
        raise CheckpointError(f"{where}: 'config_groups' is missing or empty.")
    groups = []
    for gname, g in groups_cfg.items():
        gwhere = f"{where} config_groups.{gname}"
        fmt = g.get("format") or qc.get("format")
        if fmt != MXFP4_FORMAT:
            hint = (" (NVFP4: 16-element groups with FP8 scales and a global scale, not MXFP4)"
                    if fmt and "nvfp4" in fmt else "")
            raise CheckpointError(
                f"{gwhere}: format {fmt!r}{hint} is not supported; jax_mxfp4 reads only {MXFP4_FORMAT!r} "
                "(llm-compressor schemes MXFP4A16 / MXFP4).")
        weights = g.get("weights")
        if not isinstance(weights, dict):
            raise CheckpointError(f"{gwhere}: no 'weights' quantization args.")
        err = _args_error(gwhere, weights, _WEIGHT_ARGS, "weights")
        if err:
            raise err
        acts = g.get("input_activations")
        if acts is None:
            activation_format = None
        else:
            err = _args_error(gwhere, acts, _INPUT_ARGS, "input_activations")
            if err:
                raise err
            activation_format = "mxfp4"
        if g.get("output_activations") is not None:
            raise CheckpointError(f"{gwhere}: output_activations quantization is not supported.")
        targets = g.get("targets") or []
        if isinstance(targets, str):
            targets = [targets]
        groups.append(_Group(gname, tuple(targets), activation_format))
    ignore = qc.get("ignore") or []
    return groups, list(ignore)


def _match_name(name: str, target: str) -> bool:
    from jax_mxfp4.flax.swap import match_name

    return match_name(name, target)


def _group_for(name: str, groups: list[_Group], where: str) -> _Group:
    if len(groups) == 1:
        return groups[0]
    for rank in ("exact", "regex", "linear"):
        for g in groups:
            for t in g.targets:
                if ((rank == "exact" and not t.startswith("re:") and t == name)
                        or (rank == "regex" and t.startswith("re:") and _match_name(name, t))
                        or (rank == "linear" and t == "Linear")):
                    return g
    raise CheckpointError(
        f"{where}: no config group's targets match layer {name!r} (targets: "
        f"{[list(g.targets) for g in groups]}); jax_mxfp4 resolves targets by module name, regex or 'Linear'.")


# ---------------------------------------------------------------------------
# Loading


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


def _tensor_files(folder: str) -> dict[str, list[str]]:
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
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{config_path} is missing; a compressed-tensors checkpoint has a config.json "
                              "with its quantization_config.") from e
    except ValueError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}).") from e
    groups, ignore = _parse_quantization_config(config, config_path)

    # Pass 1: headers only (names, dtypes, shapes).
    files = _tensor_files(folder)
    headers: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # name -> (file, dtype, shape)
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

    modules = sorted({k.rsplit(".", 1)[0] for k in headers
                      if k.endswith(".weight_packed") or k.endswith(".weight_scale")})
    layer_meta: dict[str, _Group] = {}
    for m in modules:
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
        layer_meta[m] = _group_for(m, groups, config_path)

    # Pass 2: read, one tensor at a time.
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

    layers = {}
    for m in modules:
        parts = layer_parts[m]
        scales = parts["weight_scale"]
        if np.any(scales == E8M0_NAN):
            rows = np.unique(np.nonzero(scales == E8M0_NAN)[0])[:5].tolist()
            raise CheckpointError(f"{headers[f'{m}.weight_scale'][0]}: {m}.weight_scale holds the E8M0 NaN byte "
                                  f"0xFF (rows {rows}...); no valid MXFP4 writer emits it. The file is corrupt.")
        layers[m] = Mxfp4Layer(m, parts["weight_packed"], scales, parts.get("bias"),
                               layer_meta[m].activation_format)
    return CompressedTensorsCheckpoint(config, layers, tensors)


# ---------------------------------------------------------------------------
# Saving


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
    names = sorted(arrays)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = arrays[name].nbytes
        if max_shard_size and shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
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


# ---------------------------------------------------------------------------
# Flax <-> checkpoint names


def _tokens(name: str) -> tuple[str, ...]:
    """Comparable tokens of a dotted name; linen's ``layers_3`` reads as ``layers.3``."""
    out = []
    for part in name.split("."):
        m = re.fullmatch(r"(.+?)_(\d+)", part)
        out.extend(m.groups() if m else (part,))
    return tuple(out)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


class _FlaxIndex:
    """Module path -> {param name -> leaf}, for an nnx model or a linen params tree."""

    def __init__(self, target):
        from flax import nnx

        self.is_nnx = isinstance(target, nnx.Module)
        self.modules: dict[tuple, dict[str, object]] = {}
        self.objects: dict[tuple, object] = {}  # nnx: module path -> module
        if self.is_nnx:
            for path, node in nnx.iter_graph(target):
                if isinstance(node, nnx.Module):
                    self.objects[tuple(path)] = node
                if isinstance(node, nnx.Param) and path:
                    self.modules.setdefault(tuple(path[:-1]), {})[str(path[-1])] = node
        else:
            def walk(tree, path):
                for key, value in tree.items():
                    if isinstance(value, Mapping):
                        walk(value, path + (key,))
                    else:
                        self.modules.setdefault(path, {})[key] = value
            walk(target, ())
        self.by_name = {_dotted(p): p for p in self.modules}
        self.by_tokens: dict[tuple, list[tuple]] = {}
        for p in self.modules:
            self.by_tokens.setdefault(_tokens(_dotted(p)), []).append(p)

    def resolve(self, ckpt_name: str, name_map) -> tuple | None:
        """Flax module path for a checkpoint module name (None: not found)."""
        if name_map is not None:
            mapped = name_map(ckpt_name) if callable(name_map) else name_map.get(ckpt_name, ckpt_name)
            if mapped is None:
                return None
            if mapped not in self.by_name:
                raise CheckpointError(f"name_map sends {ckpt_name!r} to {mapped!r}, which is no module of the Flax "
                                      f"model (modules look like {sorted(self.by_name)[:4]}).")
            return self.by_name[mapped]
        tokens = _tokens(ckpt_name)
        exact = self.by_tokens.get(tokens, [])
        if len(exact) == 1:
            return exact[0]
        candidates = [p for t, ps in self.by_tokens.items() for p in ps
                      if t and (tokens[-len(t):] == t or t[-len(tokens):] == tokens)]
        if len(exact) > 1 or len(candidates) > 1:
            raise CheckpointError(
                f"checkpoint module {ckpt_name!r} matches several Flax modules "
                f"{sorted(_dotted(p) for p in (exact or candidates))}; pass name_map to choose.")
        return candidates[0] if candidates else None


def _leaf_value(leaf):
    from flax import nnx
    from flax.core import meta

    if isinstance(leaf, nnx.Variable):
        return leaf.get_value()
    return meta.unbox(leaf) if isinstance(leaf, meta.AxisMetadata) else leaf


def _convert(value: np.ndarray, like, where: str, transpose: bool = False):
    """Checkpoint array -> array shaped/typed like ``like``, on ``like``'s sharding if it has one."""
    value = np.asarray(value)
    if transpose:
        value = value.T
    shape, dtype = tuple(like.shape), jnp.dtype(like.dtype)
    if tuple(value.shape) != shape:
        raise CheckpointError(f"{where}: checkpoint shape {list(value.shape)} does not fit the Flax param's "
                              f"{list(shape)}.")
    if dtype == jnp.uint8 and value.dtype != np.uint8:
        raise CheckpointError(f"{where}: checkpoint dtype {value.dtype} for a uint8 MXFP4 param.")
    array = jnp.asarray(value, dtype=dtype)
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        array = jax.device_put(array, sharding)
    return array


@dataclasses.dataclass
class LoadReport:
    """Where each checkpoint module went (``mapping``) and what was skipped."""

    mapping: dict[str, str]
    skipped: list[str]

    def __str__(self) -> str:
        lines = [f"{len(self.mapping)} checkpoint modules loaded, {len(self.skipped)} tensors skipped"]
        lines += [f"  {c} -> {f}" for c, f in self.mapping.items() if c != f]
        if self.skipped:
            lines.append(f"  skipped: {self.skipped}")
        return "\n".join(lines)


_DENSE_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def load_params(checkpoint: CompressedTensorsCheckpoint, target, *, name_map=None, skip: Iterable[str] = (),
                strict: bool = True):
    """Puts a checkpoint's weights into a (swapped) Flax model.

    Args:
      checkpoint: from ``load_compressed_tensors``, or a plain ``{name: array}``
        dict of dense tensors (e.g. an unquantized HF safetensors file).
      target: an nnx model (updated in place), or a linen params tree /
        variables dict (e.g. from ``jax.eval_shape(swapped.init, ...)``).
      name_map: checkpoint module name -> Flax module path (dotted, e.g.
        ``"encoder.layer_0.attention"``), as a dict or a callable (None: skip).
        Without it the path is inferred: equal names, or one a dotted suffix of
        the other (``model.layers.0.mlp.up_proj`` finds ``layers.0.mlp.up_proj``
        and linen's ``layers_0.mlp.up_proj``); ambiguity is an error.
      skip: checkpoint tensor names (or ``re:`` patterns) to leave out.
      strict: every checkpoint tensor not skipped must find a param, and every
        param of the target must be filled.

    Params: MXFP4 layers fill ``weight_packed``/``weight_scale``/``bias``;
    other tensors map HF names to Flax's (``weight`` -> ``kernel`` transposed,
    ``embedding`` or ``scale``; same names otherwise), cast to the param dtype.

    Returns ``LoadReport`` (nnx) or ``(new_tree, LoadReport)`` (linen).
    """
    if isinstance(checkpoint, Mapping):
        checkpoint = CompressedTensorsCheckpoint({}, {}, dict(checkpoint))
    skip = list(skip)
    is_variables = not _is_nnx(target) and isinstance(target, Mapping) and "params" in target \
        and isinstance(target["params"], Mapping)
    tree = target["params"] if is_variables else target
    if not _is_nnx(tree):
        tree = _plain_dict(tree)
    index = _FlaxIndex(tree)
    updates: dict[tuple, object] = {}  # (module path, param) -> new array
    formats: dict[tuple, tuple] = {}  # nnx MXFP4 layers -> (layer, activation format of the checkpoint)
    mapping, skipped = {}, []

    def place(path, param, value, where, transpose=False):
        leaves = index.modules[path]
        if param not in leaves:
            raise CheckpointError(f"{where}: the Flax module {_dotted(path) or '(root)'} has no param {param!r} "
                                  f"(it has {sorted(leaves)}).")
        updates[(path, param)] = _convert(value, _leaf_value(leaves[param]), where, transpose)

    def skipped_name(name):
        return any(_match_name(name, s) for s in skip)

    for name, layer in checkpoint.layers.items():
        if skipped_name(f"{name}.weight_packed"):
            skipped.append(name)
            continue
        path = index.resolve(name, name_map)
        if path is None:
            if strict:
                raise CheckpointError(f"MXFP4 layer {name!r} of the checkpoint has no place in the Flax model; pass "
                                      "name_map, or skip=[...] to leave it out.")
            skipped.append(name)
            continue
        leaves = index.modules[path]
        if "weight_packed" not in leaves:
            raise CheckpointError(
                f"checkpoint layer {name!r} is MXFP4 but Flax module {_dotted(path)!r} has params {sorted(leaves)}: "
                "swap that layer to MXFP4 first (jax_mxfp4.flax.quantize_model with matching targets).")
        place(path, "weight_packed", layer.packed, f"{name}.weight_packed")
        place(path, "weight_scale", layer.scales, f"{name}.weight_scale")
        if (layer.bias is None) != ("bias" not in leaves or _leaf_value(leaves["bias"]) is None):
            raise CheckpointError(f"{name}: the checkpoint layer {'has' if layer.bias is not None else 'has no'} "
                                  f"bias but Flax module {_dotted(path)!r} {'does not' if layer.bias is not None else 'does'}.")
        if layer.bias is not None:
            place(path, "bias", layer.bias, f"{name}.bias")
        module = index.objects.get(path)
        if module is not None and hasattr(module, "options"):
            # The checkpoint decides W4A16 vs W4A4 (rounding stays the layer's: compressed_tensors by default).
            formats[path] = (module, layer.activation_format)
        mapping[name] = _dotted(path)

    for name, value in checkpoint.tensors.items():
        if skipped_name(name):
            skipped.append(name)
            continue
        module, _, leaf = name.rpartition(".")
        path = index.resolve(module, name_map) if module else None
        if path is None:
            if strict:
                raise CheckpointError(f"checkpoint tensor {name!r} has no place in the Flax model; pass name_map, "
                                      "or skip=[...] to leave it out.")
            skipped.append(name)
            continue
        leaves = index.modules[path]
        if leaf in leaves:
            param = leaf
        else:
            param = next((p for p, hf in _DENSE_PARAM.items() if hf == leaf and p in leaves), None)
            if param is None:
                if "weight_packed" in leaves:
                    raise CheckpointError(
                        f"checkpoint tensor {name!r} is not quantized (its layer is in the config's ignore list), "
                        f"but Flax module {_dotted(path)!r} is MXFP4; leave that layer out of the swap (ignore=[...]).")
                raise CheckpointError(f"checkpoint tensor {name!r}: Flax module {_dotted(path)!r} has no param for "
                                      f"{leaf!r} (it has {sorted(leaves)}).")
        transpose = param == "kernel" and np.ndim(value) == 2
        place(path, param, value, name, transpose)
        mapping[module] = _dotted(path)

    if strict:
        missing = sorted(f"{_dotted(p)}.{n}" if p else n for p, leaves in index.modules.items() for n in leaves
                         if (p, n) not in updates and _leaf_value(leaves[n]) is not None)
        if missing:
            raise CheckpointError(f"the checkpoint does not fill these Flax params: {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''}; pass strict=False to keep their values.")

    report = LoadReport(mapping, skipped)
    if _is_nnx(tree):
        for (path, param), value in updates.items():
            index.modules[path][param].set_value(value)
        for module, fmt in formats.values():
            if module.options.activation_format != fmt:
                module.options = dataclasses.replace(module.options, activation_format=fmt)
        return report
    new_tree = _rebuild(tree, updates)
    if is_variables:
        out = dict(target)
        out["params"] = new_tree
        return out, report
    return new_tree, report


def _is_nnx(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Module)


def _plain_dict(tree):
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return {k: _plain_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _rebuild(tree, updates, path=()):
    from flax.core import meta

    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _rebuild(value, updates, path + (key,))
        elif (path, key) in updates:
            new = updates[(path, key)]
            out[key] = value.replace_boxed(new) if isinstance(value, meta.AxisMetadata) else new
        else:
            out[key] = value
    return out


def swap_arguments(checkpoint: CompressedTensorsCheckpoint) -> dict:
    """Keyword arguments for ``jax_mxfp4.flax.quantize_*`` / ``swap_linen`` that swap the layers
    this checkpoint quantizes, with its scheme: ``targets``, ``ignore``, ``activation_format``
    (``"mxfp4"`` for W4A4) and ``activation_rounding="compressed_tensors"`` (the library's
    own activation fake-quantization, bit for bit).

    Names in ``ignore`` are the checkpoint's; if the Flax model names modules
    differently, translate them.
    """
    formats = {layer.activation_format for layer in checkpoint.layers.values()}
    if len(formats) > 1:
        w4a4 = sorted(n for n, layer in checkpoint.layers.items() if layer.activation_format == "mxfp4")
        raise CheckpointError(
            f"the checkpoint mixes W4A16 and W4A4 layers (W4A4: {w4a4[:4]}...); swap the two sets separately "
            "with targets naming them.")
    groups = checkpoint.quantization_config.get("config_groups", {})
    targets = sorted({t for g in groups.values() for t in (g.get("targets") or [])}) or ["Linear"]
    return {"targets": targets, "ignore": checkpoint.ignore,
            "activation_format": formats.pop() if formats else None,
            "activation_rounding": "compressed_tensors"}


# ---------------------------------------------------------------------------
# Flax model -> checkpoint


def checkpoint_from_model(model, variables=None, *, config: dict | None = None, name_map=None,
                          ignore: Iterable[str] | None = None, activation_format: str | None = None,
                          dtype=None) -> CompressedTensorsCheckpoint:
    """Builds a checkpoint from a quantized Flax model.

    Args:
      model: an nnx model with ``MxFp4Linear`` layers; or, with ``variables``,
        a ``jax_mxfp4.flax.SwappedLinen`` (its options give each layer's
        activation format) or any linen module (then ``activation_format``
        applies to all MXFP4 layers).
      variables: linen variables (or params).
      config: the model's own config.json fields (``quantization_config`` is
        added).
      name_map: Flax module path (dotted) -> checkpoint module name, as dict or
        callable; default: the dotted path itself.
      ignore: the config's ignore list; default: the names of the model's
        unquantized Dense/Linear layers (what compressed-tensors writes).
      dtype: cast non-MXFP4 float tensors (biases, embeddings, norms, ignored
        layers) to this dtype (e.g. ``jnp.bfloat16``); default: keep.

    Non-MXFP4 params are named the HF way: a 2-D ``kernel`` becomes
    ``weight`` (transposed to [out, in]), ``embedding`` and ``scale`` become
    ``weight``; other names are kept.
    """
    from flax import nnx

    layers_src: dict[tuple, tuple] = {}  # path -> (packed, scales, bias, activation_format)
    dense_paths: list[tuple] = []
    plain: dict[tuple, dict[str, object]] = {}

    if isinstance(model, nnx.Module):
        from jax_mxfp4.flax.nnx import MxFp4Linear

        mx_paths = set()
        for path, node in nnx.iter_graph(model):
            if isinstance(node, MxFp4Linear):
                packed, scales = node.canonical_weights()
                bias = node.bias[...] if node.bias is not None else None
                layers_src[tuple(path)] = (packed, scales, bias, node.options.activation_format)
                mx_paths.add(tuple(path))
            elif isinstance(node, nnx.Linear):
                dense_paths.append(tuple(path))
        for path, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Param) and path and tuple(path[:-1]) not in mx_paths:
                plain.setdefault(tuple(path[:-1]), {})[str(path[-1])] = node.get_value()
    else:
        if variables is None:
            raise TypeError("checkpoint_from_model(linen_model, variables): the linen variables are required.")
        from flax.core import meta
        from jax_mxfp4.flax.linen import PREPARED_COLLECTION, canonical_params
        from jax_mxfp4.flax.swap import SwappedLinen

        if isinstance(variables, Mapping) and "params" in variables:
            params = canonical_params(variables) if PREPARED_COLLECTION in variables else variables["params"]
        else:
            params = variables
        params = meta.unbox(_plain_dict(params))

        def walk(tree, path):
            leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
            if "weight_packed" in leaves:
                fmt = activation_format
                if isinstance(model, SwappedLinen):
                    fmt = model.options.activation_format
                layers_src[path] = (leaves["weight_packed"], leaves["weight_scale"], leaves.get("bias"), fmt)
            elif leaves:
                plain[path] = leaves
                if "kernel" in leaves and np.ndim(leaves["kernel"]) == 2:
                    dense_paths.append(path)
            for k, v in tree.items():
                if isinstance(v, Mapping):
                    walk(v, path + (k,))

        walk(params, ())

    def ckpt_name(path) -> str:
        dotted = _dotted(path)
        if name_map is None:
            return dotted
        mapped = name_map(dotted) if callable(name_map) else name_map.get(dotted, dotted)
        if not mapped:
            raise CheckpointError(f"name_map gives no checkpoint name for Flax module {dotted!r}.")
        return mapped

    def cast(a):
        a = _host(a)
        if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating):
            return a.astype(jnp.dtype(dtype))
        return a

    layers = {}
    for path, (packed, scales, bias, fmt) in layers_src.items():
        name = ckpt_name(path)
        if not path:
            raise CheckpointError("the model itself is one MXFP4 layer; wrap it in a module to give it a name.")
        layers[name] = Mxfp4Layer(name, _host(packed), _host(scales), None if bias is None else cast(bias), fmt)
    tensors = {}
    for path, leaves in plain.items():
        module = ckpt_name(path) if path else ""
        for param, value in leaves.items():
            if value is None:
                continue
            hf = _DENSE_PARAM.get(param, param)
            array = _host(value)
            if param == "kernel" and array.ndim == 2:
                array = array.T
            elif param == "kernel":
                hf = param
            full = f"{module}.{hf}" if module else hf
            if full in tensors:
                raise CheckpointError(f"two Flax params map to checkpoint tensor {full!r}; pass name_map.")
            tensors[full] = cast(array)
    if ignore is None:
        ignore = sorted(ckpt_name(p) for p in dense_paths if p)
    base = copy.deepcopy(dict(config or {}))
    base["quantization_config"] = quantization_config(
        {name: layer.activation_format for name, layer in layers.items()}, ignore)
    return CompressedTensorsCheckpoint(base, layers, tensors)
