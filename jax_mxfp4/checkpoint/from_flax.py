"""A checkpoint from a quantized Flax model: ``checkpoint_from_model``."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from jax_mxfp4.checkpoint.config import CheckpointError, quantization_config
from jax_mxfp4.checkpoint.model import CompressedTensorsCheckpoint, Mxfp4Layer
from jax_mxfp4.checkpoint.to_flax import _DENSE_PARAM, _dotted, _is_nnx, _plain_dict
from jax_mxfp4.checkpoint.writer import _host

__all__ = ["checkpoint_from_model"]


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
    sources = _nnx_sources(model) if _is_nnx(model) else _linen_sources(model, variables, activation_format)

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
    for path, (packed, scales, bias, fmt) in sources.layers.items():
        name = ckpt_name(path)
        if not path:
            raise CheckpointError("the model itself is one MXFP4 layer; wrap it in a module to give it a name.")
        layers[name] = Mxfp4Layer(name, _host(packed), _host(scales), None if bias is None else cast(bias), fmt)
    tensors = {}
    for path, leaves in sources.plain.items():
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
        ignore = sorted(ckpt_name(p) for p in sources.dense_paths if p)
    base = copy.deepcopy(dict(config or {}))
    base["quantization_config"] = quantization_config(
        {name: layer.activation_format for name, layer in layers.items()}, ignore)
    return CompressedTensorsCheckpoint(base, layers, tensors)


@dataclasses.dataclass
class _Sources:
    """What a Flax model holds, by module path."""

    layers: dict[tuple, tuple] = dataclasses.field(default_factory=dict)  # (packed, scales, bias, act. format)
    dense_paths: list[tuple] = dataclasses.field(default_factory=list)  # unquantized Dense/Linear layers
    plain: dict[tuple, dict[str, object]] = dataclasses.field(default_factory=dict)  # other params


def _nnx_sources(model) -> _Sources:
    from flax import nnx

    from jax_mxfp4.flax.nnx import MxFp4Linear

    sources = _Sources()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, MxFp4Linear):
            packed, scales = node.canonical_weights()
            bias = node.bias[...] if node.bias is not None else None
            sources.layers[tuple(path)] = (packed, scales, bias, node.options.activation_format)
        elif isinstance(node, nnx.Linear):
            sources.dense_paths.append(tuple(path))
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and path and tuple(path[:-1]) not in sources.layers:
            sources.plain.setdefault(tuple(path[:-1]), {})[str(path[-1])] = node.get_value()
    return sources


def _linen_sources(model, variables, activation_format: str | None) -> _Sources:
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
    fmt = model.options.activation_format if isinstance(model, SwappedLinen) else activation_format
    sources = _Sources()

    def walk(tree, path):
        leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
        if "weight_packed" in leaves:
            sources.layers[path] = (leaves["weight_packed"], leaves["weight_scale"], leaves.get("bias"), fmt)
        elif leaves:
            sources.plain[path] = leaves
            if "kernel" in leaves and np.ndim(leaves["kernel"]) == 2:
                sources.dense_paths.append(path)
        for k, v in tree.items():
            if isinstance(v, Mapping):
                walk(v, path + (k,))

    walk(params, ())
    return sources
