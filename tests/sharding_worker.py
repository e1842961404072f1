"""Worker side of the sharding tests (tests/test_sharding.py): the case registry and the
helpers the cases share, run in a subprocess with 8 host devices (or on the GPUs).

Cases live in ``sharding_cases.py`` (quantize, canonical-weight GEMMs, shard_map,
partitioner modes, the generic mechanism) and ``sharding_cases_prepared.py``
(kernel-prepared weights: Marlin and SM100); importing those modules registers them in
``CASES``. jax is imported lazily inside functions, so collecting the tests costs nothing.
"""

from __future__ import annotations

import json
import re
import time
import traceback
import warnings

WORKER_DEVICES = 8
CASES: dict = {}
PLATFORM = "cpu"  # the worker's platform: "cpu" (8 host devices) or "gpu" (set_platform)


def set_platform(name: str) -> None:
    """Selects the worker's platform: "cpu" (8 host devices) or "gpu" (the GPUs of this host)."""
    global PLATFORM
    assert name in ("cpu", "gpu"), f"--platform {name}: cpu or gpu"
    PLATFORM = name


def on_cpu() -> bool:
    return PLATFORM == "cpu"


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
    return "cpu" if on_cpu() else "xla"


def local_kernel():
    """The kernel of the ``shard_map`` cases' local GEMMs: the registry's choice on GPUs."""
    return "cpu" if on_cpu() else None


# ---------------------------------------------------------------------------
# Helpers of the cases (worker subprocess only).

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(hlo: str) -> dict:
    """Counts of collective instructions in compiled HLO text, plus the all-gathered uint8 arrays."""
    counts = {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}
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


N, K = 256, 512  # the default GEMM shape of the cases


# ---------------------------------------------------------------------------
# Worker entry point.


def run_worker(out_path, only=None):
    import jax

    n = jax.device_count()
    if on_cpu():
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
        if not on_cpu() and fn.cpu_only:
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
