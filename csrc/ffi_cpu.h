// CPU custom-call handlers (ffi_cpu.cc), registered by module.cc, and the
// canonical-layout CPU GEMM they share with the Marlin CPU handlers
// (marlin/marlin_cpu.cc).
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace jax_mxfp4 {

// jax_mxfp4_quantize on the CPU platform.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4QuantizeCpu);
// jax_mxfp4_gemm on the CPU platform (linear-scale W4A16 GEMM).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4GemmCpu);
// jax_mxfp4_sm100_w4a4_gemm on the CPU platform (W4A4, swizzled_128x4 scales).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4W4A4GemmCpu);

// y[m, n] = x[m, k] @ dequantize(w_packed, w_scales)^T on the host: canonical
// weights (uint8[n, k/2] codes, linear uint8[n, k/32] scales), x and y of
// dtype x_dtype (F32, BF16 or F16), float32 accumulation in K order, one
// rounding to x_dtype. Shapes are the caller's to check. Multithreaded for
// large problems; the result does not depend on the thread count.
void GemmCanonicalCpu(const void* x, xla::ffi::DataType x_dtype, int64_t m, int64_t k, const uint8_t* w_packed,
                      const uint8_t* w_scales, int64_t n, void* y);

}  // namespace jax_mxfp4
