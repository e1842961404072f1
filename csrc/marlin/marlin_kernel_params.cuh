// The Marlin GEMM kernel's launch parameters (marlin_gemm.cu fills them from
// the plan of marlin_plan.cc; the host computes everything derived, see
// MakePlan). The GEMM kernel and the split-K reduction pass
// (marlin_split_reduce.cuh) take the same struct; ActivationSource maps it
// to the activation rows both GEMM kernels' loaders copy.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "marlin_layout.h"
#include "marlin_tiles.h"

namespace jax_mxfp4 {
namespace marlin {

struct KernelParams {
  const void* a;          // [m, 32 kb_count] activations, row-major, type T
  const uint4* tiles;     // prepared weights [kb_count][n_pad / 32 units][32 lanes] x 16 B
  const uint8_t* scales;  // prepared scales [kb_count + 4][n_pad] bytes
  void* c;                // [m, n] output, row-major, type T
  float* partials;        // split-K partial tiles: [2 grid][tile_m * n_tile] fp32
  int* counters;          // per-column arrival counters [n_cols], zeroed before launch
                          // (SplitReduce::kLastCta; nullptr for kPass)
  int m, n, n_pad;        // true rows of A, true and padded output features
  int kb_count;           // K / 32
  int k_tiles;            // k tiles per column = ceil(kb_count / (k_tile / 32))
  int m_chunks;           // ceil(m / tile_m); col = n_tile_idx * m_chunks + m_chunk
  int iters;              // tiles per CTA stripe
  int total_tiles;        // n_cols * k_tiles
  int stream_weights;     // 1: each weight tile is read by one column -> L2 evict_first
  int cluster_split;      // > 1: cluster split-K over clusters of this many CTAs (Plan::cluster);
                          // 0: stripes of `iters` tiles
};

// The loaders' activation source for column `col` (its m chunk) from k tile
// `kt`, for a thread whose first A chunk is row a_row0 of the chunk, 16-byte
// column a_ch of the k tile: that chunk's address, and in `rows_left` the
// rows of A at or below a_row0 in the chunk (<= 0: none to copy).
template <int kCfg, typename T>
__device__ __forceinline__ const T* ActivationSource(const KernelParams& p, int col, int kt, int a_row0, int a_ch,
                                                     int& rows_left) {
  using G = Geometry<kCfg>;
  const int n_idx = col / p.m_chunks, m_chunk = col - n_idx * p.m_chunks;
  const int row = m_chunk * G::kTileM + a_row0;
  const int kb0 = kt * G::kKbTile;
  rows_left = p.m - row;
  const int64_t k_elems = static_cast<int64_t>(p.kb_count) * kBlockK;
  return static_cast<const T*>(p.a) + static_cast<int64_t>(row) * k_elems + 8 * a_ch + kb0 * kBlockK;
}

}  // namespace marlin
}  // namespace jax_mxfp4
