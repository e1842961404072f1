// Split-K bookkeeping, the accumulator layout and the reduction pass of the
// Marlin GEMM (device code, included by marlin_kernel.cuh and marlin_gemm.cu):
//   * which CTAs' stripes touch a column, and the workspace slot of each
//     CTA's partial tile of it (CtasOfColumn, PartialSlot);
//   * which output row and feature each accumulator element is
//     (FragmentElement), used by the GEMM kernel's column epilogue and by
//   * MarlinSplitReduceKernel, the second kernel of a plan whose tile row
//     has SplitReduce::kPass (NOTES.md section 4), and
//   * ClusterSumColumn, the cluster split-K sum of SplitReduce::kCluster
//     plans (Plan::cluster > 1) through distributed shared memory.
#pragma once

#include <cstdint>

#include "../cuda_helpers.cuh"
#include "marlin_dequant.cuh"
#include "marlin_kernel_params.cuh"
#include "marlin_layout.h"
#include "marlin_tiles.h"

namespace jax_mxfp4 {
namespace marlin {

// The CTAs whose stripes touch column `col`: first..last (split iff first != last).
struct ColumnCtas {
  int first, last;
};
__device__ __forceinline__ ColumnCtas CtasOfColumn(const KernelParams& p, int col) {
  const int64_t tile0 = static_cast<int64_t>(col) * p.k_tiles;
  return {static_cast<int>(tile0 / p.iters), static_cast<int>((tile0 + p.k_tiles - 1) / p.iters)};
}

// Partial-tile slot of (CTA, column) in the workspace: a stripe can cut only
// its first and its last column, so two slots per CTA.
__device__ __forceinline__ int PartialSlot(const KernelParams& p, int cta, int col) {
  const int cta_first_col = static_cast<int>(static_cast<int64_t>(cta) * p.iters / p.k_tiles);
  return 2 * cta + (col == cta_first_col ? 0 : 1);
}

// This CTA's fp32 partial tile of split column `col`, in the order the
// reductions read it: chunk (warp_n * frags + i) * 32 + lane = fragment i.
template <int kCfg>
__device__ __forceinline__ void WritePartialTile(const KernelParams& p, int col, int warp_n, int lane,
                                                 const float (&acc)[Geometry<kCfg>::kFrags][4]) {
  using G = Geometry<kCfg>;
  float4* const part = reinterpret_cast<float4*>(p.partials) +
                       static_cast<int64_t>(PartialSlot(p, blockIdx.x, col)) * G::kPartialChunks;
#pragma unroll
  for (int i = 0; i < G::kFrags; ++i)
    part[(warp_n * G::kFrags + i) * 32 + lane] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
}

// Where element q (0..3) of accumulator fragment i of lane `lane` of the warp
// in warp column warp_n lands in its column's tile_m x n_tile output tile:
// the D layout of mma.m16n8k16 (m16: rows g, g + 8; n8: columns 2t, 2t + 1),
// which is also that of each m16 slice of a wgmma m64 tile.
struct TileElement {
  int row, feature;
};
template <int kCfg>
__device__ __forceinline__ TileElement FragmentElement(int warp_n, int lane, int i, int q) {
  using G = Geometry<kCfg>;
  const int g = lane / 4, t = lane % 4;
  if constexpr (G::kWeightsA) {
    // Fragment (2u + h) * (tile_m / 8) + it: unit u, m16 half h (its n8
    // feature tiles 2h + r, r = q / 2, row g), n8 token tile it (tokens
    // 2t + e, e = q % 2).
    const int it = i % (G::kTileM / 8), uh = i / (G::kTileM / 8);
    const int u = uh / 2, h = uh % 2, r = q / 2, e = q % 2;
    return {8 * it + 2 * t + e, (warp_n * G::kUnitsWarp + u) * kUnitN + 8 * (2 * h + r) + g};
  } else {
    // Fragment mb * n8_warp + 4u + j: m16 token block mb (rows g + 8 half,
    // half = q / 2), n8 feature tile j of unit u (features 2t + b, b = q % 2).
    const int mb = i / G::kN8Warp, u = (i % G::kN8Warp) / 4, j = i % 4;
    const int half = q / 2, b = q % 2;
    return {mb * 16 + g + 8 * half, (warp_n * G::kUnitsWarp + u) * kUnitN + 8 * j + 2 * t + b};
  }
}

// Stores chunk `chunk` (fragment i of lane `lane` of warp column warp_n: the
// partial tiles' order) of column `col`'s summed tile: C = F[n] * sum, rows
// >= m and features >= n skipped. The reduction pass and the cluster sum.
template <int kCfg, typename T>
__device__ __forceinline__ void StoreSummedChunk(const KernelParams& p, int col, int chunk, const float4& sum) {
  using G = Geometry<kCfg>;
  const int n_idx = col / p.m_chunks, m_chunk = col - n_idx * p.m_chunks;
  const uint8_t* const planes = p.scales + static_cast<int64_t>(p.kb_count) * p.n_pad;
  T* const c = static_cast<T*>(p.c);
  const int lane = chunk % 32, i = (chunk / 32) % G::kFrags, warp_n = chunk / (32 * G::kFrags);
  const float v[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const TileElement el = FragmentElement<kCfg>(warp_n, lane, i, q);
    const int row = m_chunk * G::kTileM + el.row, nf = n_idx * G::kNTile + el.feature;
    if (row < p.m && nf < p.n)
      c[static_cast<int64_t>(row) * p.n + nf] = ptx::FloatTo<T>(__fmul_rn(v[q], RowFactor(planes, p.n_pad, nf)));
  }
}

// Stores a whole column from the accumulators of a weights-A row (wgmma,
// small8): C = F[n] * acc, rows >= m and features >= n skipped, each feature's
// factor loaded once (a lane's fragments hold 2 features x tile_m tokens per
// m16 half). The all-warps kernel (its warps_k == 0 warps) and the
// warp-specialized one.
template <int kCfg, typename T>
__device__ __forceinline__ void StoreColumnWeightsA(const KernelParams& p, int col, int warp_n, int lane,
                                                    const float (&acc)[Geometry<kCfg>::kFrags][4]) {
  using G = Geometry<kCfg>;
  static_assert(G::kWeightsA, "StoreColumnWeightsA: the weights are not this row's MMA A operand");
  const int n_idx = col / p.m_chunks, m_chunk = col - n_idx * p.m_chunks;
  const uint8_t* const planes = p.scales + static_cast<int64_t>(p.kb_count) * p.n_pad;
  T* const c = static_cast<T*>(p.c);
#pragma unroll
  for (int u = 0; u < G::kUnitsWarp; ++u)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int frag0 = (2 * u + h) * (G::kTileM / 8);  // token tiles frag0 + i
        const int nf = n_idx * G::kNTile + FragmentElement<kCfg>(warp_n, lane, frag0, 2 * r).feature;
        if (nf >= p.n) continue;
        const float f = RowFactor(planes, p.n_pad, nf);
#pragma unroll
        for (int i = 0; i < G::kTileM / 8; ++i)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int row = m_chunk * G::kTileM + FragmentElement<kCfg>(warp_n, lane, frag0 + i, 2 * r + e).row;
            if (row < p.m)
              c[static_cast<int64_t>(row) * p.n + nf] = ptx::FloatTo<T>(__fmul_rn(acc[frag0 + i][2 * r + e], f));
          }
      }
}

// Block (col, slice) = (blockIdx.x / kReduceSlices, blockIdx.x % kReduceSlices):
// if stripe boundaries cut column `col`, the block sums slice `slice` of the
// column's partial tiles in CTA order (from 0, the same fp32 operations in
// the same order as the last-CTA reduction, so the result is the same bits)
// and stores it like the GEMM kernel's column epilogue; otherwise it returns
// at once. Thread chunk (warp_n * frags + i) * 32 + lane of a partial tile is
// fragment i of that lane and warp column, as the GEMM kernel wrote it.
template <int kCfg, typename T>
__global__ void __launch_bounds__(kThreads) MarlinSplitReduceKernel(const KernelParams p) {
  using G = Geometry<kCfg>;
  const int col = static_cast<int>(blockIdx.x) / G::kReduceSlices;
  const int slice = static_cast<int>(blockIdx.x) % G::kReduceSlices;
  const ColumnCtas ctas = CtasOfColumn(p, col);
  if (ctas.first == ctas.last) return;  // one CTA did the whole column and stored it

  const int chunk0 = slice * kThreads * G::kReduceChunks + static_cast<int>(threadIdx.x);
  float4 sum[G::kReduceChunks];
#pragma unroll
  for (int j = 0; j < G::kReduceChunks; ++j) sum[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  // kBatch CTAs' partials are loaded before any is added (kBatch x
  // kReduceChunks loads in flight per thread instead of one L2 round trip
  // per CTA); the additions stay in CTA order.
  constexpr int kBatch = 4;
  for (int cta0 = ctas.first; cta0 <= ctas.last; cta0 += kBatch) {
    float4 v[kBatch][G::kReduceChunks];
#pragma unroll
    for (int c = 0; c < kBatch; ++c)
      if (cta0 + c <= ctas.last) {
        const float4* const part = reinterpret_cast<const float4*>(p.partials) +
                                   static_cast<int64_t>(PartialSlot(p, cta0 + c, col)) * G::kPartialChunks +
                                   chunk0;
#pragma unroll
        for (int j = 0; j < G::kReduceChunks; ++j) v[c][j] = __ldcg(part + j * kThreads);
      }
#pragma unroll
    for (int c = 0; c < kBatch; ++c)
      if (cta0 + c <= ctas.last) {
#pragma unroll
        for (int j = 0; j < G::kReduceChunks; ++j)
          sum[j].x += v[c][j].x, sum[j].y += v[c][j].y, sum[j].z += v[c][j].z, sum[j].w += v[c][j].w;
      }
  }

#pragma unroll
  for (int j = 0; j < G::kReduceChunks; ++j) StoreSummedChunk<kCfg, T>(p, col, chunk0 + j * kThreads, sum[j]);
}

// Cluster split-K (Plan::cluster = S > 1): the S CTAs of a cluster took
// consecutive k ranges of column `col` (cluster rank r = blockIdx.x % S, in k
// order). Each writes its partial tile, in the partial tiles' chunk order,
// to its own shared memory at `stage` (the pipeline buffers: the caller has
// retired every wgmma and cp.async that used them), then rank r sums slice r
// of the tile over ranks 0..S-1 in that order, from zero: the reduction
// pass's additions in the pass's order (CTA order = k order), read through
// distributed shared memory instead of a workspace, and stores it. Clusters
// are co-scheduled, so waiting at the cluster barriers is safe.
template <int kCfg, typename T>
__device__ __forceinline__ void ClusterSumSlice(const KernelParams& p, int col, const uint4* stage) {
  using G = Geometry<kCfg>;
  const int tid = static_cast<int>(threadIdx.x);
  const int s = p.cluster_split, rank = static_cast<int>(blockIdx.x) % s;
  const int per_rank = G::kPartialChunks / s;  // a multiple of kThreads (Geometry::kValid)
  const uint32_t base = ptx::SmemAddr(stage);
  for (int chunk = rank * per_rank + tid; chunk < (rank + 1) * per_rank; chunk += kThreads) {
    float4 v[kMaxClusterSplit];
#pragma unroll
    for (int q = 0; q < kMaxClusterSplit; ++q)
      if (q < s) v[q] = ptx::LoadSharedCluster(ptx::MapSharedToRank(base + 16u * chunk, q));
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int q = 0; q < kMaxClusterSplit; ++q)
      if (q < s) sum.x += v[q].x, sum.y += v[q].y, sum.z += v[q].z, sum.w += v[q].w;
    StoreSummedChunk<kCfg, T>(p, col, chunk, sum);
  }
}

template <int kCfg, typename T>
__device__ __forceinline__ void ClusterSumColumn(const KernelParams& p, int col, const float (&acc)[Geometry<kCfg>::kFrags][4],
                                                 uint4* stage) {
  using G = Geometry<kCfg>;
  static_assert(G::kClusterSplit, "ClusterSumColumn: the row has no cluster split-K");
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp_n = tid / 32;  // kWarpsK == 1
  float4* const own = reinterpret_cast<float4*>(stage);
#pragma unroll
  for (int i = 0; i < G::kFrags; ++i)
    own[(warp_n * G::kFrags + i) * 32 + lane] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
  ptx::ClusterSync();  // every partial tile of the cluster is written
  ClusterSumSlice<kCfg, T>(p, col, stage);
  ptx::ClusterSync();  // no CTA leaves (and frees its shared memory) while others read it
}

}  // namespace marlin
}  // namespace jax_mxfp4
