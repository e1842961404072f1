// CUTLASS types shared by the SM100 W4A4 GEMM (w4a4_gemm.cu, nvcc) and the
// host-only scale-layout proof (scale_layout_cutlass.cc, host C++ compiler).
//
// Only layout headers are included here, so this compiles without nvcc (it
// still needs the CUDA toolkit's headers on the include path: CUTLASS pulls in
// vector_types.h and CCCL's cuda/std). w4a4_gemm.cu static_asserts that the
// collective it instantiates uses exactly ScaleFactorConfig, so the offsets
// scale_layout_cutlass.cc reports are the ones the kernel's TMA reads.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/detail/sm100_blockscaled_layout.hpp"
#include "scale_layout.h"

namespace jax_mxfp4::sm100 {

// GEMM problem shape (M, N, K, L): CUTLASS takes int32 extents, so every
// extent must be <= INT32_MAX (Sm100W4A4CanImplement checks it).
using ProblemShape = cute::Shape<int, int, int, int>;

// Scale-factor layout of SM100 block-scaled MMA for one E8M0 scale per 32
// elements (MX formats). Its atom is 128 rows x 4 scale columns = 512 bytes,
// atoms K-major within a 128-row band:
//   tile_atom_to_shape_SFA((M, N, K, L)) : (row, k_element, l) -> byte
// which is csrc/scale_layout.h SwizzledOffset(row, k_element / 32, K / 32).
using ScaleFactorConfig = cutlass::detail::Sm1xxBlockScaledConfig<static_cast<int>(kBlockSize)>;
static_assert(ScaleFactorConfig::SFVecSize == kBlockSize, "MX formats share one scale per 32 elements");

}  // namespace jax_mxfp4::sm100
