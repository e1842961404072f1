// CPU handlers of the two Marlin custom calls (jax_mxfp4_marlin_gemm,
// jax_mxfp4_marlin_dequantize): the same operands, results and attributes as
// the CUDA handlers in marlin_ffi.cc, so a program holding Marlin-prepared
// weights also compiles and runs on CPU devices (tests, and the partitioning
// rules of both primitives on host-device meshes).
//
// Both first turn the prepared layout back into the canonical one
// (UnprepareHost, marlin_layout.h), then
//   * dequantize: w = E2M1(code) * 2^(s - 127) rounded once to the prepared
//     dtype: the CUDA kernel's values, bit for bit (both are
//     formats.dequantize_codes of unprepare_marlin_weights);
//   * GEMM: the canonical CPU GEMM (GemmCanonicalCpu, ffi_cpu.cc): float32
//     accumulation, one rounding to x's dtype. It differs from the CUDA kernel
//     only by the float32 summation order (within reference.matmul_tolerance)
//     and, for blocks the layout's accuracy contract flushes (more than 2^133
//     resp. 2^24 below their row's largest scale), by using 2^-127 * E2M1
//     where the kernel uses 0.
// The sm_count and use_wgmma attributes and the workspace result exist for
// the CUDA launch plan; here they are accepted and unused.
#include "marlin_cpu.h"

#include <cstring>
#include <string>
#include <vector>

#include "../ffi_common.h"
#include "../ffi_cpu.h"
#include "../mxfp4.h"
#include "marlin_ffi_checks.h"
#include "marlin_layout.h"

namespace jax_mxfp4 {
namespace marlin {
namespace {

// Canonical weights recovered from the prepared operands (shapes checked).
struct Canonical {
  std::vector<uint8_t> packed, scales;
};

ffi::Error Unprepare(const std::string& op, const ffi::Buffer<ffi::U8>& tiles, const ffi::Buffer<ffi::U8>& scales,
                     int64_t n, int64_t k, InputDType dt, Canonical* out) {
  if (n <= 0 || k <= 0 || k % kBlockK)
    return InvalidArgument(op + ": N = " + std::to_string(n) + ", K = " + std::to_string(k) +
                           ": need N > 0 and K a positive multiple of 32");
  if (ffi::Error bad = CheckPreparedShapes(op, tiles, scales, n, k); bad.failure()) return bad;
  out->packed.resize(static_cast<size_t>(n * (k / 2)));
  out->scales.resize(static_cast<size_t>(n * (k / kBlockK)));
  UnprepareHost(tiles.typed_data(), scales.typed_data(), n, k, dt, out->packed.data(), out->scales.data());
  return ffi::Error::Success();
}

ffi::Error PreparedDType(const std::string& op, int32_t dtype, InputDType* dt) {
  if (dtype != static_cast<int32_t>(InputDType::kBF16) && dtype != static_cast<int32_t>(InputDType::kF16))
    return InvalidArgument(op + ": dtype code " + std::to_string(dtype) +
                           " is not bfloat16 or float16 (prepared Marlin weights are one of the two)");
  *dt = static_cast<InputDType>(dtype);
  return ffi::Error::Success();
}

ffi::DataType FfiType(InputDType dt) { return dt == InputDType::kBF16 ? ffi::DataType::BF16 : ffi::DataType::F16; }

ffi::Error MarlinGemmCpuImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> tiles, ffi::Buffer<ffi::U8> scales,
                             ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t n,
                             int64_t k, int32_t dtype, int64_t sm_count, int32_t use_wgmma) {
  (void)workspace;
  (void)sm_count;
  (void)use_wgmma;
  InputDType dt;
  if (ffi::Error bad = PreparedDType("marlin_gemm", dtype, &dt); bad.failure()) return bad;
  if (x.element_type() != FfiType(dt))
    return InvalidArgument("marlin_gemm: x's dtype is not the one the weights were prepared for (dtype code " +
                           std::to_string(dtype) + "); prepare them with activation_dtype=x.dtype");
  if (y->element_type() != x.element_type()) return InvalidArgument("marlin_gemm: y must have x's dtype");
  const auto x_dims = x.dimensions();
  if (x_dims.size() < 1 || x_dims.back() != k)
    return InvalidArgument("marlin_gemm: x has shape " + ShapeString(x_dims) + ", expected [..., " +
                           std::to_string(k) + "]");
  const int64_t m = LeadingRows(x_dims);
  if (static_cast<int64_t>(y->element_count()) != m * n)
    return InvalidArgument("marlin_gemm: y has shape " + ShapeString(y->dimensions()) +
                           ", expected x's leading dims + [" + std::to_string(n) + "]");
  Canonical w;
  if (ffi::Error bad = Unprepare("marlin_gemm", tiles, scales, n, k, dt, &w); bad.failure()) return bad;
  GemmCanonicalCpu(x.untyped_data(), x.element_type(), m, k, w.packed.data(), w.scales.data(), n, y->untyped_data());
  return ffi::Error::Success();
}

ffi::Error MarlinDequantizeCpuImpl(ffi::Buffer<ffi::U8> tiles, ffi::Buffer<ffi::U8> scales,
                                   ffi::Result<ffi::AnyBuffer> w, int64_t n, int64_t k, int32_t dtype) {
  InputDType dt;
  if (ffi::Error bad = PreparedDType("marlin_dequantize", dtype, &dt); bad.failure()) return bad;
  if (w->element_type() != FfiType(dt)) return InvalidArgument("marlin_dequantize: w must have the prepared dtype");
  const auto w_dims = w->dimensions();
  if (w_dims.size() != 2 || w_dims[0] != n || w_dims[1] != k)
    return InvalidArgument("marlin_dequantize: w has shape " + ShapeString(w_dims) + ", expected [" +
                           std::to_string(n) + ", " + std::to_string(k) + "]");
  Canonical c;
  if (ffi::Error bad = Unprepare("marlin_dequantize", tiles, scales, n, k, dt, &c); bad.failure()) return bad;
  uint16_t* out = reinterpret_cast<uint16_t*>(w->untyped_data());
  const int64_t kb_count = k / kBlockK;
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t col = 0; col < k; ++col) {
      const uint32_t code = (c.packed[row * (k / 2) + col / 2] >> (4 * (col % 2))) & 0xFu;
      const uint32_t bits = DequantizeToF32Bits(code, c.scales[row * kb_count + col / kBlockK]);
      out[row * k + col] = dt == InputDType::kBF16 ? F32BitsToBf16Bits(bits) : F32BitsToF16Bits(bits);
    }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace marlin

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp4MarlinGemmCpu, marlin::MarlinGemmCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()        // x: [..., K] bf16 / f16
                                  .Arg<ffi::Buffer<ffi::U8>>()  // tiles: [K/32, N_pad*16]
                                  .Arg<ffi::Buffer<ffi::U8>>()  // scales: [K/32+4, N_pad]
                                  .Ret<ffi::AnyBuffer>()        // y: [..., N], x's dtype
                                  .Ret<ffi::Buffer<ffi::U8>>()  // workspace (CUDA only; unused here)
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int32_t>("dtype")
                                  .Attr<int64_t>("sm_count")
                                  .Attr<int32_t>("use_wgmma"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp4MarlinDequantizeCpu, marlin::MarlinDequantizeCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()  // tiles: [K/32, N_pad*16]
                                  .Arg<ffi::Buffer<ffi::U8>>()  // scales: [K/32+4, N_pad]
                                  .Ret<ffi::AnyBuffer>()        // w: [N, K], the prepared dtype
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int32_t>("dtype"));

}  // namespace jax_mxfp4
