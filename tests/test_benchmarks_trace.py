"""Benchmark harness: profiler-trace parsing and per-call device time (benchmarks/trace_timing.py).

Synthetic XSpaces shaped like the JAX profiler's GPU output, a real CPU
trace, and the event timings of a real H100 decode trace.
"""

from __future__ import annotations

import json

import pytest
from bench_support import KD, XSpaceBuilder, _ev, two_case_trace  # first: it puts the repository root on sys.path

from benchmarks import harness as H


# ---------------------------------------------------------------------------
# Splitting events into calls.

def test_split_calls_chunk_and_gaps():
    evs = [_ev("a", 0, 1), _ev("b", 2, 1), _ev("a", 100, 1), _ev("b", 102, 1), _ev("a", 200, 1), _ev("b", 202, 1)]
    calls, method = H.split_calls(evs, 3)
    assert method == "chunk" and [len(c) for c in calls] == [2, 2, 2]
    # Uneven: the middle call ran an extra kernel -> split at the largest gaps.
    evs2 = evs[:4] + [_ev("c", 104, 1)] + evs[4:]
    calls, method = H.split_calls(evs2, 3)
    assert method == "gaps" and [len(c) for c in calls] == [2, 3, 2]
    assert H.split_calls(evs[:2], 3)[0] is None


def test_split_calls_order_insensitive():
    # Two streams: kernel order inside a call may differ between calls.
    evs = [_ev("a", 0, 1), _ev("b", 0.5, 1), _ev("b", 100, 1), _ev("a", 100.5, 1)]
    calls, method = H.split_calls(evs, 2)
    assert method == "chunk" and [len(c) for c in calls] == [2, 2]


def test_device_timing_drops_first_and_excludes_memcpy():
    evs = []
    for i, dur in enumerate([50.0, 3.0, 4.0, 5.0]):  # first call slow (warm-up)
        t = 1000.0 * i
        evs += [_ev("k1", t, dur), _ev("k2", t + dur + 1, 1.0), _ev("Memcpy", t + 20, 7.0, "memcpy")]
    dt = H.device_timing(evs, 4, drop_first=1)
    assert dt["time_us"]["median"] == pytest.approx(5.0)  # 4 + 1
    assert dt["time_us"]["min"] == pytest.approx(4.0) and dt["time_us"]["max"] == pytest.approx(6.0)
    assert dt["kernels_per_call"] == 2 and dt["method"] == "chunk" and dt["error"] is None
    assert dt["memcpy_us_per_call"] == pytest.approx(7.0)
    names = {k["name"]: k for k in dt["kernels"]}
    assert names["k1"]["median_us"] == pytest.approx(4.0) and names["k2"]["count"] == 1
    assert dt["span_us"] == pytest.approx(6.0)


def test_device_timing_not_enough_events():
    dt = H.device_timing([_ev("k", 0, 1)], 4)
    assert dt["time_us"] is None and "cannot split" in dt["error"]


# ---------------------------------------------------------------------------
# GPU-shaped traces.

def test_extract_gpu_events_classifies_and_ignores_derived_lines():
    pd = two_case_trace()
    events, diag = H.extract_device_events(pd, "gpu")
    kinds = {e.kind for e in events}
    assert kinds == {"kernel", "memcpy"}
    assert all(e.line.startswith("Stream #") for e in events)
    assert diag["device_planes"] == ["/device:GPU:0"]
    assert H.timing_kinds(events) == ("kernel",)


@pytest.mark.parametrize("shift_us, expect", [(0.0, "annotation=gaps"), (2500.0, "gaps"), (None, "gaps")])
def test_assign_group_events(shift_us, expect):
    n = 4
    pd = two_case_trace(host_shift_us=shift_us or 0.0, with_annotations=shift_us is not None, n_calls=n)
    keys = [f"{H.ANNOTATION_PREFIX}0", f"{H.ANNOTATION_PREFIX}1"]
    assigned, diag = H.assign_group_events(pd, keys, "gpu", gap_ns=4e6)
    assert assigned is not None, diag
    assert diag["assignment"] == expect
    d0 = H.device_timing(assigned[keys[0]], n, kinds=diag["timing_kinds"])
    d1 = H.device_timing(assigned[keys[1]], n, kinds=diag["timing_kinds"])
    assert d0["kernels_per_call"] == 1 and d0["time_us"]["median"] == pytest.approx(3.0)
    assert d1["kernels_per_call"] == 3 and d1["time_us"]["median"] == pytest.approx(8.0)
    assert d1["memcpy_us_per_call"] == pytest.approx(0.4 / n)
    if shift_us:
        assert any("disagree" in w or "misaligned" in w for w in diag["warnings"])


def test_assign_group_events_disagreement_prefers_gaps():
    # Windows that swallow the first call of case 1 into case 0 (a clock offset of ~1 call).
    n = 4
    pd0 = two_case_trace(n_calls=n)
    events, _ = H.extract_device_events(pd0, "gpu")
    kern = sorted((e for e in events if e.kind == "kernel"), key=lambda e: e.start_ns)
    t1 = next(e.start_ns for e in kern if e.name == "fusion_a") / 1e3
    end = kern[-1].end_ns / 1e3
    lines = {"Stream #7": [(e.name, e.start_ns / 1e3, e.duration_ns / 1e3, KD) for e in kern]}
    host = {"python": [(f"{H.ANNOTATION_PREFIX}0", 90.0, t1 + 15.0 - 90.0, {}),
                       (f"{H.ANNOTATION_PREFIX}1", t1 + 15.0, end - t1, {})]}
    pd = XSpaceBuilder().plane("/device:GPU:0", lines).plane("/host:CPU", host).profile()
    keys = [f"{H.ANNOTATION_PREFIX}0", f"{H.ANNOTATION_PREFIX}1"]
    assigned, diag = H.assign_group_events(pd, keys, "gpu", gap_ns=4e6)
    assert diag["assignment"] == "gaps" and any("disagree" in w for w in diag["warnings"])
    assert H.device_timing(assigned[keys[1]], n)["kernels_per_call"] == 3


def test_assign_group_events_no_device_plane_lists_planes():
    pd = XSpaceBuilder().plane("/host:CPU", {"python": [("x", 0, 1, {})]}).profile()
    assigned, diag = H.assign_group_events(pd, ["k0"], "gpu", gap_ns=4e6)
    assert assigned is None
    assert "no device events" in diag["error"] and "/host:CPU" in diag["error"]


def test_graph_events_used_when_no_kernels():
    lines = {"Stream #3": [("graph", 10.0, 20.0, {"cuda_graph_exec_id": "5"}),
                           ("graph", 200.0, 22.0, {"cuda_graph_exec_id": "5"})]}
    pd = XSpaceBuilder().plane("/device:GPU:0", lines).profile()
    events, _ = H.extract_device_events(pd, "gpu")
    assert H.timing_kinds(events) == ("graph",)
    dt = H.device_timing(events, 2, drop_first=0, kinds=("graph",))
    assert dt["time_us"]["median"] == pytest.approx(21.0)


def test_real_cpu_trace_run_cases():
    import jax
    import jax.numpy as jnp

    s = H.Settings(platform=jax.devices()[0].platform, warmup=1, min_wall_iters=2, max_wall_iters=3,
                   trace_iters=3, gap_s=0.01)
    x = jnp.ones((64, 64), jnp.float32)
    cases = [H.Case("t", "a", {"M": 64}, jax.jit(lambda x: jnp.sin(x) @ x), [(x,)]),
             H.Case("t", "b", {"M": 64}, jax.jit(lambda x: jnp.cos(x) + 1), [(x,), (x + 1,)]),
             H.Case("t", "bad", {"M": 64}, jax.jit(lambda x: x.reshape(7, -1)), [(x,)])]
    H.run_cases(cases, s, "test")
    assert cases[2].error and "reshape" in cases[2].error.lower() or "cannot" in cases[2].error.lower()
    for c in cases[:2]:
        assert c.compile_s is not None and len(c.wall_s) >= 2
        assert c.device and c.device["time_us"], c.device
        assert c.device["kernels_per_call"] >= 1
        rec = H.case_record(c)
        assert rec["device_time_method"].startswith(("annotation", "gaps"))
        json.dumps(rec)
