// The warp-specialized wgmma kernel of the Marlin GEMM (sm_90a; rows of
// kTileConfigs with Loader::kProducerWarpgroup): device code, included by
// marlin_gemm.cu. Same math, layout, work partition (stripes) and split-K
// reduction pass as MarlinMxfp4GemmKernel's wgmma rows (marlin_kernel.cuh:
// read its header first); what differs is who copies.
//
//   * 3 warpgroups. Warpgroup 0 is the producer: it only issues the
//     cp.async copies of each stage (A tile, weight units, multiplier bytes)
//     and gives its registers away (setmaxnreg 40). Warpgroups 1 and 2 are
//     the consumers (setmaxnreg 232): the 8 MMA warps of the wgmma rows
//     (consumer warp w owns unit w), which only wait, dequantize, issue
//     wgmma and store. In the all-warps kernel every MMA warp also runs the
//     loader (~70 of ~266 instructions per warp per stage, NOTES.md section
//     8) and the CTA meets at one barrier per stage.
//   * Per pipeline slot two mbarriers. full[slot]: each producer thread's
//     copies into the slot arrive on it when they land (cp.async.mbarrier.
//     arrive.noinc, so the producer never waits for data); empty[slot]: each
//     consumer thread arrives once its reads of the slot are done and its
//     warp's wgmma groups that read the slot have retired (mbarrier.arrive
//     releases the arriving thread's own accesses: one arrival per warp
//     left the other lanes' reads unordered before the producer's next
//     copies, as compute-sanitizer racecheck reported). The producer runs
//     up to `stages` tiles ahead, across column boundaries: a column's
//     epilogue overlaps the next column's copies.
//   * Slot of tile t: t % stages; the n-th completion of a barrier has parity
//     n % 2. Consumers wait full[t % S] for parity (t / S) % 2; the producer
//     refills slot t % S (t >= S) after empty[t % S] completed for tile
//     t - S, parity (t / S - 1) % 2.
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

// Registers per thread after the hand-over: 128 x 40 + 256 x 232 = 64512 of
// the SM's 65536 (setmaxnreg takes multiples of 8 in 24..256).
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;

// The producer warpgroup: copies tiles [t_begin, t_end) of the stripe list
// into the slots, in order. Thread map per stage (kLoad = 128 threads):
//   A chunk i:  row a_row0 + i * (kLoad / row chunks), 16-byte column a_ch,
//               stored XOR-swizzled as in the all-warps kernel;
//   B chunk i:  smem chunk tid + i * kLoad = (scale block, unit, lane):
//               unit pw + 4 (i % (units / 4)), block i / (units / 4) for the
//               thread's warp pw, lane tid % 32 (a warp copies whole units);
//   S chunk:    16 multiplier bytes (threads < kSChunks).
template <int kCfg, typename T>
__device__ __forceinline__ void ProduceStripe(const KernelParams& p, uint4* pipe, uint64_t* full,
                                              uint64_t* empty, int t_begin, int t_end) {
  using G = Geometry<kCfg>;
  constexpr int kLoad = G::kLoadThreads;
  constexpr int kARowStep = kLoad / G::kARowChunks;
  constexpr int kWarpsL = kLoad / 32;
  constexpr int kUnitGroups = G::kUnitsTile / kWarpsL;  // B chunks per scale block per thread
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, pw = tid / 32;
  const int units = p.n_pad / kUnitN;
  const T* const a = static_cast<const T*>(p.a);
  const uint64_t policy =
      p.stream_weights ? ptx::CreatePolicyEvictFirst() : ptx::CreatePolicyEvictNormal();
  const int64_t k_elems = static_cast<int64_t>(p.kb_count) * kBlockK;
  const int a_row0 = tid / G::kARowChunks, a_ch = tid % G::kARowChunks;
  const int a_dst0 = a_row0 * G::kARowChunks + (a_ch ^ (a_row0 % 8));
  const int s_kbl = tid / (G::kNTile / 16), s_col = 16 * (tid % (G::kNTile / 16));
  const int64_t b_kb_stride = static_cast<int64_t>(units) * 32;  // uint4s per scale-block row
  const int64_t a_chunk_stride = kARowStep * k_elems;

  const T* a_src = a;
  int a_rows_left = 0;
  const uint4* b_src = p.tiles;  // unit pw of scale block 0 of the tile
  bool b_ok[kUnitGroups];        // unit pw + 4 j exists (< units)
  const uint8_t* s_src = p.scales;
  bool s_ok = false;
  auto start_column = [&](int col, int kt) {
    a_src = ActivationSource<kCfg, T>(p, col, kt, a_row0, a_ch, a_rows_left);
    const int n_idx = col / p.m_chunks, kb0 = kt * G::kKbTile;
    const int unit0 = n_idx * G::kUnitsTile + pw;
#pragma unroll
    for (int j = 0; j < kUnitGroups; ++j) b_ok[j] = unit0 + kWarpsL * j < units;
    b_src = p.tiles + kb0 * b_kb_stride + 32 * unit0 + lane;
    const int n0 = n_idx * G::kNTile + s_col;
    s_ok = tid < G::kSChunks && n0 < p.n_pad;
    s_src = p.scales + static_cast<int64_t>(s_kbl + kb0) * p.n_pad + n0;
  };

  int col = t_begin / p.k_tiles, kt = t_begin - col * p.k_tiles;
  start_column(col, kt);
  for (int t = 0, slot = 0; t < t_end - t_begin; ++t) {
    if (t >= G::kStages) ptx::MbarrierWait(empty + slot, (t / G::kStages - 1) & 1);
    const int kb_left = p.kb_count - kt * G::kKbTile;  // scale blocks of K from this tile on
    uint4* const sa = pipe + slot * G::kStageChunks;
    uint4* const sb = sa + G::kAChunks;
    uint4* const ss = sb + G::kBChunks;
#pragma unroll
    for (int i = 0; i < G::kAChunks / kLoad; ++i)
      if (i * kARowStep < a_rows_left) {
        const bool ok = a_ch / 4 < kb_left;  // (zero-fill the scale blocks past K)
        ptx::CpAsync16ZeroFill(sa + a_dst0 + i * kLoad, ok ? a_src + i * a_chunk_stride : a, ok);
      }
#pragma unroll
    for (int i = 0; i < G::kBChunks / kLoad; ++i) {
      const int j = i % kUnitGroups, kbl = i / kUnitGroups;
      if (b_ok[j]) {
        const bool ok = kbl < kb_left;
        ptx::CpAsync16ZeroFillHint(sb + tid + i * kLoad,
                                   ok ? b_src + kbl * b_kb_stride + 32 * kWarpsL * j : p.tiles, ok, policy);
      }
    }
    if (s_ok) {
      const bool ok = s_kbl < kb_left;
      ptx::CpAsync16ZeroFillHint(ss + tid, ok ? s_src : p.scales, ok, policy);
    }
    ptx::CpAsyncArriveNoinc(full + slot);  // when this thread's copies (all so far) have landed
    if (++kt == p.k_tiles) {
      kt = 0;
      ++col;
      if (t + 1 < t_end - t_begin) start_column(col, 0);
    } else {
      a_src += G::kKTile;
      b_src += G::kKbTile * b_kb_stride;
      s_src += static_cast<int64_t>(G::kKbTile) * p.n_pad;
    }
    slot = slot + 1 == G::kStages ? 0 : slot + 1;
  }
  ptx::CpAsyncWait<0>();  // (the arrivals fire on completion; leave nothing in flight)
}

// kCfg: a wgmma row with Loader::kProducerWarpgroup; T: __nv_bfloat16 or __half.
template <int kCfg, typename T>
__global__ void __launch_bounds__(Geometry<kCfg>::kBlockThreads, 1)
    MarlinMxfp4GemmKernelWs(const KernelParams p) {
  using G = Geometry<kCfg>;
  static_assert(G::kProducerWarpgroup && G::kWgmma && G::kKbTile == 2 && !G::kClusterSplit && G::kReducePass,
                "MarlinMxfp4GemmKernelWs: a wgmma row with a producer warpgroup and the reduction pass");

  extern __shared__ uint4 smem_raw[];
  uint4* const pipe = smem_raw + ((1024 - (ptx::SmemAddr(smem_raw) & 1023)) & 1023) / 16;
  uint64_t* const full = reinterpret_cast<uint64_t*>(pipe + G::kStages * G::kStageChunks);
  uint64_t* const empty = full + G::kStages;

  const int t_begin = blockIdx.x * p.iters;
  const int t_end = min(t_begin + p.iters, p.total_tiles);
  if (t_begin >= t_end) return;  // (the host sizes the grid so this never happens)
  if (threadIdx.x == 0) {
    for (int s = 0; s < G::kStages; ++s) {
      ptx::MbarrierInit(full + s, kProducerThreads);
      ptx::MbarrierInit(empty + s, kThreads);
    }
    ptx::FenceMbarrierInit();
  }
  __syncthreads();

  if (threadIdx.x < kProducerThreads) {
    ptx::SetMaxNRegDec<kProducerRegisters>();
    ProduceStripe<kCfg, T>(p, pipe, full, empty, t_begin, t_end);
    return;
  }
  ptx::SetMaxNRegInc<kConsumerRegisters>();

  // ---- consumers: 8 warps, warp w = unit w of the tile ----
  const int tid = static_cast<int>(threadIdx.x) - kProducerThreads, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4;
  float acc[G::kFrags][4];
  auto zero_acc = [&]() {
#pragma unroll
    for (int i = 0; i < G::kFrags; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  };
  WgmmaFragments frag = {};
  // End of a column: a split column's partial tile goes to the workspace
  // (summed by the reduction pass), a whole column is stored.
  auto finish_column = [&](int col) {
    WgmmaRetireAll<kCfg>(acc, frag);
    const ColumnCtas ctas = CtasOfColumn(p, col);
    if (ctas.first != ctas.last) WritePartialTile<kCfg>(p, col, warp, lane, acc);
    else StoreColumnWeightsA<kCfg, T>(p, col, warp, lane, acc);
    zero_acc();
  };

  zero_acc();
  int col = t_begin / p.k_tiles, kt = t_begin - col * p.k_tiles;
  int t = 0, slot = 0, prev_slot = 0;
  // One outer pass per column (the epilogue after a loop, not under a
  // branch: see the all-warps kernel's main loop).
  for (int left = t_end - t_begin; left > 0; ++col, kt = 0) {
    for (int n_col = min(left, p.k_tiles - kt); n_col > 0; --n_col, --left, ++t) {
      ptx::MbarrierWait(full + slot, (t / G::kStages) & 1);
      ptx::FenceProxyAsyncShared();  // the landed cp.async bytes -> wgmma's (async proxy) reads
      // At block 1 every group that read the previous tile's slot has
      // retired: each thread releases it (its own LDS reads and its warp's
      // retired wgmma; a predicated arrive, not a branch: a branch between
      // the wgmma would make ptxas serialize them).
      WgmmaStage<kCfg, T>(pipe + slot * G::kStageChunks, warp, lane, g, acc, frag, [&](int kbl) {
        if (kbl == 1) ptx::MbarrierArriveIf(empty + prev_slot, t > 0);
      });
      prev_slot = slot;
      slot = slot + 1 == G::kStages ? 0 : slot + 1;
    }
    finish_column(col);
  }
}

}  // namespace marlin
}  // namespace jax_mxfp4
