// Host-only evaluation of CUTLASS's SM100 block-scaled scale-factor layout
// (see scale_layout_cutlass.h). Compiled by the host C++ compiler: only CuTe
// layout algebra runs here, no CUDA code and no device.
#include "scale_layout_cutlass.h"

#include <limits>
#include <stdexcept>
#include <string>

#include "blockscaled_config.h"

namespace jax_mxfp4 {
namespace {

using sm100::ScaleFactorConfig;

void CheckExtents(int64_t rows, int64_t k) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (rows < 0 || k < 0 || rows > kMax || k > kMax || k % kBlockSize != 0) {
    throw std::invalid_argument("jax_mxfp4: need 0 <= rows, k <= 2^31 - 1 and k % 32 == 0; got rows=" +
                                std::to_string(rows) + ", k=" + std::to_string(k));
  }
}

// Calls fn(layout) with the layout CUTLASS builds for this operand. The GEMM
// problem shape is (M, N, K, L); the other operand's extent is irrelevant to
// this one's layout, so it is 1.
template <typename Fn>
auto WithLayout(int64_t rows, int64_t k, bool operand_a, Fn&& fn) {
  CheckExtents(rows, k);
  const int r = static_cast<int>(rows);
  const int kk = static_cast<int>(k);
  if (operand_a) {
    return fn(ScaleFactorConfig::tile_atom_to_shape_SFA(sm100::ProblemShape{r, 1, kk, 1}));
  }
  return fn(ScaleFactorConfig::tile_atom_to_shape_SFB(sm100::ProblemShape{1, r, kk, 1}));
}

}  // namespace

std::vector<int64_t> CutlassScaleFactorOffsets(int64_t rows, int64_t k, bool operand_a) {
  return WithLayout(rows, k, operand_a, [&](auto layout) {
    const int64_t kb_count = k / kBlockSize;
    std::vector<int64_t> offsets;
    offsets.reserve(static_cast<size_t>(rows * kb_count));
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t kb = 0; kb < kb_count; ++kb) {
        // The layout's coordinates are (row, K element, batch); the 32
        // elements of one block share a scale (a stride-0 mode).
        offsets.push_back(static_cast<int64_t>(
            layout(cute::make_coord(static_cast<int>(row), static_cast<int>(kb * kBlockSize), 0))));
      }
    }
    return offsets;
  });
}

int64_t CutlassScaleFactorBytes(int64_t rows, int64_t k, bool operand_a) {
  return WithLayout(rows, k, operand_a, [](auto layout) {
    return static_cast<int64_t>(cute::size(cute::filter_zeros(layout)));
  });
}

}  // namespace jax_mxfp4
