// CPU custom-call handlers (ffi_cpu.cc), registered by module.cc.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_mxfp4 {

// jax_mxfp4_quantize on the CPU platform.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4QuantizeCpu);
// jax_mxfp4_gemm on the CPU platform (linear-scale W4A16 GEMM).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4GemmCpu);

}  // namespace jax_mxfp4
