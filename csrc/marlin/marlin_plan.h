// The Marlin GEMM's launch planner (host only): which tile configuration,
// how the (n tile, m chunk) columns' k tiles are cut into one stripe per CTA,
// and how much split-K workspace that needs. marlin_plan.cc; used by the
// exported host API there and by the launch in marlin_gemm.cu.
#pragma once

#include <cstdint>

namespace jax_mxfp4 {
namespace marlin {

struct Plan {
  int cfg = -1;
  int m_chunks = 0, n_tiles = 0, k_tiles = 0, n_cols = 0;
  int64_t total = 0;
  int iters = 0, grid = 0;
  bool split = false;
  bool reduce_pass = false;  // split columns are summed by the reduction pass (SplitReduce::kPass)
  int cluster = 0;           // > 1: cluster split-K (SplitReduce::kCluster): grid = n_cols x cluster,
                             // CTA b takes k tiles [r k_tiles / cluster, (r + 1) k_tiles / cluster)
                             // of column b / cluster, r = b % cluster; no workspace
  int64_t counter_bytes = 0, partial_bytes = 0;
};

// How many clusters of 2, 4 and 8 CTAs of one tile row's kernel the device
// runs at once (cudaOccupancyMaxActiveClusters: a cluster's CTAs must share
// a GPC, so this is a property of the device's GPC layout, not sm_count / S).
// 0: unknown, no cluster of that size is planned.
struct ClusterCapacity {
  int clusters[4] = {0, 0, 0, 0};  // [log2 of the cluster size]; [0] unused
  int Of(int size) const { return size == 2 ? clusters[1] : size == 4 ? clusters[2] : size == 8 ? clusters[3] : 0; }
};

// The one function that turns (m, n, k, sm_count, wgmma) into a launch; used
// by MarlinWorkspaceBytes at trace time and by MarlinGemm at run time. False
// for an unsupported shape (MarlinCanImplement) or m < 1 or sm_count < 1, and
// for a `tile_config` (a row name forced instead of the choice by M) that is
// not in the table or is a wgmma row without `wgmma`.
// Cluster split-K (SplitReduce::kCluster rows) is planned only with a
// `capacity` (MarlinGemm queries it on the device): the largest cluster of
// 8, 4, 2 CTAs such that all n_cols clusters run at once, n_cols x cluster
// <= sm_count and each CTA gets >= 2 k tiles, on >= 2/3 of the SMs; without
// one, or where none fits, the next row for this M and N (wgmma128 ->
// wgmma128ws: the same tile in stripes, warp-specialized), or a forced
// cluster row's own stripes. The workspace of the plan without `capacity`
// is thus an upper bound (a cluster plan needs none; the two rows' tiles
// are the same).
bool MakePlan(int64_t m, int64_t n, int64_t k, int sm_count, bool wgmma, Plan* plan,
              const char* tile_config = nullptr, const ClusterCapacity* capacity = nullptr);

// The cluster row MakePlan tries for (m, n) (forced or chosen by M), whose
// kernel's ClusterCapacity the caller passes; -1 if that row has no cluster
// split-K.
int ClusterRowOf(int64_t m, int64_t n, bool wgmma, const char* tile_config = nullptr);

}  // namespace marlin
}  // namespace jax_mxfp4
