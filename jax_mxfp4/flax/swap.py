"""Module swap: turn an existing linen or nnx model's Dense/Linear layers into MXFP4.

No model code is edited. Layers are chosen like compressed-tensors chooses them
(``targets`` and ``ignore`` of its ``QuantizationConfig``; its
``utils/match.py``, version 0.20), with a layer's **name** being its module
path joined by dots (nnx: ``layers.0.mlp.up_proj``; linen: ``Dense_0``,
``block.layers_0.up_proj``):

* ``"re:<pattern>"`` matches when ``re.match(pattern, name)`` does (anchored at
  the start only, as in the library);
* any other string matches a layer whose name equals it exactly (no suffix or
  substring matching), or whose class, or a base class, has that name;
  ``"Linear"`` (the library's usual target, torch's ``nn.Linear``) matches
  every ``nn.Dense`` and ``nnx.Linear``.

Only ``nn.Dense`` / ``nnx.Linear`` (and subclasses) are converted, as the
library only quantizes Linear layers. A layer is converted when it matches a
target and no ``ignore`` entry. ``SwapReport`` lists converted, ignored and
untargeted layers, and targets/ignores that matched nothing.

nnx: ``quantize_nnx(model, ...)`` replaces each chosen ``nnx.Linear`` in place
by an ``MxFp4Linear`` built from its weights (graph surgery).

linen: a linen model's ``__call__`` builds its submodules on the fly, so
instead of rewriting classes (as google/qwix does by patching Flax and JAX
internals) the swap uses Flax's public ``nn.intercept_methods``:
``SwappedLinen`` wraps the model and, inside its ``init``/``apply``, redirects
``nn.Dense.__call__`` of the chosen layers to the MXFP4 forward of
``MxFp4Dense``, reading ``weight_packed``/``weight_scale``/``bias`` from that
Dense's own param scope. ``quantize_linen`` converts existing float params
into that tree (running the model once, under ``jax.jit``, on sample inputs).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import jax
import flax.linen as nn
from flax import nnx

from jax_mxfp4.flax import _common, linen as mx_linen
from jax_mxfp4.flax._common import DEFAULT_ROUNDING, LayerOptions
from jax_mxfp4.flax.nnx import MxFp4Linear

__all__ = [
    "LayerRecord",
    "SwapReport",
    "SwappedLinen",
    "match_layer",
    "match_name",
    "quantize_linen",
    "quantize_model",
    "quantize_nnx",
]

#: Class names "Linear" stands for (torch's nn.Linear in compressed-tensors configs).
_LINEAR_CLASSES = (nn.Dense, nnx.Linear)


def match_name(name: str, target: str) -> bool:
    """compressed-tensors' ``match_name``: ``re:`` prefix -> ``re.match``, else equality."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _match_class(module, target: str) -> bool:
    if target == "Linear" and isinstance(module, _LINEAR_CLASSES):
        return True
    return any(cls.__name__ == target for cls in type(module).__mro__)


def _first_match(name: str, module, entries: Sequence[str]) -> str | None:
    for entry in entries:
        if match_name(name, entry) or _match_class(module, entry):
            return entry
    return None


def match_layer(name: str, module, targets: Sequence[str], ignore: Sequence[str] = ()):
    """``(target, ignore_entry)`` that match the layer (either may be None)."""
    return _first_match(name, module, targets), _first_match(name, module, ignore)


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One Dense/Linear layer seen by the swap."""

    name: str
    status: str  # "converted", "ignored" or "untargeted"
    in_features: int | None
    out_features: int | None
    target: str | None = None  # the target entry that matched
    ignored_by: str | None = None  # the ignore entry that matched
    scheme: str | None = None  # "W4A16" / "W4A4" when converted


@dataclasses.dataclass
class SwapReport:
    """Which layers were converted and why the others were not (``str()`` is a table)."""

    records: list[LayerRecord]
    unmatched_targets: list[str]
    unmatched_ignores: list[str]

    def _names(self, status):
        return [r.name for r in self.records if r.status == status]

    @property
    def converted(self) -> list[str]:
        return self._names("converted")

    @property
    def ignored(self) -> list[str]:
        return self._names("ignored")

    @property
    def untargeted(self) -> list[str]:
        return self._names("untargeted")

    def __str__(self) -> str:
        lines = [f"MXFP4 swap: {len(self.converted)} converted, {len(self.ignored)} ignored, "
                 f"{len(self.untargeted)} not targeted"]
        for r in self.records:
            shape = f"[{r.out_features}, {r.in_features}]" if r.in_features else ""
            why = {"converted": f"{r.scheme} (target {r.target!r})",
                   "ignored": f"kept (ignore {r.ignored_by!r})",
                   "untargeted": "kept (no target matches)"}[r.status]
            lines.append(f"  {r.name or '(root)'} {shape}: {why}")
        if self.unmatched_targets:
            lines.append(f"  targets that matched no layer: {self.unmatched_targets}")
        if self.unmatched_ignores:
            lines.append(f"  ignore entries that matched no layer: {self.unmatched_ignores}")
        return "\n".join(lines)


def _report(records: list[LayerRecord], targets, ignore) -> SwapReport:
    used_targets = {r.target for r in records if r.target}
    used_ignores = {r.ignored_by for r in records if r.ignored_by}
    return SwapReport(records, [t for t in targets if t not in used_targets],
                      [i for i in ignore if i not in used_ignores])


def _as_list(entries, what) -> list[str]:
    if isinstance(entries, str):
        entries = [entries]
    entries = list(entries or [])
    for e in entries:
        if not isinstance(e, str):
            raise TypeError(f"{what} entries must be strings (names, class names or 're:' patterns); got {e!r}.")
    return entries


# ---------------------------------------------------------------------------
# nnx: graph surgery


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _child(node, key):
    if isinstance(node, nnx.Module) and isinstance(key, str):
        return getattr(node, key)
    return node[key]


def _set_child(node, key, value, name: str):
    if isinstance(node, nnx.Module) and isinstance(key, str):
        setattr(node, key, value)
    elif isinstance(node, tuple):
        raise TypeError(f"cannot replace {name}: it sits in a tuple; keep layers in an nnx.List or list.")
    else:
        node[key] = value


def quantize_nnx(model: nnx.Module, *, targets: Iterable[str] = ("Linear",), ignore: Iterable[str] = (),
                 rounding=DEFAULT_ROUNDING.option, activation_format: str | None = None,
                 activation_rounding=DEFAULT_ROUNDING.option, kernel_name: str | None = None) -> SwapReport:
    """Replaces the chosen ``nnx.Linear`` layers of ``model`` by ``MxFp4Linear``, in place.

    Args:
      model: any nnx module.
      targets, ignore: compressed-tensors style entries (module docstring).
      rounding: how the float kernels are quantized (default
        ``"compressed_tensors"``: the bytes llm-compressor would write).
      activation_format: None (W4A16) or ``"mxfp4"`` (W4A4, like the
        library's ``MXFP4`` preset); ``activation_rounding`` for the latter.
      kernel_name: force a kernel in the new layers.

    Returns the ``SwapReport``. Each new layer keeps the old one's bias,
    ``dtype``, ``param_dtype`` (the kernel's dtype) and sharding names.
    """
    targets, ignore = _as_list(targets, "targets"), _as_list(ignore, "ignore")
    options = dict(activation_format=activation_format, activation_rounding=activation_rounding,
                   kernel_name=kernel_name)
    LayerOptions(activation_format, activation_rounding, rounding, kernel_name)  # validate early
    records: list[LayerRecord] = []
    replaced: dict[int, MxFp4Linear] = {}
    nodes = [(path, node) for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Linear) and not isinstance(node, MxFp4Linear)]
    for path, linear in nodes:
        name = _dotted(path)
        target, ignored_by = match_layer(name, linear, targets, ignore)
        k, n = linear.in_features, linear.out_features
        if target is None or ignored_by is not None:
            records.append(LayerRecord(name, "ignored" if target else "untargeted", k, n, target, ignored_by))
            continue
        if not path:
            raise ValueError("the model itself is an nnx.Linear; build MxFp4Linear.from_linear(model) instead.")
        new = MxFp4Linear.from_linear(linear, rounding=rounding, **options)
        replaced[id(linear)] = new
        records.append(LayerRecord(name, "converted", k, n, target, None, new.options.scheme))
    # Replace every reference (a layer shared by two parents is found once by iter_graph).
    while True:
        pending = [(p, n) for p, n in nnx.iter_graph(model) if id(n) in replaced and p]
        if not pending:
            break
        path, old = pending[0]
        parent = model
        for key in path[:-1]:
            parent = _child(parent, key)
        _set_child(parent, path[-1], replaced[id(old)], _dotted(path))
    return _report(records, targets, ignore)


# ---------------------------------------------------------------------------
# linen: interception


@dataclasses.dataclass(frozen=True)
class SwappedLinen:
    """A linen model whose chosen ``nn.Dense`` layers run as MXFP4 (``MxFp4Dense``).

    Use it like the model: ``init``, ``apply`` (jit-able: the interception is
    entered at trace time), or ``with swapped.intercept(): model.apply(...)``.
    The params of a swapped ``nn.Dense`` at path P are ``weight_packed``,
    ``weight_scale`` and ``bias`` under P, as an ``MxFp4Dense`` at P would
    have them. ``jax_mxfp4.flax.prepare(swapped, variables, x)`` prepares them.
    """

    module: nn.Module
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    options: LayerOptions = LayerOptions()

    def spec(self, dense: nn.Dense) -> mx_linen.DenseSpec:
        return mx_linen.DenseSpec.of(dense, self.options)

    def _interceptor(self, convert: bool, records: list | None):
        def intercept(next_fun, args, kwargs, context):
            dense = context.module
            if context.method_name != "__call__" or not isinstance(dense, nn.Dense):
                return next_fun(*args, **kwargs)
            name = _dotted(dense.path)
            target, ignored_by = match_layer(name, dense, self.targets, self.ignore)
            inputs = args[0] if args else kwargs["inputs"]
            k = int(inputs.shape[-1])
            if target is None or ignored_by is not None:
                if records is not None:
                    records.append(LayerRecord(name, "ignored" if target else "untargeted", k, dense.features,
                                               target, ignored_by))
                return next_fun(*args, **kwargs)
            _common.check_dot_general(dense.dot_general, f"nn.Dense {name}")
            if dense.dot_general_cls is not None:
                raise ValueError(f"nn.Dense {name}: dot_general_cls is set; list this layer in `ignore`.")
            if records is not None:
                records.append(LayerRecord(name, "converted", k, dense.features, target, None,
                                           self.options.scheme))
            return mx_linen.dense_forward(dense, inputs, self.spec(dense), convert_kernel=convert)

        return intercept

    def intercept(self, *, _convert: bool = False, _records: list | None = None):
        """Context manager: inside it, calls of the wrapped model's chosen ``nn.Dense`` run MXFP4."""
        return nn.intercept_methods(self._interceptor(_convert, _records))

    def init(self, rngs, *args, **kwargs):
        """``module.init`` with the chosen Dense layers initialized as MXFP4 (from their kernel_init)."""
        with self.intercept():
            return self.module.init(rngs, *args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        with self.intercept():
            return self.module.apply(variables, *args, **kwargs)

    def quantize_params(self, variables, *args, method=None, **kwargs):
        """Converts float ``kernel`` params of the chosen layers to MXFP4 params.

        Runs the model once under ``jax.jit`` on the sample inputs (values do
        not matter; the forward is dead code XLA removes) with ``params``
        mutable: each chosen Dense quantizes its kernel (``options.weight_rounding``)
        into ``weight_packed``/``weight_scale``, keeping partitioning names
        transposed. Returns ``(variables, SwapReport)``.
        """
        records: list[LayerRecord] = []

        def run(variables, *args, **kwargs):
            with self.intercept(_convert=True, _records=records):
                _, state = self.module.apply(variables, *args, method=method, mutable=["params"], **kwargs)
            return state["params"]

        params = jax.jit(run)(variables, *args, **kwargs)
        params = _drop_converted_kernels(mx_linen._as_dict(params))
        out = dict(variables)
        out["params"] = params
        unique = mx_linen._dedupe(records, key=lambda r: r.name)
        return out, _report(unique, self.targets, self.ignore)


def _drop_converted_kernels(tree):
    if not isinstance(tree, dict):
        return tree
    out = {k: _drop_converted_kernels(v) for k, v in tree.items()}
    if "weight_packed" in out and "kernel" in out:
        del out["kernel"]
    return out


def swap_linen(module: nn.Module, *, targets: Iterable[str] = ("Linear",), ignore: Iterable[str] = (),
               rounding=DEFAULT_ROUNDING.option, activation_format: str | None = None,
               activation_rounding=DEFAULT_ROUNDING.option, kernel_name: str | None = None) -> SwappedLinen:
    """``SwappedLinen`` for ``module`` (no params touched; see ``quantize_linen``)."""
    return SwappedLinen(module, tuple(_as_list(targets, "targets")), tuple(_as_list(ignore, "ignore")),
                        LayerOptions(activation_format, activation_rounding, rounding, kernel_name))


def quantize_linen(module: nn.Module, variables, *sample_args, targets: Iterable[str] = ("Linear",),
                   ignore: Iterable[str] = (), rounding=DEFAULT_ROUNDING.option,
                   activation_format: str | None = None, activation_rounding=DEFAULT_ROUNDING.option,
                   kernel_name: str | None = None, method=None, **sample_kwargs):
    """Swaps a linen model's chosen ``nn.Dense`` layers and quantizes their params.

    Returns ``(SwappedLinen, variables, SwapReport)``; run the result with
    ``swapped.apply(variables, x)``. Arguments as ``quantize_nnx``, plus the
    model's variables and sample inputs for one (jitted) trace of the model.
    """
    swapped = swap_linen(module, targets=targets, ignore=ignore, rounding=rounding,
                         activation_format=activation_format, activation_rounding=activation_rounding,
                         kernel_name=kernel_name)
    variables, report = swapped.quantize_params(variables, *sample_args, method=method, **sample_kwargs)
    return swapped, variables, report


def quantize_model(model, *args, **kwargs):
    """``quantize_nnx(model, **kw)`` for an nnx model (returns ``SwapReport``), or
    ``quantize_linen(model, variables, *sample_args, **kw)`` for a linen one
    (returns ``(SwappedLinen, variables, SwapReport)``)."""
    if isinstance(model, nnx.Module):
        if args:
            raise TypeError("quantize_model(nnx_model, **options) takes no positional arguments.")
        return quantize_nnx(model, **kwargs)
    if isinstance(model, nn.Module):
        return quantize_linen(model, *args, **kwargs)
    raise TypeError(f"expected a flax.linen or flax.nnx Module; got {type(model).__name__}.")
