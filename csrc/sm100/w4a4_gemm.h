// SM100 (Blackwell) W4A4 MXFP4 GEMM: the CUTLASS block-scaled kernel as an
// XLA FFI handler, plus the host queries the Python kernel layer
// (jax_mxfp4/kernels/cutlass_sm100.py) calls at trace time. w4a4_gemm.cu.
//
//   D[M, N] (bf16) = A[M, K] (MXFP4) x W[N, K]^T (MXFP4), fp32 accumulation.
//
// Operands, all uint8 unless noted (DESIGN.md sections 2-3):
//   a        [..., M, K/2]   activations, E2M1 packed, element 2i in the low nibble
//   a_scales [RoundUp(M, 128), RoundUp(K/32, 4)]  E8M0, swizzled_128x4
//   b        [N, K/2]        weights, same packing (K-major, "TN")
//   b_scales [RoundUp(N, 128), RoundUp(K/32, 4)]  E8M0, swizzled_128x4
//   d        bf16 [..., M, N] result
//   workspace [Sm100W4A4WorkspaceBytes(M, N, K)]  result, CUTLASS scratch
// Scale shapes are GetScaleShape(rows, K, kSwizzled128x4) (scale_layout.h),
// i.e. jax_mxfp4.layout.scale_shape(rows, K, "swizzled_128x4").
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_mxfp4 {

// Whether the kernel can compute an (M, N, K) problem, and if not, why
// (a sentence for the user). Checks K % 32 == 0 (one scale per 32 elements;
// also TMA's 16-byte rows of K/2 bytes), N % 8 == 0 (16-byte rows of the bf16
// output for the TMA store), extents <= INT32_MAX, and then asks CUTLASS's own
// Gemm::can_implement for the configuration chosen for M. M and N need not be
// multiples of any tile: TMA zero-fills / clips the ragged edges. Pure host
// code: it needs no GPU.
std::pair<bool, std::string> Sm100W4A4CanImplement(int64_t m, int64_t n, int64_t k);

// Bytes of scratch the kernel needs for (M, N, K): the size of the handler's
// `workspace` result. 0 for the configurations built today (the SM100
// cluster-launch-control scheduler keeps no global state); callers must
// still use this value, since a stream-K or split-K row in the table would
// change it. Requires Sm100W4A4CanImplement(m, n, k) to hold; returns -1
// otherwise. Pure host code.
int64_t Sm100W4A4WorkspaceBytes(int64_t m, int64_t n, int64_t k);

// Name of the tile configuration the handler uses for M rows, e.g.
// "1sm_128x64x256" (for benchmark reports).
std::string Sm100W4A4ConfigName(int64_t m);

// The CUDA handler. Inputs (a, a_scales, b, b_scales), results (d, workspace)
// as above. Fails with an error, never silently, when the device is not
// compute capability 10.x or this build carries no kernel image for it.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4W4A4GemmSm100);

}  // namespace jax_mxfp4
