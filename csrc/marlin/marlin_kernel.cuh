// The Marlin-style W4A16 GEMM kernel for MXFP4 weights (SM80 / SM90: mma.sync;
// sm_90a also wgmma): device code, included by marlin_gemm.cu (the launch).
//
//   C[M, N] = A[M, K] @ dequant(W)^T       A, C: bf16 or fp16; fp32 accumulation
//
// Weights come prepared in the layout specified in marlin_layout.h (the one
// spec; read it first): each thread's 16-byte load of a 32x32 "unit" holds the
// codes of its mma.m16n8k16 B fragments for 4 n8 tiles x 2 k16 steps, with the
// bits pre-arranged so that a B register is 1-2 funnel shifts + 1-2 LOP3 away,
// and one multiply by a per-block power of two (an exponent byte) applies the
// E8M0 scale. NOTES.md has the performance model behind the constants.
//
// Structure (after IST-DASLab/marlin; our own code):
//   * Work partition ("stripes"): the output is cut into columns of
//     tile_m x n_tile (one per (n tile, m chunk)); each column is a sequence of
//     k_tiles tiles of k_tile. All columns' tiles, k fastest, form one list
//     that is cut into `grid` contiguous stripes of `iters` tiles, one per CTA,
//     so every SM gets the same amount of weight bytes even when N / n_tile is
//     far below the SM count (small M, the bandwidth-bound case). A column cut
//     by a stripe boundary is a split-K column: each CTA that touches it writes
//     an fp32 partial tile to the workspace. The partials are summed in CTA
//     order (deterministic), by one of two means (the tile row's SplitReduce):
//     the CTA that arrives last at the column's counter (small partial tiles,
//     M <= 32), or a second kernel, MarlinSplitReduceKernel
//     (marlin_split_reduce.cuh, with the split-K bookkeeping), whose blocks
//     each take one slice of one split column (64-128 KB partial tiles: one
//     CTA summing them alone was most of the time at M = 64..256). Nobody
//     spins, so either is correct without co-residency.
//   * Cluster split-K (wgmma128, where the device fits it: MakePlan): instead
//     of stripes, each column's k tiles are cut over one thread-block
//     cluster of 2-8 CTAs, which sum their partial tiles through distributed
//     shared memory (ClusterSumColumn) in the same order as the pass.
//   * The wgmma rows' stripe plans (wgmma128ws) run the warp-specialized
//     variant of this kernel instead (marlin_kernel_ws.cuh: a producer
//     warpgroup copies, mbarriers per slot); both share the wgmma step
//     (marlin_wgmma.cuh).
//   * Pipeline: cp.async global->shared with `stages` buffers; a CTA walks its
//     stripe continuously across column boundaries (the epilogue of one column
//     runs while later tiles are already in flight), one __syncthreads/stage.
//   * Warps: warps_n x warps_k. A warp owns n_tile / warps_n columns of the
//     tile and k_tile / warps_k of each stage's k; the warps_k partial sums of a
//     column are reduced in shared memory before the cross-CTA step.
//   * A: ldmatrix.x4 from an XOR-swizzled shared tile (conflict-free).
//   * B: LDS.128 of the lane's 16 bytes, dequant in registers, mma.sync.
//   * Operand roles (Geometry::kWeightsA): the activations are the MMA's A
//     operand (m16 token blocks) except in small8 (8 tokens on the n8 side,
//     the dequantized weights as A: half the MMAs at M <= 8) and in the
//     wgmma rows (sm_90a: weights = register A of wgmma.mma_async,
//     activations = its shared-memory B).
//
// Glossary of index names (all counts, not bytes, unless named *_bytes):
//   tile_m                 rows of A / C (tokens) per column: 8 or 16 m_blocks
//   kb                     scale block index along K (32 k); kbl: within a stage
//   unit, ul               32-column group of the layout; ul: within the CTA tile
//   col                    column of the stripe list = (n_idx, m_chunk):
//                          n_idx = col / m_chunks (n tile), m_chunk = col % m_chunks
//   kt                     k tile index inside a column, 0..k_tiles-1
//   ld_*                   the loader's position (runs stages-1 tiles ahead)
//   a_row0, a_ch / b_unit, b_kbl0 / s_kbl, s_col
//                          the fixed A / B / multiplier chunk of this thread
//   slot                   pipeline buffer 0..stages-1
//   chunk                  16 bytes of shared memory (one cp.async)
//   frag                   one m16n8 fp32 accumulator (4 floats per thread)
#pragma once

#include <cstdint>

#include "../cuda_helpers.cuh"
#include "marlin_dequant.cuh"
#include "marlin_kernel_params.cuh"
#include "marlin_layout.h"
#include "marlin_split_reduce.cuh"
#include "marlin_tiles.h"
#include "marlin_wgmma.cuh"

namespace jax_mxfp4 {
namespace marlin {

// ===========================================================================
// The kernel.
// ===========================================================================

// kCfg: row of kTileConfigs (tile shape, warps, stages);
// T:    __nv_bfloat16 or __half, the type of A, C and the dequantized B.
// One CTA (kThreads threads) per stripe; grid = number of stripes <= #SMs.
template <int kCfg, typename T>
__global__ void __launch_bounds__(kThreads, 1) MarlinMxfp4GemmKernel(const KernelParams p) {
  using G = Geometry<kCfg>;
  static_assert(!G::kProducerWarpgroup, "rows with a producer warpgroup run MarlinMxfp4GemmKernelWs");
  constexpr InputDType kD = DTypeOf<T>::kValue;

  extern __shared__ uint4 smem_raw[];
  // wgmma stages start 1024-byte aligned (kSmemBytes has the slack for it).
  uint4* const smem =
      G::kWgmma ? smem_raw + ((1024 - (ptx::SmemAddr(smem_raw) & 1023)) & 1023) / 16 : smem_raw;
  uint4* const pipe = smem;                                           // stages x stage
  float4* const red = reinterpret_cast<float4*>(smem + G::kStages * G::kStageChunks);
  [[maybe_unused]] int* const flag =  // the last-CTA arrival broadcast (SplitReduce::kLastCta)
      reinterpret_cast<int*>(smem + G::kStages * G::kStageChunks + G::kRedChunks);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_n = warp % G::kWarpsN, warp_k = warp / G::kWarpsN;
  const int g = lane / 4;  // PTX fragment groupID (the multiplier word of a lane)
  const int units = p.n_pad / kUnitN;
  const T* const a = static_cast<const T*>(p.a);

  // This CTA's tiles: a stripe, or with cluster split-K (kCluster rows) its
  // cluster rank's share of one column's k tiles (MakePlan: >= 2 each).
  int t_begin = blockIdx.x * p.iters;
  int t_end = min(t_begin + p.iters, p.total_tiles);
  if constexpr (G::kClusterSplit) {
    if (p.cluster_split > 1) {
      const int col = blockIdx.x / p.cluster_split, rank = blockIdx.x % p.cluster_split;
      t_begin = col * p.k_tiles + rank * p.k_tiles / p.cluster_split;
      t_end = col * p.k_tiles + (rank + 1) * p.k_tiles / p.cluster_split;
    }
  }
  if (t_begin >= t_end) return;  // the host sizes the grid so this never happens
  // Weights are streamed (read once) unless several m chunks share them.
  const uint64_t policy =
      p.stream_weights ? ptx::CreatePolicyEvictFirst() : ptx::CreatePolicyEvictNormal();

  // ---- global -> shared: one stage = A tile, B units, multiplier bytes ----
  // The thread -> chunk map is the same in every stage (Geometry::kValid
  // guarantees the divisibility this needs), so each thread keeps one source
  // pointer per operand (set by start_column when the loader enters a column,
  // advanced by one k tile per fetch) and fixed chunk strides:
  //   A chunk i: row a_row0 + i * kARowStep, 16-byte column a_ch of the tile;
  //              stored at column a_ch ^ (row % 8) (row % 8 is the same for
  //              every i): the 8 rows one ldmatrix phase reads then sit in 8
  //              different 16-byte bank groups (conflict-free).
  //   B chunk i: lane `lane` of unit b_unit, scale block b_kbl0 + i * kBKbStep;
  //              a warp copies one 512-byte unit per instruction (coalesced),
  //              verbatim: the layout already is the consumption order.
  //   S chunk:   16 multiplier bytes at column s_col of scale block s_kbl.
  // Rows of A >= m, units >= units and multiplier columns >= n_pad are not
  // copied at all: their shared-memory bytes stay whatever they were, which
  // only reaches accumulator rows (tokens) / columns (features) that are
  // never stored, because each output element depends on one row of A and one
  // column of B only. Scale blocks past K are different (they would mix into
  // valid outputs): in the last k tile of a column they are zero-filled in
  // A, B and the multipliers.
  constexpr int kARowStep = kThreads / G::kARowChunks;
  constexpr int kBKbStep = kThreads / 32 / G::kUnitsTile;
  const int64_t k_elems = static_cast<int64_t>(p.kb_count) * kBlockK;
  const int a_row0 = tid / G::kARowChunks, a_ch = tid % G::kARowChunks;
  const int a_dst0 = a_row0 * G::kARowChunks + (a_ch ^ (a_row0 % 8));
  const int b_unit = (tid / 32) % G::kUnitsTile, b_kbl0 = (tid / 32) / G::kUnitsTile;
  const int s_kbl = tid / (G::kNTile / 16), s_col = 16 * (tid % (G::kNTile / 16));
  const int64_t b_kb_stride = static_cast<int64_t>(units) * 32;  // uint4s per scale-block row
  const int64_t a_chunk_stride = kARowStep * k_elems;            // elements, chunk i -> i + 1
  const int64_t b_chunk_stride = kBKbStep * b_kb_stride;         // uint4s, chunk i -> i + 1

  const T* a_src = a;             // this thread's A chunk 0 of the loader's next tile
  int a_rows_left = 0;            // rows of A at or below a_row0 in this m chunk
  const uint4* b_src = p.tiles;   // its B chunk 0
  bool b_ok = false;              // its unit exists (< units)
  const uint8_t* s_src = p.scales;
  bool s_ok = false;              // it copies multipliers, of columns < n_pad
  auto start_column = [&](int col, int kt) {
    a_src = ActivationSource<kCfg, T>(p, col, kt, a_row0, a_ch, a_rows_left);
    const int n_idx = col / p.m_chunks, kb0 = kt * G::kKbTile;
    const int unit = n_idx * G::kUnitsTile + b_unit;
    b_ok = unit < units;
    b_src = p.tiles + (b_kbl0 + kb0) * b_kb_stride + 32 * unit + lane;
    const int n0 = n_idx * G::kNTile + s_col;
    s_ok = tid < G::kSChunks && n0 < p.n_pad;
    s_src = p.scales + static_cast<int64_t>(s_kbl + kb0) * p.n_pad + n0;
  };

  int ld_col = t_begin / p.k_tiles;  // the next tile to fetch: column, k tile,
  int ld_kt = t_begin - ld_col * p.k_tiles;
  int ld_left = t_end - t_begin;     // and how many of the stripe remain
  start_column(ld_col, ld_kt);
  auto fetch_tile = [&](int slot) {
    if (ld_left > 0) {
      const int kb_left = p.kb_count - ld_kt * G::kKbTile;  // scale blocks of K from this tile on
      uint4* const sa = pipe + slot * G::kStageChunks;
      uint4* const sb = sa + G::kAChunks;
      uint4* const ss = sb + G::kBChunks;
      if (kb_left >= G::kKbTile) {  // the whole stage lies inside K (every tile but a last partial one)
#pragma unroll
        for (int i = 0; i < G::kAChunks / kThreads; ++i)
          if (i * kARowStep < a_rows_left)
            ptx::CpAsync16ZeroFill(sa + a_dst0 + i * kThreads, a_src + i * a_chunk_stride, true);
        if (b_ok) {
#pragma unroll
          for (int i = 0; i < G::kBChunks / kThreads; ++i)
            ptx::CpAsync16ZeroFillHint(sb + tid + i * kThreads, b_src + i * b_chunk_stride, true, policy);
        }
        if (s_ok) ptx::CpAsync16ZeroFillHint(ss + tid, s_src, true, policy);
      } else {  // scale blocks >= kb_left are zero-filled
#pragma unroll
        for (int i = 0; i < G::kAChunks / kThreads; ++i)
          if (i * kARowStep < a_rows_left) {
            const bool ok = a_ch / 4 < kb_left;
            ptx::CpAsync16ZeroFill(sa + a_dst0 + i * kThreads, ok ? a_src + i * a_chunk_stride : a, ok);
          }
        if (b_ok) {
#pragma unroll
          for (int i = 0; i < G::kBChunks / kThreads; ++i) {
            const bool ok = b_kbl0 + i * kBKbStep < kb_left;
            ptx::CpAsync16ZeroFillHint(sb + tid + i * kThreads, ok ? b_src + i * b_chunk_stride : p.tiles,
                                       ok, policy);
          }
        }
        if (s_ok) {
          const bool ok = s_kbl < kb_left;
          ptx::CpAsync16ZeroFillHint(ss + tid, ok ? s_src : p.scales, ok, policy);
        }
      }
      --ld_left;
      if (++ld_kt == p.k_tiles) {
        ld_kt = 0;
        ++ld_col;
        if (ld_left > 0) start_column(ld_col, 0);
      } else {
        a_src += G::kKTile;
        b_src += G::kKbTile * b_kb_stride;
        s_src += static_cast<int64_t>(G::kKbTile) * p.n_pad;
      }
    }
    ptx::CpAsyncCommit();  // possibly empty: keeps one group per stage
  };

  // ---- shared -> registers -> tensor cores ----
  float acc[G::kFrags][4];
  auto zero_acc = [&]() {
#pragma unroll
    for (int i = 0; i < G::kFrags; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  };

  // ldmatrix source of this lane in a stage's A tile, per scale block of the
  // warp (kw) and k16 half (s): the same in every stage, so it is computed
  // once (the XOR swizzle makes it no affine function of kw or s).
  //  * activations A (m16 token blocks): lanes 0-7 / 8-15 / 16-23 / 24-31
  //    address rows 0-7 / 8-15 / 0-7 / 8-15 of m block 0 at k chunk 2s / 2s /
  //    2s+1 / 2s+1 -> registers a[0..3] in mma order (see MmaM16N8K16); m
  //    block mb adds 16 rows (row % 8 unchanged).
  //  * weights A (8 tokens on the n8 side): lanes 8i..8i+7 address tokens
  //    0-7 at k chunk i of the block -> registers {b0, b1} of k16 half 0,
  //    then of half 1 (B[k][n] = A[token n][k]: a row of the A tile is a
  //    column of B); s = 1 is unused.
  int a_frag_chunk[G::kKbWarp][2];
#pragma unroll
  for (int kw = 0; kw < G::kKbWarp; ++kw)
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int kbl = warp_k * G::kKbWarp + kw;
      const int row = G::kWeightsA ? lane % 8 : lane % 16;
      const int ch = G::kWeightsA ? kbl * 4 + lane / 8 : kbl * 4 + 2 * s + lane / 16;
      a_frag_chunk[kw][s] = row * G::kARowChunks + (ch ^ (row % 8));
    }

  // mma.sync. Activations A: per n8 feature tile j of a unit, 2 k16 x
  // m_blocks MMAs. Weights A: n8 feature tiles 2h and 2h + 1 of a unit form
  // the m16 A fragment {b(2h)[k lo], b(2h+1)[k lo], b(2h)[k hi], b(2h+1)[k hi]}
  // (rows g and g + 8, k pairs 2t and 2t + 8), so a unit takes 2 halves x 2
  // k16 MMAs against the activations' n8 B fragment.
  auto compute_stage = [&](int slot) {
    if constexpr (!G::kWgmma) {  // (instantiated for the wgmma rows too, never called there)
      const uint4* const sa = pipe + slot * G::kStageChunks;
      const uint4* const sb = sa + G::kAChunks;
      const uint32_t* const ss = reinterpret_cast<const uint32_t*>(sb + G::kBChunks);
#pragma unroll
      for (int kw = 0; kw < G::kKbWarp; ++kw) {
        const int kbl = warp_k * G::kKbWarp + kw;
        constexpr int kABlocks = G::kWeightsA ? 1 : G::kMBlocks;
        uint32_t af[2][kABlocks][4];  // activation fragments of both k16 halves of this scale block
        if constexpr (G::kWeightsA) {
          ptx::LdMatrixX4(af[0][0], sa + a_frag_chunk[kw][0]);  // {half 0: b0 b1, half 1: b0 b1}
        } else {
#pragma unroll
          for (int s = 0; s < 2; ++s)
#pragma unroll
            for (int mb = 0; mb < G::kMBlocks; ++mb)
              ptx::LdMatrixX4(af[s][mb], sa + a_frag_chunk[kw][s] + mb * 16 * G::kARowChunks);
        }
#pragma unroll
        for (int u = 0; u < G::kUnitsWarp; ++u) {
          const int ul = warp_n * G::kUnitsWarp + u;
          const uint4 w = sb[(kbl * G::kUnitsTile + ul) * 32 + lane];       // LDS.128, lane-contiguous
          const uint32_t sw = ss[(kbl * G::kNTile + ul * kUnitN) / 4 + g];  // 4 multiplier bytes
          if constexpr (G::kWeightsA) {
            uint32_t bt[4][4];
            DequantUnit<kD>(w, sw, bt);
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int s = 0; s < 2; ++s) {
                uint32_t fa[4];
                WeightsAFragment(bt, h, s, fa);
                ptx::MmaM16N8K16<T>(acc[2 * u + h], fa, af[0][0][2 * s], af[0][0][2 * s + 1]);
              }
          } else {
            uint32_t mult[4];
            BlockMultipliers<kD>(sw, mult);
            const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              uint32_t b[4];
              DequantWord<kD>(words[j], mult[j], b);
#pragma unroll
              for (int s = 0; s < 2; ++s)
#pragma unroll
                for (int mb = 0; mb < G::kMBlocks; ++mb)
                  ptx::MmaM16N8K16<T>(acc[mb * G::kN8Warp + 4 * u + j], af[s][mb], b[2 * s], b[2 * s + 1]);
            }
          }
        }
      }
    }
  };

  // wgmma (marlin_wgmma.cuh): warp w dequantizes unit w; at most two groups in flight.
  [[maybe_unused]] WgmmaFragments wg_frag = {};
  auto compute_stage_wgmma = [&](int slot) {
    if constexpr (G::kWgmma)  // (instantiated for the mma.sync rows too, never called there)
      WgmmaStage<kCfg, T>(pipe + slot * G::kStageChunks, warp, lane, g, acc, wg_frag, [](int) {});
  };

  // ---- end of a column: reduce warps_k, then CTAs, then store ----
  auto finish_column = [&](int col) {
    if constexpr (G::kWgmma) WgmmaRetireAll<kCfg>(acc, wg_frag);  // the accumulators are final
    // 1. warps_k partial sums -> warps with warp_k == 0 (fragment layout,
    //    lane-contiguous float4s: conflict-free).
    if constexpr (G::kWarpsK > 1) {
      if (warp_k > 0) {
#pragma unroll
        for (int i = 0; i < G::kFrags; ++i)
          red[(((warp_k - 1) * G::kWarpsN + warp_n) * G::kFrags + i) * 32 + lane] =
              make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      }
      __syncthreads();
      if (warp_k == 0) {
#pragma unroll
        for (int wk = 1; wk < G::kWarpsK; ++wk)
#pragma unroll
          for (int i = 0; i < G::kFrags; ++i) {
            const float4 v = red[(((wk - 1) * G::kWarpsN + warp_n) * G::kFrags + i) * 32 + lane];
            acc[i][0] += v.x, acc[i][1] += v.y, acc[i][2] += v.z, acc[i][3] += v.w;
          }
      }
      // `red` is next written after the next stage barrier.
    }
    // 2. Split-K column: publish; then either the reduction pass sums it, or
    //    arrivals are counted and the last CTA sums all partials in CTA order,
    //    or (cluster split-K) the cluster sums it in shared memory.
    if constexpr (G::kClusterSplit) {
      if (p.cluster_split > 1) {
        ptx::CpAsyncWait<0>();  // (only empty groups remain: the CTA's one column is done)
        __syncthreads();        // every warp's wgmma groups, which read the stages, are retired
        ClusterSumColumn<kCfg, T>(p, col, acc, pipe);
        zero_acc();  // (as every column ends: the accumulators need not live through the sum)
        return;
      }
    }
    const ColumnCtas ctas = CtasOfColumn(p, col);
    bool store = true;
    if (ctas.first != ctas.last) {
      if (warp_k == 0) WritePartialTile<kCfg>(p, col, warp_n, lane, acc);
      if constexpr (G::kReducePass) {
        store = false;
      } else {
        const int arrived_before = ptx::CtaArrive(p.counters + col, flag);
        store = arrived_before == ctas.last - ctas.first;
      }
      if (store && warp_k == 0) {
        zero_acc();
        for (int cta = ctas.first; cta <= ctas.last; ++cta) {  // fixed order: deterministic
          const float4* const part = reinterpret_cast<const float4*>(p.partials) +
                                     static_cast<int64_t>(PartialSlot(p, cta, col)) * G::kPartialChunks;
#pragma unroll
          for (int i = 0; i < G::kFrags; ++i) {
            const float4 v = __ldcg(part + (warp_n * G::kFrags + i) * 32 + lane);  // L2, not L1
            acc[i][0] += v.x, acc[i][1] += v.y, acc[i][2] += v.z, acc[i][3] += v.w;
          }
        }
      }
    }
    // 3. C = F[n] * acc, rounded to T; rows >= m and columns >= n skipped
    //    (element positions: FragmentElement). The loops load each feature's
    //    factor once and pair the stores where they can.
    if constexpr (G::kWeightsA) {
      if (store && (G::kWarpsK == 1 || warp_k == 0)) StoreColumnWeightsA<kCfg, T>(p, col, warp_n, lane, acc);
    } else if (store && warp_k == 0) {
      const int n_idx = col / p.m_chunks, m_chunk = col - n_idx * p.m_chunks;
      const uint8_t* const planes = p.scales + static_cast<int64_t>(p.kb_count) * p.n_pad;
      T* const c = static_cast<T*>(p.c);
      const bool pair_store = (p.n % 2) == 0;  // 4-byte aligned pairs
#pragma unroll
      for (int u = 0; u < G::kUnitsWarp; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n0 = n_idx * G::kNTile + FragmentElement<kCfg>(warp_n, lane, 4 * u + j, 0).feature;
          if (n0 >= p.n) continue;
          const float f0 = RowFactor(planes, p.n_pad, n0);
          const float f1 = RowFactor(planes, p.n_pad, n0 + 1);  // n0 + 1 < n_pad always
#pragma unroll
          for (int mb = 0; mb < G::kMBlocks; ++mb)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int frag = mb * G::kN8Warp + 4 * u + j;
              const int row = m_chunk * G::kTileM + FragmentElement<kCfg>(warp_n, lane, frag, 2 * half).row;
              if (row >= p.m) continue;
              const float* v = acc[frag];
              const float v0 = __fmul_rn(v[2 * half], f0), v1 = __fmul_rn(v[2 * half + 1], f1);
              T* const dst = c + static_cast<int64_t>(row) * p.n + n0;
              if (n0 + 1 < p.n && pair_store) {
                *reinterpret_cast<uint32_t*>(dst) = ptx::PackFloat2<T>(v0, v1);
              } else {
                dst[0] = ptx::FloatTo<T>(v0);
                if (n0 + 1 < p.n) dst[1] = ptx::FloatTo<T>(v1);
              }
            }
        }
    }
    zero_acc();
  };

  // ---- main loop: one tile per iteration, stages - 1 tiles in flight ----
  zero_acc();
#pragma unroll
  for (int s = 0; s < G::kStages - 1 - G::kLag; ++s) fetch_tile(s);
  int slot = 0, fetch_slot = G::kStages - 1 - G::kLag;
  // Tile tt has landed once at most stages - 2 - lag newer groups are
  // pending; the barrier also guarantees every warp is done with slot
  // `fetch_slot` (it held tile tt - 1 - lag: for wgmma, tile tt - 2, whose last
  // group every warp waited for during tile tt - 1), which is refilled next.
  auto run_tile = [&]() {
    ptx::CpAsyncWait<G::kStages - 2 - G::kLag>();
    if constexpr (G::kWgmma) ptx::FenceProxyAsyncShared();  // cp.async data -> wgmma's reads
    __syncthreads();
    fetch_tile(fetch_slot);
    if constexpr (G::kWgmma) compute_stage_wgmma(slot);
    else compute_stage(slot);
    slot = slot + 1 == G::kStages ? 0 : slot + 1;
    fetch_slot = fetch_slot + 1 == G::kStages ? 0 : fetch_slot + 1;
  };
  int col = t_begin / p.k_tiles, kt = t_begin - col * p.k_tiles;
  if constexpr (G::kWgmma) {
    // One outer pass per column, so that the column epilogue follows a loop
    // instead of sitting under a branch: ptxas serializes every wgmma when
    // accumulators are touched on a path it cannot prove convergent.
    for (int left = t_end - t_begin; left > 0; ++col, kt = 0) {
      for (int n_col = min(left, p.k_tiles - kt); n_col > 0; --n_col, --left) run_tile();
      finish_column(col);
    }
  } else {  // (the same walk; this form keeps the mma.sync rows free of spills)
    for (int tt = t_begin; tt < t_end; ++tt) {
      run_tile();
      if (++kt == p.k_tiles || tt + 1 == t_end) {
        finish_column(col);
        kt = 0;
        ++col;
      }
    }
  }
  ptx::CpAsyncWait<0>();  // leave no copy in flight (only empty groups remain)
}

}  // namespace marlin
}  // namespace jax_mxfp4
