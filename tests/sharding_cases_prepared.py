"""Sharding cases with kernel-prepared weights under jax.jit: the Marlin GEMM and
dequantize primitives and the SM100 W4A4 GEMM (registered in ``sharding_worker.CASES``;
run by tests/test_sharding.py)."""

from __future__ import annotations

from sharding_worker import (
    K,
    N,
    activations,
    assert_equal,
    assert_within_tolerance,
    case,
    compile_and_run,
    explicit_mesh,
    meshes,
    no_gathers,
    on_cpu,
    put,
    unsharded,
    weights,
)


# ---------------------------------------------------------------------------
# Marlin-prepared weights under jax.jit: the Marlin GEMM and dequantize
# primitives' own rules (CPU handlers on the host devices, the CUDA kernels on GPUs).


def marlin_prepared(wp, ws, dtype="bfloat16"):
    import jax.numpy as jnp

    from jax_mxfp4.kernels import LinearConfig, get_kernel

    n, k = int(wp.shape[0]), int(wp.shape[1]) * 2
    return get_kernel("marlin").prepare_weights(wp, ws, LinearConfig(k, n, activation_dtype=jnp.dtype(dtype)))


def _marlin_case(mesh_name, x_shape, x_spec, n_axis, k_axis, *, all_reduces, n=N, dense=False,
                 scales_spec=None, expect_warning=None, dtype="bfloat16"):
    """A Marlin layer placed with ``shard_prepared_weights(n_axis, k_axis)`` (``scales_spec``
    overrides the scales' placement), run by ``jax.jit`` on x placed with ``x_spec``;
    ``dense``: the large-M path (``mxfp4_marlin_dequantize`` + dot) instead of the GEMM."""
    import jax

    import jax_mxfp4
    from jax_mxfp4 import sharding
    from jax_mxfp4.kernels import get_kernel

    mesh = meshes()[mesh_name]
    x = activations(x_shape, dtype)
    wp, ws = weights(n, x_shape[-1])
    prepared = marlin_prepared(wp, ws, dtype)
    placed = sharding.shard_prepared_weights(prepared, mesh, n_axis=n_axis, k_axis=k_axis)
    if scales_spec is not None:
        placed.arrays["scales"] = put(mesh, prepared.arrays["scales"], *scales_spec)
    fn = get_kernel("marlin").dense_matmul if dense else jax_mxfp4.mxfp4_linear
    y, metrics = compile_and_run(fn, put(mesh, x, *x_spec), placed, expect_warning=expect_warning)
    hlo = jax.jit(fn).lower(put(mesh, x, *x_spec), placed).compile().as_text()
    primitive = "mxfp4_marlin_dequantize" if dense else "mxfp4_marlin_gemm"
    assert f"jax_mxfp4_{primitive.removeprefix('mxfp4_')}" in hlo, f"{primitive} is not in the program"
    if expect_warning is None:
        assert metrics["u8_all_gathers"] == 0, f"uint8 tiles/scales are all-gathered: {metrics}"
        no_gathers(metrics)
    assert metrics["all-reduce"] == all_reduces, f"expected {all_reduces} all-reduce(s): {metrics}"
    want = unsharded(fn, x, prepared)
    k_shards = sharding.axes_size(mesh, sharding.spec_axes(placed.arrays["tiles"].sharding, 2)[0])
    if on_cpu() and all_reduces == 0:
        assert_equal(y, want, "y vs unsharded")  # the same float32 dot per output
    else:
        # Marlin partials leave the kernel in x's dtype, and so may the dense path's dot
        # partials (XLA's GPU dot of bf16 operands): k_shards roundings more.
        partials = k_shards if all_reduces else 0
        assert_within_tolerance(y, x, wp, ws, what="y vs reference", rounded_partials=partials)
        assert_within_tolerance(want, x, wp, ws, what="unsharded y vs reference")
    return metrics


@case
def marlin_column_parallel():
    return _marlin_case("2x4", (16, K), ("dp", None), "tp", None, all_reduces=0)


@case
def marlin_row_parallel():
    return _marlin_case("2x4", (16, K), ("dp", "tp"), None, "tp", all_reduces=1)


@case
def marlin_row_parallel_3d_1x8():
    return _marlin_case("1x8", (2, 4, K), (None, None, "tp"), None, "tp", all_reduces=1, dtype="float16")


@case(min_devices=8)
def marlin_n_and_k_split():
    return _marlin_case("2x4", (8, K), (None, "dp"), "tp", "dp", all_reduces=1)


@case
def marlin_dense_path_column_parallel():
    return _marlin_case("2x4", (16, K), ("dp", None), "tp", None, all_reduces=0, dense=True)


@case
def marlin_dense_path_row_parallel():
    # The dequantized weight is K-split like the tiles; the dot's partials are summed by XLA.
    return _marlin_case("2x4", (16, K), ("dp", "tp"), None, "tp", all_reduces=1, dense=True)


@case
def marlin_scales_split_along_rows_resharded():
    # scales split along their rows would cut the row-factor planes off: gathered, with the reason.
    metrics = _marlin_case("2x4", (4, K), (None, "tp"), None, "tp", all_reduces=1, scales_spec=("tp", None),
                           expect_warning=r"row factors")
    assert metrics["all-gather"] == 1, f"only the small scales array is gathered: {metrics}"
    return metrics


@case
def marlin_n_not_whole_units_resharded():
    # N = 96 over 4 (GPUs: 2) devices: 24 (48) features per shard are not whole 32-feature
    # units -> N replicated.
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_mxfp4
    from jax_mxfp4 import sharding

    mesh = meshes()["2x4"]
    x = activations((8, K))
    wp, ws = weights(96, K)
    prepared = marlin_prepared(wp, ws)
    try:
        sharding.shard_prepared_weights(prepared, mesh, n_axis="tp")
    except ValueError as err:
        assert "whole 32-element feature units" in str(err), err
    else:
        raise AssertionError("shard_prepared_weights accepted N=96 over 4 shards")
    # Placed by hand anyway (tiles split in units of 16 bytes): resharded, with the reason.
    placed = jax.device_put(prepared, jax.tree.map(lambda a: NamedSharding(mesh, P(None, "tp")), prepared))
    y, metrics = compile_and_run(jax_mxfp4.mxfp4_linear, put(mesh, x), placed,
                                 expect_warning=r"whole 32-feature units")
    assert_equal(y, unsharded(jax_mxfp4.mxfp4_linear, x, prepared), "y vs unsharded")
    return metrics


@case
def marlin_explicit_axes_row_parallel():
    from jax.sharding import PartitionSpec as P

    import jax_mxfp4
    from jax_mxfp4 import sharding

    mesh = explicit_mesh()
    x = activations((16, K))
    wp, ws = weights(N, K)
    placed = sharding.shard_prepared_weights(marlin_prepared(wp, ws), mesh, k_axis="tp")
    y, metrics = compile_and_run(jax_mxfp4.mxfp4_linear, put(mesh, x, "dp", "tp"), placed)
    no_gathers(metrics, "explicit-axes Marlin")
    assert metrics["all-reduce"] == 1, metrics
    assert y.sharding.spec == P("dp", None), y.sharding
    tp = sharding.axes_size(mesh, ("tp",))
    assert_within_tolerance(y, x, wp, ws, rounded_partials=tp)
    return metrics


# ---------------------------------------------------------------------------
# The SM100 W4A4 GEMM primitive under jax.jit (its CPU handler on the host devices;
# the CUDA kernel needs Blackwell, so these cases do not run on the Hopper GPUs).

SM100_ONLY = "the SM100 kernel runs on Blackwell only (its CPU handler runs here)"


def _sm100_case(mesh_name, x_shape, x_spec, n, n_axis, *, expect_warning=None, w_spec=None):
    import jax.numpy as jnp

    from jax_mxfp4 import sharding
    from jax_mxfp4.kernels import LinearConfig, get_kernel
    from jax_mxfp4.kernels.cutlass_sm100 import w4a4_linear

    mesh = meshes()[mesh_name]
    x = activations(x_shape)
    wp, ws = weights(n, x_shape[-1])
    config = LinearConfig(x_shape[-1], n, jnp.bfloat16, "mxfp4")
    prepared = get_kernel("cutlass_sm100").prepare_weights(wp, ws, config)
    if w_spec is None:
        placed = sharding.shard_prepared_weights(prepared, mesh, n_axis=n_axis)
    else:
        placed = type(prepared)({k: put(mesh, v, *w_spec) for k, v in prepared.arrays.items()},
                                prepared.kernel, prepared.config)
    fn = lambda a, w: w4a4_linear(a, w.arrays["packed"], w.arrays["scales"])  # noqa: E731
    y, metrics = compile_and_run(fn, put(mesh, x, *x_spec), placed, expect_warning=expect_warning)
    if expect_warning is None:
        assert metrics["u8_all_gathers"] == 0, f"uint8 weights/scales are all-gathered: {metrics}"
        no_gathers(metrics)
    assert metrics["all-reduce"] == 0, f"the SM100 GEMM is never K-split: {metrics}"
    assert_equal(y, unsharded(fn, x, prepared), "y vs unsharded")  # the same float32 dot per output
    assert_within_tolerance(y, x, wp, ws, "mxfp4", "y vs reference")
    return metrics


@case(cpu_only=SM100_ONLY)
def sm100_column_parallel_and_tokens():
    # 256 tokens over dp (128-row tiles each), N = 512 over tp (128 rows each on 4 devices).
    return _sm100_case("2x4", (256, K), ("dp", None), 512, "tp")


@case(cpu_only=SM100_ONLY)
def sm100_column_parallel_decode_1x8():
    return _sm100_case("1x8", (4, K), (None, None), 1024, "tp")


def _sm100_row_parallel(mesh_name, x_shape, x_spec, n, n_axis, k_axis):
    import jax.numpy as jnp

    from jax_mxfp4 import sharding
    from jax_mxfp4.kernels import LinearConfig, get_kernel
    from jax_mxfp4.kernels.cutlass_sm100 import w4a4_linear

    mesh = meshes()[mesh_name]
    x = activations(x_shape)
    wp, ws = weights(n, x_shape[-1])
    prepared = get_kernel("cutlass_sm100").prepare_weights(wp, ws, LinearConfig(x_shape[-1], n, jnp.bfloat16, "mxfp4"))
    placed = sharding.shard_prepared_weights(prepared, mesh, n_axis=n_axis, k_axis=k_axis)
    fn = lambda a, w: w4a4_linear(a, w.arrays["packed"], w.arrays["scales"])  # noqa: E731
    y, metrics = compile_and_run(fn, put(mesh, x, *x_spec), placed)
    assert metrics["u8_all_gathers"] == 0, f"uint8 weights/scales are all-gathered: {metrics}"
    no_gathers(metrics)
    assert metrics["all-reduce"] == 1, f"expected one all-reduce: {metrics}"
    k_shards = sharding.axes_size(mesh, sharding.spec_axes(placed.arrays["packed"].sharding, 2)[1])
    assert_within_tolerance(y, x, wp, ws, "mxfp4", "y vs reference", rounded_partials=k_shards)
    return metrics


@case(cpu_only=SM100_ONLY)
def sm100_row_parallel_decode():
    # <= 128 rows: the quantize primitive's band-split scale buffer is each shard's local buffer.
    return _sm100_row_parallel("2x4", (16, 1024), (None, "tp"), 256, None, "tp")


@case(cpu_only=SM100_ONLY)
def sm100_row_parallel_many_rows_1x8():
    # 300 rows (3 row tiles), x replicated: each device quantizes its K slice and takes its
    # K tiles of every row tile of the weight scales.
    return _sm100_row_parallel("1x8", (300, 1024), (None, None), 256, None, "tp")


@case(cpu_only=SM100_ONLY, min_devices=8)
def sm100_n_and_k_split():
    return _sm100_row_parallel("2x4", (8, 1024), (None, "dp"), 512, "tp", "dp")
