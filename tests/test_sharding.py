"""Sharded quantize and GEMM on 8 host CPU devices and on the GPUs of one host (DESIGN.md section 8).

The checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set
before jax starts, while the rest of the suite must see one device. So pytest
runs this file once more as a script in a subprocess (``python
tests/test_sharding.py --worker OUT.json``) with the flag set: the worker runs
every case below on 2x4 ("dp", "tp") and 1x8 meshes and writes one result per
case. Each pytest test reports one case: on failure it shows the worker's
assertion message and traceback, plus the collective counts of the compiled
HLO. Run one case by hand with ``python tests/test_sharding.py --only CASE``.

On a machine with 2 or more GPUs the same cases run once more on the GPUs
(``test_sharded_on_gpus``, marked ``gpu``; by hand: ``python
tests/test_sharding.py --platform gpu``): the meshes become ``1 x n``
(``dp`` of size 1 when n < 4), the canonical-weight GEMM cases use the ``xla``
kernel where the CPU run uses the ``cpu`` custom call, the ``marlin_*`` cases
run the Marlin CUDA kernels under ``jax.jit`` (on CPU devices their CPU
handlers), and the ``shard_map`` cases run the registry's kernel on each GPU
(Marlin on Ampere/Hopper). A case whose expectation is about its 8-way split
(``min_devices``) or that needs a CPU handler or Blackwell (``cpu_only``: the
``cpu`` GEMM's own cases, the ``sm100_*`` cases) is skipped there, with the
reason.

What is checked, per case:
* results equal the unsharded ones: bit for bit for quantize (blockwise along
  K, so any split in whole blocks computes the same bytes) and for GEMMs whose
  K is not split (each output is the same float32 dot product); within
  ``reference.matmul_tolerance`` when K is split: each device sums its K slice
  in float32 and the partials are all-reduced in float32 before the single
  rounding to x's dtype, so the only difference from the unsharded GEMM is the
  float32 summation order, which that bound covers;
* the compiled HLO (``jit(...).lower(...).compile().as_text()``): no
  all-gather at all where the rules honour the sharding (in particular none of
  uint8 weights or scales), no all-reduce for column-parallel (N split),
  exactly one all-reduce per row-parallel (K split) layer;
* shardings the rules cannot honour run correctly, resharded, with a
  ``ShardingWarning`` saying why.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
import warnings

import pytest

WORKER_DEVICES = 8
CASES: dict = {}
PLATFORM = "cpu"  # the worker's platform: "cpu" (8 host devices) or "gpu" (--platform gpu)


def case(fn=None, *, min_devices: int = 2, cpu_only: str | None = None):
    """Registers a worker case (run only in the worker subprocess).

    ``min_devices``: the case's expectations hold only for a split this wide
    (its meshes' ``2x4``/``1x8`` shapes); ``cpu_only``: why it runs on the CPU
    devices only.
    """
    def register(f):
        f.min_devices, f.cpu_only = min_devices, cpu_only
        CASES[f.__name__] = f
        return f

    return register(fn) if fn is not None else register


PLAN_ONLY = "the GEMM primitive's resharding plan (the GPUs' partitioned GEMM is the xla kernel, plain jnp that XLA partitions itself)"


def partitioned_kernel() -> str:
    """The kernel of the canonical-weight GEMM cases: the ``cpu`` custom call on CPU devices,
    the ``xla`` kernel (plain jnp that XLA partitions) on GPUs."""
    return "cpu" if PLATFORM == "cpu" else "xla"


def local_kernel():
    """The kernel of the ``shard_map`` cases' local GEMMs: the registry's choice on GPUs."""
    return "cpu" if PLATFORM == "cpu" else None


# ---------------------------------------------------------------------------
# pytest side (one device): run the worker once, report each case.


def _run_worker_process(out, what, env, *worker_args):
    """Runs this file as the worker (``env`` plus the installed package on PYTHONPATH) and
    returns its results JSON; fails the test with the worker's output if it fails."""
    import jax_mxfp4

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(jax_mxfp4.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *worker_args, "--worker", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"the {what} sharding worker failed (exit {proc.returncode}).\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}",
            pytrace=False,
        )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={WORKER_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return _run_worker_process(tmp_path_factory.mktemp("sharding") / "results.json", "8-device", env)


def _gpu_count() -> int:
    import jax

    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


@pytest.fixture(scope="module")
def gpu_worker_results(tmp_path_factory):
    if _gpu_count() < 2:
        pytest.skip(f"needs 2 or more GPUs on one host; jax sees {_gpu_count()}")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")}
    # The test process holds the GPUs too: neither may take 75% of their memory up front
    # (run pytest itself with XLA_PYTHON_CLIENT_PREALLOCATE=false, as tools/device_session.sh does).
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return _run_worker_process(tmp_path_factory.mktemp("sharding_gpu") / "results.json", "GPU", env,
                               "--platform", "gpu")


# ---------------------------------------------------------------------------
# Worker helpers (8-device subprocess only; jax is imported lazily so that
# collecting this file costs nothing).

_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(hlo: str) -> dict:
    """Counts of collective instructions in compiled HLO text, plus the all-gathered uint8 arrays."""
    counts = {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in _COLLECTIVES}
    counts["u8_all_gathers"] = len(re.findall(r"=\s*\(?u8\[[^\]]*\][^=]*?\ball-gather(?:-start)?\(", hlo))
    return counts


def mesh_shapes() -> dict[str, tuple[int, int]]:
    """The cases' two meshes: 2x4 and 1x8 on 8 devices; on n < 8 (GPUs) 2 x n/2 (n >= 4) or 1 x n, and 1 x n."""
    import jax

    n = min(jax.device_count(), WORKER_DEVICES)
    return {"2x4": (2, n // 2) if n >= 4 else (1, n), "1x8": (1, n)}


def meshes():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    shapes = mesh_shapes()
    devices = np.array(jax.devices()[:shapes["1x8"][1]])
    return {name: Mesh(devices.reshape(shape), ("dp", "tp")) for name, shape in shapes.items()}


def explicit_mesh():
    """The "2x4" mesh's devices as a mesh of ``AxisType.Explicit`` axes (jax.make_mesh's default)."""
    import jax
    from jax.sharding import AxisType

    return jax.make_mesh(mesh_shapes()["2x4"], ("dp", "tp"), axis_types=(AxisType.Explicit,) * 2,
                         devices=meshes()["2x4"].devices.flat)


def put(mesh, array, *spec):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.device_put(array, NamedSharding(mesh, PartitionSpec(*spec)))


def compile_and_run(fn, *args, expect_warning=None):
    """(outputs, collective counts) of ``jit(fn)(*args)``; checks ShardingWarnings."""
    import jax

    from jax_mxfp4.sharding import ShardingWarning

    jitted = jax.jit(fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hlo = jitted.lower(*args).compile().as_text()
        out = jitted(*args)
    messages = [str(w.message) for w in caught if issubclass(w.category, ShardingWarning)]
    if expect_warning is None:
        assert not messages, f"unexpected ShardingWarning:\n{messages[0]}"
    else:
        assert any(re.search(expect_warning, m) for m in messages), (
            f"expected a ShardingWarning matching {expect_warning!r}; got {messages}")
    return out, collectives(hlo)


def rng():
    import numpy as np

    return np.random.default_rng(20261125)


def activations(shape, dtype="bfloat16"):
    import jax.numpy as jnp

    return jnp.asarray(rng().standard_normal(shape), dtype)


def weights(n, k):
    import jax.numpy as jnp
    import numpy as np

    from jax_mxfp4 import reference

    r = rng()
    w = jnp.asarray(r.standard_normal((n, k)) * np.exp2(r.integers(-4, 3, size=(n, 1))), jnp.float32)
    return reference.quantize_reference(w)


def assert_equal(got, want, what):
    import numpy as np

    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    np.testing.assert_array_equal(got, want, err_msg=what)


def assert_within_tolerance(y, x, wp, ws, activation_format=None, what="y", rounded_partials=0):
    """``|y - matmul_reference| <= matmul_tolerance`` elementwise (as in test_gemm)."""
    import numpy as np

    from jax_mxfp4 import reference

    want = reference.matmul_reference(x, wp, ws, activation_format=activation_format, out_dtype=y.dtype)
    x_eff = reference.fake_quantize_reference(x) if activation_format else x
    tol = reference.matmul_tolerance(x_eff, wp, ws, y.dtype, rounded_partials=rounded_partials)
    err = np.abs(np.asarray(y, np.float64) - np.asarray(want, np.float64))
    assert np.all(np.isfinite(np.asarray(y, np.float64))), f"{what}: non-finite values"
    assert np.all(err <= tol), f"{what}: error exceeds matmul_tolerance by up to {np.max(err - tol):g}"


def unsharded(fn, *args):
    import jax

    return jax.jit(fn)(*(jax.device_put(a, jax.devices()[0]) for a in args))


def no_gathers(metrics, what=""):
    assert metrics["all-gather"] == 0 and metrics["all-to-all"] == 0, f"{what} gathers: {metrics}"


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
        assert sum(metrics[op] for op in _COLLECTIVES) == 0, f"quantize communicates: {metrics}"
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

N, K = 256, 512


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
    if PLATFORM == "cpu" and all_reduces == 0:
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
    x = activations((16, K), "float32" if PLATFORM == "cpu" else "bfloat16")
    wp, ws = weights(N, K)
    f = lambda a, p, s: jax_mxfp4.mxfp4_matmul(a, p, s, kernel=local_kernel())  # noqa: E731
    col = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("dp", None), P("tp", None), P("tp", None)),
                                out_specs=P("dp", "tp")))
    if PLATFORM == "cpu":
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


# ---------------------------------------------------------------------------
# The pytest test (defined after every case is registered).


def _report(results, name, where):
    """One worker case as a pytest outcome: skipped with the worker's reason, or failed with its traceback."""
    result = results.get(name)
    assert result is not None, f"the {where} worker did not report case {name!r}"
    if result.get("skipped"):
        pytest.skip(result["skipped"])
    if not result["ok"]:
        pytest.fail(f"{name} ({where}): {result['detail']}\ncollectives: {result.get('metrics')}", pytrace=False)


@pytest.mark.parametrize("name", list(CASES))
def test_sharded(name, worker_results):
    _report(worker_results, name, "8-device CPU")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_on_gpus(name, gpu_worker_results):
    _report(gpu_worker_results, name, "GPU")


# ---------------------------------------------------------------------------
# Worker entry point.


def _run_worker(out_path, only=None):
    import jax

    n = jax.device_count()
    if PLATFORM == "cpu":
        assert n >= WORKER_DEVICES, (
            f"the worker needs {WORKER_DEVICES} devices; got {n} "
            "(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax starts)")
    else:
        assert jax.devices()[0].platform == "gpu" and n >= 2, f"the GPU worker needs 2 or more GPUs: {jax.devices()}"
    print(f"devices: {n} x {jax.devices()[0].device_kind}; meshes {mesh_shapes()}", flush=True)
    results = {}
    for name, fn in CASES.items():
        if only and name not in only:
            continue
        skip = None
        if PLATFORM != "cpu" and fn.cpu_only:
            skip = f"CPU only: {fn.cpu_only}"
        elif min(n, WORKER_DEVICES) < fn.min_devices:
            skip = f"its expectations are about a {fn.min_devices}-way split; this run has {n} devices"
        if skip:
            results[name] = {"ok": None, "skipped": skip, "detail": "", "metrics": None}
            print(f"{name}: skipped ({skip})", flush=True)
            continue
        start = time.perf_counter()
        try:
            metrics = fn() or {}
            results[name] = {"ok": True, "detail": "", "metrics": metrics}
        except Exception:  # noqa: BLE001 - every failure is reported to its pytest test
            results[name] = {"ok": False, "detail": traceback.format_exc(), "metrics": None}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} {results[name]['metrics']} "
              f"({results[name]['seconds']} s)", flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--platform" in args:
        PLATFORM = args[args.index("--platform") + 1]
        assert PLATFORM in ("cpu", "gpu"), f"--platform {PLATFORM}: cpu or gpu"
    if "--worker" not in args and "XLA_FLAGS" not in os.environ and PLATFORM == "cpu":
        # Run by hand: restart with the device-count flag set.
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={WORKER_DEVICES}",
                   JAX_PLATFORMS="cpu")
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    out = args[args.index("--worker") + 1] if "--worker" in args else None
    only = args[args.index("--only") + 1:] if "--only" in args else None
    res = _run_worker(out, only)
    if not out:
        for name, r in res.items():
            if r["ok"] is False:
                print(f"\n=== {name}\n{r['detail']}")
