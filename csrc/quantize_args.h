// Argument checks shared by the two quantize handlers (ffi_cpu.cc, quantize.cu):
// x[..., K] float32/bfloat16/float16 with K % 32 == 0, a known layout and
// rounding, and outputs of the sizes abstract evaluation gives them.
#pragma once

#include <cstdint>
#include <string>

#include "ffi_common.h"
#include "mxfp4.h"
#include "scale_layout.h"

namespace jax_mxfp4 {

struct QuantizeArgs {
  int64_t rows;       // product of x's leading dimensions
  int64_t k;          // x's last dimension
  ScaleLayout layout;
  Rounding rounding;
  InputDType dtype;
  ScaleShape scales;  // shape of the scale buffer for `layout`
};

inline ffi::Error CheckQuantizeArgs(const ffi::AnyBuffer& x, size_t packed_count, size_t scales_count,
                                    int32_t scale_layout, int32_t rounding, QuantizeArgs* out) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return InvalidArgument("quantize: x must have at least one dimension");
  switch (x.element_type()) {
    case ffi::DataType::F32: out->dtype = InputDType::kF32; break;
    case ffi::DataType::BF16: out->dtype = InputDType::kBF16; break;
    case ffi::DataType::F16: out->dtype = InputDType::kF16; break;
    default: return InvalidArgument("quantize: x must be float32, bfloat16 or float16");
  }
  if (scale_layout != static_cast<int32_t>(ScaleLayout::kLinear) &&
      scale_layout != static_cast<int32_t>(ScaleLayout::kSwizzled128x4)) {
    return InvalidArgument("quantize: unknown scale_layout " + std::to_string(scale_layout));
  }
  if (rounding < 0 || rounding > static_cast<int32_t>(Rounding::kCompressedTensors)) {
    return InvalidArgument("quantize: unknown rounding " + std::to_string(rounding));
  }
  out->k = dims.back();
  out->rows = LeadingRows(dims);
  if (out->k % kBlockSize != 0) {
    return InvalidArgument("quantize: K must be a multiple of 32, x has shape " + ShapeString(dims));
  }
  out->layout = static_cast<ScaleLayout>(scale_layout);
  out->rounding = static_cast<Rounding>(rounding);
  out->scales = GetScaleShape(out->rows, out->k, out->layout);
  if (static_cast<int64_t>(packed_count) != out->rows * (out->k / 2) ||
      static_cast<int64_t>(scales_count) != out->scales.rows * out->scales.cols) {
    return InvalidArgument("quantize: output sizes do not match x of shape " + ShapeString(dims));
  }
  return ffi::Error::Success();
}

}  // namespace jax_mxfp4
