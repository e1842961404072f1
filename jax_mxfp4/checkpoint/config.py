"""The compressed-tensors MXFP4 format: file names, ``quantization_config``, validation.

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

This module builds the ``quantization_config`` block as the library writes it
(``quantization_config``), and parses and validates one read from a file
(``_parse_quantization_config``, ``_group_for``). Every problem with the input
is a ``CheckpointError`` (a ``ValueError``) naming the tensor, the file and the
fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

__all__ = ["CheckpointError", "MXFP4_FORMAT", "quantization_config"]

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
