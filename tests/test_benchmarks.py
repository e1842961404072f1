"""The benchmarks' own pure logic (postprocess, targets, HLO analysis, decode model) and a whole tiny benchmark on CPU.

The harness itself is tested in tests/test_benchmarks_trace.py (trace
parsing, device timing) and tests/test_benchmarks_results.py (results JSON,
tables, ncu, README report); shared builders are in tests/bench_support.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from bench_support import _case, _gcase, fake_result  # first: it makes the benchmarks package importable

from benchmarks import bench_decode, bench_decode_tp, bench_gemm, bench_quantize
from benchmarks import harness as H


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


def test_gemm_target_requirements():
    """What a missed target would take, in the run's own units: one row per missed
    (target, shape), none for a met one."""
    k, n = 8192, 8192
    flops = lambda m: 2.0 * m * n * k  # noqa: E731
    cases = [_gcase("bf16", k, n, 8, 66.0), _gcase("marlin", k, n, 8, 25.0),        # 2.64x: missed
             _gcase("bf16", k, n, 128, 60.0), _gcase("marlin", k, n, 128, 25.0),    # 2.4x: met
             _gcase("bf16", k, n, 1024, 200.0), _gcase("marlin", k, n, 1024, 250.0),  # 0.8x: missed
             _gcase("marlin_kernel", k, n, 1024, 275.0, role="variant"),
             _gcase("bf16", k, n, 8192, 1280.0),  # the fastest bf16 GEMM: 859 TFLOP/s
             _gcase("marlin", k, n, 8192, 1300.0)]  # 0.98x: met, no row
    next(c for c in cases if c["impl"] == "marlin" and c["params"]["M"] == 1024)["kernels"] = [
        {"name": "gemm_fusion_dot_general_1", "count": 1, "median_us": 200.0},
        {"name": "void jax_mxfp4::marlin::MarlinDequantizeKernel<1>(...)", "count": 1, "median_us": 50.0}]
    r = fake_result("gemm", cases, table=bench_gemm.make_table([]))
    r["copy_bandwidth"] = {"device_gbps": 3000.0}
    r = bench_gemm.postprocess(r)
    rows = bench_gemm.target_requirements(r)
    assert [(x["target"], x["M"]) for x in rows] == [("M <= 16: 3.3x bf16", 8), ("M >= 1024: 0.95x bf16", 1024)]
    small, large = rows
    assert small["allowed"] == pytest.approx(20.0)
    wb = bench_gemm.mxfp4_weight_bytes(k, n)
    assert f"{wb / 20e3:.0f} GB/s = {100 * wb / 20e3 / 3000:.0f}% of copy BW" in small["needs"]
    assert large["allowed"] == pytest.approx(200.0 / 0.95)
    assert f"dequantization in <= {200.0 / 0.95 - 200.0:.1f} us; ours takes 50.0 us" in large["needs"]
    assert f">= {(wb + 2 * k * n) / 3000e3:.1f} at copy bandwidth" in large["needs"]
    assert f"fused kernel at {flops(1024) / (200e6 / 0.95):.0f} TFLOP/s" in large["needs"]
    assert f"`marlin_kernel` row: {flops(1024) / 275e6:.0f}" in large["needs"]
    # M = 128 missed: the rate is against the fastest bf16 GEMM of the file
    r["cases"] = [c for c in r["cases"] if not (c["impl"] == "marlin" and c["params"]["M"] == 128)]
    r["cases"].append(_gcase("marlin", k, n, 128, 40.0))
    r = bench_gemm.postprocess(r)
    mid = next(x for x in bench_gemm.target_requirements(r) if x["M"] == 128)
    need = flops(128) / 30e6
    assert f"{need:.0f} TFLOP/s = {100 * need / (flops(8192) / 1280e6):.0f}% of the fastest bf16" in mid["needs"]
    text = bench_gemm.render_extra(r)
    assert text.count("\n| M ") == 3 and "| allowed (us) |" in text


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


def test_decode_tp_shards_are_the_megatron_split():
    """Column-parallel shards take slice i of every segment (q|k|v, gate|up); row-parallel
    shards take K chunk i in whole blocks; the shards' products reassemble the global one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_mxfp4 import reference

    cfg = bench_decode_tp.D.SMOKE
    tp = 2
    packed, scales = bench_decode.random_mxfp4(jax.random.PRNGKey(3), cfg.hidden, cfg.qkv_out)  # wqkv
    w = np.asarray(reference.dequantize_reference(packed, scales, dtype=jnp.float32))  # [N, K]
    seg = bench_decode_tp.column_segments(cfg, "wqkv")
    q, kk, v = np.split(w, np.cumsum(seg)[:-1])
    for i in range(tp):
        ps = bench_decode_tp.shard_rows(packed, seg, tp, i, axis=0)
        ss = bench_decode_tp.shard_rows(scales, seg, tp, i, axis=0)
        got = np.asarray(reference.dequantize_reference(ps, ss, dtype=jnp.float32))
        want = np.concatenate([part[i * len(part) // tp:(i + 1) * len(part) // tp] for part in (q, kk, v)])
        np.testing.assert_array_equal(got, want)
    # Row-parallel (wd: K = intermediate): K chunks of whole blocks; partial products sum to the whole.
    packed, scales = bench_decode.random_mxfp4(jax.random.PRNGKey(4), cfg.intermediate, cfg.hidden)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (3, cfg.intermediate)), np.float64)
    w = np.asarray(reference.dequantize_reference(packed, scales, dtype=jnp.float32), np.float64)
    total = 0
    for i in range(tp):
        ps = bench_decode_tp.shard_rows(packed, None, tp, i, axis=1, block=2)
        ss = bench_decode_tp.shard_rows(scales, None, tp, i, axis=1, block=32)
        wi = np.asarray(reference.dequantize_reference(ps, ss, dtype=jnp.float32), np.float64)
        k0 = i * cfg.intermediate // tp
        np.testing.assert_array_equal(wi, w[:, k0:k0 + cfg.intermediate // tp])
        total = total + x[:, k0:k0 + wi.shape[1]] @ wi.T
    np.testing.assert_allclose(total, x @ w.T, rtol=1e-12, atol=1e-12)
    assert bench_decode_tp.column_segments(cfg, "wo") is None
    with pytest.raises(ValueError, match="whole units"):
        bench_decode_tp.shard_rows(scales, None, 3, 0, axis=1, block=32)  # 512 / 3 elements
    with pytest.raises(ValueError, match="--tp 3 must divide heads=4"):
        bench_decode_tp.local_config(cfg, 3)


def test_bench_decode_tp_cpu_two_devices(tmp_path):
    """The whole tensor-parallel benchmark on 2 host CPU devices (a subprocess: the device
    count is fixed when jax starts): tp2 output equals tp1's, all-reduce time recorded."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    code = ("import sys; sys.path.append(sys.argv[1]); from benchmarks import bench_decode_tp as b; "
            "sys.exit(b.main(sys.argv[2:]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, root, "--cpu-smoke", "--no-results", "--no-compile-cache",
                           "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    r = H.load_result(str(tmp_path / path))
    assert r["device"]["count"] == 2 and r["params"]["tp"] == [1, 2]
    assert sorted({c["impl"] for c in r["cases"]}) == ["bf16_tp1", "bf16_tp2", "mxfp4_tp1", "mxfp4_tp2"]
    assert len(r["targets"]) == 2 and all(t["status"] == "PASS" for t in r["targets"]), json.dumps(r["targets"])
    assert all(c["check"]["layer0_rel_err_vs_tp1"] <= bench_decode_tp.TP_REL_TOL for c in r["cases"] if "tp2" in c["impl"])
    for c in r["cases"]:
        assert c["check"]["finite"]
        if c["impl"].endswith("tp2"):  # (tp1 may keep a trivial one-device all-reduce op)
            assert c["collective_time_us"]["median"] > 0 and 0 < c["metrics"]["collective_share"] < 1, c


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
