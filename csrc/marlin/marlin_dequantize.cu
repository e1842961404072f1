// Dequantizes Marlin-prepared MXFP4 weights to a dense [N, K] bf16/fp16 matrix.
//
// The Marlin kernel's large-M path (jax_mxfp4.kernels.marlin.MarlinKernel.
// dense_matmul) runs a dense cuBLAS GEMM on these. Reading the prepared layout
// directly (marlin_layout.h) costs one pass: 4.25 bits read and 16 bits
// written per weight, instead of unpreparing to the canonical layout and
// dequantizing that in XLA (several passes, ~7x the time at 8192 x 8192).
//
// Values are exactly formats.dequantize_codes of the unprepared weights
// (unprepare_marlin_weights): E2M1(code) * 2^(s - 127) rounded once to the
// output dtype (exact in bf16; fp16 rounds to nearest even, overflows to Inf),
// NaN for a NaN block, and 0 for a block the layout's accuracy contract
// flushed (its multiplier byte is 0).
//
// Work split: a warp handles the 32 rows of one layout unit at one k block
// (it reads that unit's 512 contiguous bytes and each lane writes its row's
// 32 values, 64 contiguous bytes); a CTA of kWarps warps takes kWarps
// consecutive k blocks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "marlin_dequantize.h"
#include "marlin_layout.h"

namespace jax_mxfp4 {
namespace marlin {
namespace {

constexpr int kWarps = 8;

template <InputDType kDType>
__global__ void __launch_bounds__(kWarps * 32)
    MarlinDequantizeKernel(const uint8_t* __restrict__ tiles, const uint8_t* __restrict__ scales,
                           uint16_t* __restrict__ w, int64_t n, int64_t k, int64_t n_pad) {
  const int64_t kb_count = k / kBlockK;
  const int64_t kb = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t unit = blockIdx.y;
  const int r = threadIdx.x % 32;  // row inside the unit
  const int64_t row = unit * kUnitN + r;
  if (kb >= kb_count || row >= n) return;

  // Scale: multiplier byte of (kb, row) in column 32 unit + 4 g + j; row factor planes after the Kb rows.
  const int g = r % 8, j = r / 8;
  const uint8_t mult = scales[kb * n_pad + unit * kUnitN + 4 * g + j];
  uint32_t factor = 0;
  for (int i = 0; i < kRowFactorPlanes; ++i)
    factor |= static_cast<uint32_t>(scales[(kb_count + i) * n_pad + row]) << (8 * i);
  const uint8_t scale = CanonicalScaleByte(mult, RowOffsetOfFactorBits(factor), kDType);

  uint32_t out[kBlockK / 2];  // bf16/fp16 pairs (k, k + 1); constant indices only, so registers
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(tiles + WordOffset(kb, n_pad, unit, 4 * g + t, j));
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      uint32_t pair = 0;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        uint32_t code = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) code |= ((word >> SourceBit(kDType, p, e, b)) & 1u) << b;
        const uint32_t f32 = DequantizeToF32Bits(code, scale);
        pair |= static_cast<uint32_t>(IsBf16(kDType) ? F32BitsToBf16Bits(f32) : F32BitsToF16Bits(f32)) << (16 * e);
      }
      // k inside the block: 16 s + 8 h + 2 t + e with p = 2 s + h (CoordOf's inverse): pair 4 p + t.
      out[4 * p + t] = pair;
    }
  }
  uint4* dst = reinterpret_cast<uint4*>(w + row * k + kb * kBlockK);
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[i] = make_uint4(out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]);
}

}  // namespace

std::string MarlinDequantize(const MarlinDequantizeArgs& args, cudaStream_t stream) {
  if (args.k <= 0 || args.k % kBlockK)
    return "marlin_dequantize: K = " + std::to_string(args.k) + " must be a positive multiple of 32";
  if (args.n <= 0) return "marlin_dequantize: N = " + std::to_string(args.n) + " must be positive";
  const int64_t n_pad = PaddedN(args.n), kb_count = args.k / kBlockK;
  const dim3 grid(static_cast<unsigned>((kb_count + kWarps - 1) / kWarps), static_cast<unsigned>(n_pad / kUnitN));
  if (grid.y > 65535u) return "marlin_dequantize: N = " + std::to_string(args.n) + " exceeds 65535 units of 32";
  auto* w = static_cast<uint16_t*>(args.w);
  if (args.dtype == InputDType::kBF16) {
    MarlinDequantizeKernel<InputDType::kBF16><<<grid, kWarps * 32, 0, stream>>>(args.tiles, args.scales, w, args.n,
                                                                               args.k, n_pad);
  } else if (args.dtype == InputDType::kF16) {
    MarlinDequantizeKernel<InputDType::kF16><<<grid, kWarps * 32, 0, stream>>>(args.tiles, args.scales, w, args.n,
                                                                              args.k, n_pad);
  } else {
    return "marlin_dequantize: dtype must be bfloat16 or float16";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : std::string("marlin_dequantize: launch failed: ") + cudaGetErrorString(err);
}

}  // namespace marlin
}  // namespace jax_mxfp4
