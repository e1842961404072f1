"""CPU-side proof of the Marlin MXFP4 layout and kernel logic (no GPU needed).

The kernel (csrc/marlin/marlin_gemm.cu) cannot run here, so this file emulates
it in numpy, statement by statement, on the buffers produced by
``jax_mxfp4.kernels.marlin_weights.prepare_marlin_weights``:

* the stripe partition and split-K fixup (``MakePlan``, ``slot_of``, arrival
  counters, CTA-order summation),
* every cp.async of a pipeline stage (addresses, predication, zero fill,
  the XOR swizzle of the A tile) into shared-memory buffers that start as
  garbage,
* ``ldmatrix.x4`` (which lane supplies which row, which lane receives what),
* the LDS.128 of a lane's 16 weight bytes and the 32-bit scale word,
* the dequantization bit tricks on uint32 (funnel-shift rotations, masks,
  PRMT of the multiplier bytes, the packed multiply rounded like the GPU),
* ``mma.sync.m16n8k16`` through the fragment layouts of the PTX ISA,
* the warps_k reduction, the row factor and the predicated stores,

and checks the result against ``x @ dequant(W)^T`` from the library's reference
dequantization (``jax_mxfp4.formats``). It also checks that the kernel's tile
table and the layout's extraction tables are the ones in the C++ sources
(parsed from them), that Python preparation equals the header's C++
``PrepareHost`` byte for byte (compiled with g++), and that the emulated plan
equals the C++ ``MakePlan`` (compiled with nvcc, host code only).
"""

from __future__ import annotations

import functools
import pathlib
import re
import shutil
import subprocess

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_mxfp4 import formats
from jax_mxfp4.kernels import marlin_weights as mw

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYOUT_H = ROOT / "csrc" / "marlin" / "marlin_layout.h"
GEMM_CU = ROOT / "csrc" / "marlin" / "marlin_gemm.cu"
DTYPES = (jnp.bfloat16, jnp.float16)
THREADS = 256  # kThreads
# E2M1 value of each 4-bit code (bit 3 = sign).
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])

# ---------------------------------------------------------------------------
# Reference dequantization: the library's (jax_mxfp4.formats, exact float32).


def dequant_ref(w_packed, w_scales):
    codes = formats.unpack_nibbles(w_packed)
    return np.asarray(formats.dequantize_codes(codes, w_scales, jnp.float32), np.float64)


# ---------------------------------------------------------------------------
# Tables parsed from the C++ sources.


def _parse_extract(name):
    text = LAYOUT_H.read_text()
    m = re.search(name + r"\[4\]\[2\] = \{(.*?)\n\s*\};", text, re.S)
    pairs = re.findall(r"\{(\d+), (0x[0-9A-Fa-f]+)\}", m.group(1))
    flat = [(int(r), int(f, 16)) for r, f in pairs]
    return tuple((flat[2 * p], flat[2 * p + 1]) for p in range(4))


def _parse_target(name):
    m = re.search(name + r"\[4\] = \{([^}]*)\}", LAYOUT_H.read_text())
    return tuple(int(v) for v in m.group(1).split(","))


@functools.lru_cache(None)
def tile_configs():
    text = GEMM_CU.read_text()
    body = re.search(r"kTileConfigs\[\] = \{(.*?)\n\};", text, re.S).group(1)
    rows = re.findall(
        r'\{"(\w+)",\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\w+)\}', body
    )
    keys = ("m_blocks", "n_tile", "k_tile", "warps_n", "warps_k", "stages")
    out = []
    for r in rows:
        cfg = dict(zip(keys, map(int, r[1:7])), name=r[0])
        cfg["max_m"] = 2**31 - 1 if r[7] == "INT_MAX" else int(r[7])
        out.append(cfg)
    assert out, "could not parse kTileConfigs"
    return tuple(out)


def test_tables_match_header():
    assert _parse_extract("kMarlinExtractBf16") == mw.EXTRACT["bfloat16"]
    assert _parse_extract("kMarlinExtractF16") == mw.EXTRACT["float16"]
    assert _parse_target("kTargetBitBf16") == mw.TARGET_BIT["bfloat16"]
    assert _parse_target("kTargetBitF16") == mw.TARGET_BIT["float16"]
    assert [c["name"] for c in tile_configs()] == ["small", "medium", "large"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_word_bit_used_once(dtype):
    table = mw.source_bit_table(dtype)
    assert sorted(table.ravel().tolist()) == list(range(32))


# ---------------------------------------------------------------------------
# Bit-level helpers that mirror the device code.

U32 = np.uint32


def rotr(x, r):
    x = x.astype(U32)
    return x if r == 0 else ((x >> U32(r)) | (x << U32(32 - r))).astype(U32)


def field_mask(name, fields):
    mask = 0
    for b in range(4):
        if fields & (1 << b):
            t = mw.TARGET_BIT[name][b]
            mask |= (1 << t) | (1 << (16 + t))
    return U32(mask)


def extract_register(w, name, p):  # ExtractRegister<kD, p>
    (r0, f0), (r1, f1) = mw.EXTRACT[name][p]
    r = rotr(w, r0) & field_mask(name, f0)
    if f1:
        r = r | (rotr(w, r1) & field_mask(name, f1))
    return r


def prmt(a, b, sel):  # prmt.b32 default mode (selectors < 8 here)
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(np.shape(a), np.uint64)
    for i in range(4):
        byte = (sel >> (4 * i)) & 7
        out |= ((src >> np.uint64(8 * byte)) & np.uint64(0xFF)) << np.uint64(8 * i)
    return out.astype(U32)


def block_multipliers(sw, name):  # BlockMultipliers<kD>
    zero = np.zeros_like(sw)
    if name == "bfloat16":
        return [(prmt(sw, zero, 0x4040 | j | (j << 8)) << U32(7)).astype(U32) for j in range(4)]
    return [prmt(sw, zero, 0x0404 | (j << 4) | (j << 12)) for j in range(4)]


def half_to_f64(bits, name):
    bits = np.asarray(bits, np.uint16)
    if name == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.view(np.float16).astype(np.float64)


def f64_to_half(x, name):
    """Round to nearest even in the 16-bit type. Every value rounded here is a
    product of two 16-bit floats with <= 2 + 1 significant bits, exact in
    float64 and (down to 2^-148) in float32, so the float32 step adds no error."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        x32 = np.asarray(x).astype(np.float32)
    if name == "bfloat16":
        return x32.astype(ml_dtypes.bfloat16).view(np.uint16)
    return x32.astype(np.float16).view(np.uint16)


def mul2(a, b, name):  # MulBf16x2 / MulF16x2: per half, exact product rounded once
    out = np.zeros(np.shape(a), U32)
    for half in range(2):
        ha = ((a >> U32(16 * half)) & U32(0xFFFF)).astype(np.uint16)
        hb = ((b >> U32(16 * half)) & U32(0xFFFF)).astype(np.uint16)
        with np.errstate(invalid="ignore", over="ignore"):
            prod = half_to_f64(ha, name) * half_to_f64(hb, name)
        out |= f64_to_half(prod, name).astype(U32) << U32(16 * half)
    return out


def dequant_word(w, mult, name):  # DequantWord<kD>
    return [mul2(extract_register(w, name, p), mult, name) for p in range(4)]


# The PTX fragment maps of mma.m16n8k16 (f16/bf16 inputs, f32 accumulators),
# as (register, half) -> (row, col) for lane l, g = l // 4, t = l % 4.
def _a_coord(lane, reg, half):
    g, t = lane // 4, lane % 4
    return g + 8 * (reg % 2), 2 * t + half + 8 * (reg // 2)


def _b_coord(lane, reg, half):  # (k row, n col)
    g, t = lane // 4, lane % 4
    return 2 * t + half + 8 * reg, g


def _c_coord(lane, i):
    g, t = lane // 4, lane % 4
    return g + 8 * (i // 2), 2 * t + i % 2


_LANES = np.arange(32)
_A_IDX = np.array([[_a_coord(l, r, h) for r in range(4) for h in range(2)] for l in range(32)])
_B_IDX = np.array([[_b_coord(l, r, h) for r in range(2) for h in range(2)] for l in range(32)])
_C_IDX = np.array([[_c_coord(l, i) for i in range(4)] for l in range(32)])


def mma(acc, a_regs, b0, b1, name):
    """acc[W, 32, 4] += A @ B for each warp; a_regs[W, 32, 4], b0/b1[W, 32] uint32."""
    w = a_regs.shape[0]
    a_half = np.stack([(a_regs >> U32(16 * h)) & U32(0xFFFF) for h in range(2)], -1)  # W,32,4,2
    a_val = half_to_f64(a_half.reshape(w, 32, 8), name)
    amat = np.zeros((w, 16, 16))
    amat[:, _A_IDX[..., 0], _A_IDX[..., 1]] = a_val
    b_regs = np.stack([b0, b1], -1)
    b_half = np.stack([(b_regs >> U32(16 * h)) & U32(0xFFFF) for h in range(2)], -1)  # W,32,2,2
    b_val = half_to_f64(b_half.reshape(w, 32, 4), name)
    bmat = np.zeros((w, 16, 8))
    bmat[:, _B_IDX[..., 0], _B_IDX[..., 1]] = b_val
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.einsum("wmk,wkn->wmn", amat, bmat)
    acc += d[:, _C_IDX[..., 0], _C_IDX[..., 1]]
    return bmat


def ldmatrix_x4(smem_u16, row_chunk):
    """row_chunk[W, 32]: 16-byte chunk index each lane supplies. Returns [W, 32, 4]."""
    rows = smem_u16.reshape(-1, 8)[row_chunk]  # W, 32 lanes, 8 halves
    out = np.zeros(row_chunk.shape + (4,), U32)
    for i in range(4):
        src_lane = 8 * i + _LANES // 4  # matrix i, row l // 4
        lo = rows[:, src_lane, 2 * (_LANES % 4)].astype(U32)
        hi = rows[:, src_lane, 2 * (_LANES % 4) + 1].astype(U32)
        out[..., i] = lo | (hi << U32(16))
    return out


# ---------------------------------------------------------------------------
# Plan (MakePlan in marlin_gemm.cu).


def ceil_div(a, b):
    return -(-a // b)


def make_plan(m, n, k, sm_count, cfg_index=None):
    cfgs = tile_configs()
    if cfg_index is None:
        cfg_index = next(i for i, c in enumerate(cfgs) if m <= c["max_m"])
    c = cfgs[cfg_index]
    m_chunks = ceil_div(m, 16 * c["m_blocks"])
    n_tiles = ceil_div(n, c["n_tile"])
    k_tiles = ceil_div(k // 32, c["k_tile"] // 32)
    n_cols = m_chunks * n_tiles
    total = n_cols * k_tiles
    grid = min(sm_count, total)
    iters = ceil_div(total, grid)
    if n_cols >= 4 * sm_count:
        iters = ceil_div(iters, k_tiles) * k_tiles
    grid = ceil_div(total, iters)
    split = grid > 1 and iters % k_tiles != 0
    ws = 0
    if split:
        ws = ceil_div(4 * n_cols, 256) * 256 + 2 * grid * 16 * c["m_blocks"] * c["n_tile"] * 4
    return dict(cfg=cfg_index, c=c, m_chunks=m_chunks, n_tiles=n_tiles, k_tiles=k_tiles,
                n_cols=n_cols, total=total, grid=grid, iters=iters, split=split, ws=ws)


# ---------------------------------------------------------------------------
# The kernel, emulated.


class Emulator:
    """One launch of MarlinMxfp4GemmKernel<cfg, T> on flat byte buffers."""

    def __init__(self, x_bits, tiles, scales, layout, plan, rng):
        self.name = layout.dtype
        self.a = np.asarray(x_bits, np.uint16)  # [m, k] 16-bit patterns
        self.tiles = np.asarray(tiles, np.uint8).ravel()
        self.scales = np.asarray(scales, np.uint8).ravel()
        self.m, self.k = self.a.shape
        self.n, self.n_pad, self.kb_count = layout.n, layout.n_pad, layout.kb
        self.plan, self.rng = plan, rng
        c = plan["c"]
        self.mb, self.n_tile, self.k_tile = c["m_blocks"], c["n_tile"], c["k_tile"]
        self.warps_n, self.warps_k, self.stages = c["warps_n"], c["warps_k"], c["stages"]
        self.tile_m = 16 * self.mb
        self.kb_tile = self.k_tile // 32
        self.units_tile = self.n_tile // 32
        self.units_warp = self.units_tile // self.warps_n
        self.kb_warp = self.kb_tile // self.warps_k
        self.n8_warp = 4 * self.units_warp
        self.frags = self.mb * self.n8_warp
        self.a_row_chunks = self.k_tile // 8
        self.a_chunks = self.tile_m * self.a_row_chunks
        self.b_chunks = self.kb_tile * self.units_tile * 32
        self.s_chunks = self.kb_tile * self.n_tile // 16
        self.units = self.n_pad // 32
        self.c = np.full((self.m, self.n), np.nan)  # poisoned output
        self.partials = {}
        self.counters = np.zeros(plan["n_cols"], np.int64)
        self.b_seen = np.full((self.n_pad, self.kb_count * 32), np.nan)  # dequantized B (n, k)
        warp = np.arange(8)[:, None]
        self.warp_n, self.warp_k = warp % self.warps_n, warp // self.warps_n
        self.lane = _LANES[None, :]
        self.g, self.t = self.lane // 4, self.lane % 4
        self.a_bytes = self.a.view(np.uint8).ravel()

    # -- global -> shared (start_column / fetch_tile): the kernel's per-thread
    #    address arithmetic, for all 256 threads at once --
    def start_column(self, col):
        p = self.plan
        n_idx, m_chunk = col // p["m_chunks"], col % p["m_chunks"]
        tid = np.arange(THREADS)
        rc = self.a_row_chunks
        self.a_row0, self.a_ch = tid // rc, tid % rc
        self.a_dst0 = self.a_row0 * rc + (self.a_ch ^ (self.a_row0 % 8))
        row = m_chunk * self.tile_m + self.a_row0
        self.a_rows_left = self.m - row
        self.a_base = row * self.k + 8 * self.a_ch  # elements
        b_unit, self.b_kbl0 = (tid // 32) % self.units_tile, (tid // 32) // self.units_tile
        unit = n_idx * self.units_tile + b_unit
        self.b_ok = unit < self.units
        self.b_base = self.b_kbl0 * self.units * 32 + 32 * unit + tid % 32  # uint4s
        self.s_kbl = tid // (self.n_tile // 16)
        n0 = n_idx * self.n_tile + 16 * (tid % (self.n_tile // 16))
        self.s_ok = (tid < self.s_chunks) & (n0 < self.n_pad)
        self.s_base = self.s_kbl * self.n_pad + n0

    def fetch_tile(self, slot_buf, kt):
        tid = np.arange(THREADS)
        kb0 = kt * self.kb_tile
        kb_left = self.kb_count - kb0
        a_step = THREADS // self.a_row_chunks
        for i in range(self.a_chunks // THREADS):
            ok = (i * a_step < self.a_rows_left) & (self.a_ch // 4 < kb_left)
            src = (self.a_base + i * a_step * self.k + kb0 * 32) * 2
            self._copy(slot_buf["a"], self.a_dst0 + i * THREADS, self.a_bytes, src, ok)
        b_step = THREADS // 32 // self.units_tile
        for i in range(self.b_chunks // THREADS):
            ok = self.b_ok & (self.b_kbl0 + i * b_step < kb_left)
            src = (self.b_base + (kb0 + i * b_step) * self.units * 32) * 16
            self._copy(slot_buf["b"], tid + i * THREADS, self.tiles, src, ok)
        act = tid < self.s_chunks
        ok = self.s_ok & (self.s_kbl < kb_left)
        src = self.s_base + kb0 * self.n_pad
        self._copy(slot_buf["s"], tid[act], self.scales, src[act], ok[act])

    @staticmethod
    def _copy(dst_buf, dst_chunk, src_bytes, src_off, ok):  # cp.async 16 B, zero fill
        chunks = dst_buf.reshape(-1, 16)
        assert np.all(src_off[ok] % 16 == 0) and np.all(src_off[ok] + 16 <= src_bytes.size)
        gathered = src_bytes[np.where(ok, src_off, 0)[:, None] + np.arange(16)]
        chunks[dst_chunk] = np.where(ok[:, None], gathered, 0)

    # -- shared -> registers -> mma (compute_stage) --
    def compute_stage(self, slot_buf, acc, col, kt):
        name = self.name
        sa16 = slot_buf["a"].view(np.uint16)
        sb32 = slot_buf["b"].view(U32)
        ss32 = slot_buf["s"].view(U32)
        n_idx = col // self.plan["m_chunks"]
        for kw in range(self.kb_warp):
            kbl = self.warp_k * self.kb_warp + kw  # [8, 1]
            af = {}
            for s in range(2):
                for mb in range(self.mb):
                    row = mb * 16 + self.lane % 16
                    ch = kbl * 4 + 2 * s + self.lane // 16
                    af[s, mb] = ldmatrix_x4(sa16, row * self.a_row_chunks + (ch ^ (row % 8)))
            for u in range(self.units_warp):
                ul = self.warp_n * self.units_warp + u
                wbase = ((kbl * self.units_tile + ul) * 32 + self.lane) * 4  # uint32 index
                sw = ss32[(kbl * self.n_tile + ul * 32) // 4 + self.g]
                mult = block_multipliers(sw, name)
                for j in range(4):
                    b = dequant_word(sb32[wbase + j], mult[j], name)
                    for s in range(2):
                        for mb in range(self.mb):
                            fi = mb * self.n8_warp + 4 * u + j
                            bmat = mma(acc[:, :, fi], af[s, mb], b[2 * s], b[2 * s + 1], name)
                        # record the B operand: n = tile col + g, k = 32 kb + 16 s + row
                        n0 = n_idx * self.n_tile + ul[:, 0] * 32 + 8 * j  # [8]
                        kb = kt * self.kb_tile + kbl[:, 0]
                        for w in range(8):
                            if kb[w] < self.kb_count and n0[w] < self.n_pad:
                                ks = slice(32 * kb[w] + 16 * s, 32 * kb[w] + 16 * s + 16)
                                self.b_seen[n0[w] : n0[w] + 8, ks] = bmat[w].T

    def slot_of(self, cta, col):
        p = self.plan
        return 2 * cta + (0 if col == cta * p["iters"] // p["k_tiles"] else 1)

    def finish_column(self, cta, col, acc):
        p = self.plan
        k0 = self.warp_k[:, 0] == 0
        for wk in range(1, self.warps_k):  # red[] then add in wk order
            for wn in range(self.warps_n):
                acc[wn] += acc[wk * self.warps_n + wn]
        tile0 = col * p["k_tiles"]
        first, last = tile0 // p["iters"], (tile0 + p["k_tiles"] - 1) // p["iters"]
        store = True
        if first != last:
            self.partials[self.slot_of(cta, col)] = acc[k0].copy()
            arrived_before = self.counters[col]
            self.counters[col] += 1
            store = arrived_before == last - first
            if store:
                acc[k0] = 0
                for other in range(first, last + 1):
                    acc[k0] += self.partials[self.slot_of(other, col)]
        if store:
            self.store(col, acc)
        acc[:] = 0

    def store(self, col, acc):
        p = self.plan
        n_idx, m_chunk = col // p["m_chunks"], col % p["m_chunks"]
        planes = self.scales[self.kb_count * self.n_pad :].reshape(4, self.n_pad).astype(U32)
        factor = (planes[0] | (planes[1] << 8) | (planes[2] << 16) | (planes[3] << 24)).view(np.float32)
        for w in range(self.warps_n):  # warps with warp_k == 0
            for u in range(self.units_warp):
                for j in range(4):
                    n0 = n_idx * self.n_tile + (w * self.units_warp + u) * 32 + 8 * j + 2 * self.t[0]
                    for mb in range(self.mb):
                        for half in range(2):
                            row = m_chunk * self.tile_m + mb * 16 + self.g[0] + 8 * half
                            v = acc[w, :, mb * self.n8_warp + 4 * u + j]
                            for e in range(2):
                                n = n0 + e
                                ok = (n < self.n) & (row < self.m)
                                with np.errstate(invalid="ignore", over="ignore"):
                                    val = v[:, 2 * half + e].astype(np.float32) * factor[np.minimum(n, self.n_pad - 1)]
                                self.c[row[ok], n[ok]] = val[ok]

    def run_cta(self, cta):
        p = self.plan
        t_begin = cta * p["iters"]
        t_end = min(t_begin + p["iters"], p["total"])
        assert t_begin < t_end
        # shared memory starts as garbage: predication bugs would show
        bufs = [
            {k: self.rng.integers(0, 256, 16 * n, dtype=np.uint8)
             for k, n in (("a", self.a_chunks), ("b", self.b_chunks), ("s", self.s_chunks))}
            for _ in range(self.stages)
        ]
        acc = np.zeros((8, 32, self.frags, 4))
        ld = [t_begin // p["k_tiles"], t_begin % p["k_tiles"], t_end - t_begin]
        self.start_column(ld[0])

        def fetch(slot):
            if ld[2] > 0:
                self.fetch_tile(bufs[slot], ld[1])
                ld[2] -= 1
                ld[1] += 1
                if ld[1] == p["k_tiles"]:
                    ld[0], ld[1] = ld[0] + 1, 0
                    if ld[2] > 0:
                        self.start_column(ld[0])

        for s in range(self.stages - 1):
            fetch(s)
        slot, fetch_slot = 0, self.stages - 1
        col, kt = t_begin // p["k_tiles"], t_begin % p["k_tiles"]
        for tt in range(t_begin, t_end):
            fetch(fetch_slot)
            self.compute_stage(bufs[slot], acc, col, kt)
            slot = (slot + 1) % self.stages
            fetch_slot = (fetch_slot + 1) % self.stages
            kt += 1
            if kt == p["k_tiles"] or tt + 1 == t_end:
                self.finish_column(cta, col, acc)
                kt, col = 0, col + 1

    def run(self, order):
        for cta in order:
            self.run_cta(cta)
        return self.c


# ---------------------------------------------------------------------------
# Test data.


def random_weights(rng, n, k, scale_lo=112, scale_hi=128):
    w_packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    w_scales = rng.integers(scale_lo, scale_hi + 1, (n, k // 32), dtype=np.uint8)
    return w_packed, w_scales


def random_x(rng, m, k, name):
    x = rng.standard_normal((m, k)).astype(np.float32)
    if name == "bfloat16":
        return x.astype(ml_dtypes.bfloat16).view(np.uint16)
    return x.astype(np.float16).view(np.uint16)


def reference(x_bits, w_packed, w_scales, name):
    x = half_to_f64(x_bits, name)
    w = dequant_ref(w_packed, w_scales).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return x @ w.T, w


def emulate(x_bits, w_packed, w_scales, dtype, sm_count, cfg_index=None, seed=0, order="forward"):
    tiles, scales, layout = mw.prepare_marlin_weights(w_packed, w_scales, dtype)
    m = x_bits.shape[0]
    plan = make_plan(m, layout.n, layout.k, sm_count, cfg_index)
    emu = Emulator(x_bits, np.asarray(tiles), np.asarray(scales), layout, plan, np.random.default_rng(seed))
    ctas = list(range(plan["grid"]))
    if order == "reverse":
        ctas = ctas[::-1]
    elif order == "shuffle":
        np.random.default_rng(seed + 1).shuffle(ctas)
    out = emu.run(ctas)
    return out, emu, plan, layout


def round_to(x, name):
    return half_to_f64(f64_to_half(x, name), name)


def rel_err(out, ref):
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


# ---------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_bits_exhaustive(dtype):
    """Every code in every (register, half) slot of a word, other bits random:
    the extracted 16-bit pattern is E2M1(code) * 2^-126 (bf16) / 2^-14 (f16)."""
    name = mw._dtype_name(dtype)
    src = mw.source_bit_table(dtype)
    rng = np.random.default_rng(1)
    raw_scale = 2.0**-126 if name == "bfloat16" else 2.0**-14
    for p in range(4):
        for e in range(2):
            for code in range(16):
                words = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(U32)
                for b in range(4):
                    bit = U32(1 << int(src[p, e, b]))
                    words = np.where((code >> b) & 1, words | bit, words & ~bit).astype(U32)
                reg = extract_register(words, name, p)
                half = ((reg >> U32(16 * e)) & U32(0xFFFF)).astype(np.uint16)
                other = ((reg >> U32(16 * (1 - e))) & U32(0xFFFF)).astype(np.uint16)
                got = half_to_f64(half, name)
                np.testing.assert_array_equal(got, E2M1[code] * raw_scale)
                assert np.all(np.signbit(got) == bool(code & 8))
                # the other half only holds its own element's bits: no leak
                assert np.all((other & ~np.uint16(field_mask(name, 0xF) & 0xFFFF)) == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(32, 32), (200, 320), (96, 96), (64, 4160), (33, 64)])
def test_round_trip(dtype, n, k):
    rng = np.random.default_rng(n * 7 + k)
    # Lossless range: f16 flushes blocks > 29 binades below the row max.
    lo, hi = (100, 140) if mw._dtype_name(dtype) == "bfloat16" else (110, 139)
    w_packed, w_scales = random_weights(rng, n, k, lo, hi)
    w_scales[0, 0] = 255  # NaN blocks round-trip too
    tiles, scales, layout = mw.prepare_marlin_weights(w_packed, w_scales, dtype)
    assert tiles.shape == layout.tiles_shape and scales.shape == layout.scales_shape
    assert tiles.dtype == np.uint8 and scales.dtype == np.uint8
    wp, ws = mw.unprepare_marlin_weights(tiles, scales, layout)
    np.testing.assert_array_equal(wp, w_packed)
    np.testing.assert_array_equal(ws, w_scales)


def _lane_view(tiles, layout):
    """[kb, unit, lane, 16 bytes] view: what each lane's LDS.128 reads."""
    return np.asarray(tiles).reshape(layout.kb, layout.n_pad // 32, 32, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lane_bytes_are_its_fragments(dtype):
    """Spell out the contract of one 16-byte load: lane l of unit (kb, u) holds,
    in word j, exactly the B-fragment elements (k = 16s + 8h + 2t + e, n = 8j + g)
    of n8 tile j for both k16 steps."""
    name = mw._dtype_name(dtype)
    raw_scale = 2.0**-126 if name == "bfloat16" else 2.0**-14
    rng = np.random.default_rng(3)
    n, k = 64, 96
    w_packed, w_scales = random_weights(rng, n, k)
    tiles, _, layout = mw.prepare_marlin_weights(w_packed, w_scales, dtype)
    codes = np.stack([w_packed & 15, w_packed >> 4], -1).reshape(n, k)
    view = _lane_view(tiles, layout).view(U32)  # [kb, u, lane, 4 words]
    for kb in range(layout.kb):
        for u in range(layout.n_pad // 32):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for j in range(4):
                    word = view[kb, u, lane, j : j + 1]
                    for p in range(4):
                        reg = extract_register(word, name, p)
                        s, h = p // 2, p % 2
                        for e in range(2):
                            kk = 32 * kb + 16 * s + 8 * h + 2 * t + e
                            nn = 32 * u + 8 * j + g
                            half = np.uint16((reg[0] >> U32(16 * e)) & U32(0xFFFF))
                            assert half_to_f64(half, name) == E2M1[codes[nn, kk]] * raw_scale
                            assert bool(half & 0x8000) == bool(codes[nn, kk] & 8)


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
    planes = emu.scales[emu.kb_count * emu.n_pad :].reshape(4, emu.n_pad).astype(U32)
    return (planes[0] | (planes[1] << 8) | (planes[2] << 16) | (planes[3] << 24)).view(np.float32).astype(np.float64)


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


def test_prepare_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        mw.prepare_marlin_weights(np.zeros((4, 15), np.uint8), np.zeros((4, 1), np.uint8), jnp.bfloat16)
    with pytest.raises(ValueError, match="linear uint8"):
        mw.prepare_marlin_weights(np.zeros((4, 16), np.uint8), np.zeros((4, 2), np.uint8), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mw.prepare_marlin_weights(np.zeros((4, 16), np.uint8), np.zeros((4, 1), np.uint8), jnp.float32)
    lay = mw.marlin_layout(200, 4160, jnp.float16)
    assert (lay.n_pad, lay.tiles_shape, lay.scales_shape) == (224, (130, 3584), (134, 224))


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
# Cross-checks with the C++ sources (compiled here, host code only).

_PREPARE_PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "marlin/marlin_layout.h"
int main(int argc, char** argv) {
  const long n = atol(argv[1]), k = atol(argv[2]);
  const int dt = atoi(argv[3]);
  std::vector<uint8_t> wp(n * k / 2), ws(n * k / 32);
  FILE* f = fopen(argv[4], "rb");
  if (fread(wp.data(), 1, wp.size(), f) != wp.size() || fread(ws.data(), 1, ws.size(), f) != ws.size()) return 2;
  fclose(f);
  const auto s = jax_mxfp4::marlin::GetPreparedShape(n, k);
  std::vector<uint8_t> tiles(s.tiles_rows * s.tiles_cols), scales(s.scales_rows * s.scales_cols);
  jax_mxfp4::marlin::PrepareHost(wp.data(), ws.data(), n, k, static_cast<jax_mxfp4::InputDType>(dt),
                                 tiles.data(), scales.data());
  f = fopen(argv[5], "wb");
  fwrite(tiles.data(), 1, tiles.size(), f);
  fwrite(scales.data(), 1, scales.size(), f);
  fclose(f);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the C++ PrepareHost")
@pytest.mark.parametrize("dtype", DTYPES)
def test_python_prepare_equals_cpp_prepare(dtype, tmp_path):
    src = tmp_path / "probe.cc"
    src.write_text(_PREPARE_PROBE)
    exe = tmp_path / "probe"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)], check=True)
    dt_code = 1 if mw._dtype_name(dtype) == "bfloat16" else 2
    rng = np.random.default_rng(4)
    for n, k in [(200, 320), (32, 32), (77, 4160)]:
        w_packed, w_scales = random_weights(rng, n, k, 0, 254)
        w_scales[3, -1] = 255
        w_scales[5, :] = 255
        (tmp_path / "in.bin").write_bytes(w_packed.tobytes() + w_scales.tobytes())
        subprocess.run([str(exe), str(n), str(k), str(dt_code), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
        tiles, scales, layout = mw.prepare_marlin_weights(w_packed, w_scales, dtype)
        blob = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.uint8)
        nt = int(np.prod(layout.tiles_shape))
        np.testing.assert_array_equal(blob[:nt], np.asarray(tiles).ravel())
        np.testing.assert_array_equal(blob[nt:], np.asarray(scales).ravel())


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


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the host planner")
def test_python_plan_equals_cpp_plan(tmp_path):
    src = tmp_path / "plan.cu"
    src.write_text(_PLAN_PROBE)
    exe = tmp_path / "plan"
    # Host code is what matters; PTX for one virtual arch keeps the build short.
    subprocess.run(
        ["nvcc", "-std=c++17", "-O1", "-gencode=arch=compute_80,code=compute_80", f"-I{ROOT / 'csrc'}",
         str(src), str(GEMM_CU), "-o", str(exe)],
        check=True,
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
