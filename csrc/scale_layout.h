// Scale-factor layouts for MXFP4 tensors: padded shapes and swizzle offsets.
//
// This header mirrors jax_mxfp4/layout.py (the Python side is the one used by
// abstract evaluation, loaders and tests; tests/test_layout.py checks that the
// two agree through the extension's `scale_shape` / `swizzled_offset`).
//
// Layouts (DESIGN.md section 3):
//   kLinear:        scales[rows, K/32], row-major, no padding.
//   kSwizzled128x4: the layout read by SM100 block-scaled MMA (CUTLASS
//                   Sm1xxBlkScaledConfig, cuBLAS/FlashInfer "128x4"): rows
//                   padded to a multiple of 128, scale columns (Kb = K/32)
//                   padded to a multiple of 4, padding bytes zero; the 2-D
//                   buffer is [ceil(rows/128)*128, ceil(Kb/4)*4] and
//                   (row, kb) lives at byte
//                   ((row/128)*ceil(Kb/4) + kb/4)*512
//                     + (row%32)*16 + ((row/32)%4)*4 + kb%4.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MXFP4_HD __host__ __device__ __forceinline__
#else
#define MXFP4_HD inline
#endif

namespace jax_mxfp4 {

// Elements that share one E8M0 scale (OCP MX spec v1.0, section 5).
constexpr int64_t kBlockSize = 32;
// Swizzled tiles: 128 rows x 4 scale columns = 512 bytes.
constexpr int64_t kSwizzleRows = 128;
constexpr int64_t kSwizzleCols = 4;
constexpr int64_t kSwizzleTileBytes = kSwizzleRows * kSwizzleCols;

// Values must match ScaleLayout in jax_mxfp4/layout.py (passed as an FFI
// attribute).
enum class ScaleLayout : int32_t { kLinear = 0, kSwizzled128x4 = 1 };

struct ScaleShape {
  int64_t rows;
  int64_t cols;
};

MXFP4_HD constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
MXFP4_HD constexpr int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// Shape of the 2-D scale buffer for `rows` rows of `k` elements (k % 32 == 0).
MXFP4_HD constexpr ScaleShape GetScaleShape(int64_t rows, int64_t k, ScaleLayout layout) {
  const int64_t kb = k / kBlockSize;
  if (layout == ScaleLayout::kLinear) return ScaleShape{rows, kb};
  return ScaleShape{RoundUp(rows, kSwizzleRows), RoundUp(kb, kSwizzleCols)};
}

// Byte offset of scale (row, kb) in a swizzled buffer whose unpadded scale
// column count is `kb_count` (= K/32).
MXFP4_HD constexpr int64_t SwizzledOffset(int64_t row, int64_t kb, int64_t kb_count) {
  const int64_t kb_tiles = CeilDiv(kb_count, kSwizzleCols);
  return ((row / kSwizzleRows) * kb_tiles + kb / kSwizzleCols) * kSwizzleTileBytes +
         (row % 32) * 16 + ((row / 32) % 4) * 4 + kb % kSwizzleCols;
}

// Byte offset of scale (row, kb) in either layout.
MXFP4_HD constexpr int64_t ScaleOffset(int64_t row, int64_t kb, int64_t kb_count,
                                       ScaleLayout layout) {
  return layout == ScaleLayout::kLinear ? row * kb_count + kb
                                        : SwizzledOffset(row, kb, kb_count);
}

}  // namespace jax_mxfp4
