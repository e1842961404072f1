"""The Marlin MXFP4 kernel (csrc/marlin/marlin_kernel.cuh) emulated in numpy, and test data for it.

``Emulator`` runs one launch of ``MarlinMxfp4GemmKernel<cfg, T>`` statement
by statement on the buffers produced by
``jax_mxfp4.kernels.marlin_weights.prepare_marlin_weights``:

* the stripe partition and split-K fixup (``MakePlan``: ``make_plan``;
  ``slot_of``, arrival counters, CTA-order summation; for the rows with
  ``SplitReduce::kPass`` the reduction pass: which columns it sums,
  CTA-order summation),
* every cp.async of a pipeline stage (addresses, predication, zero fill,
  the XOR swizzle of the A tile) into shared-memory buffers that start as
  garbage,
* ``ldmatrix.x4``, the LDS.128 of a lane's 16 weight bytes and the 32-bit
  scale word, the dequantization and ``mma.sync.m16n8k16`` (marlin_bits.py),
* the warps_k reduction, the row factor and the predicated stores.

test_marlin_emulation.py checks it against ``x @ dequant(W)^T``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jax_mxfp4.kernels import marlin_weights as mw
from marlin_bits import (LANES, THREADS, U32, block_multipliers, dequant_ref, dequant_word, f64_to_half,
                         half_to_f64, ldmatrix_x4, mma, tile_configs)

# ---------------------------------------------------------------------------
# Plan (MakePlan in marlin_plan.cc).


def ceil_div(a, b):
    return -(-a // b)


def make_plan(m, n, k, sm_count, cfg_index=None, wgmma=False, reduce=None, capacity=None):
    """MakePlan; ``reduce`` ("last_cta" / "pass") replaces the row's SplitReduce (emulation only).

    ``capacity`` ({2: clusters, 4: ..., 8: ...}, ClusterCapacity): with it, cluster split-K for the
    SplitReduce::kCluster rows (plan ``cluster`` > 1, grid = n_cols x cluster) where one fits."""
    cfgs = tile_configs()
    skip = "mma_sync" if wgmma else "wgmma"

    def select(start):
        return next(i for i, c in enumerate(cfgs)
                    if i >= start and c["path"] != skip and m <= c["max_m"] and n >= c["min_n"])

    def cluster_split(c):
        if c["reduce"] != "cluster" or not capacity:
            return 1
        n_cols = ceil_div(m, c["tile_m"]) * ceil_div(n, c["n_tile"])
        k_tiles = ceil_div(k // 32, c["k_tile"] // 32)
        fits = [s for s in (2, 4, 8) if n_cols <= capacity.get(s, 0) and s * n_cols <= sm_count and 2 * s <= k_tiles]
        cluster = max(fits, default=1)
        return 1 if 3 * cluster * n_cols < 2 * sm_count else cluster  # keeps >= 2/3 of the SMs busy

    if cfg_index is None:
        cfg_index = select(0)
        if cfgs[cfg_index]["reduce"] == "cluster" and cluster_split(cfgs[cfg_index]) <= 1:
            cfg_index = select(cfg_index + 1)  # the cluster row's stripe form (wgmma128 -> wgmma128ws)
    c = cfgs[cfg_index]
    m_chunks = ceil_div(m, c["tile_m"])
    n_tiles = ceil_div(n, c["n_tile"])
    k_tiles = ceil_div(k // 32, c["k_tile"] // 32)
    n_cols = m_chunks * n_tiles
    total = n_cols * k_tiles
    if c["reduce"] == "cluster" and capacity:  # cluster split-K (wgmma rows, not emulated)
        cluster = cluster_split(c)
        if cluster > 1:
            return dict(cfg=cfg_index, c=c, m_chunks=m_chunks, n_tiles=n_tiles, k_tiles=k_tiles,
                        n_cols=n_cols, total=total, grid=n_cols * cluster, iters=ceil_div(k_tiles, cluster),
                        split=True, reduce_pass=False, cluster=cluster, ws=0)
    grid = min(sm_count, total)
    iters = ceil_div(total, grid)
    if n_cols >= 4 * sm_count:
        iters = ceil_div(iters, k_tiles) * k_tiles
    grid = ceil_div(total, iters)
    split = grid > 1 and iters % k_tiles != 0
    reduce_pass = split and (reduce or c["reduce"]) in ("pass", "cluster")  # (a forced cluster row: the pass)
    ws = 0
    if split:
        counters = 0 if reduce_pass else ceil_div(4 * n_cols, 256) * 256
        ws = counters + 2 * grid * c["tile_m"] * c["n_tile"] * 4
    return dict(cfg=cfg_index, c=c, m_chunks=m_chunks, n_tiles=n_tiles, k_tiles=k_tiles,
                n_cols=n_cols, total=total, grid=grid, iters=iters, split=split,
                reduce_pass=reduce_pass, cluster=0, ws=ws)


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
        self.tile_m, self.n_tile, self.k_tile = c["tile_m"], c["n_tile"], c["k_tile"]
        self.warps_n, self.warps_k, self.stages = c["warps_n"], c["warps_k"], c["stages"]
        self.weights_a = c["weights_a"]
        assert c["path"] != "wgmma", "the emulator covers the mma.sync configurations"
        self.mb = 0 if self.weights_a else self.tile_m // 16
        self.kb_tile = self.k_tile // 32
        self.units_tile = self.n_tile // 32
        self.units_warp = self.units_tile // self.warps_n
        self.kb_warp = self.kb_tile // self.warps_k
        self.n8_warp = 4 * self.units_warp
        self.frags = 2 * self.units_warp if self.weights_a else self.mb * self.n8_warp
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
        self.lane = LANES[None, :]
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
        # Rows >= m, units >= units and multiplier columns >= n_pad are not
        # copied (their garbage reaches only outputs that are never stored);
        # scale blocks past K are zero-filled.
        tid = np.arange(THREADS)
        kb0 = kt * self.kb_tile
        kb_left = self.kb_count - kb0
        a_step = THREADS // self.a_row_chunks
        for i in range(self.a_chunks // THREADS):
            copy = i * a_step < self.a_rows_left
            ok = self.a_ch // 4 < kb_left
            src = (self.a_base + i * a_step * self.k + kb0 * 32) * 2
            self._copy(slot_buf["a"], (self.a_dst0 + i * THREADS)[copy], self.a_bytes, src[copy], ok[copy])
        b_step = THREADS // 32 // self.units_tile
        for i in range(self.b_chunks // THREADS):
            copy = self.b_ok
            ok = self.b_kbl0 + i * b_step < kb_left
            src = (self.b_base + (kb0 + i * b_step) * self.units * 32) * 16
            self._copy(slot_buf["b"], (tid + i * THREADS)[copy], self.tiles, src[copy], ok[copy])
        copy = self.s_ok
        ok = self.s_kbl < kb_left
        src = self.s_base + kb0 * self.n_pad
        self._copy(slot_buf["s"], tid[copy], self.scales, src[copy], ok[copy])

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
            if self.weights_a:  # one ldmatrix.x4: tokens lane % 8, k chunk kbl * 4 + lane // 8
                row = self.lane % 8
                ch = kbl * 4 + self.lane // 8
                af[0] = ldmatrix_x4(sa16, row * self.a_row_chunks + (ch ^ (row % 8)))
            else:
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
                bt = [dequant_word(sb32[wbase + j], mult[j], name) for j in range(4)]
                kb = kt * self.kb_tile + kbl[:, 0]
                n_unit = n_idx * self.n_tile + ul[:, 0] * 32  # [8]
                if self.weights_a:
                    # n8 tiles 2h, 2h + 1 = rows g, g + 8 of the m16 A fragment
                    for h in range(2):
                        for s in range(2):
                            fa = np.stack([bt[2 * h][2 * s], bt[2 * h + 1][2 * s], bt[2 * h][2 * s + 1],
                                           bt[2 * h + 1][2 * s + 1]], -1)
                            amat, _ = mma(acc[:, :, 2 * u + h], fa, af[0][..., 2 * s], af[0][..., 2 * s + 1], name)
                            self._record_b(amat, n_unit + 16 * h, kb, s)
                else:
                    for j in range(4):
                        b = bt[j]
                        for s in range(2):
                            for mb in range(self.mb):
                                fi = mb * self.n8_warp + 4 * u + j
                                _, bmat = mma(acc[:, :, fi], af[s, mb], b[2 * s], b[2 * s + 1], name)
                            self._record_b(bmat.transpose(0, 2, 1), n_unit + 8 * j, kb, s)

    def _record_b(self, w_nk, n0, kb, s):
        """Records the dequantized weights the tensor cores saw: w_nk[W, features, 16 k]
        (features n0[w] + row) of k16 half s of scale block kb[w]."""
        rows = w_nk.shape[1]
        for w in range(8):
            if kb[w] < self.kb_count and n0[w] < self.n_pad:
                ks = slice(32 * kb[w] + 16 * s, 32 * kb[w] + 16 * s + 16)
                self.b_seen[n0[w] : n0[w] + rows, ks] = w_nk[w]

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
        if first != last and self.plan["reduce_pass"]:
            self.partials[self.slot_of(cta, col)] = acc[k0].copy()
            store = False  # reduce_pass() sums and stores it
        elif first != last:
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
        factor = self.row_factor()
        for w in range(self.warps_n):  # warps with warp_k == 0
            for u in range(self.units_warp):
                unit0 = n_idx * self.n_tile + (w * self.units_warp + u) * 32
                if self.weights_a:  # frag 2u + h: features unit0 + 8 (2h + r) + g, tokens 2t + e
                    for h in range(2):
                        for r in range(2):
                            n = unit0 + 8 * (2 * h + r) + self.g[0]
                            for e in range(2):
                                row = m_chunk * self.tile_m + 2 * self.t[0] + e
                                self._store(row, n, acc[w, :, 2 * u + h, 2 * r + e], factor)
                    continue
                for j in range(4):
                    n0 = unit0 + 8 * j + 2 * self.t[0]
                    for mb in range(self.mb):
                        for half in range(2):
                            row = m_chunk * self.tile_m + mb * 16 + self.g[0] + 8 * half
                            v = acc[w, :, mb * self.n8_warp + 4 * u + j]
                            for e in range(2):
                                self._store(row, n0 + e, v[:, 2 * half + e], factor)

    def _store(self, row, n, v, factor):
        """C[row, n] = F[n] * v, rounded to T, where row < m and n < n (per lane)."""
        ok = (n < self.n) & (row < self.m)
        with np.errstate(invalid="ignore", over="ignore"):
            val = v.astype(np.float32) * factor[np.minimum(n, self.n_pad - 1)]
        self.c[row[ok], n[ok]] = val[ok]

    def row_factor(self):
        """F[n] (float32): the four byte planes that follow the block scales."""
        planes = self.scales[self.kb_count * self.n_pad :].reshape(4, self.n_pad).astype(U32)
        return (planes[0] | (planes[1] << 8) | (planes[2] << 16) | (planes[3] << 24)).view(np.float32)

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

    def reduce_pass(self):
        """MarlinSplitReduceKernel: the blocks of column col sum it in CTA order if stripe
        boundaries cut it (its first and last CTA differ)."""
        p = self.plan
        k0 = self.warp_k[:, 0] == 0
        for col in range(p["n_cols"]):
            tile0 = col * p["k_tiles"]
            first, last = tile0 // p["iters"], (tile0 + p["k_tiles"] - 1) // p["iters"]
            if first == last:
                continue
            acc = np.zeros((8, 32, self.frags, 4))
            for cta in range(first, last + 1):
                acc[k0] += self.partials.pop(self.slot_of(cta, col))
            self.store(col, acc)
        assert not self.partials, "partial tiles no block of the pass summed"

    def run(self, order):
        for cta in order:
            self.run_cta(cta)
        if self.plan["reduce_pass"]:
            self.reduce_pass()
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


def emulate(x_bits, w_packed, w_scales, dtype, sm_count, cfg_index=None, seed=0, order="forward", reduce=None):
    tiles, scales, layout = mw.prepare_marlin_weights(w_packed, w_scales, dtype)
    m = x_bits.shape[0]
    plan = make_plan(m, layout.n, layout.k, sm_count, cfg_index, reduce=reduce)
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
