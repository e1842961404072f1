"""Sharding cases with canonical weights: quantize, the CPU/XLA GEMM, a Megatron MLP,
shard_map, the GSPMD and explicit-axes modes, and the generic partitioning mechanism
(registered in ``sharding_worker.CASES``; run by tests/test_sharding.py)."""

from __future__ import annotations

from sharding_worker import (
    COLLECTIVES,
    K,
    N,
    PLAN_ONLY,
    activations,
    assert_equal,
    assert_within_tolerance,
    case,
    collectives,
    compile_and_run,
    explicit_mesh,
    local_kernel,
    meshes,
    no_gathers,
    on_cpu,
    partitioned_kernel,
    put,
    unsharded,
    weights,
)


# ---------------------------------------------------------------------------
# Quantize.


def _quantize_case(mesh_name, shape, spec, scale_layout, dtype="bfloat16", expect_warning=None):
    import jax_mxfp4
    from jax_mxfp4 import reference

    mesh = meshes()[mesh_name]
    x = activations(shape, dtype)
    fn = lambda v: jax_mxfp4.quantize_mxfp4(v, scale_layout=scale_layout)  # noqa: E731
    (packed, scales), metrics = compile_and_run(fn, put(mesh, x, *spec), expect_warning=expect_warning)
    want = unsharded(fn, x)
    assert_equal(packed, want[0], "packed")
    assert_equal(scales, want[1], "scales")
    ref = reference.quantize_reference(x, scale_layout=scale_layout)
    assert_equal(scales, ref[1], "scales vs reference")
    if expect_warning is None:
        assert sum(metrics[op] for op in COLLECTIVES) == 0, f"quantize communicates: {metrics}"
    return metrics


@case
def quantize_linear_tokens_and_k_2x4():
    return _quantize_case("2x4", (256, 512), ("dp", "tp"), "linear")


@case
def quantize_linear_3d_1x8():
    return _quantize_case("1x8", (2, 16, 512), (None, None, "tp"), "linear", dtype="float32")


@case
def quantize_linear_k_over_both_axes_2x4():
    return _quantize_case("2x4", (8, 256), (None, ("dp", "tp")), "linear", dtype="float16")


@case(min_devices=8)
def quantize_swizzled_tokens_and_k_2x4():
    # 128 rows and 128 elements of K per shard: whole tiles, one row tile each.
    return _quantize_case("2x4", (256, 512), ("dp", "tp"), "swizzled_128x4")


@case
def quantize_swizzled_decode_k_1x8():
    # M <= 128 (decode): K split in whole 4-column tiles.
    return _quantize_case("1x8", (16, 1024), (None, "tp"), "swizzled_128x4")


@case
def quantize_swizzled_tokens_1x8():
    # Tokens split over the outermost non-trivial dim, 128 rows per shard.
    return _quantize_case("1x8", (1, 1024, 64), (None, "tp", None), "swizzled_128x4")


@case
def quantize_swizzled_inner_token_dim_resharded():
    # Splitting dim 1 of (4, 256, K) would interleave shards' rows in the buffer.
    return _quantize_case("1x8", (4, 256, 64), (None, "tp", None), "swizzled_128x4",
                          expect_warning=r"interleave the rows")


@case(min_devices=8)
def quantize_swizzled_partial_row_tile_resharded():
    # 64 rows over 2 shards would pad each shard's rows to 128 separately: not
    # the global buffer, so x is gathered instead (with a warning).
    return _quantize_case("2x4", (64, 256), ("dp", None), "swizzled_128x4",
                          expect_warning=r"not a multiple of 128")


@case
def quantize_swizzled_k_with_many_rows_resharded():
    return _quantize_case("2x4", (256, 512), (None, "tp"), "swizzled_128x4",
                          expect_warning=r"at most 128 rows")


@case(min_devices=8)
def quantize_k_not_whole_blocks_resharded():
    # 64 elements over 8 shards = 8 per shard: not whole 32-element blocks.
    return _quantize_case("1x8", (16, 64), (None, "tp"), "linear", expect_warning=r"whole 32-element blocks")


@case(min_devices=8)
def weight_sharding_helpers():
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from jax_mxfp4 import sharding

    mesh = meshes()["2x4"]
    wp, ws = weights(64, 256)
    p, s = sharding.shard_weights(wp, ws, mesh, n_axis="dp", k_axis="tp")
    assert p.sharding.spec == P("dp", "tp") and s.sharding.spec == P("dp", "tp")
    assert p.addressable_shards[0].data.shape == (32, 32) and s.addressable_shards[0].data.shape == (32, 2)
    assert jnp.array_equal(p, wp) and jnp.array_equal(s, ws)
    try:
        sharding.weight_shardings(mesh, k_axis=("dp", "tp"), shape=(64, 128))  # 16 elements per K shard
    except ValueError as err:
        assert "whole 32-element MXFP4 blocks" in str(err), err
    else:
        raise AssertionError("K shards of 16 elements were accepted")
    return {}


# ---------------------------------------------------------------------------
# GEMM.

def _gemm_case(mesh_name, x_shape, x_spec, w_spec, kernel, activation_format=None, *, all_reduces,
               n=N, expect_warning=None, dtype="bfloat16"):
    import jax_mxfp4

    mesh = meshes()[mesh_name]
    x = activations(x_shape, dtype)
    wp, ws = weights(n, x_shape[-1])
    fn = lambda a, p, s: jax_mxfp4.mxfp4_matmul(  # noqa: E731
        a, p, s, kernel=kernel, activation_format=activation_format)
    y, metrics = compile_and_run(fn, put(mesh, x, *x_spec), put(mesh, wp, *w_spec), put(mesh, ws, *w_spec),
                                 expect_warning=expect_warning)
    assert metrics["u8_all_gathers"] == 0, f"uint8 weights/scales are all-gathered: {metrics}"
    if expect_warning is None:
        no_gathers(metrics)
    assert metrics["all-reduce"] == all_reduces, f"expected {all_reduces} all-reduce(s): {metrics}"
    want = unsharded(fn, x, wp, ws)
    k_split = all_reduces > 0
    if kernel == "cpu" and not k_split:
        assert_equal(y, want, "y vs unsharded")  # same float32 dot per output
    else:
        assert_within_tolerance(y, x, wp, ws, activation_format, "y vs reference")
        assert_within_tolerance(want, x, wp, ws, activation_format, "unsharded y vs reference")
    return metrics


def _gemm_cases(kernel, activation_format):
    tag = f"{kernel}_{'w4a4' if activation_format else 'w4a16'}"

    def column_parallel():
        return _gemm_case("2x4", (16, K), ("dp", None), ("tp", None), kernel, activation_format, all_reduces=0)

    def row_parallel():
        return _gemm_case("2x4", (16, K), ("dp", "tp"), (None, "tp"), kernel, activation_format, all_reduces=1)

    def row_parallel_3d_1x8():
        return _gemm_case("1x8", (2, 4, K), (None, None, "tp"), (None, "tp"), kernel, activation_format,
                          all_reduces=1)

    def column_parallel_1x8():
        return _gemm_case("1x8", (2, 4, K), (None, None, None), ("tp", None), kernel, activation_format,
                          all_reduces=0)

    for fn in (column_parallel, row_parallel, row_parallel_3d_1x8, column_parallel_1x8):
        fn.__name__ = f"gemm_{tag}_{fn.__name__}"
        case(fn, cpu_only="the CPU handler's cases (the GPU run has the xla_* ones)" if kernel == "cpu" else None)


for _kernel in ("cpu", "xla"):
    for _format in (None, "mxfp4"):
        _gemm_cases(_kernel, _format)


@case
def gemm_cpu_row_parallel_slices_replicated_x():
    # x replicated, weights split along K: x is sliced locally (no gather).
    return _gemm_case("2x4", (16, K), ("dp", None), (None, "tp"), partitioned_kernel(), all_reduces=1)


@case(min_devices=8)
def gemm_cpu_n_and_k_split():
    # N over tp and K over dp at once: one all-reduce over dp.
    return _gemm_case("2x4", (8, K), (None, "dp"), ("tp", "dp"), partitioned_kernel(), "mxfp4", all_reduces=1, dtype="float16")


@case
def gemm_cpu_row_parallel_float32_precision():
    # float32 activations: the all-reduce sums float32 partials (no bf16 rounding).
    return _gemm_case("1x8", (4, K), (None, "tp"), (None, "tp"), partitioned_kernel(), all_reduces=1, dtype="float32")


@case(cpu_only=PLAN_ONLY)
def gemm_cpu_x_k_axis_differs_from_weights():
    # x split along K over dp, weights over tp: x is resharded to the weights' split.
    return _gemm_case("2x4", (16, K), (None, "dp"), (None, "tp"), partitioned_kernel(), all_reduces=1,
                      expect_warning=r"x \(16, 512\) P\(None, 'dp'\) -> P\(None, 'tp'\)")


@case(cpu_only=PLAN_ONLY)
def gemm_cpu_tokens_on_weight_axis_resharded():
    # x's tokens and the weights' N on the same mesh axis: x gives way (weights are never gathered).
    return _gemm_case("2x4", (16, K), ("tp", None), ("tp", None), partitioned_kernel(), all_reduces=0,
                      expect_warning=r"used by the weights")


@case(min_devices=8, cpu_only=PLAN_ONLY)
def gemm_cpu_weights_k_not_whole_blocks():
    # packed split into 8-byte (16-element) K shards: not whole blocks -> replicated along K.
    import jax_mxfp4

    mesh = meshes()["1x8"]
    x = activations((4, 128))
    wp, ws = weights(64, 128)
    fn = lambda a, p, s: jax_mxfp4.mxfp4_matmul(a, p, s, kernel=partitioned_kernel())  # noqa: E731
    y, metrics = compile_and_run(fn, put(mesh, x), put(mesh, wp, None, "tp"), put(mesh, ws),
                                 expect_warning=r"whole 32-element blocks")
    assert_equal(y, unsharded(fn, x, wp, ws), "y vs unsharded")
    return metrics


@case
def mlp_megatron_one_all_reduce():
    """Column-parallel up projection then row-parallel down projection: one all-reduce in total."""
    import jax
    import jax.numpy as jnp

    import jax_mxfp4

    mesh = meshes()["2x4"]
    x = activations((16, 256))
    w1p, w1s = weights(512, 256)
    w2p, w2s = weights(256, 512)

    def mlp(a, p1, s1, p2, s2):
        h = jax.nn.relu(jax_mxfp4.mxfp4_matmul(a, p1, s1, kernel=partitioned_kernel(), activation_format="mxfp4"))
        return jax_mxfp4.mxfp4_matmul(h, p2, s2, kernel=partitioned_kernel(), activation_format="mxfp4")

    args = (put(mesh, x, "dp", None), put(mesh, w1p, "tp", None), put(mesh, w1s, "tp", None),
            put(mesh, w2p, None, "tp"), put(mesh, w2s, None, "tp"))
    y, metrics = compile_and_run(mlp, *args)
    no_gathers(metrics, "MLP")
    assert metrics["all-reduce"] == 1, f"expected exactly one all-reduce: {metrics}"
    assert y.sharding.spec[0] == "dp"
    h = unsharded(lambda a, p, s: jax.nn.relu(jax_mxfp4.mxfp4_matmul(a, p, s, kernel=partitioned_kernel(), activation_format="mxfp4")),
                  x, w1p, w1s)
    assert_within_tolerance(y, h, w2p, w2s, "mxfp4", "MLP output vs reference on the unsharded hidden layer")
    assert jnp.all(jnp.isfinite(y.astype(jnp.float32)))
    return metrics


# ---------------------------------------------------------------------------
# shard_map: the ops on local shards.


@case
def shard_map_column_and_row_parallel():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax_mxfp4

    mesh = meshes()["2x4"]
    # float32 x on CPU (the handler's exact path); bf16 on GPUs, the Marlin kernel's dtype.
    x = activations((16, K), "float32" if on_cpu() else "bfloat16")
    wp, ws = weights(N, K)
    f = lambda a, p, s: jax_mxfp4.mxfp4_matmul(a, p, s, kernel=local_kernel())  # noqa: E731
    col = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("dp", None), P("tp", None), P("tp", None)),
                                out_specs=P("dp", "tp")))
    if on_cpu():
        assert_equal(col(x, wp, ws), unsharded(f, x, wp, ws), "column-parallel shard_map vs unsharded")
    else:  # each GPU's local N may get another launch plan: same math, other accumulation order
        assert_within_tolerance(col(x, wp, ws), x, wp, ws, what="column-parallel shard_map")
    # Row-parallel: float32 partials, one psum, then the single rounding (what the primitive does).
    row = jax.jit(jax.shard_map(
        lambda a, p, s: jax.lax.psum(f(a.astype(jnp.float32), p, s), "tp").astype(a.dtype),
        mesh=mesh, in_specs=(P("dp", "tp"), P(None, "tp"), P(None, "tp")), out_specs=P("dp", None)))
    xb = x.astype(jnp.bfloat16)
    assert_within_tolerance(row(xb, wp, ws), xb, wp, ws, what="row-parallel shard_map")
    metrics = collectives(row.lower(xb, wp, ws).compile().as_text())
    assert metrics["all-reduce"] == 1 and metrics["all-gather"] == 0, metrics
    return metrics


@case
def shard_map_quantize_local_shards_concatenate():
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_mxfp4

    mesh = meshes()["2x4"]
    x = activations((2, 128, 512))
    for layout, out_scales in (("linear", P("dp", None, "tp")), ("swizzled_128x4", P("dp", None))):
        f = lambda v, layout=layout: jax_mxfp4.quantize_mxfp4(v, scale_layout=layout)  # noqa: E731
        x_spec = P("dp", None, "tp") if layout == "linear" else P("dp", None, None)
        g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=x_spec, out_specs=(x_spec, out_scales)))
        got, want = g(x), unsharded(f, x)
        assert_equal(got[0], want[0], f"{layout} packed")
        assert_equal(got[1], want[1], f"{layout} scales")  # 128 rows per shard: buffers concatenate
    return {}


# ---------------------------------------------------------------------------
# Other partitioners and modes.


@case(min_devices=8)
def gspmd_partitioner():
    """The legacy GSPMD path (``infer_sharding_from_operands``) gives the same programs."""
    import jax

    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        _quantize_case("2x4", (256, 512), ("dp", "tp"), "swizzled_128x4")
        return _gemm_case("2x4", (16, K), ("dp", "tp"), (None, "tp"), partitioned_kernel(), "mxfp4", all_reduces=1)
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


@case
def explicit_axes_types_follow_the_plan():
    """With ``AxisType.Explicit`` meshes (jax.make_mesh's default) result types carry the sharding."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_mxfp4

    mesh = explicit_mesh()
    x = activations((16, K))
    wp, ws = weights(N, K)
    args = (put(mesh, x, "dp", "tp"), put(mesh, wp, None, "tp"), put(mesh, ws, None, "tp"))
    f = lambda a, p, s: jax_mxfp4.mxfp4_matmul(a, p, s, kernel=partitioned_kernel())  # noqa: E731
    y_type = jax.eval_shape(f, *args)
    assert y_type.sharding.spec == P("dp", None), y_type.sharding
    y, metrics = compile_and_run(f, *args)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("dp", None)), 2), y.sharding
    assert_within_tolerance(y, x, wp, ws)
    (packed, scales), _ = compile_and_run(lambda v: jax_mxfp4.quantize_mxfp4(v), args[0])
    assert packed.sharding.spec == P("dp", "tp") and scales.sharding.spec == P("dp", "tp")
    return metrics


def _explicit_axes_row_parallel(kernel, activation_format=None):
    """x split (dp, tp), weights split along K over tp, explicit-axes mesh: one all-reduce,
    no gather, result typed P("dp", None)."""
    from jax.sharding import PartitionSpec as P

    import jax_mxfp4

    mesh = explicit_mesh()
    x = activations((16, K))
    wp, ws = weights(N, K)
    f = lambda a, p, s: jax_mxfp4.mxfp4_matmul(  # noqa: E731
        a, p, s, kernel=kernel, activation_format=activation_format)
    y, metrics = compile_and_run(f, put(mesh, x, "dp", "tp"), put(mesh, wp, None, "tp"), put(mesh, ws, None, "tp"))
    no_gathers(metrics, f"explicit-axes {kernel} {activation_format or 'w4a16'}")
    assert metrics["all-reduce"] == 1, metrics
    assert y.sharding.spec == P("dp", None), y.sharding
    assert_within_tolerance(y, x, wp, ws, activation_format)
    return metrics


@case
def explicit_axes_w4a4():
    return _explicit_axes_row_parallel(partitioned_kernel(), "mxfp4")


@case
def explicit_axes_xla_kernel_row_parallel():
    """The xla kernel (plain jnp) under explicit axes: a split K needs the result sharding given."""
    return _explicit_axes_row_parallel("xla")


# ---------------------------------------------------------------------------
# The mechanism is generic: a toy primitive declares its rules the same way
# (as the Marlin GEMM primitive does), including a workspace.


@case(cpu_only="the toy primitive has a CPU lowering only")
def generic_primitive_with_workspace():
    import jax
    import jax.numpy as jnp
    from jax import core
    from jax.interpreters import mlir
    from jax.sharding import PartitionSpec as P

    from jax_mxfp4.primitives.base import FfiPrimitive, Partition, register_primitive

    @register_primitive
    class RowSum(FfiPrimitive):
        """y[m] = sum_k x[m, k], with a per-call scratch buffer of one float per local row."""

        name = "test_row_sum"
        target = "unused"
        platforms = ("cpu",)
        num_workspace_results = 1

        @classmethod
        def abstract_eval(cls, x):
            return core.ShapedArray(x.shape[:1], x.dtype), core.ShapedArray(x.shape[:1], jnp.float32)

        @classmethod
        def _lowering(cls, platform):
            return mlir.lower_fun(lambda x: (x.sum(1), jnp.zeros(x.shape[:1], jnp.float32)),
                                  multiple_results=True)

        @classmethod
        def batch(cls, args, dims):
            raise NotImplementedError

        @classmethod
        def sharding_rule(cls, mesh, in_shapes, out_shapes):
            return "m k -> m", {"reduction_factors": ("k",)}

        @classmethod
        def partition(cls, mesh, args):
            from jax_mxfp4 import sharding

            m_axes, k_axes = sharding.spec_axes(args[0].sharding, 2)

            def local(x):
                y = cls.inner_primitive.bind(x)[0]
                return jax.lax.psum(y, k_axes) if k_axes else y

            return Partition((sharding.to_spec((m_axes, k_axes)),), (sharding.to_spec((m_axes,)),), local)

    mesh = meshes()["2x4"]
    x = activations((16, 64), "float32")
    y, metrics = compile_and_run(RowSum.bind, put(mesh, x, "dp", "tp"))
    assert y.shape == (16,) and metrics["all-reduce"] == 1 and metrics["all-gather"] == 0, metrics
    assert_equal(y.sharding.spec, P("dp"), "result sharding")
    import numpy as np

    np.testing.assert_allclose(np.asarray(y), np.asarray(x).sum(1), rtol=1e-5)
    return metrics
