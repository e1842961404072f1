"""Sharded quantize and GEMM on 8 host CPU devices and on the GPUs of one host (DESIGN.md section 8).

The checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set
before jax starts, while the rest of the suite must see one device. So pytest
runs this file once more as a script in a subprocess (``python
tests/test_sharding.py --worker OUT.json``) with the flag set: the worker
(``sharding_worker.py``) runs every case of ``sharding_cases.py`` (canonical
weights) and ``sharding_cases_prepared.py`` (Marlin- and SM100-prepared
weights) on 2x4 ("dp", "tp") and 1x8 meshes and writes one result per case. Each pytest test reports one case: on failure it shows the worker's
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
  float32 summation order, which that bound covers (kernels whose partials
  leave in bf16/fp16, Marlin and SM100, add ``rounded_partials``);
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
import subprocess
import sys

import pytest

import sharding_cases  # noqa: F401 - registers the cases
import sharding_cases_prepared  # noqa: F401 - registers the cases
import sharding_worker
from sharding_worker import CASES, WORKER_DEVICES


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
# The pytest tests, one per registered case.


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


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--platform" in args:
        sharding_worker.set_platform(args[args.index("--platform") + 1])
    if "--worker" not in args and "XLA_FLAGS" not in os.environ and sharding_worker.on_cpu():
        # Run by hand: restart with the device-count flag set.
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={WORKER_DEVICES}",
                   JAX_PLATFORMS="cpu")
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    out = args[args.index("--worker") + 1] if "--worker" in args else None
    only = args[args.index("--only") + 1:] if "--only" in args else None
    res = sharding_worker.run_worker(out, only)
    if not out:
        for name, r in res.items():
            if r["ok"] is False:
                print(f"\n=== {name}\n{r['detail']}")
