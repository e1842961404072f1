// CPU handlers of the Marlin custom calls (marlin_cpu.cc), registered by
// module.cc for the CPU platform under the CUDA handlers' target names.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_mxfp4 {

// jax_mxfp4_marlin_gemm on the CPU platform.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4MarlinGemmCpu);
// jax_mxfp4_marlin_dequantize on the CPU platform.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4MarlinDequantizeCpu);

}  // namespace jax_mxfp4
