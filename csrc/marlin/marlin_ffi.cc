// XLA FFI handler for the Marlin MXFP4 W4A16 GEMM (marlin_gemm.cu).
//
// Python side (trace time), for x[..., K] and a weight prepared by
// jax_mxfp4.kernels.marlin_weights.prepare_marlin_weights:
//   ws = MarlinWorkspaceBytes(M, N, K, sm_count, use_wgmma)   # M = prod(x.shape[:-1])
//   y, _ = jax.ffi.ffi_call("jax_mxfp4_marlin_gemm",
//            (ShapeDtypeStruct(x.shape[:-1] + (N,), x.dtype),
//             ShapeDtypeStruct((max(ws, 0),), uint8)))(
//            x, tiles, scales, n=N, k=K, dtype=InputDType, sm_count=sm_count,
//            use_wgmma=0|1)
// The handler recomputes the launch plan from (M, N, K, sm_count, use_wgmma); passing the
// same sm_count the workspace was sized with keeps the two consistent (any
// sm_count >= 1 is correct, the device's own is fastest; 0 = use the device's).
//
// Graph-safe (no host synchronization, no allocation, only stream-ordered
// work: the GEMM kernel and at most one more), hence CmdBufferCompatible.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../ffi_common.h"
#include "marlin_dequantize.h"
#include "marlin_ffi_checks.h"
#include "marlin_gemm.h"
#include "marlin_layout.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mxfp4 {
namespace marlin {
namespace {

ffi::Error MarlinGemmImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> tiles,
                          ffi::Buffer<ffi::U8> scales, ffi::Result<ffi::AnyBuffer> y,
                          ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t n, int64_t k,
                          int32_t dtype, int64_t sm_count, int32_t use_wgmma) {
  // ---- dtypes ----
  const ffi::DataType xt = x.element_type();
  if (xt != ffi::DataType::BF16 && xt != ffi::DataType::F16)
    return InvalidArgument("marlin_gemm: x must be bfloat16 or float16 (W4A16 kernel)");
  const InputDType x_dtype = xt == ffi::DataType::BF16 ? InputDType::kBF16 : InputDType::kF16;
  if (dtype != static_cast<int32_t>(x_dtype))
    return InvalidArgument("marlin_gemm: the weights were prepared for dtype code " +
                           std::to_string(dtype) + " but x has dtype code " +
                           std::to_string(static_cast<int32_t>(x_dtype)) +
                           " (prepare_marlin_weights(..., dtype=x.dtype))");
  if (y->element_type() != xt) return InvalidArgument("marlin_gemm: y must have x's dtype");

  // ---- shapes ----
  const std::string why = MarlinCanImplement(n, k);
  if (!why.empty()) return InvalidArgument("marlin_gemm: " + why);
  const auto x_dims = x.dimensions();
  if (x_dims.size() < 1 || x_dims.back() != k)
    return InvalidArgument("marlin_gemm: x has shape " + ShapeString(x_dims) + ", expected [..., " +
                           std::to_string(k) + "]");
  const int64_t m = LeadingRows(x_dims);
  const auto y_dims = y->dimensions();
  bool y_ok = y_dims.size() == x_dims.size() && y_dims.back() == n;
  for (size_t i = 0; y_ok && i + 1 < x_dims.size(); ++i) y_ok = y_dims[i] == x_dims[i];
  if (!y_ok)
    return InvalidArgument("marlin_gemm: y has shape " + ShapeString(y_dims) + ", expected x's leading dims + [" +
                           std::to_string(n) + "]");
  if (ffi::Error bad = CheckPreparedShapes("marlin_gemm", tiles, scales, n, k); bad.failure()) return bad;
  if (m == 0) return ffi::Error::Success();

  // ---- workspace ----
  int sms = static_cast<int>(sm_count);
  if (sms <= 0) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return ffi::Error::Internal("marlin_gemm: cudaGetDevice failed");
    sms = MarlinDeviceSmCount(device);  // cached per device
    if (sms <= 0) return ffi::Error::Internal("marlin_gemm: cannot query the SM count");
  }
  const int64_t need = MarlinWorkspaceBytes(m, n, k, sms, use_wgmma != 0);
  if (need < 0) return InvalidArgument("marlin_gemm: no launch plan for M = " + std::to_string(m));
  const int64_t have = static_cast<int64_t>(workspace->element_count());
  if (have < need)
    return InvalidArgument("marlin_gemm: workspace has " + std::to_string(have) + " bytes, needs " +
                           std::to_string(need) + " (MarlinWorkspaceBytes(" + std::to_string(m) + ", " +
                           std::to_string(n) + ", " + std::to_string(k) + ", " + std::to_string(sms) + ", " +
                           std::to_string(use_wgmma) + "))");

  MarlinGemmArgs args{};
  args.a = x.untyped_data();
  args.tiles = tiles.typed_data();
  args.scales = scales.typed_data();
  args.c = y->untyped_data();
  args.workspace = workspace->typed_data();
  args.workspace_bytes = have;
  args.m = m, args.n = n, args.k = k;
  args.dtype = x_dtype;
  args.sm_count = sms;
  args.use_wgmma = use_wgmma != 0;  // MarlinGemm refuses it on a device other than 9.0
  const std::string err = MarlinGemm(args, stream);  // checks cudaGetLastError after the launch
  if (!err.empty()) return ffi::Error::Internal(err);
  return ffi::Error::Success();
}

// w[N, K] = dequantize(tiles, scales) in the dtype the weights were prepared for.
ffi::Error MarlinDequantizeImpl(cudaStream_t stream, ffi::Buffer<ffi::U8> tiles, ffi::Buffer<ffi::U8> scales,
                                ffi::Result<ffi::AnyBuffer> w, int64_t n, int64_t k, int32_t dtype) {
  if (dtype != static_cast<int32_t>(InputDType::kBF16) && dtype != static_cast<int32_t>(InputDType::kF16))
    return InvalidArgument("marlin_dequantize: dtype code " + std::to_string(dtype) +
                           " is not bfloat16 or float16 (prepared Marlin weights are one of the two)");
  const InputDType dt = static_cast<InputDType>(dtype);
  const ffi::DataType want = dt == InputDType::kBF16 ? ffi::DataType::BF16 : ffi::DataType::F16;
  if (w->element_type() != want) return InvalidArgument("marlin_dequantize: w must have the prepared dtype");
  if (n <= 0 || k <= 0 || k % kBlockK)
    return InvalidArgument("marlin_dequantize: N = " + std::to_string(n) + ", K = " + std::to_string(k) +
                           ": need N > 0 and K a positive multiple of 32");
  if (ffi::Error bad = CheckPreparedShapes("marlin_dequantize", tiles, scales, n, k); bad.failure()) return bad;
  const auto w_dims = w->dimensions();
  if (w_dims.size() != 2 || w_dims[0] != n || w_dims[1] != k)
    return InvalidArgument("marlin_dequantize: w has shape " + ShapeString(w_dims) + ", expected [" +
                           std::to_string(n) + ", " + std::to_string(k) + "]");
  MarlinDequantizeArgs args{tiles.typed_data(), scales.typed_data(), w->untyped_data(), n, k, dt};
  const std::string err = MarlinDequantize(args, stream);
  if (!err.empty()) return ffi::Error::Internal(err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace marlin
}  // namespace jax_mxfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinMxfp4GemmFfi, jax_mxfp4::marlin::MarlinGemmImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream
                                  .Arg<xla::ffi::AnyBuffer>()           // x: [..., K] bf16 / f16
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()  // tiles: [K/32, N_pad*16]
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()  // scales: [K/32+4, N_pad]
                                  .Ret<xla::ffi::AnyBuffer>()           // y: [..., N], x's dtype
                                  .Ret<xla::ffi::Buffer<xla::ffi::U8>>()  // workspace: [W] scratch
                                  .Attr<int64_t>("n")                   // true N (output features)
                                  .Attr<int64_t>("k")                   // true K (inputs), % 32 == 0
                                  .Attr<int32_t>("dtype")               // InputDType the weights were prepared for
                                  .Attr<int64_t>("sm_count")            // as given to MarlinWorkspaceBytes; 0 = device's
                                  .Attr<int32_t>("use_wgmma"),          // 1: Hopper wgmma configs for M > 32
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinDequantizeFfi, jax_mxfp4::marlin::MarlinDequantizeImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()  // tiles: [K/32, N_pad*16]
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()  // scales: [K/32+4, N_pad]
                                  .Ret<xla::ffi::AnyBuffer>()           // w: [N, K], the prepared dtype
                                  .Attr<int64_t>("n")                   // true N (output features)
                                  .Attr<int64_t>("k")                   // true K (inputs), % 32 == 0
                                  .Attr<int32_t>("dtype"),              // InputDType the weights were prepared for
                              {xla::ffi::Traits::kCmdBufferCompatible});
