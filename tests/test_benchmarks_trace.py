"""Benchmark harness: profiler-trace parsing and per-call device time (benchmarks/trace_timing.py).

Synthetic XSpaces shaped like the JAX profiler's GPU output, a real CPU
trace, and the event timings of a real H100 decode trace.
"""

from __future__ import annotations

import json

import pytest
from bench_support import KD, XSpaceBuilder, _ev, two_case_trace  # first: it makes the benchmarks package importable

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


def test_device_timing_drops_first_and_counts_attached_copies():
    evs = []
    for i, dur in enumerate([50.0, 3.0, 4.0, 5.0]):  # first call slow (warm-up)
        t = 1000.0 * i
        evs += [_ev("k1", t, dur), _ev("k2", t + dur + 1, 1.0), _ev("Memcpy", t + 20, 7.0, "memcpy")]
    dt = H.device_timing(evs, 4, drop_first=1)
    assert dt["time_us"]["median"] == pytest.approx(12.0)  # 4 + 1 + the call's memcpy 7
    assert dt["time_us"]["min"] == pytest.approx(11.0) and dt["time_us"]["max"] == pytest.approx(13.0)
    assert dt["attached_us"]["median"] == pytest.approx(7.0)
    assert dt["kernels_per_call"] == 2 and dt["method"] == "chunk" and dt["error"] is None
    assert dt["memcpy_us_per_call"] == pytest.approx(7.0)
    names = {k["name"]: k for k in dt["kernels"]}
    assert names["k1"]["median_us"] == pytest.approx(4.0) and names["k2"]["count"] == 1
    assert dt["span_us"] == pytest.approx(27.0)  # to the memcpy's end
    # Kernels only (nothing attached): the sum of the kernels.
    only = H.device_timing(evs, 4, drop_first=1, attach=())
    assert only["time_us"]["median"] == pytest.approx(5.0) and only["span_us"] == pytest.approx(6.0)


def test_attached_events_join_the_nearest_call():
    """A memset just before a call's kernels is that call's, not the previous one's; one
    after the last call's kernels is the last call's."""
    evs = []
    for i in range(3):
        t = 1000.0 * i
        evs += [_ev("Memset", t - 3.0, 1.0, "memset"), _ev("k", t, 10.0)]
    evs.append(_ev("Memcpy", 2000.0 + 15.0, 2.0, "memcpy"))
    dt = H.device_timing(evs, 3, drop_first=0)
    assert dt["time_us"]["min"] == pytest.approx(11.0) and dt["time_us"]["max"] == pytest.approx(13.0)
    assert dt["span_us"] == pytest.approx(13.0)  # memset start .. kernel end


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
    # Knowing the calls per case keeps the gaps: these windows split case 0 unevenly, the gaps do not.
    assigned, diag = H.assign_group_events(pd, keys, "gpu", gap_ns=4e6, n_calls=n)
    assert diag["assignment"] == "gaps" and any("using the idle gaps" in w for w in diag["warnings"])
    assert H.device_timing(assigned[keys[0]], n)["kernels_per_call"] == 1
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


# ---------------------------------------------------------------------------
# A real H100 trace: the decode benchmark's MXFP4 group (16 layers, batches 1
# and 16, 1 untimed + 5 timed calls each). One stream line carries both the
# kernels and the Marlin kernel's split-K counter memsets (one before each of
# the 64 Marlin kernels of a step). Numbers taken from the trace (ns): the two
# annotation windows and, per call, the first start, the last end, the summed
# kernel and memset durations, and the kernel and memset counts.

DECODE_MXFP4_WINDOWS_NS = [(14801951, 35804430), (39887917, 56349358)]
DECODE_MXFP4_CALLS = [  # (case, start_ns, end_ns, kernel_ns, memset_ns, kernels, memsets)
    (0, 15694527, 18826780, 1535165, 54846, 260, 64),
    (0, 24280613, 26200394, 1523579, 78525, 260, 64),  # 5.45 ms after call 0: the host built a CUDA graph
    (0, 26913240, 28738811, 1530943, 64731, 260, 64),
    (0, 29249605, 31072521, 1527287, 66848, 260, 64),
    (0, 31539762, 33368277, 1529337, 67524, 260, 64),
    (0, 33850110, 35677569, 1531709, 65597, 260, 64),
    (1, 40335611, 42571527, 1931173, 57434, 235, 64),  # 4.66 ms after case 0: the inserted gap
    (1, 43116753, 45348572, 1935362, 56669, 235, 64),
    (1, 45807749, 48035344, 1936453, 57412, 235, 64),
    (1, 48508377, 50738564, 1936421, 57826, 235, 64),
    (1, 51180013, 53406520, 1934212, 58281, 235, 64),
    (1, 53884897, 56114700, 1937080, 57407, 235, 64),
]
MARLIN = "void jax_mxfp4::marlin::(anonymous namespace)::MarlinMxfp4GemmKernel<0, __nv_bfloat16>"
MEMSET = {"Memset_details": "kind:device num_bytes:256 async:1"}


def _spread(total: int, n: int) -> list[int]:
    """``total`` ns in ``n`` whole-ns parts (the trace's resolution), summing exactly."""
    return [total // n + (i < total % n) for i in range(n)]


def decode_mxfp4_trace():
    """The trace rebuilt from DECODE_MXFP4_*: in each call, the other kernels spread among 64
    (memset, Marlin kernel) pairs, back to back with the call's idle time spread evenly, so that
    each call's start, end and kernel and memset sums are the real ones."""
    events = []
    for _, start, end, kern_ns, mset_ns, n_k, n_m in DECODE_MXFP4_CALLS:
        n_other = n_k - n_m
        seq = []
        for i in range(n_m):
            seq += [f"fusion_{j}" for j in range(i * n_other // n_m, (i + 1) * n_other // n_m)]
            seq += ["Memset 3", MARLIN]
        k_durs, m_durs = iter(_spread(kern_ns, n_k)), iter(_spread(mset_ns, n_m))
        idle = _spread(end - start - kern_ns - mset_ns, len(seq) - 1) + [0]
        t = start
        for name, gap in zip(seq, idle):
            memset = name == "Memset 3"
            dur = next(m_durs) if memset else next(k_durs)
            events.append((name, t / 1e3, dur / 1e3, MEMSET if memset else KD))
            t += dur + gap
        assert t == end
    host = [(f"{H.ANNOTATION_PREFIX}{i}", a / 1e3, (b - a) / 1e3, {})
            for i, (a, b) in enumerate(DECODE_MXFP4_WINDOWS_NS)]
    return (XSpaceBuilder().plane("/device:GPU:0", {"Stream #14(Compute,Memset)": events})
            .plane("/host:CPU", {"python3": host}).profile())


def test_decode_mxfp4_trace_pause_inside_a_case():
    n_calls = 6
    pd = decode_mxfp4_trace()
    keys = [f"{H.ANNOTATION_PREFIX}0", f"{H.ANNOTATION_PREFIX}1"]
    events, _ = H.extract_device_events(pd, "gpu")
    assert sum(e.kind == "memset" for e in events) == 12 * 64 and sum(e.kind == "kernel" for e in events) == 2970

    # The cause: the largest idle gap (5.45 ms, after case 0's first call) is longer than the one
    # between the cases (4.66 ms), so the idle gaps put case 0's first call alone in case 0.
    kernels = [e for e in events if e.kind == "kernel"]
    groups = H.split_at_largest_gaps(kernels, 2)
    assert [len(g) for g in groups] == [260, 5 * 260 + 6 * 235]
    # Without the calls per case the gaps still win, and case 0's one call is split into 6 "calls"
    # (on the H100: kernels per call [3, 18, 37, 66, 135], median 246 us).
    assigned, diag = H.assign_group_events(pd, keys, "gpu", gap_ns=4e6)
    assert diag["assignment"] == "gaps"
    old = H.device_timing(assigned[keys[0]], n_calls, kinds=diag["timing_kinds"])
    assert old["error"].startswith("calls ran different numbers of kernels")

    # The fix: only the annotation windows split every case into 6 calls of one size.
    assigned, diag = H.assign_group_events(pd, keys, "gpu", gap_ns=4e6, n_calls=n_calls)
    assert diag["assignment"] == "annotation"
    assert any("does not split into 6 calls" in w for w in diag["warnings"])
    for case, n_k in ((0, 260), (1, 235)):
        calls = [c for c in DECODE_MXFP4_CALLS if c[0] == case]
        dt = H.device_timing(assigned[keys[case]], n_calls, kinds=diag["timing_kinds"])
        assert dt["error"] is None and dt["method"] == "chunk"
        assert dt["kernels_per_call"] == n_k and dt["memsets_per_call"] == 64
        # Device time: kernels and the 64 counter memsets of each of the 5 timed calls.
        want = sorted((c[3] + c[4]) / 1e3 for c in calls[1:])[2]
        assert dt["time_us"]["median"] == pytest.approx(want, abs=1e-3)
        assert dt["memset_us_per_call"] == pytest.approx(sum(c[4] for c in calls) / 1e3 / n_calls, abs=1e-3)
        kernels_only = H.device_timing(assigned[keys[case]], n_calls, kinds=diag["timing_kinds"], attach=())
        assert kernels_only["time_us"]["median"] == pytest.approx(sorted(c[3] / 1e3 for c in calls[1:])[2], abs=1e-3)
    # The kernels-only medians are those the run recorded before memsets counted (its kernel_time_us).
    assert H.device_timing(assigned[keys[0]], n_calls, attach=())["time_us"]["median"] == pytest.approx(1529.337, abs=1e-3)
    assert H.device_timing(assigned[keys[1]], n_calls, attach=())["time_us"]["median"] == pytest.approx(1936.421, abs=1e-3)


def test_memset_details_stat_any_case():
    lines = {"Stream #1": [("cuMemsetD32Async", 10.0, 1.0, MEMSET), ("k", 12.0, 2.0, KD)]}
    events, _ = H.extract_device_events(XSpaceBuilder().plane("/device:GPU:0", lines).profile(), "gpu")
    assert sorted(e.kind for e in events) == ["kernel", "memset"]


def test_only_planes_keeps_one_gpu():
    """On several GPUs, ``only_planes`` counts one GPU's events (its busy time), not the sum over GPUs."""
    builder = XSpaceBuilder()
    builder.plane("/device:GPU:0", {"Stream #1": [("gemm", 10.0, 10.0, KD), ("ncclDevKernel_AllReduce", 20.0, 5.0, KD),
                                                  ("gemm", 110.0, 10.0, KD), ("ncclDevKernel_AllReduce", 120.0, 5.0, KD)]})
    builder.plane("/device:GPU:1", {"Stream #1": [("gemm", 10.0, 12.0, KD), ("gemm", 110.0, 12.0, KD)]})
    pd = builder.profile()
    both, _ = H.extract_device_events(pd, "gpu")
    gpu0, diag = H.extract_device_events(pd, "gpu", only_planes=["/device:GPU:0"])
    assert len(both) == 6 and [e.name for e in gpu0] == ["gemm", "ncclDevKernel_AllReduce"] * 2
    assert diag["device_planes"] == ["/device:GPU:0"]
    t = H.device_timing(gpu0, 2, drop_first=0)
    assert t["time_us"]["median"] == pytest.approx(15.0)
    assert t["collective_time_us"]["median"] == pytest.approx(5.0)
