// Host-only view of the scale-factor layout CUTLASS's SM100 block-scaled GEMM
// reads (scale_layout_cutlass.cc). It lets CPU-only tests prove that our
// swizzled_128x4 layout (csrc/scale_layout.h, jax_mxfp4/layout.py) is the
// layout the kernel expects, without a Blackwell GPU.
//
// module.cc binds these (when the build has them, JAX_MXFP4_WITH_SM100_LAYOUT)
// as _ext.cutlass_scale_factor_offsets(rows, k, operand) with operand "a" or
// "b", and _ext.cutlass_scale_factor_bytes(rows, k, operand).
#pragma once

#include <cstdint>
#include <vector>

namespace jax_mxfp4 {

// Byte offsets of every scale of a [rows, k] MXFP4 operand in the buffer the
// SM100 W4A4 GEMM reads, as CUTLASS computes them:
// Sm1xxBlkScaledConfig::tile_atom_to_shape_SFA((rows, 1, k, 1)) for
// operand_a (activations, rows = M) or tile_atom_to_shape_SFB((1, rows, k, 1))
// for the weights (rows = N), evaluated at (row, kb * 32, 0).
// Returns rows * (k / 32) offsets, row-major over (row, kb).
// Throws std::invalid_argument unless 0 <= rows, 0 <= k, k % 32 == 0 and both
// are <= INT32_MAX (CUTLASS's problem shape is int32).
std::vector<int64_t> CutlassScaleFactorOffsets(int64_t rows, int64_t k, bool operand_a);

// Size in bytes of the scale buffer CUTLASS expects for the same operand:
// size(filter_zeros(layout)), what CUTLASS's own examples allocate. Equals
// GetScaleShape(rows, k, kSwizzled128x4).rows * .cols. Same preconditions.
int64_t CutlassScaleFactorBytes(int64_t rows, int64_t k, bool operand_a);

}  // namespace jax_mxfp4
