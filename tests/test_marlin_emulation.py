"""CPU-side proof of the Marlin MXFP4 kernel logic (no GPU needed).

The kernel (csrc/marlin/marlin_gemm.cu) cannot run here, so marlin_emulator.py
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
from marlin_bits import DTYPES, GEMM_CU, ROOT, THREADS, compile_probe, needs_compiler, tile_configs
from marlin_emulator import emulate, make_plan, random_weights, random_x, reference, rel_err, round_to

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
@pytest.mark.parametrize("cfg_index", [0, 1, 2])
@pytest.mark.parametrize("case", CASES)
def test_emulated_kernel_matches_reference(dtype, cfg_index, case):
    m, n, k, sms = case
    name = mw._dtype_name(dtype)
    rng = np.random.default_rng(hash((m, n, k, cfg_index)) % 2**32)
    w_packed, w_scales = random_weights(rng, n, k)
    x = random_x(rng, m, k, name)
    out, emu, plan, layout = emulate(x, w_packed, w_scales, dtype, sms, cfg_index)
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
def test_split_k_is_deterministic(dtype):
    """The last-arriving CTA sums partials in CTA order: bitwise the same output
    whatever order CTAs run in."""
    name = mw._dtype_name(dtype)
    rng = np.random.default_rng(11)
    m, n, k, sms = 5, 128, 1024, 7
    w_packed, w_scales = random_weights(rng, n, k)
    x = random_x(rng, m, k, name)
    outs = [emulate(x, w_packed, w_scales, dtype, sms, 0, order=o)[0] for o in ("forward", "reverse", "shuffle")]
    plan = make_plan(m, n, k, sms, 0)
    assert plan["split"]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_scale_gives_nan_column(dtype):
    name = mw._dtype_name(dtype)
    rng = np.random.default_rng(5)
    m, n, k = 3, 64, 128
    w_packed, w_scales = random_weights(rng, n, k)
    w_scales[17, 2] = 255
    x = random_x(rng, m, k, name)
    out, *_ = emulate(x, w_packed, w_scales, dtype, 4, 0)
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
    out, emu, _, _ = emulate(x, w_packed, w_scales, dtype, 4, 0)
    _, w_ref = reference(x, w_packed, w_scales, name)
    smax = w_scales.max(axis=1).astype(np.int64)
    span = 133 if name == "bfloat16" else 24
    inside = np.repeat(w_scales.astype(np.int64) >= (smax - span)[:, None], 32, axis=1)
    got = emu.b_seen[:n, :k] * _row_factor(emu)[:n, None]
    finite = np.isfinite(w_ref)
    np.testing.assert_array_equal(got[inside & finite], w_ref[inside & finite])
    bound = 2.0 ** (smax - 127 - 25)
    assert np.all(np.abs(got - w_ref)[~inside] <= np.broadcast_to(bound[:, None], got.shape)[~inside])


@pytest.mark.parametrize("cfg_index", [0, 1, 2])
def test_shared_memory_accesses_are_conflict_free(cfg_index):
    """ldmatrix phases (8 lanes = one 8x8 matrix) and each warp's cp.async
    writes of the A tile touch distinct 16-byte bank groups (XOR swizzle)."""
    c = tile_configs()[cfg_index]
    rc = c["k_tile"] // 8
    tile_m = 16 * c["m_blocks"]
    lane = np.arange(32)
    for kbl in range(c["k_tile"] // 32):
        for s in range(2):
            for mb in range(c["m_blocks"]):
                row = mb * 16 + lane % 16
                ch = kbl * 4 + 2 * s + lane // 16
                chunk = row * rc + (ch ^ (row % 8))
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
    # the heuristic picks small / medium / large by M
    assert make_plan(1, 4096, 4096, 132)["c"]["name"] == "small"
    assert make_plan(16, 4096, 4096, 132)["c"]["name"] == "small"
    assert make_plan(32, 4096, 4096, 132)["c"]["name"] == "medium"
    assert make_plan(33, 4096, 4096, 132)["c"]["name"] == "large"
    assert make_plan(1024, 4096, 4096, 132)["c"]["name"] == "large"
    p = make_plan(1, 8192, 8192, 132)
    assert p["grid"] <= 132 and p["split"]


# ---------------------------------------------------------------------------
# Cross-check with the C++ MakePlan (compiled here, host code only).

_PLAN_PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include "marlin/marlin_gemm.h"
int main(int argc, char** argv) {
  for (int i = 1; i + 3 < argc; i += 4) {
    const long m = atol(argv[i]), n = atol(argv[i + 1]), k = atol(argv[i + 2]);
    const int sms = atoi(argv[i + 3]);
    std::printf("%s|%lld\n", jax_mxfp4::marlin::MarlinDescribePlan(m, n, k, sms).c_str(),
                (long long)jax_mxfp4::marlin::MarlinWorkspaceBytes(m, n, k, sms));
  }
  return 0;
}
"""

PLAN_SHAPES = [
    (m, n, k, sms)
    for (n, k) in [(4096, 4096), (8192, 8192), (28672, 8192), (200, 4160), (5760, 2880), (96, 96)]
    for m in (1, 16, 32, 64, 129, 1024)
    for sms in (132, 7)
]


@needs_compiler("nvcc", "the host planner")
def test_python_plan_equals_cpp_plan(tmp_path):
    src = tmp_path / "plan.cu"
    src.write_text(_PLAN_PROBE)
    exe = tmp_path / "plan"
    # Host code is what matters; PTX for one virtual arch keeps the build short.
    compile_probe(
        ["nvcc", "-std=c++17", "-O1", "-gencode=arch=compute_80,code=compute_80", f"-I{ROOT / 'csrc'}",
         str(src), str(GEMM_CU), "-o", str(exe)]
    )
    args = [str(v) for shape in PLAN_SHAPES for v in shape]
    lines = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout.splitlines()
    for (m, n, k, sms), line in zip(PLAN_SHAPES, lines, strict=True):
        desc, ws = line.split("|")
        p = make_plan(m, n, k, sms)
        c = p["c"]
        expect = (
            f"{c['name']} m{16 * c['m_blocks']}xn{c['n_tile']}xk{c['k_tile']} grid={p['grid']} "
            f"iters={p['iters']} cols={p['n_cols']} k_tiles={p['k_tiles']} "
            f"split={'yes' if p['split'] else 'no'} ws={p['ws']}"
        )
        assert desc == expect
        assert int(ws) == p["ws"]
