"""What the linen and nnx layers share: options, dtype rule, quantizing a kernel.

Both layers store a weight exactly as compressed-tensors checkpoints do:
``weight_packed uint8[N, K/2]`` (row = output feature, element ``2i`` in the
low nibble) and ``weight_scale uint8[N, K/32]`` (E8M0 bytes, linear layout),
plus an optional ``bias[N]`` in ``param_dtype``. Flax's own Dense/Linear keep
``kernel[K, N]``; the transpose happens once, when a kernel is quantized.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

import jax_mxfp4
from jax_mxfp4.formats import Rounding, parse_rounding
from jax_mxfp4.kernels.base import ACTIVATION_FORMATS, PreparedWeights

__all__ = [
    "DEFAULT_ROUNDING",
    "LayerOptions",
    "compute_dtype",
    "quantize_kernel",
]

#: Rounding the Flax layers use by default, for weights and for W4A4
#: activations: the rule compressed-tensors (llm-compressor, vLLM's format)
#: uses, so a layer quantized here holds the bytes that library would write
#: for the same weights, and a W4A4 layer quantizes its activations as the
#: library's fake-quantized model does. It also saturates less than the OCP
#: ``floor`` rule (a block's scale is chosen from amax / 3.5, not amax / 4).
DEFAULT_ROUNDING = Rounding.COMPRESSED_TENSORS


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """How an MXFP4 layer computes; static (hashable), shared by linen and nnx.

    Attributes:
      activation_format: None (W4A16: activations stay bf16/fp16/f32) or
        ``"mxfp4"`` (W4A4: activations are quantized to MXFP4 on the fly, as
        compressed-tensors' ``MXFP4`` preset does).
      activation_rounding: rounding of that on-the-fly quantization.
      weight_rounding: rounding used when a float kernel is quantized (layer
        initialization, module swap).
      kernel_name: force one MXFP4 kernel by registry name (see
        ``jax_mxfp4.kernels.REGISTRY``); None lets selection pick.
    """

    activation_format: str | None = None
    activation_rounding: Rounding = DEFAULT_ROUNDING
    weight_rounding: Rounding = DEFAULT_ROUNDING
    kernel_name: str | None = None

    def __post_init__(self):
        if self.activation_format not in ACTIVATION_FORMATS:
            raise ValueError(
                f"activation_format={self.activation_format!r}; use None (W4A16) or 'mxfp4' (W4A4: "
                "activations quantized to MXFP4 on the fly)."
            )
        object.__setattr__(self, "activation_rounding", parse_rounding(self.activation_rounding))
        object.__setattr__(self, "weight_rounding", parse_rounding(self.weight_rounding))

    @property
    def scheme(self) -> str:
        return "W4A4" if self.activation_format == "mxfp4" else "W4A16"


def compute_dtype(x_dtype, dtype, param_dtype) -> jnp.dtype:
    """The dtype a layer computes in: ``dtype`` if set, else x promoted with the params.

    Mirrors ``nn.Dense`` / ``nnx.Linear`` (``promote_dtype(inputs, kernel,
    bias, dtype=dtype)``): with ``dtype=None`` a bfloat16 input to a layer
    with float32 params computes in float32.
    """
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.dtype(jnp.result_type(x_dtype, param_dtype))


def quantize_kernel(kernel_kn, rounding):
    """``kernel[K, N]`` (Flax layout) -> ``(weight_packed uint8[N, K/2], weight_scale uint8[N, K/32])``."""
    kernel_kn = jnp.asarray(kernel_kn)
    if kernel_kn.ndim != 2:
        raise ValueError(f"a Dense kernel must be 2-D [K, N]; got shape {tuple(kernel_kn.shape)}.")
    k = int(kernel_kn.shape[0])
    if k % 32:
        raise ValueError(
            f"kernel has shape {tuple(kernel_kn.shape)}: K={k} (in_features) is not a multiple of 32, "
            "so it has no MXFP4 form (one scale per 32 inputs). Leave this layer in bf16 (add it to "
            "`ignore`)."
        )
    if jnp.dtype(kernel_kn.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        kernel_kn = kernel_kn.astype(jnp.float32)
    return jax_mxfp4.quantize_mxfp4(kernel_kn.T, rounding=rounding)


def check_dot_general(dot_general, layer: str) -> None:
    """Refuses a custom ``dot_general``: the MXFP4 kernels are the matmul."""
    if dot_general is None or dot_general is lax.dot_general:
        return
    raise ValueError(
        f"{layer}: dot_general={dot_general!r} is not supported; an MXFP4 layer's matmul is the "
        "selected MXFP4 kernel (jax_mxfp4.mxfp4_linear). Leave dot_general at its default, or keep "
        "this layer unquantized (list it in `ignore` when swapping)."
    )


def prepare(packed, scales, options: LayerOptions, activation_dtype, tokens=None) -> PreparedWeights:
    """Canonical weights -> the selected kernel's layout (``jax_mxfp4.prepare_weights``)."""
    return jax_mxfp4.prepare_weights(
        packed,
        scales,
        activation_dtype=activation_dtype,
        activation_format=options.activation_format,
        activation_rounding=options.activation_rounding,
        kernel=options.kernel_name,
        tokens=tokens,
    )


def canonical_from_prepared(prepared: PreparedWeights):
    """``(weight_packed, weight_scale)`` recovered from prepared weights, where the layout allows.

    The ``xla`` and ``cpu`` kernels keep the canonical arrays; ``cutlass_sm100``
    keeps ``packed`` and swizzles the scales (inverted with
    ``unswizzle_scales``). Other layouts raise ``ValueError`` (Marlin's, for
    one, flushes scale bytes far below a row's largest to zero, so its inverse
    is not the checkpoint): prepare those layers with ``keep_canonical=True``
    to save checkpoints afterwards.
    """
    config = prepared.config
    arrays = prepared.arrays
    if prepared.kernel in ("xla", "cpu"):
        return arrays["packed"], arrays["scales"]
    if prepared.kernel == "cutlass_sm100":
        return arrays["packed"], jax_mxfp4.unswizzle_scales(
            arrays["scales"], config.out_features, config.in_features)
    raise ValueError(
        f"weights prepared for kernel {prepared.kernel!r} cannot be turned back into checkpoint form "
        "here; prepare with keep_canonical=True (or save the checkpoint before preparing)."
    )
