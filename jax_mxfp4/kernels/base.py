"""The MXFP4 linear-kernel interface, the registry, and kernel selection.

Every kernel (CUTLASS SM100 W4A4, Marlin W4A16, the CPU custom call, XLA
dequantize-then-dot) implements ``Mxfp4LinearKernel``:

* ``is_supported(device) -> (ok, reason)``: can it run on this device at all;
* ``can_implement(config) -> (ok, reason)``: can it run this layer's shapes;
* ``prepare_weights(w_packed, w_scales, config) -> PreparedWeights``: the
  one-time conversion from the canonical checkpoint layout to the kernel's own
  (Marlin tile repack, swizzled scales, ...), run once at load;
* ``apply(x, weights, bias=None)``: the layer's forward under ``jax.jit``.

``select_kernel`` walks ``REGISTRY`` in priority order and returns the first
kernel that accepts, with the reason every earlier one was skipped.
``JAX_MXFP4_KERNEL=<name>`` (or the ``kernel=`` argument of the public API,
which takes precedence) forces one kernel; a forced kernel that cannot run is
a ``KernelUnavailableError``, never a silent fallback.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
from typing import ClassVar

import jax
import jax.numpy as jnp

from jax_mxfp4.formats import Rounding, parse_rounding
from jax_mxfp4.sharding import to_spec

__all__ = [
    "CanonicalLayoutKernel",
    "KERNEL_ENV_VAR",
    "KernelSelection",
    "KernelUnavailableError",
    "LinearConfig",
    "Mxfp4LinearKernel",
    "PreparedWeights",
    "REGISTRY",
    "get_kernel",
    "register_kernel",
    "select_kernel",
    "tokens_of",
]

KERNEL_ENV_VAR = "JAX_MXFP4_KERNEL"
ACTIVATION_FORMATS = (None, "mxfp4")


class KernelUnavailableError(RuntimeError):
    """No kernel (or not the forced one) can run this layer on this device."""


def tokens_of(shape) -> int:
    """M of an activation of shape ``[..., K]``: the product of its leading dims (LinearConfig.tokens)."""
    return math.prod(int(d) for d in shape[:-1])


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """What a kernel needs to know about a linear layer to accept it.

    Attributes:
      in_features: K, a multiple of 32.
      out_features: N.
      activation_dtype: dtype of x (and of the output): bfloat16, float16 or float32.
      activation_format: None for W4A16 (bf16/fp16 activations), "mxfp4" for
        W4A4 (activations quantized to MXFP4 on the fly).
      activation_rounding: rounding mode of that on-the-fly quantization.
      tokens: M (product of x's leading dims) when known at trace time; lets
        selection depend on M. None means unknown.
    """

    in_features: int
    out_features: int
    activation_dtype: jnp.dtype = jnp.dtype(jnp.bfloat16)
    activation_format: str | None = None
    activation_rounding: Rounding = Rounding.FLOOR
    tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "activation_dtype", jnp.dtype(self.activation_dtype))
        object.__setattr__(self, "activation_rounding", parse_rounding(self.activation_rounding))
        if self.activation_format not in ACTIVATION_FORMATS:
            raise ValueError(
                f"activation_format={self.activation_format!r}; use None (W4A16: activations stay "
                "bf16/fp16) or 'mxfp4' (W4A4: activations are quantized to MXFP4)."
            )
        if self.in_features % 32:
            raise ValueError(f"in_features={self.in_features} is not a multiple of 32.")

    def with_tokens(self, tokens: int | None) -> "LinearConfig":
        return dataclasses.replace(self, tokens=tokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreparedWeights:
    """Weights in one kernel's layout, made by that kernel's ``prepare_weights``.

    A pytree: ``arrays`` are the leaves (jit/shard/save them like params);
    ``kernel`` and ``config`` are static.
    """

    arrays: dict[str, jax.Array]
    kernel: str = dataclasses.field(metadata=dict(static=True))
    config: LinearConfig = dataclasses.field(metadata=dict(static=True))


class Mxfp4LinearKernel(abc.ABC):
    """Interface of an MXFP4 linear-layer kernel (see the module docstring)."""

    #: Registry name, accepted by ``JAX_MXFP4_KERNEL`` and ``kernel=``.
    name: ClassVar[str]
    #: One line on what it is, for selection reports.
    description: ClassVar[str]
    #: Whether ``apply`` takes MXFP4 activations natively (W4A4 hardware). Kernels
    #: without it run W4A4 layers by fake-quantizing x first.
    native_w4a4: ClassVar[bool] = False

    @abc.abstractmethod
    def is_supported(self, device: jax.Device) -> tuple[bool, str]:
        """(True, "") if the kernel can run on ``device``, else (False, why not)."""

    @abc.abstractmethod
    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        """(True, "") if the kernel can run a layer with ``config``, else (False, why not)."""

    @abc.abstractmethod
    def prepare_weights(self, w_packed, w_scales, config: LinearConfig) -> PreparedWeights:
        """Canonical weights (uint8[N, K/2], linear uint8[N, K/32]) -> this kernel's layout."""

    def prepared_specs(self, config: LinearConfig, mesh, n_axes: tuple[str, ...],
                       k_axes: tuple[str, ...]) -> dict[str, "jax.sharding.PartitionSpec"]:
        """``PartitionSpec`` of each prepared array for a layer split along N over mesh
        axes ``n_axes`` (column-parallel) and along K over ``k_axes`` (row-parallel),
        the sharding its primitives run with locally. ``ValueError`` (saying why) where
        this kernel's layout cannot be split so. Used by
        ``jax_mxfp4.sharding.shard_prepared_weights``; a kernel that does not override
        it cannot have its prepared weights placed that way."""
        raise NotImplementedError(
            f"kernel {self.name!r} does not say how its prepared weights split over a mesh "
            "(Mxfp4LinearKernel.prepared_specs); shard the canonical weights "
            "(jax_mxfp4.sharding.shard_weights) and prepare them inside jax.jit or jax.shard_map.")

    def describe_path(self, config: LinearConfig, device: jax.Device) -> str:
        """What ``matmul`` runs for ``config`` on ``device`` where that depends on the
        layer (e.g. a dispatch by M), for selection reports; "" where there is one path."""
        return ""

    @abc.abstractmethod
    def matmul(self, x, weights: PreparedWeights):
        """x[..., K] (already fake-quantized for W4A4 unless ``native_w4a4``) -> y[..., N]."""

    def apply(self, x, weights: PreparedWeights, bias=None):
        """The layer: ``x @ W^T (+ bias)`` with the layer's activation format."""
        _check_prepared(self, weights)
        config = weights.config
        if config.activation_format == "mxfp4" and not self.native_w4a4:
            x = fake_quantize_activations(x, config.activation_rounding)
        y = self.matmul(x, weights)
        if bias is not None:
            y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)
        return y

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class CanonicalLayoutKernel(Mxfp4LinearKernel):
    """A kernel that reads the checkpoint layout as is (packed ``[N, K/2]``,
    linear scales ``[N, K/32]``) and accepts every layer shape."""

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        return True, ""

    def prepare_weights(self, w_packed, w_scales, config: LinearConfig) -> PreparedWeights:
        return PreparedWeights({"packed": w_packed, "scales": w_scales}, self.name, config)

    def prepared_specs(self, config, mesh, n_axes, k_axes):
        # Both arrays have N as rows and K (in whole blocks) as columns.
        spec = to_spec((n_axes, k_axes))
        return {"packed": spec, "scales": spec}


def fake_quantize_activations(x, rounding):
    """MXFP4-quantize x with the quantize custom call, then dequantize (W4A4 numerics)."""
    from jax_mxfp4.primitives import quantize as quantize_primitive
    from jax_mxfp4 import reference

    packed, scales = quantize_primitive.quantize(x, scale_layout="linear", rounding=rounding)
    return reference.dequantize_reference(packed, scales, dtype=x.dtype)


def _check_prepared(kernel: Mxfp4LinearKernel, weights) -> None:
    if not isinstance(weights, PreparedWeights):
        raise TypeError(
            f"weights must be PreparedWeights from {kernel.name}.prepare_weights; got {type(weights).__name__}."
        )
    if weights.kernel != kernel.name:
        raise ValueError(
            f"weights were prepared for kernel {weights.kernel!r} but are applied with {kernel.name!r}; "
            "prepare them again with this kernel (jax_mxfp4.prepare_weights(..., kernel=...))."
        )


# ---------------------------------------------------------------------------
# Registry and selection.

#: Kernels in priority order (first that accepts wins).
REGISTRY: list[Mxfp4LinearKernel] = []


def register_kernel(kernel_cls: type[Mxfp4LinearKernel]) -> type[Mxfp4LinearKernel]:
    """Class decorator appending an instance to ``REGISTRY`` (import order = priority)."""
    if any(k.name == kernel_cls.name for k in REGISTRY):
        raise ValueError(f"a kernel named {kernel_cls.name!r} is already registered")
    REGISTRY.append(kernel_cls())
    return kernel_cls


def get_kernel(name: str) -> Mxfp4LinearKernel:
    for k in REGISTRY:
        if k.name == name:
            return k
    raise ValueError(f"unknown MXFP4 kernel {name!r}; registered kernels: {[k.name for k in REGISTRY]}.")


@dataclasses.dataclass(frozen=True)
class KernelSelection:
    """The chosen kernel and why every kernel before it was skipped."""

    kernel: Mxfp4LinearKernel
    skipped: tuple[tuple[str, str], ...]
    forced_by: str | None = None  # "argument", "JAX_MXFP4_KERNEL" or None
    path: str = ""  # the kernel's describe_path for the layer

    def explain(self) -> str:
        how = f"forced by {self.forced_by}" if self.forced_by else "first kernel that accepts"
        lines = [f"kernel {self.kernel.name!r} ({self.kernel.description}); {how}"]
        if self.path:
            lines.append(f"  path: {self.path}")
        lines += [f"  skipped {name!r}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def default_device() -> jax.Device:
    """The device selection is made for: jax's default device."""
    device = jax.config.jax_default_device
    if isinstance(device, jax.Device):
        return device
    if isinstance(device, str):
        return jax.devices(device)[0]
    return jax.devices()[0]


def _check(kernel: Mxfp4LinearKernel, config: LinearConfig, device) -> str:
    ok, reason = kernel.is_supported(device)
    if not ok:
        return reason
    ok, reason = kernel.can_implement(config)
    return "" if ok else reason


def select_kernel(config: LinearConfig, *, kernel: str | None = None, device=None) -> KernelSelection:
    """Picks the kernel for ``config`` on ``device`` (default: jax's default device).

    ``kernel`` (a registry name) forces one; otherwise ``JAX_MXFP4_KERNEL`` does,
    if set; otherwise the first kernel in ``REGISTRY`` that accepts is chosen.
    """
    device = device or default_device()
    forced_by = None
    if kernel is not None:
        forced_by = "argument"
    elif os.environ.get(KERNEL_ENV_VAR):
        kernel, forced_by = os.environ[KERNEL_ENV_VAR], KERNEL_ENV_VAR
    if kernel is not None:
        chosen = get_kernel(kernel)
        reason = _check(chosen, config, device)
        if reason:
            raise KernelUnavailableError(
                f"MXFP4 kernel {kernel!r} (forced by {forced_by}) cannot run this layer "
                f"(K={config.in_features}, N={config.out_features}, tokens={config.tokens}, "
                f"activations {config.activation_dtype}/{config.activation_format or 'bf16'}) on "
                f"{device.device_kind} ({device.platform}): {reason}"
            )
        return KernelSelection(chosen, (), forced_by, chosen.describe_path(config, device))
    skipped = []
    for candidate in REGISTRY:
        reason = _check(candidate, config, device)
        if not reason:
            return KernelSelection(candidate, tuple(skipped), path=candidate.describe_path(config, device))
        skipped.append((candidate.name, reason))
    raise KernelUnavailableError(
        "no MXFP4 kernel can run this layer:\n" + "\n".join(f"  {n}: {r}" for n, r in skipped)
    )
