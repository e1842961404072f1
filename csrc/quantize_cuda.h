// CUDA activation quantization (quantize.cu), registered by module.cc.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_mxfp4 {

// jax_mxfp4_quantize on the CUDA platform.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4QuantizeCuda);

}  // namespace jax_mxfp4
