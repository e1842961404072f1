// CPU handlers for the quantize and GEMM custom calls.
//
// Real loops over the data (not a call back into XLA): they make the package
// usable on machines without a GPU and are tested bit for bit (quantize) and
// within jax_mxfp4.reference.matmul_tolerance (GEMM) against the reference.
// All element math comes from mxfp4.h and works on bit patterns, so XLA's
// flush-to-zero mode on its CPU threads does not change any result.
#include "ffi_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "ffi_common.h"
#include "mxfp4.h"
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
  const auto dims = x.dimensions();
  if (dims.size() == 0) return InvalidArgument("quantize: x must have at least one dimension");
  if (!IsFloatInput(x.element_type())) {
    return InvalidArgument("quantize: x must be float32, bfloat16 or float16");
  }
  if (scale_layout != static_cast<int32_t>(ScaleLayout::kLinear) &&
      scale_layout != static_cast<int32_t>(ScaleLayout::kSwizzled128x4)) {
    return InvalidArgument("quantize: unknown scale_layout " + std::to_string(scale_layout));
  }
  if (rounding < 0 || rounding > static_cast<int32_t>(Rounding::kCompressedTensors)) {
    return InvalidArgument("quantize: unknown rounding " + std::to_string(rounding));
  }
  const int64_t k = dims.back();
  const int64_t rows = LeadingRows(dims);
  if (k % kBlockSize != 0) {
    return InvalidArgument("quantize: K must be a multiple of 32, x has shape " + ShapeString(dims));
  }
  const auto layout = static_cast<ScaleLayout>(scale_layout);
  const ScaleShape ss = GetScaleShape(rows, k, layout);
  if (static_cast<int64_t>(packed->element_count()) != rows * (k / 2) ||
      static_cast<int64_t>(scales->element_count()) != ss.rows * ss.cols) {
    return InvalidArgument("quantize: output sizes do not match x of shape " + ShapeString(dims));
  }
  const int64_t kb_count = k / kBlockSize;
  uint8_t* packed_out = packed->typed_data();
  uint8_t* scales_out = scales->typed_data();
  if (layout == ScaleLayout::kSwizzled128x4) {
    std::memset(scales_out, 0, static_cast<size_t>(ss.rows * ss.cols));
  }
  const void* in = x.untyped_data();
  const ffi::DataType dtype = x.element_type();
  const auto mode = static_cast<Rounding>(rounding);
  const InputDType in_type = dtype == ffi::DataType::F32    ? InputDType::kF32
                             : dtype == ffi::DataType::BF16 ? InputDType::kBF16
                                                            : InputDType::kF16;
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

constexpr int64_t kRowsPerPanel = 8;  // weight rows dequantized together

void DequantizeRowsTransposed(const uint8_t* w_packed, const uint8_t* w_scales, int64_t n0,
                              int64_t n_count, int64_t k, float* panel /* [k][8] */) {
  const int64_t kb_count = k / kBlockSize;
  for (int64_t j = 0; j < kRowsPerPanel; ++j) {
    for (int64_t kk = 0; kk < k; ++kk) {
      float v = 0.0f;
      if (j < n_count) {
        const int64_t n = n0 + j;
        const uint8_t byte = w_packed[n * (k / 2) + kk / 2];
        const uint32_t code = (kk & 1) ? (byte >> 4) : (byte & 0xF);
        const uint32_t b = DequantizeToF32Bits(code, w_scales[n * kb_count + kk / kBlockSize]);
        std::memcpy(&v, &b, 4);
      }
      panel[kk * kRowsPerPanel + j] = v;
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

  std::vector<float> xf(static_cast<size_t>(m * k));
  const void* xin = x.untyped_data();
  for (int64_t i = 0; i < m * k; ++i) {
    const uint32_t b = LoadF32Bits(xin, x.element_type(), i);
    std::memcpy(&xf[i], &b, 4);
  }
  std::vector<float> panel(static_cast<size_t>(k * kRowsPerPanel));
  void* out = y->untyped_data();
  for (int64_t n0 = 0; n0 < n; n0 += kRowsPerPanel) {
    const int64_t n_count = std::min(kRowsPerPanel, n - n0);
    DequantizeRowsTransposed(w_packed.typed_data(), w_scales.typed_data(), n0, n_count, k,
                             panel.data());
    for (int64_t r = 0; r < m; ++r) {
      // Eight independent float32 sums, each in K order: vectorizes without
      // reassociating any single sum.
      float acc[kRowsPerPanel] = {};
      const float* xr = xf.data() + r * k;
      for (int64_t kk = 0; kk < k; ++kk) {
        const float xv = xr[kk];
        const float* wp = panel.data() + kk * kRowsPerPanel;
        for (int j = 0; j < kRowsPerPanel; ++j) acc[j] += xv * wp[j];
      }
      for (int64_t j = 0; j < n_count; ++j) StoreFromF32(acc[j], out, y->element_type(), r * n + n0 + j);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

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

}  // namespace jax_mxfp4
