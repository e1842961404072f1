"""CPU-side proof of the Marlin MXFP4 kernel logic (no GPU needed).

The kernel (csrc/marlin/marlin_kernel.cuh) cannot run here, so marlin_emulator.py
emulates it in numpy, statement by statement, on the prepared buffers (stripe
partition and split-K fixup, every cp.async, ldmatrix, the dequantization bit
tricks, mma.sync through the PTX fragment layouts, the predicated stores).
This file checks the result against ``x @ dequant(W)^T`` from the library's
reference dequantization (``jax_mxfp4.formats``), the determinism of split-K,
NaN scales, the scale-range contract, conflict-free shared-memory access, and
that the emulated plan equals the C++ ``MakePlan`` (compiled with nvcc, host
code only; skipped, saying so, without it).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from jax_mxfp4.kernels import marlin_weights as mw
from marlin_bits import DTYPES, PLAN_CC, ROOT, THREADS, compile_probe, needs_compiler, tile_configs
from marlin_emulator import emulate, make_plan, random_weights, random_x, reference, rel_err, round_to

#: the mma.sync rows of the tile table (the wgmma rows are verified on the GPU only)
MMA_SYNC = [i for i, c in enumerate(tile_configs()) if c["path"] != "wgmma"]


def cfg_index(name):
    return next(i for i, c in enumerate(tile_configs()) if c["name"] == name)


CASES = [
    # (m, n, k, sm_count)  residues in every dimension, splits and multi-chunk M
    (1, 96, 96, 8),
    (7, 200, 320, 5),
    (16, 128, 512, 3),
    (3, 64, 1056, 16),
    (33, 96, 192, 6),
    (70, 160, 128, 4),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", MMA_SYNC)
@pytest.mark.parametrize("case", CASES)
def test_emulated_kernel_matches_reference(dtype, cfg, case):
    m, n, k, sms = case
    name = mw._dtype_name(dtype)
    rng = np.random.default_rng(hash((m, n, k, cfg)) % 2**32)
    w_packed, w_scales = random_weights(rng, n, k)
    x = random_x(rng, m, k, name)
    out, emu, plan, layout = emulate(x, w_packed, w_scales, dtype, sms, cfg)
    ref, w_ref = reference(x, w_packed, w_scales, name)
    assert not np.isnan(out).any(), "unwritten or NaN outputs"
    # fp32-accumulated result before output rounding: tight; after rounding: 2^-8.
    assert rel_err(out, ref) < 1e-6, (plan, rel_err(out, ref))
    assert rel_err(round_to(out, name), ref) < 2.0**-8
    # The B operands the tensor cores saw, times F[n], are the exact weights.
    factor = _row_factor(emu)[:n, None]
    np.testing.assert_array_equal(emu.b_seen[:n, :k] * factor, w_ref)


def _row_factor(emu):
    return emu.row_factor().astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg_name", ["small8", "small", "large"])
def test_split_k_is_deterministic(dtype, cfg_name):
    """The last-arriving CTA (small8, small) or the reduction pass (large) sums
    partials in CTA order: bitwise the same output whatever order CTAs run in."""
    name = mw._dtype_name(dtype)
    rng = np.random.default_rng(11)
    m, n, k, sms = 5, 128, 1024, 7
    w_packed, w_scales = random_weights(rng, n, k)
    x = random_x(rng, m, k, name)
    cfg = cfg_index(cfg_name)
    outs = [emulate(x, w_packed, w_scales, dtype, sms, cfg, order=o)[0] for o in ("forward", "reverse", "shuffle")]
    plan = make_plan(m, n, k, sms, cfg)
    assert plan["split"]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(70, 160, 1024, 7), (33, 300, 2048, 5), (5, 128, 1024, 7)])
def test_reduction_pass_equals_last_cta(dtype, case):
    """Both SplitReduce modes add the same partials in the same order from zero: the same
    bits. The pass also finds every split column (and only those), with 1..many stripe
    boundaries per column."""
    m, n, k, sms = case
    name = mw._dtype_name(dtype)
    rng = np.random.default_rng(hash(case) % 2**32)
    w_packed, w_scales = random_weights(rng, n, k)
    x = random_x(rng, m, k, name)
    cfg = cfg_index("large")
    plan = make_plan(m, n, k, sms, cfg)
    assert plan["split"] and plan["reduce_pass"]
    via_pass = emulate(x, w_packed, w_scales, dtype, sms, cfg, reduce="pass")[0]
    via_last = emulate(x, w_packed, w_scales, dtype, sms, cfg, reduce="last_cta")[0]
    assert not np.isnan(via_pass).any(), "outputs the pass never wrote"
    np.testing.assert_array_equal(via_pass, via_last)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_scale_gives_nan_column(dtype):
    name = mw._dtype_name(dtype)
    rng = np.random.default_rng(5)
    m, n, k = 3, 64, 128
    w_packed, w_scales = random_weights(rng, n, k)
    w_scales[17, 2] = 255
    x = random_x(rng, m, k, name)
    out, *_ = emulate(x, w_packed, w_scales, dtype, 4, cfg_index("small"))
    ref, _ = reference(x, w_packed, w_scales, name)
    assert np.isnan(out[:, 17]).all() and np.isnan(ref[:, 17]).all()
    keep = np.arange(n) != 17
    assert not np.isnan(out[:, keep]).any()
    assert rel_err(out[:, keep], ref[:, keep]) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_range_contract(dtype):
    """Rows whose block scales span a wide range: blocks inside the contract are
    exact, blocks outside have at most the documented error."""
    name = mw._dtype_name(dtype)
    rng = np.random.default_rng(9)
    m, n, k = 2, 64, 256
    w_packed, _ = random_weights(rng, n, k)
    kb = k // 32
    w_scales = np.empty((n, kb), np.uint8)
    for row in range(n):
        smax = int(rng.integers(100, 255))  # > 128 exercises bf16's row offset
        spread = int(rng.integers(0, 40))
        w_scales[row] = np.clip(smax - rng.integers(0, spread + 1, kb), 0, 254)
        w_scales[row, 0] = smax
    x = random_x(rng, m, k, name)
    out, emu, _, _ = emulate(x, w_packed, w_scales, dtype, 4, cfg_index("small"))
    _, w_ref = reference(x, w_packed, w_scales, name)
    smax = w_scales.max(axis=1).astype(np.int64)
    span = 133 if name == "bfloat16" else 24
    inside = np.repeat(w_scales.astype(np.int64) >= (smax - span)[:, None], 32, axis=1)
    got = emu.b_seen[:n, :k] * _row_factor(emu)[:n, None]
    finite = np.isfinite(w_ref)
    np.testing.assert_array_equal(got[inside & finite], w_ref[inside & finite])
    bound = 2.0 ** (smax - 127 - 25)
    assert np.all(np.abs(got - w_ref)[~inside] <= np.broadcast_to(bound[:, None], got.shape)[~inside])


@pytest.mark.parametrize("cfg", MMA_SYNC)
def test_shared_memory_accesses_are_conflict_free(cfg):
    """ldmatrix phases (8 lanes = one 8x8 matrix) and each warp's cp.async
    writes of the A tile touch distinct 16-byte bank groups (XOR swizzle)."""
    c = tile_configs()[cfg]
    rc = c["k_tile"] // 8
    tile_m = c["tile_m"]
    lane = np.arange(32)
    reads = []  # per ldmatrix.x4: the chunk each lane supplies
    for kbl in range(c["k_tile"] // 32):
        if c["weights_a"]:  # 8 tokens, k chunk kbl * 4 + lane // 8
            row, ch = lane % 8, kbl * 4 + lane // 8
            reads.append(row * rc + (ch ^ (row % 8)))
            continue
        for s in range(2):
            for mb in range(tile_m // 16):
                row = mb * 16 + lane % 16
                ch = kbl * 4 + 2 * s + lane // 16
                reads.append(row * rc + (ch ^ (row % 8)))
    for chunk in reads:
        assert chunk.max() < tile_m * rc
        for phase in range(4):
            groups = chunk[8 * phase : 8 * phase + 8] % 8
            assert len(set(groups.tolist())) == 8
    tid = np.arange(THREADS)
    a_row0, a_ch = tid // rc, tid % rc
    dst = a_row0 * rc + (a_ch ^ (a_row0 % 8))
    assert sorted(dst.tolist()) == list(range(THREADS))  # a permutation of the chunks
    for w in range(THREADS // 32):
        for q in range(4):  # 8 lanes = 128 bytes per shared-memory wavefront
            groups = dst[32 * w + 8 * q : 32 * w + 8 * q + 8] % 8
            assert len(set(groups.tolist())) == 8
    assert (tile_m * rc) % THREADS == 0


def test_plan_configs_cover_m():
    # the heuristic picks small8 / small / medium / large by M
    assert make_plan(1, 4096, 4096, 132)["c"]["name"] == "small8"
    assert make_plan(8, 4096, 4096, 132)["c"]["name"] == "small8"
    assert make_plan(9, 4096, 4096, 132)["c"]["name"] == "small"
    assert make_plan(16, 4096, 4096, 132)["c"]["name"] == "small"
    # n_tile 256 for M = 9..16 from N = 16384 on (the tile table's smalln row)
    assert make_plan(9, 16384, 4096, 132)["c"]["name"] == "smalln"
    assert make_plan(16, 28672, 8192, 132, wgmma=True)["c"]["name"] == "smalln"
    assert make_plan(16, 16383, 4096, 132)["c"]["name"] == "small"
    assert make_plan(8, 28672, 8192, 132)["c"]["name"] == "small8"
    assert make_plan(32, 4096, 4096, 132)["c"]["name"] == "medium"
    assert make_plan(33, 4096, 4096, 132)["c"]["name"] == "large"
    assert make_plan(1024, 4096, 4096, 132)["c"]["name"] == "large"
    # Hopper (use_wgmma): M <= 32 stays on mma.sync, then the wgmma rows
    assert make_plan(8, 4096, 4096, 132, wgmma=True)["c"]["name"] == "small8"
    assert make_plan(16, 4096, 4096, 132, wgmma=True)["c"]["name"] == "small"
    assert make_plan(32, 4096, 4096, 132, wgmma=True)["c"]["name"] == "medium"
    assert make_plan(33, 4096, 4096, 132, wgmma=True)["c"]["name"] == "wgmma64"
    assert make_plan(64, 4096, 4096, 132, wgmma=True)["c"]["name"] == "wgmma64"
    # M > 64: wgmma128 where a cluster plan fits (needs the device's capacity), else its stripe
    # form wgmma128ws (the warp-specialized kernel); always the latter at trace time
    assert make_plan(65, 4096, 4096, 132, wgmma=True)["c"]["name"] == "wgmma128ws"
    assert make_plan(4096, 4096, 4096, 132, wgmma=True)["c"]["name"] == "wgmma128ws"
    cap = {2: 66, 4: 30, 8: 15}
    assert make_plan(128, 5760, 2880, 132, wgmma=True, capacity=cap)["c"]["name"] == "wgmma128"
    assert make_plan(1024, 8192, 28672, 132, wgmma=True, capacity=cap)["c"]["name"] == "wgmma128ws"
    # a forced cluster row keeps its own stripes (and the reduction pass)
    p = make_plan(1024, 8192, 28672, 132, cfg_index=cfg_index("wgmma128"), wgmma=True, capacity=cap)
    assert p["c"]["name"] == "wgmma128" and p["cluster"] == 0
    p = make_plan(1, 8192, 8192, 132)
    assert p["grid"] <= 132 and p["split"]


def test_cluster_split_plans():
    """wgmma128 with a cluster capacity: the largest cluster (2, 4, 8 CTAs) whose n_cols clusters run
    at once, within the SMs, >= 2 k tiles per CTA, if it keeps >= 2/3 of the SMs busy; else the
    stripes of wgmma128ws with the reduction pass."""
    cap = {2: 66, 4: 32, 8: 16}  # illustrative (the lent H100: 66 / 30 / 15)
    p = make_plan(128, 4096, 4096, 132, wgmma=True, capacity=cap)  # 16 columns
    assert (p["cluster"], p["grid"], p["iters"], p["ws"]) == (8, 128, 8, 0) and p["split"]
    p = make_plan(128, 8192, 8192, 132, wgmma=True, capacity=cap)  # 32 columns
    assert (p["cluster"], p["grid"]) == (4, 128)
    p = make_plan(128, 8192, 8192, 132, wgmma=True, capacity={2: 66, 4: 30, 8: 15})  # 4 does not fit,
    assert p["cluster"] == 0 and p["reduce_pass"]  # and 2 would leave half the SMs idle
    assert p["c"]["name"] == "wgmma128ws"  # no cluster plan: the stripe form of the tile
    p = make_plan(256, 8192, 8192, 132, wgmma=True, capacity={2: 66, 4: 30, 8: 15})  # 64 columns
    assert (p["cluster"], p["grid"]) == (2, 128)
    p = make_plan(128, 5760, 2880, 132, wgmma=True, capacity={2: 66, 4: 30, 8: 15})  # 23 columns: 92 CTAs
    assert (p["cluster"], p["grid"]) == (4, 92)
    p = make_plan(256, 14336, 4096, 132, wgmma=True, capacity=cap)  # 2 m chunks x 56 n tiles
    assert p["cluster"] == 0 and p["reduce_pass"] and p["ws"] > 0
    p = make_plan(128, 4096, 256, 132, wgmma=True, capacity=cap)  # 4 k tiles: at most clusters of 2
    assert p["cluster"] == 0 and p["reduce_pass"]
    # without a capacity (trace time: the workspace's upper bound), wgmma64 and mma.sync rows: never
    assert make_plan(128, 4096, 4096, 132, wgmma=True)["cluster"] == 0
    assert make_plan(64, 4096, 4096, 132, wgmma=True, capacity=cap)["cluster"] == 0
    assert make_plan(128, 4096, 4096, 132, capacity=cap)["cluster"] == 0


# ---------------------------------------------------------------------------
# Cross-check with the C++ MakePlan (compiled here, host code only).

_PLAN_PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include "marlin/marlin_gemm.h"
#include "marlin/marlin_plan.h"
int main(int argc, char** argv) {
  namespace mm = jax_mxfp4::marlin;
  for (int i = 1; i + 4 < argc; i += 5) {
    const long m = atol(argv[i]), n = atol(argv[i + 1]), k = atol(argv[i + 2]);
    const int sms = atoi(argv[i + 3]);
    const bool wgmma = atoi(argv[i + 4]) != 0;
    mm::ClusterCapacity cap;  // CAPACITY below
    cap.clusters[1] = 66, cap.clusters[2] = 30, cap.clusters[3] = 15;
    const mm::ClusterCapacity none;  // what MarlinGemm passes where no cluster row applies
    // by M: trace time, workspace, with the capacity; the cluster row tried; wgmma128 forced;
    // with an all-zero capacity
    std::printf("%s|%lld|%s|%d|%s|%s\n", mm::MarlinDescribePlan(m, n, k, sms, wgmma).c_str(),
                (long long)mm::MarlinWorkspaceBytes(m, n, k, sms, wgmma),
                mm::MarlinDescribePlan(m, n, k, sms, wgmma, nullptr, &cap).c_str(), mm::ClusterRowOf(m, n, wgmma),
                mm::MarlinDescribePlan(m, n, k, sms, wgmma, "wgmma128", &cap).c_str(),
                mm::MarlinDescribePlan(m, n, k, sms, wgmma, nullptr, &none).c_str());
  }
  return 0;
}
"""

CAPACITY = {2: 66, 4: 30, 8: 15}  # the probe's ClusterCapacity (the lent H100's)

PLAN_SHAPES = [
    (m, n, k, sms, wgmma)
    for (n, k) in [(4096, 4096), (8192, 8192), (28672, 8192), (200, 4160), (5760, 2880), (96, 96)]
    for m in (1, 8, 9, 16, 32, 64, 129, 256, 1024)
    for sms in (132, 7)
    for wgmma in (0, 1)
]


def _split_name(p):
    if not p["split"]:
        return "no"
    if p["cluster"]:
        return f"cluster{p['cluster']}"
    return "pass" if p["reduce_pass"] else "last-cta"


@needs_compiler("nvcc", "the host planner")
def test_python_plan_equals_cpp_plan(tmp_path):
    src = tmp_path / "plan.cu"
    src.write_text(_PLAN_PROBE)
    exe = tmp_path / "plan"
    # Host code is what matters; PTX for one virtual arch keeps the build short.
    compile_probe(
        ["nvcc", "-std=c++17", "-O1", "-gencode=arch=compute_80,code=compute_80", f"-I{ROOT / 'csrc'}",
         str(src), str(PLAN_CC), "-o", str(exe)]
    )
    args = [str(v) for shape in PLAN_SHAPES for v in shape]
    lines = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout.splitlines()
    clusters = 0
    for (m, n, k, sms, wgmma), line in zip(PLAN_SHAPES, lines, strict=True):
        desc, ws, desc_cap, cluster_row, desc_forced, desc_zero = line.split("|")
        assert desc_zero == desc  # an all-zero capacity plans as no capacity does
        by_m = make_plan(m, n, k, sms, wgmma=bool(wgmma))["cfg"]
        # the row whose clusters MarlinGemm queries: wgmma128 wherever M chooses it (M > 64 on SM90)
        assert int(cluster_row) == (cfg_index("wgmma128") if wgmma and m > 64 else -1)
        if wgmma:  # a forced cluster row keeps its own stripes where no cluster fits
            assert desc_forced == _describe(make_plan(m, n, k, sms, cfg_index=cfg_index("wgmma128"), wgmma=True,
                                                      capacity=CAPACITY))
        else:
            assert desc_forced == "unsupported"
        assert by_m != cfg_index("wgmma128")  # without a capacity, never the cluster row
        p = make_plan(m, n, k, sms, wgmma=bool(wgmma))
        assert desc == _describe(p)
        assert int(ws) == p["ws"]
        p_cap = make_plan(m, n, k, sms, wgmma=bool(wgmma), capacity=CAPACITY)
        assert desc_cap == _describe(p_cap)
        assert p_cap["ws"] <= p["ws"]  # the trace-time workspace is an upper bound
        clusters += p_cap["cluster"] > 0
    assert clusters > 0, "no cluster plan among PLAN_SHAPES"


def _describe(p):
    c = p["c"]
    return (
        f"{c['name']} m{c['tile_m']}xn{c['n_tile']}xk{c['k_tile']} grid={p['grid']} "
        f"iters={p['iters']} cols={p['n_cols']} k_tiles={p['k_tiles']} "
        f"split={_split_name(p)} ws={p['ws']}"
    )


# ---------------------------------------------------------------------------
# The large-M path's dense dequantization (csrc/marlin/marlin_dequantize.cu).


def emulate_dense_dequantize(tiles, scales, layout):
    """MarlinDequantizeKernel in numpy: per word, the GEMM's rotate-and-mask registers
    (two elements each, as bf16x2 / f16x2 of E2M1 * 2^-126 / 2^-14), widened to float32,
    times 2^126 (2^14) times 2^(s - 127) in float32, rounded once to the 16-bit type;
    NaN blocks written as the rounded float32 quiet NaN. Returns uint16 bits [N, K]."""
    import ml_dtypes

    from marlin_bits import extract_register

    name, n, k = layout.dtype, layout.n, layout.k
    kb, units = layout.kb, layout.n_pad // mw.UNIT_N
    words = np.asarray(tiles).reshape(kb, units, 32, 4, 4).astype(np.uint32)
    words = words[..., 0] | (words[..., 1] << 8) | (words[..., 2] << 16) | (words[..., 3] << 24)  # kb,unit,lane,j
    _, s = mw.unprepare_marlin_weights(tiles, scales, layout)  # canonical bytes [N, Kb]
    s = np.pad(np.asarray(s).astype(np.uint32), ((0, layout.n_pad - n), (0, 0)))
    # block scale per (kb, unit, lane = 4 g + t, j): row n = 32 unit + 8 j + g
    s_t = s.reshape(units, 4, 8, kb).transpose(3, 0, 2, 1)  # kb, unit, g, j
    s_t = np.repeat(s_t[:, :, :, None, :], 4, axis=3).reshape(kb, units, 32, 4)
    block_scale = np.where(s_t == 0, np.uint32(0x00400000), s_t << np.uint32(23)).view(np.float32)
    unbias = np.float32(2.0 ** 126 if name == "bfloat16" else 2.0 ** 14)
    out = np.zeros((kb, units, 8, 4, 4, 2, 2, 2), np.uint16)  # kb, unit, g, t, j, s, h, e
    for p in range(4):
        reg = extract_register(words, name, p)
        for e in range(2):
            half = ((reg >> np.uint32(16 * e)) & np.uint32(0xFFFF)).astype(np.uint16)
            if name == "bfloat16":
                v = (half.astype(np.uint32) << np.uint32(16)).view(np.float32)
            else:
                v = half.view(np.float16).astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):  # overflow -> Inf; NaN blocks are replaced below
                v = (v * unbias) * block_scale
                bits = (v.astype(ml_dtypes.bfloat16) if name == "bfloat16" else v.astype(np.float16)).view(np.uint16)
            out[..., p // 2, p % 2, e] = bits.reshape(kb, units, 8, 4, 4)
    nan = np.float32(np.nan)
    nan_bits = (np.array(nan).astype(ml_dtypes.bfloat16) if name == "bfloat16"
                else np.array(nan).astype(np.float16)).view(np.uint16)
    # n = 32 unit + 8 j + g; k = 32 kb + 16 s + 8 h + 2 t + e
    w = out.transpose(1, 4, 2, 0, 5, 6, 3, 7).reshape(layout.n_pad, k)[:n]
    nan_block = np.repeat(s[:n] == 0xFF, 32, axis=1)
    return np.where(nan_block, nan_bits, w)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_dense_dequantize_math_is_exact(name):
    """The dense dequantization's algorithm (emulated) equals the reference dequantization of
    the unprepared weights bit for bit, for random scales and for the extremes: E8M0 bytes 0,
    1 and 254 (subnormal and overflowing values), NaN blocks, rows whose span makes the
    layout flush blocks."""
    import jax.numpy as jnp

    from jax_mxfp4 import reference

    from marlin_bits import half_to_f64

    dtype = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    rng = np.random.default_rng(7)
    n, k = 72, 1024
    wp = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
    ws = rng.integers(110, 135, size=(n, k // 32), dtype=np.uint8)
    ws[0, :] = 254
    ws[1, :] = np.arange(k // 32) * 8
    ws[2, 5] = 0xFF
    ws[3, :] = 0
    ws[4, :] = 1
    ws[5, :] = rng.integers(0, 255, size=k // 32)
    tiles, scales, layout = mw.prepare_marlin_weights(wp, ws, dtype)
    got = emulate_dense_dequantize(tiles, scales, layout)
    up, us = mw.unprepare_marlin_weights(tiles, scales, layout)
    want = np.asarray(reference.dequantize_reference(up, us, dtype=jnp.dtype(dtype))).view(np.uint16)
    nan = np.isnan(np.asarray(reference.dequantize_reference(up, us, dtype=jnp.float32)))
    bad = (got != want) & ~nan
    assert not bad.any(), f"{bad.sum()} elements differ, first at {np.argwhere(bad)[0]}"
    assert nan.any() and np.array_equal(np.isnan(half_to_f64(got, name)), nan)
    assert np.isinf(half_to_f64(got[0], name)).any()  # 6 * 2^127 overflows (bf16 and fp16)
