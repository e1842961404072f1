"""``MxFp4Linear``: an ``nnx.Linear`` whose weight is MXFP4.

Params (named as in compressed-tensors checkpoints):

* ``weight_packed``: ``nnx.Param uint8[N, K/2]`` (E2M1 pairs, row = output feature);
* ``weight_scale``: ``nnx.Param uint8[N, K/32]`` (E8M0 bytes, linear layout);
* ``bias``: ``nnx.Param [N]`` in ``param_dtype``, or None.

Prepare once, apply many times
------------------------------
``layer.prepare(input_dtype)`` (or ``jax_mxfp4.flax.prepare(model, ...)`` for
every layer of a model) converts the canonical weights to the selected
kernel's layout (Marlin's tile repack, SM100's swizzled scales) once, and
stores the ``jax_mxfp4.PreparedWeights`` in the layer as a ``MxFp4Prepared``
variable. From then on the call is ``jax_mxfp4.mxfp4_linear(x, prepared,
bias)`` with no repacking, under ``nnx.jit`` or ``jax.jit`` of a split model.
By default ``weight_packed``/``weight_scale`` are removed (they would double
the weight memory); ``layer.canonical_weights()`` recovers them where the
layout allows, and ``keep_canonical=True`` keeps them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn.linear import default_kernel_init
from jax import lax

import jax_mxfp4
from jax_mxfp4.flax import _common
from jax_mxfp4.flax._common import DEFAULT_ROUNDING, LayerOptions
from jax_mxfp4.flax.linen import PreparedLayer, PrepareReport, prepare_selected
from jax_mxfp4.kernels.base import PreparedWeights, tokens_of

__all__ = ["MxFp4Linear", "MxFp4Prepared", "prepare"]


class MxFp4Prepared(nnx.Variable):
    """A layer's ``jax_mxfp4.PreparedWeights`` (kernel layout; not a trainable ``Param``)."""


def _unwrap_metadata(value):
    """(raw array, metadata dict) from an initializer's output (``nnx.with_partitioning`` etc.)."""
    if isinstance(value, nnx.VariableMetadata):
        return value.raw_value, dict(value.metadata)
    return value, {}


def _transposed_metadata(metadata: dict) -> dict:
    """[K, N] kernel metadata -> [N, K] weight metadata (sharding names swapped)."""
    out = dict(metadata)
    for key in ("out_sharding", "sharding", "sharding_names"):
        names = out.pop(key, None)
        if names is not None and len(names) == 2:
            out["out_sharding"] = (names[1], names[0])
    return out


def _n_axis(weight_metadata: dict):
    names = weight_metadata.get("out_sharding")
    return None if names is None else names[0]


class MxFp4Linear(nnx.Module):
    """``nnx.Linear`` with MXFP4 weights: same constructor and call, MXFP4 params.

    ``y = x @ W^T + b`` over the last axis of ``x``.

    Args (as ``nnx.Linear``):
      in_features, out_features: K (a multiple of 32) and N.
      use_bias, dtype, param_dtype, kernel_init, bias_init, rngs: as
        ``nnx.Linear``; the ``[K, N]`` kernel drawn from ``kernel_init`` is
        quantized with ``weight_rounding``. ``dtype=None`` computes in x's dtype
        promoted with ``param_dtype``, like ``nnx.Linear``.
      precision: accepted and ignored (the MXFP4 kernels accumulate in float32).
      dot_general, promote_dtype, preferred_element_type: only the defaults;
        anything else is a ``ValueError``.
      kernel_metadata, bias_metadata: as ``nnx.Linear``; sharding names given
        for the ``[K, N]`` kernel (here or through ``nnx.with_partitioning`` on
        ``kernel_init``) are transposed onto ``weight_packed``/``weight_scale``
        (``[N, K]``), and a bias without its own gets the N name.

    Args (MXFP4):
      activation_format: None (W4A16) or ``"mxfp4"`` (W4A4).
      activation_rounding, weight_rounding: default ``"compressed_tensors"``.
      kernel_name: force a kernel by registry name.
      weight_sharding: ``(n_name, k_name)`` for the ``[N, K]`` weights
        (overrides the kernel's names).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init=default_kernel_init,
        bias_init=nnx.initializers.zeros_init(),
        dot_general=lax.dot_general,
        promote_dtype=nnx_dtypes.promote_dtype,
        preferred_element_type=None,
        rngs: nnx.Rngs | None = None,
        kernel_metadata=None,
        bias_metadata=None,
        activation_format: str | None = None,
        activation_rounding: str = DEFAULT_ROUNDING.option,
        weight_rounding: str = DEFAULT_ROUNDING.option,
        kernel_name: str | None = None,
        weight_sharding: tuple | None = None,
        _weights=None,
    ):
        _common.check_dot_general(dot_general, "MxFp4Linear")
        if promote_dtype is not nnx_dtypes.promote_dtype or preferred_element_type is not None:
            raise ValueError(
                "MxFp4Linear: promote_dtype / preferred_element_type must stay at their defaults; the layer "
                "computes in `dtype` (x promoted with param_dtype when None) and returns that dtype."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.options = LayerOptions(activation_format, activation_rounding, weight_rounding, kernel_name)

        if _weights is not None:  # from_linear / checkpoint: (packed, scales, bias, metadata, bias_metadata)
            packed, scales, bias, w_meta, b_meta = _weights
        else:
            if rngs is None:
                raise TypeError("MxFp4Linear needs rngs=nnx.Rngs(...) to initialize its weights.")
            kernel, w_meta = _unwrap_metadata(
                kernel_init(rngs.params(), (in_features, out_features), param_dtype))
            w_meta = _transposed_metadata({**w_meta, **dict(kernel_metadata or {})})
            packed, scales = _common.quantize_kernel(kernel, self.options.weight_rounding)
            bias, b_meta = None, {}
            if use_bias:
                bias, b_meta = _unwrap_metadata(bias_init(rngs.params(), (out_features,), param_dtype))
                b_meta.update(bias_metadata or {})
        if weight_sharding is not None:
            w_meta = {**w_meta, "out_sharding": tuple(weight_sharding)}
        if use_bias and bias is not None and "out_sharding" not in b_meta and _n_axis(w_meta) is not None:
            b_meta = {**b_meta, "out_sharding": (_n_axis(w_meta),)}
        self.weight_packed = nnx.Param(packed, **w_meta)
        self.weight_scale = nnx.Param(scales, **w_meta)
        self.bias = nnx.Param(bias, **b_meta) if use_bias else nnx.data(None)
        self.prepared = nnx.data(None)

    # -- construction from existing weights ------------------------------------

    @classmethod
    def from_weights(cls, weight_packed, weight_scale, bias=None, *, dtype=None, param_dtype=None,
                     weight_metadata=None, bias_metadata=None, **options) -> "MxFp4Linear":
        """A layer holding given canonical weights (e.g. from a checkpoint).

        ``weight_metadata``/``bias_metadata`` are ``nnx.Param`` metadata for the
        ``[N, K]`` weights (e.g. ``{"out_sharding": ("model", None)}``).
        """
        jax_mxfp4.validation.check_linear_weights(weight_packed, weight_scale)
        n, k = int(weight_packed.shape[0]), int(weight_packed.shape[1]) * 2
        if param_dtype is None:
            param_dtype = bias.dtype if bias is not None else jnp.float32
        return cls(k, n, use_bias=bias is not None, dtype=dtype, param_dtype=param_dtype,
                   _weights=(weight_packed, weight_scale, bias, dict(weight_metadata or {}),
                             dict(bias_metadata or {})), **options)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, rounding=DEFAULT_ROUNDING.option, **options) -> "MxFp4Linear":
        """Quantizes an ``nnx.Linear``'s kernel; keeps its bias, dtypes and sharding names.

        The kernel's ``[K, N]`` sharding names become ``[N, K]`` names of
        ``weight_packed``/``weight_scale``; a bias without names gets the N
        name. If the kernel lives on a mesh (``NamedSharding``), the new
        arrays are placed on the same mesh with the transposed spec.
        """
        _common.check_dot_general(linear.dot_general, "nnx.Linear")
        kernel_var = linear.kernel
        kernel = kernel_var[...]
        packed, scales = _common.quantize_kernel(kernel, rounding)
        w_meta = _transposed_metadata(_param_metadata(kernel_var))
        bias = b_meta = None
        if linear.bias is not None:
            bias = linear.bias[...]
            b_meta = _param_metadata(linear.bias)
        packed, scales = _place_like(kernel, packed, scales)
        if bias is not None and "out_sharding" not in b_meta and _n_axis(w_meta) is not None:
            b_meta["out_sharding"] = (_n_axis(w_meta),)
            bias = _place_bias(kernel, bias)
        return cls.from_weights(packed, scales, bias, dtype=linear.dtype, param_dtype=kernel.dtype,
                                weight_metadata=w_meta, bias_metadata=b_meta,
                                weight_rounding=rounding, **options)

    # -- forward -----------------------------------------------------------------

    def __call__(self, inputs, out_sharding=None):
        x = jnp.asarray(inputs)
        cdtype = _common.compute_dtype(x.dtype, self.dtype, self.param_dtype)
        x = x.astype(cdtype)
        bias = self.bias[...] if self.bias is not None else None
        if self.prepared is not None:
            prepared = self.prepared.get_value()
        else:  # not prepared: convert inside the call (free for the cpu/xla kernels)
            prepared = _common.prepare(self.weight_packed[...], self.weight_scale[...], self.options, cdtype,
                                       tokens_of(x.shape))
        y = jax_mxfp4.mxfp4_linear(x, prepared, bias)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y

    # -- prepare-once ------------------------------------------------------------

    def compute_dtype(self, input_dtype) -> jnp.dtype:
        """The dtype the kernel sees for inputs of ``input_dtype``."""
        return _common.compute_dtype(input_dtype, self.dtype, self.param_dtype)

    def prepare(self, input_dtype=None, *, tokens: int | None = None, kernel_name: str | None = None,
                keep_canonical: bool = False, path: str = "") -> PreparedLayer:
        """Converts the weights to the selected kernel's layout, once (see the module docstring).

        Args:
          input_dtype: dtype of the activations the layer will be called with
            (default: the layer's ``dtype``; required when that is None).
          tokens: expected M (rows of x) if kernel selection should depend on it.
          kernel_name: force a kernel (default: the layer's ``kernel_name``).
          keep_canonical: keep ``weight_packed``/``weight_scale`` as well.

        Returns the ``PreparedLayer`` record (kernel chosen and why).
        """
        if input_dtype is None:
            if self.dtype is None:
                raise ValueError(
                    f"MxFp4Linear {path or ''}: dtype=None, so the compute dtype depends on the inputs; pass "
                    "input_dtype (the dtype of x at call time)."
                )
            input_dtype = self.dtype
        packed, scales = self.canonical_weights()
        prepared, record = prepare_selected(packed, scales, self.options, self.compute_dtype(input_dtype),
                                            tokens, path, kernel_name)
        self.prepared = MxFp4Prepared(prepared)
        if not keep_canonical:
            self.weight_packed = nnx.data(None)
            self.weight_scale = nnx.data(None)
        return record

    def canonical_weights(self):
        """``(weight_packed, weight_scale)`` arrays, recovered from the prepared layout if dropped."""
        if self.weight_packed is not None:
            return self.weight_packed[...], self.weight_scale[...]
        prepared: PreparedWeights = self.prepared.get_value()
        return _common.canonical_from_prepared(prepared)


def _param_metadata(var) -> dict:
    """A Param's user metadata (sharding names, rules, mesh), minus nnx's bookkeeping keys."""
    meta = dict(var.get_metadata())
    for key in ("hijax", "ref", "eager_sharding", "on_get_value", "on_set_value", "on_create_value",
                "on_add_axis", "on_remove_axis"):
        meta.pop(key, None)
    # The new arrays are placed explicitly (``_place_like``), never resharded at creation.
    meta["eager_sharding"] = False
    return meta


def _named_sharding(array):
    sharding = getattr(array, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def _place_like(kernel, packed, scales):
    """Puts [N, K] weights on the [K, N] kernel's mesh with the transposed partition spec."""
    sharding = _named_sharding(kernel)
    if sharding is None:
        return packed, scales
    from jax_mxfp4 import sharding as mx_sharding

    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    k_axis, n_axis = spec[0], spec[1]
    n, k = int(packed.shape[0]), int(packed.shape[1]) * 2
    packed_sharding, scales_sharding = mx_sharding.weight_shardings(
        sharding.mesh, n_axis=n_axis, k_axis=k_axis, shape=(n, k))
    return jax.device_put(packed, packed_sharding), jax.device_put(scales, scales_sharding)


def _place_bias(kernel, bias):
    sharding = _named_sharding(kernel)
    if sharding is None:
        return bias
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    return jax.device_put(bias, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[1])))


def prepare(model: nnx.Module, input_dtype=None, *, tokens: int | None = None, kernel_name: str | None = None,
            keep_canonical: bool = False) -> PrepareReport:
    """Prepares every ``MxFp4Linear`` in ``model`` (in place); see ``MxFp4Linear.prepare``."""
    records = []
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, MxFp4Linear) and node.prepared is None:
            dotted = ".".join(str(p) for p in path)
            records.append(node.prepare(input_dtype, tokens=tokens, kernel_name=kernel_name,
                                        keep_canonical=keep_canonical, path=dotted))
    return PrepareReport(records)
