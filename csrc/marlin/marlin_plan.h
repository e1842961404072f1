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
  int64_t counter_bytes = 0, partial_bytes = 0;
};

// The one function that turns (m, n, k, sm_count, wgmma) into a launch; used
// by MarlinWorkspaceBytes at trace time and by MarlinGemm at run time. False
// for an unsupported shape (MarlinCanImplement) or m < 1 or sm_count < 1, and
// for a `tile_config` (a row name forced instead of the choice by M) that is
// not in the table or is a wgmma row without `wgmma`.
bool MakePlan(int64_t m, int64_t n, int64_t k, int sm_count, bool wgmma, Plan* plan,
              const char* tile_config = nullptr);

}  // namespace marlin
}  // namespace jax_mxfp4
