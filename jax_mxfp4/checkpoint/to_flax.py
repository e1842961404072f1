"""A checkpoint onto a Flax model: ``load_params`` and ``swap_arguments``.

Checkpoint module names (``model.layers.0.mlp.up_proj``) are matched to Flax
module paths (nnx ``layers.0.mlp.up_proj``, linen ``layers_0.mlp.up_proj``) by
``_FlaxIndex``; HF param names map to Flax's by ``_DENSE_PARAM``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_mxfp4.checkpoint.config import CheckpointError, _match_name
from jax_mxfp4.checkpoint.model import CompressedTensorsCheckpoint, Mxfp4Layer

__all__ = ["LoadReport", "load_params", "swap_arguments"]

#: Flax param name -> the HF checkpoint's name for it (other names are the same in both).
_DENSE_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


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
    is_variables = not _is_nnx(target) and isinstance(target, Mapping) and "params" in target \
        and isinstance(target["params"], Mapping)
    tree = target["params"] if is_variables else target
    if not _is_nnx(tree):
        tree = _plain_dict(tree)
    loader = _Loader(_FlaxIndex(tree), name_map, list(skip), strict)
    for name, layer in checkpoint.layers.items():
        loader.load_layer(name, layer)
    for name, value in checkpoint.tensors.items():
        loader.load_tensor(name, value)
    if strict:
        loader.check_complete()

    report = LoadReport(loader.mapping, loader.skipped)
    if _is_nnx(tree):
        loader.apply_to_nnx()
        return report
    new_tree = _rebuild(tree, loader.updates)
    if is_variables:
        out = dict(target)
        out["params"] = new_tree
        return out, report
    return new_tree, report


class _Loader:
    """One ``load_params``: checkpoint arrays checked and converted for their Flax params (``updates``)."""

    def __init__(self, index: _FlaxIndex, name_map, skip: list[str], strict: bool):
        self.index, self.name_map, self.skip, self.strict = index, name_map, skip, strict
        self.updates: dict[tuple, object] = {}  # (module path, param) -> new array
        self.formats: dict[tuple, tuple] = {}  # nnx MXFP4 layers -> (layer, activation format of the checkpoint)
        self.mapping: dict[str, str] = {}  # checkpoint module -> Flax module (dotted)
        self.skipped: list[str] = []

    def _skip(self, tensor: str, name: str) -> bool:
        """Whether ``skip`` lists ``tensor``; if so, ``name`` is recorded as skipped."""
        if any(_match_name(tensor, s) for s in self.skip):
            self.skipped.append(name)
            return True
        return False

    def _locate(self, module: str | None, name: str, what: str) -> tuple | None:
        """The Flax path of checkpoint module ``module``, or None (then ``name`` is skipped; an error if strict)."""
        path = self.index.resolve(module, self.name_map) if module is not None else None
        if path is None:
            if self.strict:
                raise CheckpointError(f"{what} has no place in the Flax model; pass name_map, or skip=[...] to "
                                      "leave it out.")
            self.skipped.append(name)
        return path

    def _place(self, path, param, value, where, transpose=False):
        leaves = self.index.modules[path]
        if param not in leaves:
            raise CheckpointError(f"{where}: the Flax module {_dotted(path) or '(root)'} has no param {param!r} "
                                  f"(it has {sorted(leaves)}).")
        self.updates[(path, param)] = _convert(value, _leaf_value(leaves[param]), where, transpose)

    def load_layer(self, name: str, layer: Mxfp4Layer) -> None:
        """An MXFP4 layer: ``weight_packed``/``weight_scale``/``bias`` (and, nnx, its activation format)."""
        if self._skip(f"{name}.weight_packed", name):
            return
        path = self._locate(name, name, f"MXFP4 layer {name!r} of the checkpoint")
        if path is None:
            return
        leaves = self.index.modules[path]
        if "weight_packed" not in leaves:
            raise CheckpointError(
                f"checkpoint layer {name!r} is MXFP4 but Flax module {_dotted(path)!r} has params {sorted(leaves)}: "
                "swap that layer to MXFP4 first (jax_mxfp4.flax.quantize_model with matching targets).")
        self._place(path, "weight_packed", layer.packed, f"{name}.weight_packed")
        self._place(path, "weight_scale", layer.scales, f"{name}.weight_scale")
        if (layer.bias is None) != ("bias" not in leaves or _leaf_value(leaves["bias"]) is None):
            raise CheckpointError(f"{name}: the checkpoint layer {'has' if layer.bias is not None else 'has no'} "
                                  f"bias but Flax module {_dotted(path)!r} {'does not' if layer.bias is not None else 'does'}.")
        if layer.bias is not None:
            self._place(path, "bias", layer.bias, f"{name}.bias")
        module = self.index.objects.get(path)
        if module is not None and hasattr(module, "options"):
            # The checkpoint decides W4A16 vs W4A4 (rounding stays the layer's: compressed_tensors by default).
            self.formats[path] = (module, layer.activation_format)
        self.mapping[name] = _dotted(path)

    def load_tensor(self, name: str, value) -> None:
        """A plain tensor: its HF param name mapped to the Flax module's (``_DENSE_PARAM``)."""
        if self._skip(name, name):
            return
        module, _, leaf = name.rpartition(".")
        path = self._locate(module or None, name, f"checkpoint tensor {name!r}")
        if path is None:
            return
        leaves = self.index.modules[path]
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
        self._place(path, param, value, name, transpose)
        self.mapping[module] = _dotted(path)

    def check_complete(self) -> None:
        """Every param of the target (that has a value) is filled."""
        missing = sorted(f"{_dotted(p)}.{n}" if p else n for p, leaves in self.index.modules.items() for n in leaves
                         if (p, n) not in self.updates and _leaf_value(leaves[n]) is not None)
        if missing:
            raise CheckpointError(f"the checkpoint does not fill these Flax params: {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''}; pass strict=False to keep their values.")

    def apply_to_nnx(self) -> None:
        """Sets the nnx model's params (in place) and its MXFP4 layers' activation formats."""
        for (path, param), value in self.updates.items():
            self.index.modules[path][param].set_value(value)
        for module, fmt in self.formats.values():
            if module.options.activation_format != fmt:
                module.options = dataclasses.replace(module.options, activation_format=fmt)

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

