"""Benchmark harness: statistics, ncu parsing, results JSON (schema, IO, merge), tables, plots, README report, self-test logs."""

from __future__ import annotations

import json
import os

import pytest
from bench_support import _case, _gcase, fake_result  # first: it makes the benchmarks package importable

from benchmarks import harness as H
from benchmarks import report


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
    # The plot is drawn again from the merged cases, not the placeholder copied from the first run.
    assert (dst / "gemm-nvidia-h100-80gb-hbm3.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------
# benchmarks/selftest_json.py: the standalone self-test's logs -> results JSON.

_SELFTEST_LOG = """=== t_1: marlin_selftest --dtype bf16 --shape 28672x8192 --m 1024 --config wgmma128ws
device: NVIDIA H200 (sm_90, 132 SMs, L2 60 MB); planning for 132 SMs, wgmma above M = 32
device copy bandwidth (read+write): 4184 GB/s

dtype      N      K     M  sms | res    rel_err    bound |   time_us     GB/s  %copy TFLOP/s cublas_us | plan
bf16   28672   8192  1024  132 | PASS  1.66e-03  3.9e-03 |    731.58      144   3.4%   657.6    562.90 | wgmma128ws m128xn256xk64 grid=128 iters=896 cols=896 k_tiles=128 split=no ws=0
bf16    8192   8192     1  132 | FAIL  2.00e+00  3.9e-03 |     20.61     1720  41.1%     6.5      0.00 | small8 m8xn128xk256 grid=128 iters=16 cols=64 k_tiles=32 split=last-cta ws=1081344
"""


def test_selftest_json_parses_rows_with_and_without_cublas(tmp_path):
    from benchmarks import selftest_json

    log = tmp_path / "t_1.log"
    log.write_text(_SELFTEST_LOG)
    run = selftest_json.parse_log(str(log))
    assert run["command"] == "marlin_selftest --dtype bf16 --shape 28672x8192 --m 1024 --config wgmma128ws"
    assert run["device"] == {"name": "NVIDIA H200", "sm": 90, "sm_count": 132}
    assert run["copy_gbps"] == 4184
    first, second = run["rows"]
    assert (first["N"], first["K"], first["M"], first["time_us"], first["config"]) == (28672, 8192, 1024, 731.58,
                                                                                        "wgmma128ws")
    assert first["pass"] and first["cublas_us"] == 562.90  # built with -DMARLIN_SELFTEST_CUBLAS
    assert not second["pass"] and "cublas_us" not in second  # cuBLAS not timed: no field
    out = tmp_path / "out.json"
    assert selftest_json.main([str(log), "--out", str(out), "--commit", "abc", "--note", "n"]) == 0
    doc = json.loads(out.read_text())
    assert doc["git"] == {"commit": "abc"} and doc["notes"] == ["n"] and len(doc["runs"][0]["rows"]) == 2


def test_selftest_json_refuses_a_log_without_timing_rows(tmp_path):
    from benchmarks import selftest_json

    log = tmp_path / "quick.log"
    log.write_text("PASS: 64 / 64 cases passed\n")
    with pytest.raises(ValueError, match="no timing rows"):
        selftest_json.parse_log(str(log))
