// CUDA activation quantization: x[..., K] (f32/bf16/f16) -> packed E2M1
// [..., K/2] + E8M0 scales in the linear or swizzled_128x4 layout.
//
// Memory-bound: per element it reads 2 (bf16) bytes and writes 0.5 + 1/32.
// Work split: four threads own one 32-element block, eight elements each, so a
// thread loads 16 bytes (bf16/f16; two 16-byte loads for f32) and stores the 4
// packed bytes of its eight codes; a warp covers eight consecutive blocks and
// its packed stores form one contiguous 128-byte segment. The block's amax is
// reduced across the four lanes with two xor-shuffles; lane 0 of the four
// writes the scale byte. The block exponent comes from mxfp4.h
// (ChooseBlockExponent, shared with the CPU handler); the element encoding is
// EncodeMagnitude below, a float-pipe formulation of mxfp4.h's threshold count
// that is bit-identical to it (tested against jax_mxfp4.reference on the GPU).
//
// Launch: a grid-stride loop over quarter-blocks with the grid capped at a few
// waves of the device, so M = 1 launches one or a few CTAs (latency-bound,
// one kernel) and M = 64k streams with every SM busy. Swizzled padding bytes
// are zeroed by the same kernel (no separate memset launch).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "ffi_common.h"
#include "mxfp4.h"
#include "quantize_args.h"
#include "quantize_cuda.h"
#include "scale_layout.h"

namespace jax_mxfp4 {
namespace {

constexpr int kThreadsPerBlockGroup = 4;  // threads per 32-element MX block
constexpr int kElemsPerThread = kBlockSize / kThreadsPerBlockGroup;  // 8
constexpr int kCtaThreads = 256;

// Loads a thread's eight elements as float32 bit patterns.
template <typename T>
__device__ __forceinline__ void LoadEight(const T* src, uint32_t (&bits)[kElemsPerThread]);

template <>
__device__ __forceinline__ void LoadEight<float>(const float* src, uint32_t (&bits)[kElemsPerThread]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(src));
  const uint4 b = __ldg(reinterpret_cast<const uint4*>(src) + 1);
  bits[0] = a.x; bits[1] = a.y; bits[2] = a.z; bits[3] = a.w;
  bits[4] = b.x; bits[5] = b.y; bits[6] = b.z; bits[7] = b.w;
}

struct Bf16Tag {};
struct F16Tag {};

template <typename Tag>
__device__ __forceinline__ uint32_t HalfToF32Bits(uint16_t h) {
  if constexpr (std::is_same_v<Tag, Bf16Tag>) {
    return Bf16BitsToF32Bits(h);
  } else {
    return F16BitsToF32Bits(h);
  }
}

template <typename Tag>
__device__ __forceinline__ void LoadEightHalf(const uint16_t* src, uint32_t (&bits)[kElemsPerThread]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    bits[2 * i] = HalfToF32Bits<Tag>(static_cast<uint16_t>(w[i] & 0xFFFFu));
    bits[2 * i + 1] = HalfToF32Bits<Tag>(static_cast<uint16_t>(w[i] >> 16));
  }
}

template <typename Elem, typename Tag>
__device__ __forceinline__ void LoadThreadElems(const void* x, int64_t elem_offset,
                                                uint32_t (&bits)[kElemsPerThread]) {
  if constexpr (std::is_same_v<Elem, float>) {
    LoadEight<float>(static_cast<const float*>(x) + elem_offset, bits);
  } else {
    LoadEightHalf<Tag>(static_cast<const uint16_t*>(x) + elem_offset, bits);
  }
}

// 2^-E as a float (exact: a normal float for E <= 126, the subnormal 2^-127
// for E = 127).
__device__ __forceinline__ float InvPow2(int e) {
  return e <= 126 ? __uint_as_float(static_cast<uint32_t>(127 - e) << 23) : __uint_as_float(0x00400000u);
}

// E2M1 magnitude code (0..7) of |x| in a block with scale 2^E, given
// inv_scale = 2^-E. Same result as mxfp4.h's E2M1MagnitudeCode, with about
// half the integer instructions (Hopper has no E2M1 convert, and this kernel
// is bound by the integer pipe, not by memory, with the threshold count):
//   q = |x| * 2^-E is exact (a power-of-two scaling; nvcc keeps subnormals);
//   on [0, 2) the E2M1 grid is 0.5 apart, on [2, 4) 1 apart, from 4 on 2
//   apart, so code = rint(2q), rint(q) + 2, rint(q/2) + 4 there, capped at 7
//   (saturation). rint (ties to even, the E2M1 ties) is the float add trick:
//   fma(q, step, 2^23) rounds q * step to an integer in the low mantissa bits.
__device__ __forceinline__ uint32_t EncodeMagnitude(float abs_x, float inv_scale) {
  const float q = abs_x * inv_scale;
  const bool below2 = q < 2.0f, below4 = q < 4.0f;
  const float step = below2 ? 2.0f : (below4 ? 1.0f : 0.5f);
  const uint32_t offset = below2 ? 0u : (below4 ? 2u : 4u);
  const float t = __fmaf_rn(q, step, 8388608.0f);  // 2^23 + rint(q * step)
  return min(__float_as_uint(t) - 0x4B000000u + offset, 7u);
}

// n / d for 32-bit n < 2^31 by a multiply-high and a shift (Granlund and
// Montgomery, "Division by invariant integers using multiplication", 1994):
// the swizzled layout needs (row, kb) of every block, and a hardware-less
// integer division per block would cost more than the rest of the kernel.
struct FastDivisor {
  uint32_t divisor, multiplier, shift;
  explicit FastDivisor(uint32_t d) : divisor(d), multiplier(0), shift(0) {
    if (d > 1) {
      int log2_ceil = 0;
      while ((1ull << log2_ceil) < d) ++log2_ceil;
      const uint64_t p = 31 + static_cast<uint64_t>(log2_ceil);
      multiplier = static_cast<uint32_t>(((1ull << p) + d - 1) / d);
      shift = static_cast<uint32_t>(p - 32);
    }
  }
  __device__ __forceinline__ uint32_t Divide(uint32_t n) const {
    return multiplier == 0 ? n : (__umulhi(n, multiplier) >> shift);
  }
};

// One launch covers the whole tensor. `rows` x `k` elements; `kb_count` = k/32.
// Indices are 32-bit (the host refuses tensors of 2^30 blocks or more).
template <typename Elem, typename Tag, InputDType kDType>
__global__ void __launch_bounds__(kCtaThreads)
    QuantizeKernel(const void* __restrict__ x,       // [rows, k] elements of Elem
                   uint8_t* __restrict__ packed,     // [rows, k/2] E2M1 pairs
                   uint8_t* __restrict__ scales,     // scale buffer in `layout`
                   uint32_t rows, uint32_t kb_count,  // kb_count = k / 32
                   FastDivisor kb_divisor,           // divides by kb_count
                   ScaleLayout layout, Rounding rounding, uint32_t padded_rows,
                   uint32_t padded_cols) {
  const uint32_t quarters = rows * kb_count * kThreadsPerBlockGroup;
  const uint32_t stride = gridDim.x * blockDim.x;
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const bool ct = rounding == Rounding::kCompressedTensors;
  // The loop bound is rounded up to whole warps so every lane of a warp
  // reaches the shuffles together (inactive lanes carry amax 0).
  const uint32_t quarters_warp_aligned = (quarters + 31) / 32 * 32;
  for (uint32_t q = tid; q < quarters_warp_aligned; q += stride) {
    const bool active = q < quarters;
    uint32_t bits[kElemsPerThread] = {};
    uint32_t amax = 0;
    if (active) {
      LoadThreadElems<Elem, Tag>(x, static_cast<int64_t>(q) * kElemsPerThread, bits);
#pragma unroll
      for (int i = 0; i < kElemsPerThread; ++i) amax = max(amax, bits[i] & kF32AbsMask);
    }
    amax = max(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 1));
    amax = max(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 2));
    if (!active) continue;
    const BlockExponent be = ChooseBlockExponent(amax, rounding, kDType);
    const float inv_scale = InvPow2(be.exponent);
    // Negatives keep their sign bit (floor/rceil), or do unless their
    // quotient underflows in the input dtype (compressed_tensors).
    const uint32_t sign_floor = ct ? CompressedTensorsSignThreshold(be.exponent, kDType) : 0u;
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < kElemsPerThread; ++i) {
      const uint32_t abs_bits = bits[i] & kF32AbsMask;
      const uint32_t sign = (bits[i] >> 31) & static_cast<uint32_t>(!ct || abs_bits > sign_floor);
      word |= ((sign << 3) | EncodeMagnitude(__uint_as_float(abs_bits), inv_scale)) << (4 * i);
    }
    reinterpret_cast<uint32_t*>(packed)[q] = be.nan_block ? 0u : word;
    if ((q & (kThreadsPerBlockGroup - 1)) == 0) {
      const uint32_t block = q / kThreadsPerBlockGroup;
      const uint8_t byte = be.nan_block ? kE8M0Nan : static_cast<uint8_t>(be.exponent + kE8M0Bias);
      if (layout == ScaleLayout::kLinear) {
        scales[block] = byte;
      } else {
        const uint32_t r = kb_divisor.Divide(block);
        scales[SwizzledOffset(r, block - r * kb_count, kb_count)] = byte;
      }
    }
  }
  if (layout == ScaleLayout::kSwizzled128x4) {
    // Zero the padding: rows < `rows` past column kb_count, then whole padded
    // rows (a few hundred bytes at most per 128 rows: plain division is fine).
    const uint32_t tail_cols = padded_cols - kb_count;
    const uint32_t in_row_pad = rows * tail_cols;
    const uint32_t pad_total = in_row_pad + (padded_rows - rows) * padded_cols;
    for (uint32_t i = tid; i < pad_total; i += stride) {
      uint32_t r, c;
      if (i < in_row_pad) {
        r = i / tail_cols;
        c = kb_count + (i - r * tail_cols);
      } else {
        const uint32_t j = i - in_row_pad;
        r = rows + j / padded_cols;
        c = j % padded_cols;
      }
      scales[SwizzledOffset(r, c, kb_count)] = 0;
    }
  }
}

int SmCount() {
  // Per device, queried once: an attribute query per call would cost more
  // than the kernel at small M.
  static int cached[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= 64) return 132;
  if (cached[device] == 0) {
    int count = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    cached[device] = count > 0 ? count : 132;
  }
  return cached[device];
}

template <typename Elem, typename Tag, InputDType kDType>
void Launch(cudaStream_t stream, const void* x, uint8_t* packed, uint8_t* scales, int64_t rows,
            int64_t k, ScaleLayout layout, Rounding rounding, ScaleShape ss) {
  const int64_t kb_count = k / kBlockSize;
  const int64_t quarters = rows * kb_count * kThreadsPerBlockGroup;
  const int64_t pad = layout == ScaleLayout::kSwizzled128x4 ? ss.rows * ss.cols - rows * kb_count : 0;
  const int64_t work = quarters > pad ? quarters : pad;
  // 8 CTAs of 256 threads per SM keep every SM at full occupancy; beyond that
  // the grid-stride loop gives each thread more quarters.
  const int64_t max_ctas = static_cast<int64_t>(SmCount()) * 8;
  int64_t ctas = (work + kCtaThreads - 1) / kCtaThreads;
  if (ctas > max_ctas) ctas = max_ctas;
  if (ctas < 1) ctas = 1;
  QuantizeKernel<Elem, Tag, kDType><<<static_cast<unsigned>(ctas), kCtaThreads, 0, stream>>>(
      x, packed, scales, static_cast<uint32_t>(rows), static_cast<uint32_t>(kb_count),
      FastDivisor(static_cast<uint32_t>(kb_count)), layout, rounding, static_cast<uint32_t>(ss.rows),
      static_cast<uint32_t>(ss.cols));
}

ffi::Error QuantizeCudaImpl(cudaStream_t stream, ffi::AnyBuffer x,
                            ffi::Result<ffi::Buffer<ffi::U8>> packed,
                            ffi::Result<ffi::Buffer<ffi::U8>> scales, int32_t scale_layout,
                            int32_t rounding) {
  QuantizeArgs args{};
  ffi::Error bad = CheckQuantizeArgs(x, packed->element_count(), scales->element_count(), scale_layout, rounding, &args);
  if (bad.failure()) return bad;
  const int64_t k = args.k, rows = args.rows;
  const ScaleLayout layout = args.layout;
  const ScaleShape ss = args.scales;
  const auto dims = x.dimensions();
  // 32-bit indexing in the kernel: quarters of blocks and scale offsets.
  if (rows * (k / kBlockSize) >= (int64_t{1} << 29) || ss.rows * ss.cols >= (int64_t{1} << 31)) {
    return InvalidArgument("quantize: x of shape " + ShapeString(dims) +
                           " has 2^29 or more 32-element blocks; split it into several calls");
  }
  if (rows == 0 || k == 0) {
    if (ss.rows * ss.cols > 0) cudaMemsetAsync(scales->typed_data(), 0, ss.rows * ss.cols, stream);
  } else {
    const Rounding mode = args.rounding;
    switch (x.element_type()) {
      case ffi::DataType::F32:
        Launch<float, void, InputDType::kF32>(stream, x.untyped_data(), packed->typed_data(),
                                              scales->typed_data(), rows, k, layout, mode, ss);
        break;
      case ffi::DataType::BF16:
        Launch<uint16_t, Bf16Tag, InputDType::kBF16>(stream, x.untyped_data(), packed->typed_data(),
                                                     scales->typed_data(), rows, k, layout, mode, ss);
        break;
      case ffi::DataType::F16:
        Launch<uint16_t, F16Tag, InputDType::kF16>(stream, x.untyped_data(), packed->typed_data(),
                                                   scales->typed_data(), rows, k, layout, mode, ss);
        break;
      default:
        return InvalidArgument("quantize: x must be float32, bfloat16 or float16");
    }
  }
  // cudaGetLastError also reports errors of earlier asynchronous work on this
  // thread; either way the computation is not trustworthy.
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_mxfp4: quantize kernel launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp4QuantizeCuda, QuantizeCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()          // x: f32/bf16/f16 [..., K]
                                  .Ret<ffi::Buffer<ffi::U8>>()    // packed: [..., K/2]
                                  .Ret<ffi::Buffer<ffi::U8>>()    // scales: linear or swizzled
                                  .Attr<int32_t>("scale_layout")  // ScaleLayout
                                  .Attr<int32_t>("rounding"),     // Rounding
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_mxfp4
