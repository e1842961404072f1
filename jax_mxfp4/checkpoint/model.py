"""The in-memory data model: ``CompressedTensorsCheckpoint`` and its ``Mxfp4Layer``s."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jax_mxfp4

__all__ = ["CompressedTensorsCheckpoint", "Mxfp4Layer"]


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
        """``save_compressed_tensors(self, path, **kwargs)``."""
        from jax_mxfp4.checkpoint.writer import save_compressed_tensors  # writer imports this module

        save_compressed_tensors(self, path, **kwargs)

    @classmethod
    def from_flax(cls, model, variables=None, **kwargs) -> "CompressedTensorsCheckpoint":
        """``checkpoint_from_model(model, variables, **kwargs)``."""
        from jax_mxfp4.checkpoint.from_flax import checkpoint_from_model  # from_flax imports this module

        return checkpoint_from_model(model, variables, **kwargs)

    def __repr__(self) -> str:
        w4a4 = sum(layer.activation_format == "mxfp4" for layer in self.layers.values())
        return (f"CompressedTensorsCheckpoint({len(self.layers)} MXFP4 layers ({w4a4} W4A4), "
                f"{len(self.tensors)} other tensors)")

