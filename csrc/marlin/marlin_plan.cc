// The Marlin GEMM's launch planner and the host API that needs no GPU
// (MarlinCanImplement, MarlinWorkspaceBytes, MarlinDescribePlan): plain C++.
#include "marlin_plan.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>

#include "marlin_gemm.h"
#include "marlin_layout.h"
#include "marlin_tiles.h"

namespace jax_mxfp4 {
namespace marlin {
namespace {

// Rows of the other path are skipped; the last row of each path has
// max_m = INT_MAX and min_n = 0, so every M, N >= 1 finds one. `from` is the
// first row considered (MakePlan moves past a cluster row that gets no
// cluster plan).
int SelectConfig(int64_t m, int64_t n, bool wgmma, int from = 0) {
  for (int i = from; i < kNumTileConfigs; ++i) {
    const MmaPath path = kTileConfigs[i].path;
    if (path == (wgmma ? MmaPath::kMmaSync : MmaPath::kWgmma)) continue;
    if (m <= kTileConfigs[i].max_m && n >= kTileConfigs[i].min_n) return i;
  }
  return -1;
}

// Cluster split-K of row `cfg` (see MakePlan's declaration): the largest
// cluster of 2, 4, 8 CTAs whose n_cols clusters the device runs at once,
// with >= 2 k tiles per CTA and n_cols x cluster <= sm_count, and only
// where the clusters keep >= 2/3 of the SMs busy (self-test, H100: 92-128
// of 132 CTAs 1.05-1.20x the stripes, 64 of 132 0.60-0.94x); 1: none.
int ClusterSplit(int64_t m, int64_t n, int64_t k, int sm_count, int cfg, const ClusterCapacity* capacity) {
  const TileConfig& c = kTileConfigs[cfg];
  if (c.reduce != SplitReduce::kCluster || capacity == nullptr) return 1;
  const int64_t n_cols = CeilDiv(m, c.tile_m) * CeilDiv(n, c.n_tile);
  const int64_t k_tiles = CeilDiv(k / kBlockK, c.k_tile / kBlockK);
  int cluster = 1;
  for (int size = 2; size <= kMaxClusterSplit; size *= 2)
    if (n_cols <= capacity->Of(size) && size * n_cols <= sm_count && 2 * size <= k_tiles) cluster = size;
  if (3 * cluster * n_cols < 2 * static_cast<int64_t>(sm_count)) cluster = 1;
  return cluster;
}

int ConfigByName(const char* name, bool wgmma) {
  for (int i = 0; i < kNumTileConfigs; ++i)
    if (std::strcmp(kTileConfigs[i].name, name) == 0)
      return kTileConfigs[i].path == MmaPath::kWgmma && !wgmma ? -1 : i;
  return -1;
}

}  // namespace

bool MakePlan(int64_t m, int64_t n, int64_t k, int sm_count, bool wgmma, Plan* plan,
              const char* tile_config, const ClusterCapacity* capacity) {
  if (m < 1 || !MarlinCanImplement(n, k).empty() || sm_count < 1) return false;
  Plan p;
  p.cfg = tile_config ? ConfigByName(tile_config, wgmma) : SelectConfig(m, n, wgmma);
  if (p.cfg < 0) return false;
  // A cluster row (SplitReduce::kCluster) serves only the plans where its
  // clusters fit; the others go to the next row for this M and N (its
  // stripe form: wgmma128 -> wgmma128ws, the warp-specialized kernel). A
  // forced row keeps its own stripes and the reduction pass instead.
  int cluster = ClusterSplit(m, n, k, sm_count, p.cfg, capacity);
  if (!tile_config && kTileConfigs[p.cfg].reduce == SplitReduce::kCluster && cluster <= 1) {
    const int next = SelectConfig(m, n, wgmma, p.cfg + 1);
    if (next >= 0) {
      p.cfg = next;
      cluster = ClusterSplit(m, n, k, sm_count, p.cfg, capacity);
    }
  }
  const TileConfig& c = kTileConfigs[p.cfg];
  const int64_t m_chunks = CeilDiv(m, c.tile_m);
  const int64_t n_tiles = CeilDiv(n, c.n_tile);
  const int64_t k_tiles = CeilDiv(k / kBlockK, c.k_tile / kBlockK);
  const int64_t n_cols = m_chunks * n_tiles;
  const int64_t total = n_cols * k_tiles;
  if (m > INT_MAX || n_cols > INT_MAX || total > INT_MAX) return false;
  p.m_chunks = static_cast<int>(m_chunks);
  p.n_tiles = static_cast<int>(n_tiles);
  p.k_tiles = static_cast<int>(k_tiles);
  p.n_cols = static_cast<int>(n_cols);
  p.total = total;
  // Cluster split-K (see the declaration): the largest cluster that fits.
  if (cluster > 1) {
    p.cluster = cluster;
    p.grid = static_cast<int>(n_cols * cluster);
    p.iters = static_cast<int>(CeilDiv(k_tiles, cluster));  // the most tiles a CTA takes
    p.split = true;
    *plan = p;
    return true;
  }
  int64_t grid = std::min<int64_t>(sm_count, total);
  int64_t iters = CeilDiv(total, grid);
  // Plenty of columns: give each CTA whole columns (no split-K traffic); the
  // imbalance is at most one column in >= 4.
  if (n_cols >= 4 * static_cast<int64_t>(sm_count)) iters = RoundUp(iters, k_tiles);
  grid = CeilDiv(total, iters);  // every CTA gets >= 1 tile
  p.iters = static_cast<int>(iters);
  p.grid = static_cast<int>(grid);
  // A stripe boundary inside a column exists iff some b * iters (0 < b < grid)
  // is not a multiple of k_tiles, i.e. iff iters is not.
  p.split = grid > 1 && iters % k_tiles != 0;
  if (p.split) {
    p.reduce_pass = c.reduce != SplitReduce::kLastCta;  // (a forced kCluster row: the pass)
    if (!p.reduce_pass) p.counter_bytes = RoundUp(4 * n_cols, 256);
    p.partial_bytes = 2 * grid * c.tile_m * c.n_tile * static_cast<int64_t>(sizeof(float));
  }
  *plan = p;
  return true;
}

int ClusterRowOf(int64_t m, int64_t n, bool wgmma, const char* tile_config) {
  if (m < 1 || n < 1) return -1;
  const int cfg = tile_config ? ConfigByName(tile_config, wgmma) : SelectConfig(m, n, wgmma);
  return cfg >= 0 && kTileConfigs[cfg].reduce == SplitReduce::kCluster ? cfg : -1;
}

// ===========================================================================
// Exported host API (marlin_gemm.h).
// ===========================================================================

std::string MarlinCanImplement(int64_t n, int64_t k) {
  if (k < kBlockK || k % kBlockK != 0)
    return "K = " + std::to_string(k) + " must be a positive multiple of 32 (MXFP4 block size)";
  if (n < 1) return "N = " + std::to_string(n) + " must be positive";
  // 32-bit indexing inside the kernel: units * 32 lanes, n_pad * (kb + 4).
  const PreparedShape s = GetPreparedShape(n, k);
  if (s.tiles_rows * s.tiles_cols / 16 > INT_MAX || s.scales_rows * s.scales_cols > INT_MAX ||
      k > INT_MAX / 2 || PaddedN(n) > INT_MAX / 2)
    return "N x K = " + std::to_string(n) + " x " + std::to_string(k) + " is too large";
  return "";
}

int64_t MarlinWorkspaceBytes(int64_t m, int64_t n, int64_t k, int sm_count, bool use_wgmma,
                             const char* tile_config) {
  if (m == 0 && MarlinCanImplement(n, k).empty()) return 0;
  Plan plan;
  if (!MakePlan(m, n, k, sm_count, use_wgmma, &plan, tile_config)) return -1;
  return plan.counter_bytes + plan.partial_bytes;
}

std::string MarlinDescribePlan(int64_t m, int64_t n, int64_t k, int sm_count, bool use_wgmma,
                               const char* tile_config, const ClusterCapacity* capacity) {
  Plan p;
  if (!MakePlan(m, n, k, sm_count, use_wgmma, &p, tile_config, capacity)) return "unsupported";
  const TileConfig& c = kTileConfigs[p.cfg];
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "%s m%dxn%dxk%d grid=%d iters=%d cols=%d k_tiles=%d split=%s%s ws=%lld",
                c.name, c.tile_m, c.n_tile, c.k_tile, p.grid, p.iters, p.n_cols, p.k_tiles,
                !p.split ? "no" : p.cluster ? "cluster" : p.reduce_pass ? "pass" : "last-cta",
                p.cluster ? std::to_string(p.cluster).c_str() : "",
                static_cast<long long>(p.counter_bytes + p.partial_bytes));
  return buf;
}

}  // namespace marlin
}  // namespace jax_mxfp4
