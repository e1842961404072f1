"""``MxFp4Dense``: a linen ``nn.Dense`` whose weight is MXFP4.

Params (named as in compressed-tensors checkpoints, so mapping is trivial):

* ``weight_packed``: ``uint8[N, K/2]``, E2M1 pairs, row = output feature;
* ``weight_scale``: ``uint8[N, K/32]``, E8M0 bytes, linear layout;
* ``bias``: ``[N]`` in ``param_dtype`` (if ``use_bias``).

Prepare once, apply many times
------------------------------
A kernel may need its own weight layout (Marlin's tile repack, SM100's
swizzled scales). Without preparation the layer converts the canonical params
inside every call, which is free for the ``cpu`` and ``xla`` kernels and
wasteful for the others. ``prepare`` does it once::

    variables = model.init(key, x)                    # or loaded from a checkpoint
    variables, report = prepare(model, variables, x)  # adds collection "mxfp4_prepared"
    y = jax.jit(model.apply)(variables, x)            # no repacking inside

``prepare`` runs the model once under ``jax.jit`` with the ``mxfp4_prepared``
collection mutable; each MXFP4 layer stores its ``jax_mxfp4.PreparedWeights``
(chosen for the dtype and token count it saw) in that collection, and from
then on applies it with ``jax_mxfp4.mxfp4_linear``. The canonical
``weight_packed``/``weight_scale`` params are dropped from the returned
variables unless ``keep_canonical=True`` (the layer does not read them once
prepared); keep the unprepared variables, or recover them with
``canonical_params``, to save a checkpoint. With ``nn.scan``/``nn.vmap`` over
layers, list ``"mxfp4_prepared"`` in the transform's ``variable_axes`` as
you do for ``"params"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.core import meta
from flax.linen import dtypes as linen_dtypes
from flax.linen.linear import default_kernel_init

import jax_mxfp4
from jax_mxfp4 import validation
from jax_mxfp4.flax import _common
from jax_mxfp4.flax._common import DEFAULT_ROUNDING, LayerOptions
from jax_mxfp4.kernels import base as kernel_base

__all__ = ["MxFp4Dense", "PREPARED_COLLECTION", "PrepareReport", "canonical_params", "prepare"]

#: The linen variable collection holding each layer's ``PreparedWeights``.
PREPARED_COLLECTION = "mxfp4_prepared"
_PREPARED_NAME = "weights"


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    """Everything the MXFP4 forward needs from a Dense-like module (static)."""

    features: int
    use_bias: bool
    dtype: Any
    param_dtype: Any
    kernel_init: Callable
    bias_init: Callable
    options: LayerOptions
    weight_sharding: tuple | None = None  # mesh axis names for [N, K], or None

    @classmethod
    def of(cls, dense, options: LayerOptions, weight_sharding: tuple | None = None) -> "DenseSpec":
        """The spec of a Dense-like module (``nn.Dense``, ``MxFp4Dense``): its features, dtypes and inits."""
        return cls(
            features=dense.features,
            use_bias=dense.use_bias,
            dtype=dense.dtype,
            param_dtype=dense.param_dtype,
            kernel_init=dense.kernel_init,
            bias_init=dense.bias_init,
            options=options,
            weight_sharding=weight_sharding,
        )


@dataclasses.dataclass(frozen=True)
class PreparedLayer:
    """One prepared layer: its path, shape and the kernel selection's explanation."""

    path: str
    in_features: int
    out_features: int
    activation_dtype: str
    scheme: str
    kernel: str
    explanation: str


@dataclasses.dataclass
class PrepareReport:
    """What ``prepare`` did, layer by layer (``str()`` gives a table)."""

    layers: list[PreparedLayer]

    def __str__(self) -> str:
        lines = [f"{len(self.layers)} MXFP4 layers prepared"]
        for layer in self.layers:
            why = layer.explanation.splitlines()
            lines.append(f"  {layer.path}: [{layer.out_features}, {layer.in_features}] {layer.scheme} "
                         f"{layer.activation_dtype} -> {why[0]}")
            lines += [f"    {w.strip()}" for w in why[1:]]
        return "\n".join(lines)


# Trace-time state of a running ``prepare`` (records + forced kernel).
_prepare_state = threading.local()


@contextlib.contextmanager
def _preparing(records: list, kernel_name: str | None):
    previous = getattr(_prepare_state, "active", None)
    _prepare_state.active = (records, kernel_name)
    try:
        yield
    finally:
        _prepare_state.active = previous


def _path(module: nn.Module) -> str:
    return ".".join(str(p) for p in module.path)


def prepare_selected(packed, scales, options: LayerOptions, activation_dtype, tokens, path: str,
                     kernel_name: str | None = None):
    """``PreparedWeights`` for one layer plus a ``PreparedLayer`` record (selection explained)."""
    n, k = validation.check_linear_weights(packed, scales)
    config = kernel_base.LinearConfig(
        in_features=k,
        out_features=n,
        activation_dtype=activation_dtype,
        activation_format=options.activation_format,
        activation_rounding=options.activation_rounding,
        tokens=tokens,
    )
    selection = kernel_base.select_kernel(config, kernel=kernel_name or options.kernel_name)
    prepared = selection.kernel.prepare_weights(packed, scales, config)
    record = PreparedLayer(path, k, n, jnp.dtype(activation_dtype).name, options.scheme,
                           selection.kernel.name, selection.explain())
    return prepared, record


# ---------------------------------------------------------------------------
# Partitioning metadata: Flax kernels are [K, N]; MXFP4 weights are [N, K].


def _weight_box(kernel_box, explicit_names, value):
    """Boxes an [N, ...] weight like its [K, N] kernel was boxed, names transposed."""
    if explicit_names is not None:
        return nn.Partitioned(value, names=tuple(explicit_names))
    if isinstance(kernel_box, meta.Partitioned) and kernel_box.names is not None and len(kernel_box.names) == 2:
        k_name, n_name = kernel_box.names
        return kernel_box.replace(value=value, names=(n_name, k_name))
    if isinstance(kernel_box, meta.AxisMetadata):
        return kernel_box.replace_boxed(value)
    return value


def _bias_box(weight_box, bias):
    """A bias without its own annotation gets the weight's N axis name."""
    if isinstance(bias, meta.AxisMetadata) or not isinstance(weight_box, meta.Partitioned):
        return bias
    return weight_box.replace(value=bias, names=(weight_box.names[0],))


def _quantize_boxed(kernel, spec: DenseSpec):
    raw = meta.unbox(kernel)
    packed, scales = _common.quantize_kernel(raw, spec.options.weight_rounding)
    return (_weight_box(kernel, spec.weight_sharding, packed),
            _weight_box(kernel, spec.weight_sharding, scales))


# ---------------------------------------------------------------------------
# The forward, shared by MxFp4Dense and by swapped nn.Dense layers (swap.py):
# ``module`` is any bound linen module inside a compact method; the params
# live in its scope.


def dense_forward(module: nn.Module, x, spec: DenseSpec, *, convert_kernel: bool = False):
    """``x[..., K] -> [..., N]`` with ``module``'s MXFP4 params (created if initializing).

    ``convert_kernel=True`` (module swap of existing params) builds
    ``weight_packed``/``weight_scale`` from the module's float ``kernel`` param
    instead of from ``kernel_init``; the ``params`` collection must be mutable.
    """
    x = jnp.asarray(x)
    n = spec.features
    cdtype = _common.compute_dtype(x.dtype, spec.dtype, spec.param_dtype)
    x = x.astype(cdtype)
    k = validation.check_activations(x)
    tokens = kernel_base.tokens_of(x.shape)

    weight_box = None
    if convert_kernel:
        weight_box = _convert_kernel(module, spec)
    elif module.has_variable("params", "weight_packed") != module.has_variable("params", "weight_scale"):
        raise ValueError(
            f"{_path(module)}: params hold only one of weight_packed / weight_scale; both come from one "
            "quantized kernel. Re-initialize, or load both from the checkpoint."
        )
    elif not module.has_variable("params", "weight_packed") and module.has_variable("params", "kernel"):
        raise ValueError(
            f"{_path(module)}: the params hold a float 'kernel' but this layer is MXFP4; convert the "
            "params first (jax_mxfp4.flax.quantize_linen / SwappedLinen.quantize_params) or load MXFP4 "
            "weights (jax_mxfp4.checkpoint.load_params)."
        )

    is_prepared = module.has_variable(PREPARED_COLLECTION, _PREPARED_NAME)
    init_packed, init_scales, init_state = _weight_inits(spec, k)
    if not is_prepared:  # a prepared layer may have dropped its canonical params
        packed = module.param("weight_packed", init_packed)
        scales = module.param("weight_scale", init_scales)
    bias = None
    if spec.use_bias:
        bias = module.param("bias", _bias_init(spec, init_state, weight_box), (n,), spec.param_dtype)

    if is_prepared:
        prepared = module.get_variable(PREPARED_COLLECTION, _PREPARED_NAME)
        return jax_mxfp4.mxfp4_linear(x, prepared, bias)

    active = getattr(_prepare_state, "active", None)
    if module.is_mutable_collection(PREPARED_COLLECTION) and active is not None:
        records, kernel_name = active
        prepared, record = prepare_selected(packed, scales, spec.options, cdtype, tokens, _path(module),
                                            kernel_name)
        records.append(record)
        module.put_variable(PREPARED_COLLECTION, _PREPARED_NAME, prepared)
    else:
        # Not prepared: convert inside the call (free for the cpu/xla kernels).
        prepared = _common.prepare(packed, scales, spec.options, cdtype, tokens)
    return jax_mxfp4.mxfp4_linear(x, prepared, bias)


def _weight_inits(spec: DenseSpec, k: int):
    """Initializers for weight_packed and weight_scale drawing ONE kernel from kernel_init."""
    state: dict = {}

    def quantized(rng):
        if "weights" not in state:
            kernel = spec.kernel_init(rng, (k, spec.features), spec.param_dtype)
            state["weights"] = _quantize_boxed(kernel, spec)
        return state["weights"]

    return (lambda rng: quantized(rng)[0]), (lambda rng: quantized(rng)[1]), state


def _bias_init(spec: DenseSpec, init_state: dict, weight_box):
    def init(rng, shape, dtype):
        bias = spec.bias_init(rng, shape, dtype)
        box = weight_box if weight_box is not None else init_state.get("weights", (None,))[0]
        return _bias_box(box, bias)

    return init


def _convert_kernel(module: nn.Module, spec: DenseSpec):
    """Module swap: quantize the existing float ``kernel`` into new params (mutable ``params``)."""
    if module.has_variable("params", "weight_packed"):
        return None  # already converted (a shared module, or a second call)
    if not module.has_variable("params", "kernel"):
        raise ValueError(f"{_path(module)}: no 'kernel' param to quantize.")
    kernel = module.get_variable("params", "kernel")  # boxed, if the model annotates it
    packed, scales = _quantize_boxed(kernel, spec)
    module.put_variable("params", "weight_packed", packed)
    module.put_variable("params", "weight_scale", scales)
    if spec.use_bias and module.has_variable("params", "bias"):
        bias = module.get_variable("params", "bias")
        module.put_variable("params", "bias", _bias_box(packed, bias))
    return packed


# ---------------------------------------------------------------------------


class MxFp4Dense(nn.Module):
    """``nn.Dense`` with MXFP4 weights: same arguments, same call, MXFP4 params.

    ``y = x @ W^T + b`` over the last axis of ``x``, with ``W`` stored as
    ``weight_packed uint8[N, K/2]`` + ``weight_scale uint8[N, K/32]`` (see the
    module docstring). At ``init`` the kernel drawn from ``kernel_init``
    (shape ``[K, N]``, as ``nn.Dense`` draws it) is quantized with
    ``weight_rounding``.

    Attributes (as ``nn.Dense``):
      features: N.
      use_bias, dtype, param_dtype, kernel_init, bias_init: as ``nn.Dense``.
        ``dtype=None`` computes in ``x``'s dtype promoted with ``param_dtype``,
        like ``nn.Dense``. The MXFP4 kernels take float32/bfloat16/float16.
      precision: accepted and ignored: the MXFP4 kernels always accumulate in
        float32.
      promote_dtype, dot_general, dot_general_cls: only the defaults; anything
        else is a ``ValueError`` (the MXFP4 kernel is the matmul).
      kernel_init wrapped in ``nn.with_partitioning(init, (k_name, n_name))``
      gives ``weight_packed``/``weight_scale`` the names ``(n_name, k_name)``
      and an unannotated bias ``(n_name,)``.

    Attributes (MXFP4):
      activation_format: None (W4A16) or ``"mxfp4"`` (W4A4: x is quantized to
        MXFP4 with ``activation_rounding`` before the product).
      activation_rounding, weight_rounding: ``"compressed_tensors"`` (default;
        see ``_common.DEFAULT_ROUNDING``), ``"floor"`` or ``"rceil"``.
      kernel_name: force a kernel (registry name); None lets selection pick.
      weight_sharding: mesh axis names ``(n_name, k_name)`` for the [N, K]
        weights (overrides names carried by ``kernel_init``).
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    promote_dtype: Callable = linen_dtypes.promote_dtype
    dot_general: Callable | None = None
    dot_general_cls: Any = None
    activation_format: str | None = None
    activation_rounding: str = DEFAULT_ROUNDING.option
    weight_rounding: str = DEFAULT_ROUNDING.option
    kernel_name: str | None = None
    weight_sharding: tuple | None = None

    def spec(self) -> DenseSpec:
        _common.check_dot_general(self.dot_general, f"MxFp4Dense {self.name}")
        if self.dot_general_cls is not None or self.promote_dtype is not linen_dtypes.promote_dtype:
            raise ValueError(
                f"MxFp4Dense {self.name}: dot_general_cls / promote_dtype must stay at their defaults; the "
                "MXFP4 kernel is the matmul and the layer computes in `dtype` (x promoted with param_dtype "
                "when dtype is None)."
            )
        options = LayerOptions(self.activation_format, self.activation_rounding, self.weight_rounding,
                               self.kernel_name)
        return DenseSpec.of(self, options, self.weight_sharding)

    @nn.compact
    def __call__(self, inputs):
        return dense_forward(self, inputs, self.spec())


# ---------------------------------------------------------------------------
# prepare / canonical_params


def _map_prepared_dicts(tree, prepared, fn, path=()):
    """Calls fn(params_dict, prepared_dict, path) for each dict of `tree` with a prepared twin."""
    if not isinstance(prepared, dict):
        return tree
    out = dict(tree)
    if _PREPARED_NAME in prepared and not isinstance(prepared[_PREPARED_NAME], dict):
        out = fn(out, prepared[_PREPARED_NAME], path)
    for key, sub in prepared.items():
        if key != _PREPARED_NAME and isinstance(out.get(key), dict):
            out[key] = _map_prepared_dicts(out[key], sub, fn, path + (key,))
    return out


def prepare(model, variables, *args, method=None, kernel_name: str | None = None,
            keep_canonical: bool = False, **kwargs):
    """Prepares every MXFP4 layer of a linen model for its kernel, once.

    Args:
      model: an ``nn.Module`` holding ``MxFp4Dense`` layers, or a
        ``jax_mxfp4.flax.SwappedLinen`` (a model whose ``nn.Dense`` layers are
        swapped); anything with ``apply(variables, *args, mutable=...)``.
      variables: its variables with MXFP4 ``params``.
      *args, **kwargs: sample inputs of the call (``method``); their dtype and
        token count decide each layer's kernel (their values do not matter).
      kernel_name: force one kernel for every layer.
      keep_canonical: keep ``weight_packed``/``weight_scale`` in ``params``
        (default: drop them; the prepared layers do not read them).

    Returns:
      ``(variables, PrepareReport)``: variables with the ``mxfp4_prepared``
      collection added, and per layer the kernel chosen and why.
    """
    variables = dict(variables)
    variables.pop(PREPARED_COLLECTION, None)
    records: list[PreparedLayer] = []

    def run(variables, *args, **kwargs):
        with _preparing(records, kernel_name):
            _, state = model.apply(variables, *args, method=method, mutable=[PREPARED_COLLECTION], **kwargs)
        return state.get(PREPARED_COLLECTION, {})

    prepared = jax.jit(run)(variables, *args, **kwargs)
    prepared = _as_dict(prepared)
    if not keep_canonical:
        def drop(params, _, path):
            params.pop("weight_packed", None)
            params.pop("weight_scale", None)
            return params

        variables["params"] = _map_prepared_dicts(_as_dict(variables["params"]), prepared, drop)
    variables[PREPARED_COLLECTION] = prepared
    return variables, PrepareReport(_dedupe(records))


def canonical_params(variables):
    """``params`` with ``weight_packed``/``weight_scale`` restored from ``mxfp4_prepared`` (where dropped)."""
    prepared = variables.get(PREPARED_COLLECTION, {})

    def restore(params, weights, path):
        if "weight_packed" not in params:
            packed, scales = _common.canonical_from_prepared(weights)
            params["weight_packed"], params["weight_scale"] = packed, scales
        return params

    return _map_prepared_dicts(_as_dict(variables["params"]), prepared, restore)


def _as_dict(tree):
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return {k: _as_dict(v) if isinstance(v, dict) or hasattr(v, "unfreeze") else v for k, v in tree.items()}


def _dedupe(records, key=lambda r: r.path):
    """The first record of each ``key`` (a layer traced more than once is recorded more than once)."""
    seen, out = set(), []
    for r in records:
        if key(r) not in seen:
            seen.add(key(r))
            out.append(r)
    return out
