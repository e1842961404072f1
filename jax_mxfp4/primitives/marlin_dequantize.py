"""The ``mxfp4_marlin_dequantize`` primitive: Marlin-prepared weights -> dense ``[N, K]``.

``w = dequantize(tiles, scales)`` in the dtype the weights were prepared for
(bfloat16 or float16), from the layout of ``csrc/marlin/marlin_layout.h``
(made by ``kernels.marlin_weights.prepare_marlin_weights``). The values are
those of ``formats.dequantize_codes`` on ``unprepare_marlin_weights(tiles,
scales)``. Used by the Marlin kernel's large-M path (a dense GEMM on the
result); lowers to the CUDA handler ``MarlinDequantizeFfi``
(``csrc/marlin/marlin_dequantize.cu``: one pass over the prepared bytes) and
to the CPU handler in ``csrc/marlin/marlin_cpu.cc`` (same values).

Sharding: like the weight operand of ``mxfp4_marlin_gemm`` (see there): N
split in whole 32-feature units and K split in whole blocks stay local, the
result ``w`` is split alike (N on axis 0, K on axis 1); ``scales`` stays whole
along its rows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import core, lax
from jax.interpreters import batching

from jax_mxfp4 import sharding, validation
from jax_mxfp4.formats import BLOCK_SIZE, input_dtype_code
from jax_mxfp4.kernels.marlin_weights import UNIT_N, MarlinLayout, k_shard_scales, prepared_specs
from jax_mxfp4.primitives.base import FfiPrimitive, Partition, register_primitive
from jax_mxfp4.primitives.marlin_gemm import prepared_rule, scales_notes

__all__ = ["MarlinDequantizePrimitive", "marlin_dequantize"]


@register_primitive
class MarlinDequantizePrimitive(FfiPrimitive):
    name = "mxfp4_marlin_dequantize"
    target = "jax_mxfp4_marlin_dequantize"
    platforms = ("cpu", "cuda")
    operand_names = ("tiles", "scales")

    @classmethod
    def abstract_eval(cls, tiles, scales, *, n: int, k: int, dtype: int):
        out_dtype = {int(input_dtype_code(d)): jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16)}.get(dtype)
        if out_dtype is None:
            raise ValueError(f"dtype code {dtype}: prepared Marlin weights are bfloat16 or float16.")
        layout = MarlinLayout(n, k, "bfloat16" if out_dtype == jnp.bfloat16 else "float16")
        for arr, want, what in ((tiles, layout.tiles_shape, "tiles"), (scales, layout.scales_shape, "scales")):
            validation.check_uint8(arr, what)
            if tuple(arr.shape) != want:
                raise ValueError(
                    f"{what} has shape {tuple(arr.shape)} but a Marlin weight of N={n}, K={k} has {want} "
                    "(prepare it with jax_mxfp4.prepare_weights(..., kernel='marlin')).")
        return core.ShapedArray((n, k), out_dtype)

    @classmethod
    def ffi_attributes(cls, *, n: int, k: int, dtype: int):
        return {"n": np.int64(n), "k": np.int64(k), "dtype": np.int32(dtype)}

    @classmethod
    def batch(cls, args, dims, **params):
        # Stacked weights (e.g. experts): one dequantization per batch element.
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
        return lax.map(lambda a: cls.bind(*a, **params), tuple(args)), 0

    @classmethod
    def sharding_rule(cls, mesh, in_shapes, out_shapes, *, n, k, dtype):
        rb = sharding.RuleBuilder()
        tiles, scales, n_dim = prepared_rule(rb, n, k)
        k_dim = rb.dim(("k", k // BLOCK_SIZE), ("b", BLOCK_SIZE))
        return f"{tiles}, {scales} -> {n_dim} {k_dim}", rb.sizes()

    @classmethod
    def partition(cls, mesh, args, *, n, k, dtype):
        tiles, scales = args
        t_k, t_n = sharding.spec_axes(tiles.sharding, 2)
        # The weight operand's plan of a GEMM (no activations: x is one row of K).
        plan = sharding.plan_linear(mesh, (k,), None, n, k, t_n, t_k, n_multiple=UNIT_N)
        n_axes, k_axes = plan.n, plan.k
        notes = plan.notes + scales_notes(scales)
        n_local = n // sharding.axes_size(mesh, n_axes)
        k_local = k // sharding.axes_size(mesh, k_axes)

        def local(tiles, scales):
            if k_axes:
                scales = k_shard_scales(scales, k_local // BLOCK_SIZE, lax.axis_index(k_axes))
            return cls.inner_primitive.bind(tiles, scales, n=n_local, k=k_local, dtype=dtype)

        specs = prepared_specs(n_axes, k_axes)
        return Partition((specs["tiles"], specs["scales"]), (sharding.to_spec((n_axes, k_axes)),), local, notes)


def marlin_dequantize(tiles, scales, layout: MarlinLayout):
    """Binds ``mxfp4_marlin_dequantize``: ``[N, K]`` in ``layout.dtype``."""
    return MarlinDequantizePrimitive.bind(tiles, scales, n=layout.n, k=layout.k,
                                          dtype=int(input_dtype_code(jnp.dtype(layout.dtype))))
