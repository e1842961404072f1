// The nanobind extension jax_mxfp4._ext: custom-call handler capsules, the
// shape functions mirrored from layout.py (so tests can check the C++ and
// Python copies agree), and CUDA build/device queries.
//
// Target names live here and nowhere else in C++; jax_mxfp4/_native.py reads
// them from registrations() and the primitives look them up there, so a
// misspelt target is an error at import, not a missing custom call at run time.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <utility>

#include "ffi_cpu.h"
#include "marlin/marlin_cpu.h"
#include "scale_layout.h"

#if JAX_MXFP4_WITH_CUDA
#include <cuda_runtime_api.h>

#include "marlin/marlin_dequantize.h"
#include "marlin/marlin_gemm.h"
#include "quantize_cuda.h"
#endif
#if JAX_MXFP4_WITH_SM100
#include "sm100/w4a4_gemm.h"
#endif
#if JAX_MXFP4_WITH_SM100_LAYOUT
#include "sm100/scale_layout_cutlass.h"
#endif

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule Capsule(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an XLA FFI handler must take XLA_FFI_CallFrame*");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict Registrations() {
  nb::dict cpu;
  cpu["jax_mxfp4_quantize"] = Capsule(jax_mxfp4::JaxMxfp4QuantizeCpu);
  cpu["jax_mxfp4_gemm"] = Capsule(jax_mxfp4::JaxMxfp4GemmCpu);
  cpu["jax_mxfp4_marlin_gemm"] = Capsule(jax_mxfp4::JaxMxfp4MarlinGemmCpu);
  cpu["jax_mxfp4_marlin_dequantize"] = Capsule(jax_mxfp4::JaxMxfp4MarlinDequantizeCpu);
  cpu["jax_mxfp4_sm100_w4a4_gemm"] = Capsule(jax_mxfp4::JaxMxfp4W4A4GemmCpu);
  nb::dict out;
  out["cpu"] = cpu;
#if JAX_MXFP4_WITH_CUDA
  nb::dict cuda;
  cuda["jax_mxfp4_quantize"] = Capsule(jax_mxfp4::JaxMxfp4QuantizeCuda);
  cuda["jax_mxfp4_marlin_gemm"] = Capsule(MarlinMxfp4GemmFfi);
  cuda["jax_mxfp4_marlin_dequantize"] = Capsule(MarlinDequantizeFfi);
#if JAX_MXFP4_WITH_SM100
  cuda["jax_mxfp4_sm100_w4a4_gemm"] = Capsule(jax_mxfp4::JaxMxfp4W4A4GemmSm100);
#endif
  out["CUDA"] = cuda;
#endif
  return out;
}

// (major, minor) of CUDA device `ordinal`, or (0, 0) when there is none or
// the extension was built without CUDA.
std::pair<int, int> CudaComputeCapability(int ordinal) {
#if JAX_MXFP4_WITH_CUDA
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, ordinal) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, ordinal) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are unaffected
    return {0, 0};
  }
  return {major, minor};
#else
  (void)ordinal;
  return {0, 0};
#endif
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "jax_mxfp4 native extension: XLA FFI handlers and layout helpers";
  m.def("registrations", &Registrations,
        "{platform: {target_name: PyCapsule}} for jax.ffi.register_ffi_target");
  m.def(
      "scale_shape",
      [](int64_t rows, int64_t k, int layout) {
        auto s = jax_mxfp4::GetScaleShape(rows, k, static_cast<jax_mxfp4::ScaleLayout>(layout));
        return std::make_pair(s.rows, s.cols);
      },
      nb::arg("rows"), nb::arg("k"), nb::arg("layout"),
      "C++ mirror of jax_mxfp4.layout.scale_shape (layout as its int value)");
  m.def("swizzled_offset", &jax_mxfp4::SwizzledOffset, nb::arg("row"), nb::arg("kb"),
        nb::arg("kb_count"), "C++ mirror of jax_mxfp4.layout.swizzled_offset");
  m.def(
      "cuda_enabled", [] { return static_cast<bool>(JAX_MXFP4_WITH_CUDA); },
      "whether the CUDA kernels were compiled into this build");
  m.def("cuda_compute_capability", &CudaComputeCapability, nb::arg("ordinal"));

#if JAX_MXFP4_WITH_CUDA
  namespace marlin = jax_mxfp4::marlin;
  m.def("marlin_can_implement", &marlin::MarlinCanImplement, nb::arg("n"), nb::arg("k"),
        "'' when the Marlin W4A16 GEMM can run an [N, K] weight, else the reason");
  m.def(
      "marlin_workspace_bytes",
      [](int64_t m, int64_t n, int64_t k, int sm_count, bool use_wgmma) {
        return marlin::MarlinWorkspaceBytes(m, n, k, sm_count, use_wgmma);
      },
      nb::arg("m"), nb::arg("n"), nb::arg("k"), nb::arg("sm_count"), nb::arg("use_wgmma"),
      "bytes of the Marlin GEMM's workspace result (-1: unsupported shape)");
  m.def("marlin_device_sm_count", &marlin::MarlinDeviceSmCount, nb::arg("device"),
        "SM count of CUDA device `device` (0 if the query fails)");
  m.def(
      "marlin_describe_plan",
      [](int64_t m, int64_t n, int64_t k, int sm_count, bool use_wgmma) {
        return marlin::MarlinDescribePlan(m, n, k, sm_count, use_wgmma);
      },
      nb::arg("m"), nb::arg("n"), nb::arg("k"), nb::arg("sm_count"), nb::arg("use_wgmma"));
#endif

  m.attr("has_sm100_gemm") = static_cast<bool>(JAX_MXFP4_WITH_SM100);
#if JAX_MXFP4_WITH_SM100
  m.def("sm100_w4a4_can_implement", &jax_mxfp4::Sm100W4A4CanImplement, nb::arg("m"), nb::arg("n"),
        nb::arg("k"), "(ok, reason) for the SM100 W4A4 GEMM on an (M, N, K) problem");
  m.def("sm100_w4a4_workspace_bytes", &jax_mxfp4::Sm100W4A4WorkspaceBytes, nb::arg("m"), nb::arg("n"),
        nb::arg("k"), "bytes of the SM100 W4A4 GEMM's workspace result");
  m.def("sm100_w4a4_config_name", &jax_mxfp4::Sm100W4A4ConfigName, nb::arg("m"));
#endif

  m.attr("has_cutlass_layout") = static_cast<bool>(JAX_MXFP4_WITH_SM100_LAYOUT);
#if JAX_MXFP4_WITH_SM100_LAYOUT
  m.def(
      "cutlass_scale_factor_offsets",
      [](int64_t rows, int64_t k, const std::string& operand) {
        if (operand != "a" && operand != "b") throw nb::value_error("operand must be 'a' or 'b'");
        return jax_mxfp4::CutlassScaleFactorOffsets(rows, k, operand == "a");
      },
      nb::arg("rows"), nb::arg("k"), nb::arg("operand"),
      "byte offsets of every (row, kb) scale as CUTLASS's SM100 Sm1xxBlkScaledConfig lays them out");
  m.def(
      "cutlass_scale_factor_bytes",
      [](int64_t rows, int64_t k, const std::string& operand) {
        if (operand != "a" && operand != "b") throw nb::value_error("operand must be 'a' or 'b'");
        return jax_mxfp4::CutlassScaleFactorBytes(rows, k, operand == "a");
      },
      nb::arg("rows"), nb::arg("k"), nb::arg("operand"));
#endif
}
