// CPU handlers for the quantize, GEMM and W4A4 (swizzled-scale) GEMM custom calls.
//
// Real loops over the data (not a call back into XLA): they make the package
// usable on machines without a GPU and are tested bit for bit (quantize) and
// within jax_mxfp4.reference.matmul_tolerance (GEMM) against the reference.
// All element math comes from mxfp4.h and works on bit patterns, so XLA's
// flush-to-zero mode on its CPU threads does not change any result.
#include "ffi_cpu.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <tuple>
#include <vector>

#include "ffi_common.h"
#include "mxfp4.h"
#include "quantize_args.h"
#include "scale_layout.h"

namespace jax_mxfp4 {
namespace {

uint32_t LoadF32Bits(const void* data, ffi::DataType dtype, int64_t i) {
  switch (dtype) {
    case ffi::DataType::F32: {
      uint32_t b;
      std::memcpy(&b, static_cast<const uint32_t*>(data) + i, 4);
      return b;
    }
    case ffi::DataType::BF16:
      return Bf16BitsToF32Bits(static_cast<const uint16_t*>(data)[i]);
    default:  // F16, checked by the caller
      return F16BitsToF32Bits(static_cast<const uint16_t*>(data)[i]);
  }
}

bool IsFloatInput(ffi::DataType dtype) {
  return dtype == ffi::DataType::F32 || dtype == ffi::DataType::BF16 ||
         dtype == ffi::DataType::F16;
}

// ---------------------------------------------------------------------------
// Quantize: x[..., K] -> packed[..., K/2], scales (linear [..., K/32] or the
// padded swizzled 2-D buffer).

ffi::Error QuantizeImpl(ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::U8>> packed,
                        ffi::Result<ffi::Buffer<ffi::U8>> scales, int32_t scale_layout,
                        int32_t rounding) {
  QuantizeArgs args{};
  ffi::Error bad = CheckQuantizeArgs(x, packed->element_count(), scales->element_count(), scale_layout, rounding, &args);
  if (bad.failure()) return bad;
  const int64_t k = args.k, rows = args.rows;
  const ScaleLayout layout = args.layout;
  const ScaleShape ss = args.scales;
  const int64_t kb_count = k / kBlockSize;
  uint8_t* packed_out = packed->typed_data();
  uint8_t* scales_out = scales->typed_data();
  if (layout == ScaleLayout::kSwizzled128x4) {
    std::memset(scales_out, 0, static_cast<size_t>(ss.rows * ss.cols));
  }
  const void* in = x.untyped_data();
  const ffi::DataType dtype = x.element_type();
  const Rounding mode = args.rounding;
  const InputDType in_type = args.dtype;
  uint32_t bits[kBlockSize];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      const int64_t base = r * k + kb * kBlockSize;
      uint32_t amax = 0;
      for (int i = 0; i < kBlockSize; ++i) {
        bits[i] = LoadF32Bits(in, dtype, base + i);
        amax = std::max(amax, bits[i] & kF32AbsMask);
      }
      const BlockScale scale = ChooseBlockScale(amax, mode, in_type);
      scales_out[ScaleOffset(r, kb, kb_count, layout)] = scale.byte;
      uint8_t* dst = packed_out + base / 2;
      for (int i = 0; i < kBlockSize / 2; ++i) {
        const uint32_t lo = EncodeE2M1(bits[2 * i], scale, mode);
        const uint32_t hi = EncodeE2M1(bits[2 * i + 1], scale, mode);
        dst[i] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// GEMM: y[..., N] = x[..., K] @ dequantize(w)^T, float32 accumulation.

// Cache blocking: a thread owns a chunk of kChunkCols output columns and
// walks K in slices of kSliceK, so the dequantized weight slice
// (kChunkCols x kSliceK floats, 128 KiB) and a 4-row activation tile stay in
// cache while every activation row streams past them. Each output is still
// one float32 sum in K order.
constexpr int64_t kPanelRows = 8;    // weight rows per panel: one 8-wide vector
constexpr int64_t kTileRows = 8;     // activation rows per micro-kernel call: 8 independent
                                     // FMA chains hide the FMA latency
constexpr int64_t kChunkPanels = 8;  // panels per column chunk
constexpr int64_t kChunkCols = kPanelRows * kChunkPanels;
constexpr int64_t kSliceK = 512;     // K per slice (a multiple of 32)

// Exact float value of every (scale byte, code) pair, built once from the
// bit-level DequantizeToF32Bits: dequantizing is then one table lookup per
// element, with subnormal results exact whatever the FPU mode.
struct DequantTable {
  float value[256][16];
  DequantTable() {
    for (int s = 0; s < 256; ++s) {
      for (uint32_t c = 0; c < 16; ++c) {
        const uint32_t b = DequantizeToF32Bits(c, static_cast<uint8_t>(s));
        std::memcpy(&value[s][c], &b, 4);
      }
    }
  }
};

const DequantTable& GetDequantTable() {
  static const DequantTable table;  // thread-safe initialization
  return table;
}

// Dequantizes weight rows [n0, n0 + 8) x k in [k0, k0 + len) into
// panel[len][8] (rows past N are zero).
void DequantizePanel(const uint8_t* w_packed, const uint8_t* w_scales, int64_t n0, int64_t n,
                     int64_t k, int64_t k0, int64_t len, float* panel) {
  const DequantTable& table = GetDequantTable();
  const int64_t kb_count = k / kBlockSize;
  for (int64_t j = 0; j < kPanelRows; ++j) {
    const int64_t row = n0 + j;
    if (row >= n) {
      for (int64_t kk = 0; kk < len; ++kk) panel[kk * kPanelRows + j] = 0.0f;
      continue;
    }
    const uint8_t* packed = w_packed + row * (k / 2) + k0 / 2;
    const uint8_t* scales = w_scales + row * kb_count + k0 / kBlockSize;
    for (int64_t kk = 0; kk < len; kk += 2) {
      const float* lut = table.value[scales[kk / kBlockSize]];
      const uint8_t byte = packed[kk / 2];
      panel[kk * kPanelRows + j] = lut[byte & 0xF];
      panel[(kk + 1) * kPanelRows + j] = lut[byte >> 4];
    }
  }
}

// acc[r][:] += sum_k tile[k][r] * panel[k][:] for `rows` (<= 8) activation
// rows packed as tile[len][8], k in K order (no reassociation); the 8 columns
// are one vector (GCC/Clang vector extension), the 8 rows 8 independent FMA
// chains. On x86-64 GCC compiles it twice, for CPUs with FMA (AVX + FMA3, a
// feature test that AMD and Intel CPUs both pass) and baseline, and picks
// one at load time.
typedef float Vec8 __attribute__((vector_size(kPanelRows * sizeof(float))));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("fma", "default")))
#endif
void MicroKernel(const float* tile, int64_t rows, const float* panel, int64_t len, float* acc,
                 int64_t acc_stride) {
  Vec8 a[kTileRows] = {};
  for (int64_t r = 0; r < rows; ++r) std::memcpy(&a[r], acc + r * acc_stride, sizeof(Vec8));
  for (int64_t kk = 0; kk < len; ++kk) {
    Vec8 w;
    std::memcpy(&w, panel + kk * kPanelRows, sizeof(w));
    const float* xk = tile + kk * kTileRows;
    for (int64_t r = 0; r < kTileRows; ++r) a[r] += xk[r] * w;
  }
  for (int64_t r = 0; r < rows; ++r) std::memcpy(acc + r * acc_stride, &a[r], sizeof(Vec8));
}

// Packs activation rows [r0, r0 + rows) x k in [k0, k0 + len) as tile[len][8]
// (rows past `rows` are zero): one cache line per k for the micro-kernel.
void PackTile(const float* xf, int64_t k, int64_t r0, int64_t rows, int64_t k0, int64_t len, float* tile) {
  for (int64_t kk = 0; kk < len; ++kk) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      tile[kk * kTileRows + r] = r < rows ? xf[(r0 + r) * k + k0 + kk] : 0.0f;
    }
  }
}

void StoreFromF32(float v, void* out, ffi::DataType dtype, int64_t i) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  switch (dtype) {
    case ffi::DataType::F32:
      static_cast<float*>(out)[i] = v;
      break;
    case ffi::DataType::BF16:
      static_cast<uint16_t*>(out)[i] = F32BitsToBf16Bits(b);
      break;
    default:
      static_cast<uint16_t*>(out)[i] = F32BitsToF16Bits(b);
      break;
  }
}

// Computes output column chunks [c0, c1).
void GemmChunks(const float* xf, int64_t m, int64_t k, const uint8_t* w_packed, const uint8_t* w_scales,
                int64_t n, int64_t c0, int64_t c1, void* out, ffi::DataType out_dtype) {
  std::vector<float> slice(static_cast<size_t>(kChunkCols * kSliceK));  // [panel][kSliceK][8]
  std::vector<float> tile(static_cast<size_t>(kTileRows * kSliceK));     // [kSliceK][8]
  std::vector<float> acc(static_cast<size_t>(m * kChunkCols));           // [m][64]
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n0 = c * kChunkCols;
    const int64_t panels = std::min(kChunkPanels, (n - n0 + kPanelRows - 1) / kPanelRows);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k0 = 0; k0 < k; k0 += kSliceK) {
      const int64_t len = std::min(kSliceK, k - k0);
      for (int64_t p = 0; p < panels; ++p) {
        DequantizePanel(w_packed, w_scales, n0 + p * kPanelRows, n, k, k0, len,
                        slice.data() + p * kSliceK * kPanelRows);
      }
      for (int64_t r0 = 0; r0 < m; r0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, m - r0);
        PackTile(xf, k, r0, rows, k0, len, tile.data());
        for (int64_t p = 0; p < panels; ++p) {
          MicroKernel(tile.data(), rows, slice.data() + p * kSliceK * kPanelRows, len,
                      acc.data() + r0 * kChunkCols + p * kPanelRows, kChunkCols);
        }
      }
    }
    const int64_t cols = std::min(kChunkCols, n - n0);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < cols; ++j) StoreFromF32(acc[r * kChunkCols + j], out, out_dtype, r * n + n0 + j);
    }
  }
}

ffi::Error GemmImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> w_packed, ffi::Buffer<ffi::U8> w_scales,
                    ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions();
  const auto pd = w_packed.dimensions();
  const auto sd = w_scales.dimensions();
  if (!IsFloatInput(x.element_type())) {
    return InvalidArgument("gemm: x must be float32, bfloat16 or float16");
  }
  if (y->element_type() != x.element_type()) {
    return InvalidArgument("gemm: y must have the dtype of x");
  }
  if (xd.size() == 0 || pd.size() != 2 || sd.size() != 2) {
    return InvalidArgument("gemm: expected x[..., K], w_packed[N, K/2], w_scales[N, K/32]");
  }
  const int64_t k = xd.back();
  const int64_t m = LeadingRows(xd);
  const int64_t n = pd[0];
  if (k % kBlockSize != 0 || pd[1] != k / 2 || sd[0] != n || sd[1] != k / kBlockSize) {
    return InvalidArgument("gemm: shapes x" + ShapeString(xd) + ", w_packed" + ShapeString(pd) +
                           ", w_scales" + ShapeString(sd) + " do not agree");
  }
  if (static_cast<int64_t>(y->element_count()) != m * n) return InvalidArgument("gemm: y has the wrong size");
  if (m == 0 || n == 0) return ffi::Error::Success();

  GemmCanonicalCpu(x.untyped_data(), x.element_type(), m, k, w_packed.typed_data(), w_scales.typed_data(), n,
                   y->untyped_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// W4A4 GEMM with swizzled_128x4 scales (the operands of the SM100 block-scaled
// GEMM, registered under its target name for the CPU platform):
//   d[..., N] = dequantize(a, a_scales) @ dequantize(b, b_scales)^T, bf16.
// a is dequantized exactly to float32 (every E2M1 * 2^e is a float32, or a
// float32 subnormal floor below 2^-149), then the canonical GEMM runs with
// float32 accumulation and one rounding to bfloat16 (the CUTLASS kernel also
// accumulates in float32 and rounds once).

// Linear [rows, kb_count] copy of the scales of a swizzled buffer.
std::vector<uint8_t> UnswizzleScales(const uint8_t* swizzled, int64_t rows, int64_t kb_count) {
  std::vector<uint8_t> linear(static_cast<size_t>(rows * kb_count));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t kb = 0; kb < kb_count; ++kb) linear[r * kb_count + kb] = swizzled[SwizzledOffset(r, kb, kb_count)];
  return linear;
}

ffi::Error W4A4GemmImpl(ffi::Buffer<ffi::U8> a, ffi::Buffer<ffi::U8> a_scales, ffi::Buffer<ffi::U8> b,
                        ffi::Buffer<ffi::U8> b_scales, ffi::Result<ffi::Buffer<ffi::BF16>> d,
                        ffi::Result<ffi::Buffer<ffi::U8>> workspace) {
  (void)workspace;  // the CUDA kernel's scratch
  const auto ad = a.dimensions();
  const auto bd = b.dimensions();
  if (ad.size() < 1 || bd.size() != 2 || bd[1] != ad.back())
    return InvalidArgument("w4a4_gemm: a" + ShapeString(ad) + " and b" + ShapeString(bd) +
                           " must be packed MXFP4 [..., K/2] and [N, K/2] with the same K");
  const int64_t k = 2 * ad.back(), m = LeadingRows(ad), n = bd[0];
  if (k % kBlockSize) return InvalidArgument("w4a4_gemm: K = " + std::to_string(k) + " is not a multiple of 32");
  const int64_t kb_count = k / kBlockSize;
  for (const auto& [buf, rows, name] : {std::tuple{&a_scales, m, "a_scales"}, std::tuple{&b_scales, n, "b_scales"}}) {
    const ScaleShape want = GetScaleShape(rows, k, ScaleLayout::kSwizzled128x4);
    const auto sd = buf->dimensions();
    if (sd.size() != 2 || sd[0] != want.rows || sd[1] != want.cols)
      return InvalidArgument(std::string("w4a4_gemm: ") + name + " has shape " + ShapeString(sd) +
                             ", expected the padded swizzled buffer [" + std::to_string(want.rows) + ", " +
                             std::to_string(want.cols) + "]");
  }
  if (static_cast<int64_t>(d->element_count()) != m * n) return InvalidArgument("w4a4_gemm: d has the wrong size");
  if (m == 0 || n == 0) return ffi::Error::Success();

  const std::vector<uint8_t> a_lin = UnswizzleScales(a_scales.typed_data(), m, kb_count);
  const std::vector<uint8_t> b_lin = UnswizzleScales(b_scales.typed_data(), n, kb_count);
  std::vector<uint32_t> a_f32(static_cast<size_t>(m * k));
  const uint8_t* ap = a.typed_data();
  for (int64_t i = 0; i < m * k; ++i) {
    const uint32_t code = (ap[i / 2] >> (4 * (i % 2))) & 0xFu;
    a_f32[i] = DequantizeToF32Bits(code, a_lin[(i / k) * kb_count + (i % k) / kBlockSize]);
  }
  std::vector<float> out(static_cast<size_t>(m * n));
  GemmCanonicalCpu(a_f32.data(), ffi::DataType::F32, m, k, b.typed_data(), b_lin.data(), n, out.data());
  uint16_t* dp = reinterpret_cast<uint16_t*>(d->typed_data());
  for (int64_t i = 0; i < m * n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &out[i], 4);
    dp[i] = F32BitsToBf16Bits(bits);
  }
  return ffi::Error::Success();
}

}  // namespace

void GemmCanonicalCpu(const void* x, ffi::DataType x_dtype, int64_t m, int64_t k, const uint8_t* w_packed,
                      const uint8_t* w_scales, int64_t n, void* y) {
  if (m == 0 || n == 0) return;
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) {
    const uint32_t b = LoadF32Bits(x, x_dtype, i);
    std::memcpy(&xf[i], &b, 4);
  }
  // Column chunks are independent: split them over a few threads when the
  // problem is large enough to pay for starting them (~2^22 multiply-adds
  // each); results do not depend on the split.
  const int64_t chunks = (n + kChunkCols - 1) / kChunkCols;
  const int64_t work = m * n * k;
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = std::max<int64_t>(1, std::min({hw, chunks, work >> 22}));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) {
    pool.emplace_back(GemmChunks, xf.data(), m, k, w_packed, w_scales, n,
                      chunks * t / threads, chunks * (t + 1) / threads, y, x_dtype);
  }
  GemmChunks(xf.data(), m, k, w_packed, w_scales, n, 0, chunks / threads, y, x_dtype);
  for (auto& th : pool) th.join();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp4QuantizeCpu, QuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // x: f32/bf16/f16 [..., K]
                                  .Ret<ffi::Buffer<ffi::U8>>()    // packed: [..., K/2]
                                  .Ret<ffi::Buffer<ffi::U8>>()    // scales: linear or swizzled
                                  .Attr<int32_t>("scale_layout")  // ScaleLayout
                                  .Attr<int32_t>("rounding"));    // Rounding

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp4GemmCpu, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()        // x: f32/bf16/f16 [..., K]
                                  .Arg<ffi::Buffer<ffi::U8>>()  // w_packed: [N, K/2]
                                  .Arg<ffi::Buffer<ffi::U8>>()  // w_scales: [N, K/32] linear
                                  .Ret<ffi::AnyBuffer>());      // y: x's dtype [..., N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp4W4A4GemmCpu, W4A4GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()    // a: E2M1 packed [..., K/2]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // a_scales: swizzled [RoundUp(M,128), RoundUp(K/32,4)]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // b: E2M1 packed [N, K/2]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // b_scales: swizzled [RoundUp(N,128), RoundUp(K/32,4)]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // d: bf16 [..., N]
                                  .Ret<ffi::Buffer<ffi::U8>>());  // workspace (CUDA only; unused here)

}  // namespace jax_mxfp4
