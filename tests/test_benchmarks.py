"""Fast CPU tests of the benchmark harness's pure parts (benchmarks/).

Trace parsing is tested on synthetic XSpaces shaped like the JAX profiler's
GPU output (planes ``/device:GPU:0`` with ``Stream #`` lines, kernel /
memcpy / memset events, host annotations) and on a real CPU trace; the ncu
parser on a realistic CSV; the results schema, tables, README markers and the
benchmarks' target logic on synthetic results.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_decode, bench_gemm, bench_quantize, report  # noqa: E402
from benchmarks import harness as H  # noqa: E402

US = 1_000_000  # ps per us


# ---------------------------------------------------------------------------
# Synthetic XSpace (text proto) builder.

class XSpaceBuilder:
    """Builds an XSpace text proto for ``jax.profiler.ProfileData.from_text_proto``."""

    def __init__(self):
        self.planes = []

    def plane(self, name, lines, plane_id=None):
        """lines: {line name: [(event name, start_us, dur_us, {stat: str value})]} (times absolute)."""
        self.planes.append((plane_id if plane_id is not None else len(self.planes) + 1, name, lines))
        return self

    def text(self) -> str:
        out = []
        for pid, pname, lines in self.planes:
            ev_ids, st_ids, body = {}, {}, []
            for li, (lname, events) in enumerate(lines.items()):
                evs = []
                for name, start_us, dur_us, stats in events:
                    eid = ev_ids.setdefault(name, len(ev_ids) + 1)
                    st = " ".join(
                        f'stats {{ metadata_id: {st_ids.setdefault(k, len(st_ids) + 1)} str_value: "{v}" }}'
                        for k, v in stats.items())
                    evs.append(f"events {{ metadata_id: {eid} offset_ps: {int(start_us * US)} "
                               f"duration_ps: {int(dur_us * US)} {st} }}")
                body.append(f'lines {{ id: {li + 1} name: "{lname}" timestamp_ns: 0 {" ".join(evs)} }}')
            meta = [f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}' for n, i in ev_ids.items()]
            meta += [f'stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}' for n, i in st_ids.items()]
            out.append(f'planes {{ id: {pid} name: "{pname}" {" ".join(body)} {" ".join(meta)} }}')
        return "\n".join(out)

    def profile(self):
        from jax.profiler import ProfileData

        return ProfileData.from_text_proto(self.text())


KD = {"kernel_details": "regs:32 static_shared:0 dynamic_shared:0 grid:132,1,1 block:256,1,1"}


def gpu_calls(t0_us, n_calls, kernels, call_gap_us=60.0):
    """Events of n_calls identical calls: kernels = [(name, dur_us)] back to back (1 us apart)."""
    events, t = [], t0_us
    for _ in range(n_calls):
        for name, dur in kernels:
            events.append((name, t, dur, dict(KD, hlo_op="fusion")))
            t += dur + 1.0
        t += call_gap_us
    return events, t


def two_case_trace(host_shift_us=0.0, with_annotations=True, n_calls=4):
    """Case 0: 1 kernel of 3 us per call; case 1: 3 kernels (2, 5, 1 us) + a memcpy per call."""
    ev0, t_end0 = gpu_calls(100.0, n_calls, [("quantize_kernel", 3.0)])
    t1 = t_end0 + 4000.0  # the inserted idle gap (4 ms)
    ev1, t_end1 = gpu_calls(t1, n_calls, [("fusion_a", 2.0), ("fusion_b", 5.0), ("fusion_c", 1.0)])
    memcpy = [("MemcpyDtoD", t1 + 9.5, 0.4, {"memcpy_details": "kind_src:device kind_dst:device size:64"})]
    lines = {
        "Stream #7(Kernel,MemcpyD2D)": ev0 + ev1 + memcpy,
        "XLA Ops": [("fusion", 100.0, 5000.0, {})],  # a derived line: must be ignored
        "CUPTI overhead": [("overhead", 50.0, 30.0, {})],
    }
    b = XSpaceBuilder().plane("/device:GPU:0", lines)
    host = {"python": []}
    if with_annotations:
        s = host_shift_us
        host["python"] = [(f"{H.ANNOTATION_PREFIX}0", 90.0 + s, t_end0 - 90.0, {}),
                          (f"{H.ANNOTATION_PREFIX}1", t1 - 10.0 + s, t_end1 - t1 + 10.0, {})]
    b.plane("/host:CPU", host)
    return b.profile()


# ---------------------------------------------------------------------------
# Statistics, rotation, formatting.

def test_summarize():
    s = H.summarize([3.0, 1.0, 2.0, float("nan"), None])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "mean": 2.0, "n": 3}
    assert H.summarize([]) is None
    assert H.summarize([float("inf")]) is None


def test_rotation():
    l2 = 50 * H.MIB
    assert H.rotation_copies(200 * H.MIB, l2) == 1
    assert H.rotation_copies(1024, l2) == 64
    mid = H.rotation_copies(30 * H.MIB, l2)
    assert 2 <= mid <= 64 and mid * 30 * H.MIB >= 4 * l2
    info = H.rotation_info(30 * H.MIB, mid, l2)
    assert info["used"] and info["exceeds_l2"]
    assert not H.rotation_info(1024, 1, l2)["used"]


def test_formatting_and_slug():
    assert H.fmt_time_us(3.14159) == "3.14"
    assert H.fmt_time_us(31.4159) == "31.4"
    assert H.fmt_time_us(31415.9) == "31416"
    assert H.fmt_time_us(None) == "-"
    assert H.fmt_ratio(3.3) == "3.30x"
    assert H.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert H.device_slug("cpu") == "cpu"


# ---------------------------------------------------------------------------
# Splitting events into calls.

def _ev(name, start, dur, kind="kernel"):
    return H.DeviceEvent(name, start * 1e3, (start + dur) * 1e3, kind)


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


# ---------------------------------------------------------------------------
# ncu.

NCU_SAMPLE = '''==PROF== Connected to process 4242 (/usr/bin/python3.12)
device: NVIDIA H100 80GB HBM3 (gpu); jax 0.11.2
==PROF== Profiling "quantize_mxfp4_kernel" - 0: 0%....50%....100% - 1 pass
==PROF== Profiling "quantize_mxfp4_kernel" - 1: 0%....50%....100% - 1 pass
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3.12","127.0.0.1","void jax_mxfp4::quantize_kernel<__nv_bfloat16, 0>(const __nv_bfloat16 *, unsigned char *, int, int)","1","13","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","3,456"
"1","4242","python3.12","127.0.0.1","loop_convert_fusion","1","13","(128, 1, 1)","(1024, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","1.25"
"1","4242","python3.12","127.0.0.1","loop_convert_fusion","1","13","(128, 1, 1)","(1024, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes.sum","byte","1,024"
"2","4242","python3.12","127.0.0.1","void jax_mxfp4::quantize_kernel<__nv_bfloat16, 0>(const __nv_bfloat16 *, unsigned char *, int, int)","1","13","(256, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","3,544"
"3","4242","python3.12","127.0.0.1","loop_convert_fusion","1","13","(128, 1, 1)","(1024, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","msecond","0.00125"
'''


def test_ncu_command():
    cmd = H.ncu_command(["-m", "benchmarks.bench_quantize", "--ncu-worker"], python="python3", kernel_regex="quant")
    joined = " ".join(cmd)
    for flag in ("--clock-control none", "--cache-control none", "--metrics gpu__time_duration.sum", "--csv",
                 "--profile-from-start off", "--kernel-name regex:quant"):
        assert flag in joined
    assert cmd[0] == "ncu" and cmd[-3:] == ["-m", "benchmarks.bench_quantize", "--ncu-worker"][-3:]
    assert "--profile-from-start" not in H.ncu_command(["x.py"], profile_from_start=True)


def test_parse_ncu_csv():
    ks = H.parse_ncu_csv(NCU_SAMPLE)
    assert [k.id for k in ks] == [0, 1, 2, 3]
    assert ks[0].duration_ns == pytest.approx(3456.0)
    assert ks[1].duration_ns == pytest.approx(1250.0)
    assert ks[3].duration_ns == pytest.approx(1250.0)
    assert "quantize_kernel<__nv_bfloat16, 0>" in ks[0].name and ks[0].grid == "(132, 1, 1)"
    per = H.ncu_per_call(ks, 2)
    assert per["kernels_per_call"] == 2 and per["error"] is None
    assert per["time_us"]["median"] == pytest.approx((3.456 + 1.25 + 3.544 + 1.25) / 2)
    assert H.ncu_per_call(ks, 3)["error"]
    assert H.ncu_per_call([], 3)["time_us"] is None


def test_parse_ncu_csv_errors():
    with pytest.raises(H.HarnessError, match="no ncu CSV header"):
        H.parse_ncu_csv("==PROF== No kernels were profiled.\n")
    bad = NCU_SAMPLE.replace('"nsecond","3,456"', '"furlong","3"')
    with pytest.raises(H.HarnessError, match="unknown ncu time unit"):
        H.parse_ncu_csv(bad)


# ---------------------------------------------------------------------------
# Results schema, merge, tables.

TABLE = {"row_params": ["K", "M"], "columns": [
    {"kind": "time", "label": "ours (us)", "impl": "ours"},
    {"kind": "time", "label": "base (us)", "impl": "base"},
    {"kind": "time", "label": "gone (us)", "impl": "never_ran"},
    {"kind": "ratio", "label": "ours vs base", "impl": "ours", "baseline": "base"},
    {"kind": "metric", "label": "GB/s", "impl": "ours", "metric": "gbps", "fmt": "{:.0f}"},
]}


def _case(impl, k, m, dev_us, wall_us=50.0, **kw):
    c = {"benchmark": "t", "impl": impl, "role": kw.pop("role", "ours" if impl == "ours" else "baseline"),
         "params": {"K": k, "M": m}, "device_time_us": None if dev_us is None else {"median": dev_us, "min": dev_us,
                                                                                    "max": dev_us, "mean": dev_us, "n": 3},
         "wall_time_us": {"median": wall_us, "min": wall_us, "max": wall_us, "mean": wall_us, "n": 3},
         "kernels_per_call": 1, "metrics": {}, "ratios": {}, "rotation": {"used": False, "copies": 1}}
    c.update(kw)
    return c


def fake_result(benchmark="t", cases=None, kind="NVIDIA H100 80GB HBM3", table=TABLE):
    return {
        "schema_version": H.SCHEMA_VERSION, "benchmark": benchmark, "run_id": "r1",
        "device": {"kind": kind, "platform": "gpu", "slug": H.device_slug(kind), "count": 1},
        "software": {"jax": "0.11.2", "jaxlib": "0.11.2", "python": "3.12.1"},
        "date_utc": "2026-11-25T00:00:00Z", "git": {"commit": "0123456789abcdef", "dirty": False},
        "command": "python -m benchmarks.bench_t", "cases": cases if cases is not None else [],
        "targets": [H.target("fast", True, "yes", "ours")], "table": copy.deepcopy(table), "notes": [], "errors": [],
    }


def test_validate_result_ok_and_errors():
    r = fake_result(cases=[_case("ours", 8, 1, 2.0)])
    assert H.validate_result(r) is r
    bad = fake_result(cases=[{"impl": 3}])
    del bad["git"]
    bad["targets"] = [{"status": "MAYBE"}]
    with pytest.raises(H.SchemaError) as e:
        H.validate_result(bad)
    msg = str(e.value)
    assert "git" in msg and "cases[0].impl" in msg and "targets[0]" in msg
    with pytest.raises(H.SchemaError):
        H.validate_result([])
    r2 = fake_result(cases=[_case("ours", 8, 1, 2.0)])
    r2["cases"][0]["device_time_us"] = {"median": "fast"}
    with pytest.raises(H.SchemaError, match="numeric median"):
        H.validate_result(r2)


def test_write_load_roundtrip_and_nan(tmp_path):
    r = fake_result(cases=[_case("ours", 8, 1, 2.0, metrics={"gbps": float("nan")})])
    path = H.write_json(r, str(tmp_path / H.result_filename(r)))
    assert path.endswith("t-nvidia-h100-80gb-hbm3.json")
    back = H.load_result(path)
    assert back["cases"][0]["metrics"]["gbps"] is None
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(H.SchemaError, match="not valid JSON"):
        H.load_result(str(tmp_path / "broken.json"))


def test_merge_results():
    old = fake_result(cases=[_case("ours", 8, 1, 2.0), _case("ours", 8, 2, 3.0)])
    old["run_id"] = "old"
    new = fake_result(cases=[_case("ours", 8, 2, 2.5)])
    merged = H.merge_results(old, new)
    times = {c["params"]["M"]: c["device_time_us"]["median"] for c in merged["cases"]}
    assert times == {1: 2.0, 2: 2.5}
    assert any("earlier run" in n for n in merged["notes"])
    with pytest.raises(H.HarnessError):
        H.merge_results(fake_result(kind="other"), new)


def test_add_ratio_and_render_table():
    r = fake_result(cases=[_case("ours", 8, 1, 2.0, metrics={"gbps": 123.4}), _case("base", 8, 1, 6.0),
                           _case("ours", 8, 16, None, wall_us=40.0), _case("base", 8, 16, 80.0),
                           _case("ours", 16, 1, 1.0)])
    H.add_ratio(r, "ours", "base", ("K", "M"))
    assert r["cases"][0]["ratios"]["vs_base"] == pytest.approx(3.0)
    assert r["cases"][2]["ratios"]["vs_base"] == pytest.approx(2.0)  # wall fallback
    md = H.render_table(r)
    lines = md.splitlines()
    assert lines[0] == "| K | M | ours (us) | base (us) | ours vs base | GB/s |"  # 'gone' dropped
    assert "| 8 | 1 | 2.00 | 6.00 | 3.00x | 123 |" in md
    assert "| 8 | 16 | 40.0 (w) | 80.0 |" in md
    assert lines[-1].startswith("| 16 | 1 | 1.00 | - |")  # rows sorted numerically
    assert "**PASS** [ours] fast: yes" in H.render_targets(r)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    r = fake_result(cases=[_case("ours", 8, m, 2.0 * m) for m in (1, 2, 4)] + [_case("base", 8, 1, 5.0)])
    path = H.plot_result(r, str(tmp_path / "p.png"), x="M", panels=["K"])
    assert path and os.path.getsize(path) > 1000


# ---------------------------------------------------------------------------
# README report.

def test_replace_section():
    text = "# T\n\nintro\n<!-- perf-table:start -->\nold\n<!-- perf-table:end -->\noutro\n"
    new = report.replace_section(text, report.START + "\nNEW\n" + report.END)
    assert new == "# T\n\nintro\n<!-- perf-table:start -->\nNEW\n<!-- perf-table:end -->\noutro\n"
    with pytest.raises(report.ReportError, match="exactly one"):
        report.replace_section("no markers", "x")
    with pytest.raises(report.ReportError, match="exactly one"):
        report.replace_section(text + report.START, "x")
    with pytest.raises(report.ReportError, match="before"):
        report.replace_section(f"{report.END}\n{report.START}\n", "x")


def test_report_end_to_end(tmp_path):
    res_dir = tmp_path / "results"
    for bench in ("gemm", "gemm-quick", "quantize-quick", "quantize-cpu-smoke"):
        r = fake_result(benchmark=bench, cases=[_case("ours", 8, 1, 2.0), _case("base", 8, 1, 6.0)],
                        kind="cpu" if "smoke" in bench else "NVIDIA H100 80GB HBM3")
        H.write_json(r, str(res_dir / H.result_filename(r)))
    (res_dir / "gemm-nvidia-h100-80gb-hbm3.png").write_bytes(b"png")
    loaded = report.load_all(str(res_dir))
    assert [r["benchmark"] for _, r in loaded] == ["quantize-quick", "gemm"]  # quick superseded, smoke out
    readme = tmp_path / "README.md"
    readme.write_text("# P\n\n<!-- perf-table:start -->\n<!-- perf-table:end -->\n\nmore\n")
    assert report.main(["--readme", str(readme), "--results-dir", str(res_dir)]) == 0
    text = readme.read_text()
    assert "### gemm — NVIDIA H100 80GB HBM3" in text and "commit 0123456789" in text and "jax 0.11.2" in text
    assert "| 8 | 1 | 2.00 | 6.00 | 3.00x |" in text
    assert "](results/gemm-nvidia-h100-80gb-hbm3.png)" in text
    assert text.endswith("<!-- perf-table:end -->\n\nmore\n")
    assert report.main(["--readme", str(readme), "--results-dir", str(res_dir), "--check"]) == 0
    readme.write_text("# no markers\n")
    assert report.main(["--readme", str(readme), "--results-dir", str(res_dir)]) == 2
    (res_dir / "bad.json").write_text(json.dumps({"benchmark": "x"}))
    with pytest.raises(report.ReportError, match="invalid results"):
        report.load_all(str(res_dir))


# ---------------------------------------------------------------------------
# Benchmark-specific pure logic.

def _qcase(impl, k, m, t, kernels=1, **kw):
    c = _case(impl, k, m, t, kernels_per_call=kernels, **kw)
    c["params"] = {"K": k, "M": m, "layout": "linear", "rounding": "floor", "dtype": "bfloat16"}
    c["bytes_moved"] = m * k * 2 + m * k // 2 + m * k // 32
    return c


def test_quantize_postprocess_targets():
    cases = [_qcase("ours", 8192, 128, 3.0, check={"bit_exact_vs_jnp": True}), _qcase("jnp", 8192, 128, 15.0, 3),
             _qcase("ours", 8192, 4096, 30.0, check={"bit_exact_vs_jnp": True}), _qcase("jnp", 8192, 4096, 200.0, 3)]
    r = fake_result("quantize", cases, table=bench_quantize.TABLE)
    r["copy_bandwidth"] = {"device_gbps": 3000.0}
    r = bench_quantize.postprocess(r)
    st = {t["name"]: t["status"] for t in r["targets"]}
    big = next(c for c in r["cases"] if c["impl"] == "ours" and c["params"]["M"] == 4096)
    assert big["metrics"]["pct_copy_bw"] == pytest.approx(100 * big["bytes_moved"] / 30e3 / 3000.0)
    assert st[">= 85% of copy bandwidth at M*K >= 4096*8192"] == "PASS"
    assert st["one kernel of <= 4 us at M <= 128, K = 8192"] == "PASS"
    assert st["faster than jnp everywhere"] == "PASS" and st[">= 3x jnp at M >= 1024"] == "PASS"
    assert st["bit-exact vs the jnp reference (fresh random data)"] == "PASS"
    # Two kernels at M = 128 -> MISS; slower than jnp somewhere -> MISS.
    r["cases"][0]["kernels_per_call"] = 2
    r["cases"][2]["device_time_us"]["median"] = 300.0
    st = {t["name"]: t["status"] for t in bench_quantize.postprocess(r)["targets"]}
    assert st["one kernel of <= 4 us at M <= 128, K = 8192"] == "MISS"
    assert st["faster than jnp everywhere"] == "MISS"
    H.validate_result(r)


def test_quantize_same_bytes_copy_shape():
    import jax.numpy as jnp

    y = bench_quantize.same_bytes_copy(jnp.ones((3, 64), jnp.bfloat16))
    assert y.shape == (3, 8) and y.dtype == jnp.uint32  # 3*64/2 bytes written
    assert bench_quantize.quantize_bytes(1, 64, "swizzled_128x4") == {"read": 128, "packed": 32, "scales": 512}


GPU_INT4_HLO_FUSED = """HloModule jit__lambda, is_scheduled=true, entry_computation_layout={(bf16[16,8192]{1,0}, s4[8192,8192]{1,0:E(4)}, bf16[8192]{0})->bf16[16,8192]{1,0}}

%gemm_fusion_dot.1_computation (parameter_0: bf16[16,8192], parameter_1: s4[8192,8192], parameter_2: bf16[8192]) -> bf16[16,8192] {
  %parameter_0 = bf16[16,8192]{1,0} parameter(0)
  %parameter_1 = s4[8192,8192]{1,0:E(4)} parameter(1)
  %convert.3 = bf16[8192,8192]{1,0} convert(%parameter_1)
  %dot.1 = bf16[16,8192]{1,0} dot(%parameter_0, %convert.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %parameter_2 = bf16[8192]{0} parameter(2)
  %broadcast.1 = bf16[16,8192]{1,0} broadcast(%parameter_2), dimensions={1}
  ROOT %multiply.1 = bf16[16,8192]{1,0} multiply(%dot.1, %broadcast.1)
}

ENTRY %main.10 (Arg_0.1: bf16[16,8192], Arg_1.2: s4[8192,8192], Arg_2.3: bf16[8192]) -> bf16[16,8192] {
  %Arg_0.1 = bf16[16,8192]{1,0} parameter(0)
  %Arg_1.2 = s4[8192,8192]{1,0:E(4)} parameter(1)
  %Arg_2.3 = bf16[8192]{0} parameter(2)
  ROOT %gemm_fusion_dot.1 = bf16[16,8192]{1,0} fusion(%Arg_0.1, %Arg_1.2, %Arg_2.3), kind=kCustom, calls=%gemm_fusion_dot.1_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
}
"""

GPU_INT4_HLO_UNFUSED = """HloModule jit__lambda, is_scheduled=true

%fused_convert (param_0: s4[8192,8192]) -> bf16[8192,8192] {
  %param_0 = s4[8192,8192]{1,0:E(4)} parameter(0)
  ROOT %convert.1 = bf16[8192,8192]{1,0} convert(%param_0)
}

ENTRY %main.10 (Arg_0.1: bf16[16,8192], Arg_1.2: s4[8192,8192]) -> bf16[16,8192] {
  %Arg_0.1 = bf16[16,8192]{1,0} parameter(0)
  %Arg_1.2 = s4[8192,8192]{1,0:E(4)} parameter(1)
  %fusion = bf16[8192,8192]{1,0} fusion(%Arg_1.2), kind=kLoop, calls=%fused_convert
  %custom-call = (bf16[16,8192]{1,0}, s8[4194304]{0}) custom-call(%Arg_0.1, %fusion), custom_call_target="__cublas$gemm"
  ROOT %get-tuple-element = bf16[16,8192]{1,0} get-tuple-element(%custom-call), index=0
}
"""


GPU_INT4_HLO_NESTED = """HloModule jit__lambda, is_scheduled=true

%fusion_rhs (p0: s4[4096,4096]) -> bf16[4096,4096] {
  %p0 = s4[4096,4096]{1,0:E(4)} parameter(0)
  ROOT %convert.1 = bf16[4096,4096]{1,0} convert(%p0)
}

%fusion_lhs (p0.1: bf16[8,4096]) -> bf16[8,4096] {
  ROOT %p0.1 = bf16[8,4096]{1,0} parameter(0)
}

%gemm_fusion_dot.2_computation (parameter_0: bf16[8,4096], parameter_1: s4[4096,4096]) -> bf16[8,4096] {
  %parameter_0 = bf16[8,4096]{1,0} parameter(0)
  %lhs = bf16[8,4096]{1,0} fusion(%parameter_0), kind=kCustom, calls=%fusion_lhs
  %parameter_1 = s4[4096,4096]{1,0:E(4)} parameter(1)
  %rhs = bf16[4096,4096]{1,0} fusion(%parameter_1), kind=kCustom, calls=%fusion_rhs
  ROOT %dot.2 = bf16[8,4096]{1,0} dot(%lhs, %rhs), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_multiply (param_0: bf16[8,4096], param_1: bf16[4096]) -> bf16[8,4096] {
  %param_0 = bf16[8,4096]{1,0} parameter(0)
  %param_1 = bf16[4096]{0} parameter(1)
  %broadcast = bf16[8,4096]{1,0} broadcast(%param_1), dimensions={1}
  ROOT %multiply = bf16[8,4096]{1,0} multiply(%param_0, %broadcast)
}

ENTRY %main.5 (Arg_0.1: bf16[8,4096], Arg_1.2: s4[4096,4096], Arg_2.3: bf16[4096]) -> bf16[8,4096] {
  %Arg_0.1 = bf16[8,4096]{1,0} parameter(0)
  %Arg_1.2 = s4[4096,4096]{1,0:E(4)} parameter(1)
  %Arg_2.3 = bf16[4096]{0} parameter(2)
  %gemm_fusion_dot.2 = bf16[8,4096]{1,0} fusion(%Arg_0.1, %Arg_1.2), kind=kCustom, calls=%gemm_fusion_dot.2_computation, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  ROOT %multiply_fusion = bf16[8,4096]{1,0} fusion(%gemm_fusion_dot.2, %Arg_2.3), kind=kLoop, calls=%fused_multiply
}
"""


def test_analyze_int4_hlo():
    fused = bench_gemm.analyze_int4_hlo(GPU_INT4_HLO_FUSED)
    assert fused["convert_fused_into_gemm"] and fused["gemm_backend"] == "triton"
    assert fused["fused_computations"] == ["gemm_fusion_dot.1_computation"]
    unfused = bench_gemm.analyze_int4_hlo(GPU_INT4_HLO_UNFUSED)
    assert not unfused["convert_fused_into_gemm"] and unfused["gemm_backend"] == "cublas"
    assert unfused["separate_convert_computations"] == ["fused_convert"]
    nested = bench_gemm.analyze_int4_hlo(GPU_INT4_HLO_NESTED)
    assert nested["convert_fused_into_gemm"] and nested["fused_computations"] == ["gemm_fusion_dot.2_computation"]
    assert nested["separate_convert_computations"] == []


def test_analyze_int4_hlo_real_cpu_text():
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x, w, s: jnp.dot(x, w.astype(jnp.bfloat16)) * s)
    text = f.lower(jnp.ones((4, 64), jnp.bfloat16), jnp.ones((64, 32), jnp.int4),
                   jnp.ones((32,), jnp.bfloat16)).compile().as_text()
    comps = bench_gemm.hlo_computations(text)
    assert any(entry for _, entry, _ in comps) and len(comps) >= 2
    info = bench_gemm.analyze_int4_hlo(text)
    assert set(info) >= {"convert_fused_into_gemm", "gemm_backend"}


def _gcase(impl, k, n, m, t, role=None, check=None):
    c = _case(impl, k, n, t, role=role or ("ours" if impl == "marlin" else "baseline"))
    c["params"] = {"K": k, "N": n, "M": m, "dtype": "bfloat16"}
    c["flops"] = 2.0 * m * n * k
    c["bytes_moved"] = bench_gemm.weight_bytes(impl, k, n) + 2 * m * (k + n)
    c["extra"] = {"weight_bytes": bench_gemm.weight_bytes(impl, k, n)}
    c["check"] = check
    return c


def test_gemm_postprocess_targets():
    k, n = 8192, 8192
    cases = []
    for m, (tb, tx, ti, to) in {1: (60.0, 160.0, 35.0, 14.0), 128: (64.0, 170.0, 40.0, 30.0),
                                4096: (1000.0, 1500.0, 1100.0, 1000.0)}.items():
        cases += [_gcase("bf16", k, n, m, tb), _gcase("xla_mxfp4", k, n, m, tx), _gcase("int4_pc", k, n, m, ti, "peer"),
                  _gcase("marlin", k, n, m, to, check={"rel_err": 3e-3, "ok": True} if m == 1 else None)]
    r = fake_result("gemm", cases, table=bench_gemm.make_table([]))
    r["copy_bandwidth"] = {"device_gbps": 3000.0}
    r = bench_gemm.postprocess(r)
    H.validate_result(r)
    st = {t["name"]: t["status"] for t in r["targets"]}
    assert st["M <= 16: >= 3.3x bf16"] == "PASS"          # 60 / 14 = 4.3
    assert st["M <= 16: >= 1.7x int4 per-channel"] == "PASS"  # 35 / 14 = 2.5
    assert st["M <= 16, large shapes: >= 75% of HBM BW on weight bytes"] == "PASS"  # 35.7 MB / 14 us = 2.5 TB/s
    assert st["M = 128: >= 2x bf16"] == "PASS"
    assert st["any M: never slower than XLA-native MXFP4"] == "PASS"
    assert st["M >= 1024: >= 0.95x bf16"] == "PASS"
    assert st[f"rel err vs float32 reference < {bench_gemm.REL_ERR_LIMIT}"] == "PASS"
    m1 = next(c for c in r["cases"] if c["impl"] == "marlin" and c["params"]["M"] == 1)
    assert m1["ratios"]["vs_bf16"] == pytest.approx(60 / 14)
    assert m1["metrics"]["weight_bw_pct"] == pytest.approx(100 * bench_gemm.mxfp4_weight_bytes(k, n) / 14e3 / 3000)
    assert "marlin vs bf16" in H.render_table(r)
    # Without any custom kernel: one N/A target.
    r2 = bench_gemm.postprocess(fake_result("gemm", [c for c in cases if c["impl"] != "marlin"],
                                            table=bench_gemm.make_table([])))
    assert [t["status"] for t in r2["targets"]] == ["N/A"]


def test_gemm_shape_parsing():
    assert H.parse_shapes("4096x4096, 8192X28672") == [(4096, 4096), (8192, 28672)]
    assert H.parse_int_list("1,2, 16") == [1, 2, 16]
    assert H.parse_shapes(None) is None


def test_decode_postprocess():
    cases = []
    for impl, wall in (("bf16", 5000.0), ("mxfp4", 1800.0)):
        c = _case(impl, 0, 0, wall * 0.9, wall_us=wall)
        c["params"] = {"batch": 1, "layers": 32, "cache_len": 1024}
        c["extra"] = {"weight_bytes": 1e9, "kernel": "marlin" if impl == "mxfp4" else "jnp.dot"}
        cases.append(c)
    r = bench_decode.postprocess(fake_result("decode", cases, table=bench_decode.TABLE))
    mx = next(c for c in r["cases"] if c["impl"] == "mxfp4")
    assert mx["ratios"]["vs_bf16_wall"] == pytest.approx(5000 / 1800)
    assert mx["metrics"]["tokens_per_s"] == pytest.approx(1 / 1800e-6)
    assert r["targets"][0]["status"] == "PASS"
    assert bench_decode.weight_bytes(bench_decode.Config(layers=1), "bf16") == 2 * 4096 * (6144 + 4096 + 28672) \
        + 2 * 14336 * 4096


def test_decode_layer_shapes_consistent():
    import jax
    import jax.numpy as jnp

    cfg = bench_decode.SMOKE
    key = jax.random.PRNGKey(0)
    layers, _ = bench_decode.make_layers(cfg, "bf16", True, key, None)
    caches = bench_decode.make_caches(cfg, 2, key)
    x = jnp.ones((2, cfg.hidden), jnp.bfloat16)
    y = bench_decode.decoder_layer(x, layers[0], *caches[0], cfg, bench_decode.make_linear("bf16"), True)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    assert math.isclose(float(bench_decode.rope(jnp.ones((1, 1, 64)), 0, 1e4).astype(jnp.float32).sum()), 64.0)


# ---------------------------------------------------------------------------
# A whole (tiny) benchmark on CPU: JSON written, valid, with device times.

def test_bench_quantize_cpu_end_to_end(tmp_path):
    # --allow-cpu rather than --cpu-smoke: never switch jax's platform inside a test session.
    rc = bench_quantize.main(["--allow-cpu", "--ks", "64", "--ms", "1,8", "--layouts", "linear",
                              "--out", str(tmp_path), "--no-results", "--copy-mib", "1", "--keep-traces",
                              "--no-compile-cache"])
    assert rc == 0
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    r = H.load_result(str(tmp_path / path))
    assert r["benchmark"] == "quantize"
    assert {c["impl"] for c in r["cases"]} == {"ours", "jnp", "copy"}
    assert all(c["device_time_us"] for c in r["cases"]), [c["device_time_error"] for c in r["cases"]]
    assert all(c["check"]["bit_exact_vs_jnp"] for c in r["cases"] if c["impl"] == "ours")
    assert sorted(os.listdir(tmp_path / "traces")) == ["copy_bandwidth.xplane.pb", "quantize-K64.xplane.pb"]
    assert (tmp_path / path.replace(".json", ".png")).exists() or not _has_matplotlib()


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_report_import(tmp_path, monkeypatch):
    src, dst = tmp_path / "out", tmp_path / "results"
    r = fake_result("gemm", [_gcase("marlin", 8192, 8192, 1, 14.0)])
    r["git"] = {"commit": "unknown", "dirty": None}
    H.write_json(r, str(src / H.result_filename(r)))
    (src / "gemm-nvidia-h100-80gb-hbm3.png").write_bytes(b"png")
    smoke = fake_result("gemm-cpu-smoke", [], kind="cpu")
    H.write_json(smoke, str(src / H.result_filename(smoke)))
    monkeypatch.setattr(H, "git_info", lambda repo=H.REPO_ROOT: {"commit": "feedbeef", "dirty": False})
    copied = report.import_results(str(src), str(dst))
    assert sorted(os.path.basename(p) for p in copied) == ["gemm-nvidia-h100-80gb-hbm3.json",
                                                           "gemm-nvidia-h100-80gb-hbm3.png"]
    back = H.load_result(str(dst / "gemm-nvidia-h100-80gb-hbm3.json"))
    assert back["git"]["commit"] == "feedbeef" and back["git"]["filled_in_at_import"]
    # A second device call measured another shape: --merge keeps both and recomputes the targets.
    r2 = fake_result("gemm", [_gcase("marlin", 4096, 4096, 1, 5.0), _gcase("bf16", 4096, 4096, 1, 20.0)])
    r2["run_id"] = "r2"
    src2 = tmp_path / "out2"
    H.write_json(r2, str(src2 / H.result_filename(r2)))
    report.import_results(str(src2), str(dst), merge=True)
    merged = H.load_result(str(dst / "gemm-nvidia-h100-80gb-hbm3.json"))
    assert len(merged["cases"]) == 3
    assert any(t["name"] == "M <= 16: >= 3.3x bf16" and t["status"] == "PASS" for t in merged["targets"])
