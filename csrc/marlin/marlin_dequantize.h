// Dense dequantization of Marlin-prepared MXFP4 weights (marlin_dequantize.cu):
//   W[N, K] (bf16 or fp16, row-major) = dequantize(tiles, scales)
// for the layout of marlin_layout.h; the XLA FFI handler is
// MarlinDequantizeFfi (marlin_ffi.cc): Arg tiles, Arg scales, Ret w [N, K],
// attributes n, k, dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../mxfp4.h"

namespace jax_mxfp4 {
namespace marlin {

struct MarlinDequantizeArgs {
  const uint8_t* tiles;   // uint8[k/32, N_pad * 16]
  const uint8_t* scales;  // uint8[k/32 + 4, N_pad]
  void* w;                // [n, k] output, dtype `dtype`, 16-byte aligned
  int64_t n, k;           // true sizes; k % 32 == 0
  InputDType dtype;       // kBF16 or kF16: the dtype the weights were prepared for and w's dtype
};

// Enqueue the dequantization on `stream` (asynchronous, no allocation).
// Returns "" or an error message.
std::string MarlinDequantize(const MarlinDequantizeArgs& args, cudaStream_t stream);

}  // namespace marlin
}  // namespace jax_mxfp4

struct XLA_FFI_Error;
struct XLA_FFI_CallFrame;
extern "C" XLA_FFI_Error* MarlinDequantizeFfi(XLA_FFI_CallFrame* call_frame);
