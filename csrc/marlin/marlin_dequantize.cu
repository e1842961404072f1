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
// Work split: a CTA of kWarps warps takes one layout unit (32 rows) and
// kWarps consecutive k blocks. Phase 1: warp w decodes block kb0 + w, as the
// unit's 512 contiguous bytes (lane r computes row r's 32 values, 64 bytes)
// and parks them in shared memory. Phase 2: each warp writes whole row
// segments: one 512-byte segment (32 rows x kWarps blocks x 64 bytes / row)
// per store instruction, 16 bytes per lane, fully coalesced. (The first form
// stored each lane's 64 bytes straight from registers: one store instruction
// touched 32 rows, and the kernel ran at ~38% of HBM bandwidth, 146 us for
// 8192 x 8192 on an H100.) The staging buffer is XOR-swizzled by row so that
// both phases hit all 32 banks (4 wavefronts per 512 bytes).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "marlin_dequant.cuh"
#include "marlin_dequantize.h"
#include "marlin_layout.h"

namespace jax_mxfp4 {
namespace marlin {
namespace {

constexpr int kWarps = 8;                          // k blocks per CTA, one per warp in phase 1
constexpr int kRowChunks = kWarps * kBlockK * 2 / 16;  // 16-byte chunks of a row segment (32)
static_assert(kRowChunks == 32, "phase 2 gives one chunk of each row segment to each lane");

template <InputDType kDType>
__global__ void __launch_bounds__(kWarps * 32)
    MarlinDequantizeKernel(const uint8_t* __restrict__ tiles, const uint8_t* __restrict__ scales,
                           uint16_t* __restrict__ w, int64_t n, int64_t k, int64_t n_pad) {
  // stage[row][chunk ^ row]: row r's 16-byte chunk c (k elements 8c .. 8c + 7 of the segment).
  __shared__ uint4 stage[kUnitN][kRowChunks];
  const int64_t kb_count = k / kBlockK;
  const int64_t kb0 = static_cast<int64_t>(blockIdx.x) * kWarps;
  const int64_t unit = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // ---- phase 1: warp `warp` decodes block kb0 + warp; lane r holds row r's 32 values ----
  const int64_t kb = kb0 + warp;
  const int r = lane;
  const int64_t row = unit * kUnitN + r;
  if (kb < kb_count && row < n) {
    // Scale: multiplier byte of (kb, row) in column 32 unit + 4 g + j; row factor planes after the Kb rows.
    const int g = r % 8, j = r / 8;
    const uint8_t mult = scales[kb * n_pad + unit * kUnitN + 4 * g + j];
    uint32_t factor = 0;
    for (int i = 0; i < kRowFactorPlanes; ++i)
      factor |= static_cast<uint32_t>(scales[(kb_count + i) * n_pad + row]) << (8 * i);
    const uint8_t scale = CanonicalScaleByte(mult, RowOffsetOfFactorBits(factor), kDType);

    // The layout places each code's fields at the bf16 / fp16 positions (TargetBit), so two
    // rotate-and-masks give a register p holding elements (p, e = 0) and (p, e = 1) as a
    // bf16x2 / f16x2 of value E2M1 * 2^-126 (bf16) or E2M1 * 2^-14 (fp16), as in the GEMM.
    // Widened to float32 and multiplied by 2^126 (2^14) and by 2^(s - 127), each product is
    // exact (no float32 overflow before the last one, no underflow at all), and the pair is
    // rounded once to the output dtype: the reference's E2M1 * 2^(s - 127) rounded once.
    constexpr float kUnbias = IsBf16(kDType) ? 0x1p126f : 0x1p14f;
    const float block_scale = scale == 0 ? 0x1p-127f : __uint_as_float(static_cast<uint32_t>(scale) << 23);
    uint32_t out[kBlockK / 2];  // bf16/fp16 pairs (k, k + 1); constant indices only, so registers
    if (scale == kE8M0Nan) {
      const uint32_t nan = IsBf16(kDType) ? F32BitsToBf16Bits(0x7FC00000u) : F32BitsToF16Bits(0x7FC00000u);
#pragma unroll
      for (int i = 0; i < kBlockK / 2; ++i) out[i] = nan | (nan << 16);
    } else {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const uint32_t word = *reinterpret_cast<const uint32_t*>(tiles + WordOffset(kb, n_pad, unit, 4 * g + t, j));
        uint32_t regs[4];
        ExtractRegisters<kDType>(word, regs);  // the GEMM's rotate-and-mask (marlin_dequant.cuh)
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const uint32_t reg = regs[p];
          float lo, hi;
          if constexpr (IsBf16(kDType)) {
            lo = __uint_as_float(reg << 16);
            hi = __uint_as_float(reg & 0xFFFF0000u);
          } else {
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&reg));
            lo = f.x;
            hi = f.y;
          }
          lo = lo * kUnbias * block_scale;
          hi = hi * kUnbias * block_scale;
          uint32_t pair;
          if constexpr (IsBf16(kDType)) {
            const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
            pair = *reinterpret_cast<const uint32_t*>(&v);
          } else {
            const __half2 v = __floats2half2_rn(lo, hi);
            pair = *reinterpret_cast<const uint32_t*>(&v);
          }
          // k inside the block: 16 s + 8 h + 2 t + e with p = 2 s + h (CoordOf's inverse): pair 4 p + t.
          out[4 * p + t] = pair;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
      stage[r][(4 * warp + i) ^ r] = make_uint4(out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]);
  }
  __syncthreads();

  // ---- phase 2: warp `warp` stores rows warp, warp + kWarps, ...; lane l writes chunk l ----
  const int64_t blocks = kb_count - kb0 < kWarps ? kb_count - kb0 : kWarps;
  if (lane / 4 >= blocks) return;  // chunk l belongs to block kb0 + l / 4
  for (int rr = warp; rr < kUnitN; rr += kWarps) {
    const int64_t out_row = unit * kUnitN + rr;
    if (out_row >= n) break;
    uint4* dst = reinterpret_cast<uint4*>(w + out_row * k + kb0 * kBlockK);
    dst[lane] = stage[rr][lane ^ rr];
  }
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
