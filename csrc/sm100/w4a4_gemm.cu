/*! \file w4a4_gemm.cu
    \brief W4A4 MXFP4 GEMM on SM100 block-scaled tensor cores (CUTLASS), as an XLA FFI handler.

    D[M, N] = A[M, K] x W[N, K]^T with A (activations) and W (weights) both
    MXFP4: E2M1 values, one E8M0 scale per 32 elements along K; bf16 output,
    fp32 accumulation. The main loop is CUTLASS's SM100 block-scaled collective
    (tcgen05.mma kind::mxf4 with block scaling: the hardware applies the scales,
    nothing is dequantized in software), the epilogue converts the fp32
    accumulator to bf16 and stores it with TMA.

    Why this kernel: on Blackwell the MXF4 MMA runs at 2x the FP8 rate and reads
    4-bit operands straight from shared memory, so W4A4 needs no dequantization
    pass at all (DESIGN.md section 1).

    Layout contract (w4a4_gemm.h lists the FFI operands): packed operands are
    uint8[rows, K/2] with element 2i in the low nibble, which is CUTLASS's
    float_e2m1_t packing; scales are the padded swizzled_128x4 buffers of
    csrc/scale_layout.h, which is exactly Sm1xxBlkScaledConfig's layout
    (proved on the host by scale_layout_cutlass.cc). M and N need not be tile
    multiples: TMA zero-fills loads and clips stores outside the problem.

    Host order per call follows CUTLASS example 72c: get_workspace_size ->
    can_implement -> initialize -> run, every status checked and turned into
    an ffi::Error.
*/
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "blockscaled_config.h"
#include "ffi_common.h"
#include "scale_layout.h"
#include "w4a4_gemm.h"

namespace jax_mxfp4 {
namespace {

using namespace cute;

/////////////////////////////////////////////////////////////////////////////////////////////////
/// Operand types, shared by every tile configuration
/////////////////////////////////////////////////////////////////////////////////////////////////

using ElementA    = cutlass::mx_float4_t<cutlass::float_e2m1_t>;  // activations: E2M1 + E8M0 scale per 32 along K
using LayoutATag  = cutlass::layout::RowMajor;                    // A[M, K], K contiguous: uint8[M, K/2]
constexpr int AlignmentA = 32;                                    // elements: 32 x 4 bit = 16 bytes, TMA's minimum

using ElementB    = cutlass::mx_float4_t<cutlass::float_e2m1_t>;  // weights: same format as A
using LayoutBTag  = cutlass::layout::ColumnMajor;                 // B[K, N] column-major == W[N, K] row-major ("TN")
constexpr int AlignmentB = 32;                                    // elements: 16 bytes, as for A

using ElementD    = cutlass::bfloat16_t;                          // output
using LayoutDTag  = cutlass::layout::RowMajor;                    // D[M, N], N contiguous
constexpr int AlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;  // 8 elements = 16 bytes (TMA store)

using ElementC    = void;                                         // no source operand: D = accumulator
using LayoutCTag  = LayoutDTag;                                   // unused (C is void), kept equal to D
constexpr int AlignmentC = AlignmentD;                            // unused (C is void)

using ElementAccumulator = float;                                 // MMA accumulator (TMEM)
using ElementCompute     = float;                                 // epilogue arithmetic before the bf16 store
using ArchTag            = cutlass::arch::Sm100;                  // tcgen05 block-scaled MMA: sm_100a
using OperatorClass      = cutlass::arch::OpClassBlockScaledTensorOp;

// K extent of one main-loop stage: 256 E2M1 elements = 128 bytes per row,
// one 128-byte TMA swizzle atom, 4 MMA instructions (K = 64 each) and 2
// scale-factor atoms (8 scales) per row.
using TileK = _256;

// Packed (rows, cols, batch) stride with cols contiguous, in elements. A, B
// (as N x K) and D all use this form; the static_assert keeps it honest if
// CUTLASS ever changes the stride type its layout tags map to.
template <class Stride>
Stride PackedStride(int64_t rows, int64_t cols) {
  static_assert(std::is_same_v<Stride, cute::Stride<int64_t, _1, int64_t>>,
                "expected a (rows, cols, batch) stride with unit stride along cols");
  return Stride{cols, _1{}, rows * cols};
}

/////////////////////////////////////////////////////////////////////////////////////////////////
/// Tile configurations: one template, one table
/////////////////////////////////////////////////////////////////////////////////////////////////

constexpr int64_t kAnyM = std::numeric_limits<int64_t>::max();

// One row of the kernel table. kTileM x kTileN x 256 is the MMA tile:
// kTileM = 128 runs on one SM, kTileM = 256 on a 2-SM pair of a cluster
// (kClusterM even, each SM holding 128 rows of the accumulator). kTileN must be 64, 128, 192 or
// 256 (the block-scaled collective's restriction). The row is used for
// M <= kMaxM (rows are tried in order).
template <int kTileM, int kTileN, int kClusterM, int64_t kMaxM_>
struct W4A4Config {
  static constexpr bool kTwoSm = kTileM == 256;
  static_assert(kTileM == (kTwoSm ? 256 : 128), "MXF4 MMA tiles are 128 rows per SM");
  static_assert(!kTwoSm || kClusterM % 2 == 0, "a 2-SM MMA needs an even cluster along M");
  static constexpr int64_t kMaxM = kMaxM_;

  using MmaTileShape = Shape<Int<kTileM>, Int<kTileN>, TileK>;
  using ClusterShape = Shape<Int<kClusterM>, _1, _1>;
  using KernelSchedule = std::conditional_t<kTwoSm, cutlass::gemm::KernelTmaWarpSpecialized2SmMxf4Sm100,
                                            cutlass::gemm::KernelTmaWarpSpecialized1SmMxf4Sm100>;
  using EpilogueSchedule = std::conditional_t<kTwoSm, cutlass::epilogue::TmaWarpSpecialized2Sm,
                                              cutlass::epilogue::TmaWarpSpecialized1Sm>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, OperatorClass,
      MmaTileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto,
      ElementAccumulator, ElementCompute,
      ElementC, LayoutCTag, AlignmentC,
      ElementD, LayoutDTag, AlignmentD,
      EpilogueSchedule>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, OperatorClass,
      ElementA, LayoutATag, AlignmentA,
      ElementB, LayoutBTag, AlignmentB,
      ElementAccumulator,
      MmaTileShape, ClusterShape,
      // Pipeline stages: as many as fit beside the epilogue's shared memory.
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  // Tile scheduler void = SM100 persistent scheduler with cluster launch
  // control (no workspace).
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<sm100::ProblemShape, CollectiveMainloop,
                                                          CollectiveEpilogue, void>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  // The layout the host-side proof evaluates is the one this kernel reads.
  static_assert(std::is_same_v<typename CollectiveMainloop::Sm1xxBlkScaledConfig, sm100::ScaleFactorConfig>,
                "scale_layout_cutlass.cc must evaluate the collective's own scale-factor config");

  static std::string Name() {
    return std::string(kTwoSm ? "2sm_" : "1sm_") + std::to_string(kTileM) + "x" + std::to_string(kTileN) +
           "x" + std::to_string(TileK::value) + "_cluster" + std::to_string(kClusterM) + "x1";
  }
};

// The kernel table, tried top to bottom by M (the activation rows).
// - M <= 128 (decode, small batches): one 128-row tile covers all of M, the
//   GEMM is bound by reading the weights, and parallelism comes only from N;
//   a 64-wide N tile gives twice the CTAs of 128 (N = 4096: 64 CTAs instead
//   of 32 on a 148-SM part).
// - larger M (prefill): 2-SM 256x128 tiles; each SM still holds a 128x128
//   accumulator, and each SM of the pair loads only half of the B tile (the
//   2-SM MMA reads both halves), halving B traffic per SM.
// Thresholds are a starting point: they have not been measured on hardware.
//                  tile M  tile N  cluster M  used for M <=
using ConfigTable = std::tuple<
    W4A4Config<       128,     64,         1,  128>,
    W4A4Config<       256,    128,         2,  kAnyM>>;

static_assert(std::tuple_element_t<std::tuple_size_v<ConfigTable> - 1, ConfigTable>::kMaxM == kAnyM,
              "the last row of the table must accept every M");

// Calls fn(Config{}) with the table row chosen for M rows.
template <size_t I = 0, typename Fn>
auto WithConfigForM(int64_t m, Fn&& fn) {
  using Config = std::tuple_element_t<I, ConfigTable>;
  if constexpr (I + 1 == std::tuple_size_v<ConfigTable>) {
    return fn(Config{});
  } else {
    if (m <= Config::kMaxM) return fn(Config{});
    return WithConfigForM<I + 1>(m, std::forward<Fn>(fn));
  }
}

/////////////////////////////////////////////////////////////////////////////////////////////////
/// Host side: arguments and the CUTLASS call sequence
/////////////////////////////////////////////////////////////////////////////////////////////////

// Everything one GEMM call needs; device pointers are null for host-only
// queries (can_implement and get_workspace_size never dereference them).
struct Operands {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;         // uint8[M, K/2]
  const void* a_scales = nullptr;  // uint8 swizzled [RoundUp(M,128), RoundUp(K/32,4)]
  const void* b = nullptr;         // uint8[N, K/2]
  const void* b_scales = nullptr;  // uint8 swizzled [RoundUp(N,128), RoundUp(K/32,4)]
  void* d = nullptr;               // bf16[M, N]
  void* workspace = nullptr;       // CUTLASS scratch
  size_t workspace_bytes = 0;
};

template <class Config>
typename Config::Gemm::Arguments MakeArguments(const Operands& op) {
  using Gemm = typename Config::Gemm;
  using Mainloop = typename Config::CollectiveMainloop::Arguments;
  using Epilogue = typename Config::CollectiveEpilogue::Arguments;
  const int m = static_cast<int>(op.m), n = static_cast<int>(op.n), k = static_cast<int>(op.k);
  const sm100::ProblemShape problem{m, n, k, 1};

  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = problem;
  args.mainloop.ptr_A = static_cast<decltype(Mainloop::ptr_A)>(op.a);
  args.mainloop.dA = PackedStride<typename Gemm::GemmKernel::StrideA>(op.m, op.k);
  args.mainloop.ptr_B = static_cast<decltype(Mainloop::ptr_B)>(op.b);
  args.mainloop.dB = PackedStride<typename Gemm::GemmKernel::StrideB>(op.n, op.k);
  args.mainloop.ptr_SFA = static_cast<decltype(Mainloop::ptr_SFA)>(op.a_scales);
  args.mainloop.layout_SFA = sm100::ScaleFactorConfig::tile_atom_to_shape_SFA(problem);
  args.mainloop.ptr_SFB = static_cast<decltype(Mainloop::ptr_SFB)>(op.b_scales);
  args.mainloop.layout_SFB = sm100::ScaleFactorConfig::tile_atom_to_shape_SFB(problem);
  args.epilogue.thread.alpha = 1.0f;  // D = 1 * accumulator
  args.epilogue.thread.beta = 0.0f;   // no source (C is void)
  args.epilogue.ptr_C = nullptr;
  args.epilogue.ptr_D = static_cast<decltype(Epilogue::ptr_D)>(op.d);
  args.epilogue.dD = PackedStride<typename Gemm::GemmKernel::StrideD>(op.m, op.n);
  return args;
}

std::string ProblemString(const Operands& op) {
  return "M=" + std::to_string(op.m) + ", N=" + std::to_string(op.n) + ", K=" + std::to_string(op.k);
}

ffi::Error CutlassError(const char* step, cutlass::Status status, const std::string& config, const Operands& op) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string("jax_mxfp4: SM100 W4A4 GEMM (") + config + ", " +
                                                   ProblemString(op) + "): CUTLASS " + step + " failed: " +
                                                   cutlass::cutlassGetStatusString(status));
}

template <class Config>
ffi::Error RunGemm(cudaStream_t stream, const Operands& op) {
  using Gemm = typename Config::Gemm;
  const auto args = MakeArguments<Config>(op);

  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  if (workspace_bytes > op.workspace_bytes) {
    return InvalidArgument("SM100 W4A4 GEMM needs a workspace of " + std::to_string(workspace_bytes) +
                           " bytes, got " + std::to_string(op.workspace_bytes) +
                           " (size it with Sm100W4A4WorkspaceBytes for the same M, N, K)");
  }
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return CutlassError("can_implement", status, Config::Name(), op);
  status = gemm.initialize(args, workspace_bytes ? op.workspace : nullptr, stream);
  if (status != cutlass::Status::kSuccess) return CutlassError("initialize", status, Config::Name(), op);
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) return CutlassError("run", status, Config::Name(), op);
  // run() already consumed the launch error into its status; this catches
  // anything left behind (it may also report an earlier kernel's error).
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jax_mxfp4: SM100 W4A4 GEMM launch: ") +
                                                     cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// The kernels are built for sm_100a only (an arch-specific target: its code
// loads on compute capability 10.0 and nothing else), so besides the major
// version we ask the runtime whether this device can load one of our kernels,
// which turns 10.3 (B300) or a future 10.x into a message instead of a
// "no kernel image" launch failure.
ffi::Error CheckDevice(cudaStream_t stream) {
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaStreamGetDevice(stream, &device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jax_mxfp4: SM100 W4A4 GEMM: cannot query the device: ") + cudaGetErrorString(err));
  }
  const std::string cc = std::to_string(major) + "." + std::to_string(minor);
  if (major != 10) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jax_mxfp4: the SM100 W4A4 (CUTLASS block-scaled) GEMM needs a Blackwell data-center GPU "
                      "(compute capability 10.x); device " + std::to_string(device) + " is " + cc +
                      ". Select another kernel (W4A16 Marlin, XLA or CPU).");
  }
  using Probe = typename std::tuple_element_t<0, ConfigTable>::GemmKernel;
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(&attributes, cutlass::device_kernel<Probe>);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jax_mxfp4: this build of the SM100 W4A4 GEMM has no kernel image for compute capability " +
                          cc + " (it is compiled for sm_100a, which runs on 10.0 only): " +
                          cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

std::string ScaleShapeString(ScaleShape s) {
  return "[" + std::to_string(s.rows) + ", " + std::to_string(s.cols) + "]";
}

bool SameShape(ffi::Span<const int64_t> dims, ScaleShape s) {
  return dims.size() == 2 && dims[0] == s.rows && dims[1] == s.cols;
}

ffi::Error W4A4GemmImpl(cudaStream_t stream, ffi::Buffer<ffi::U8> a, ffi::Buffer<ffi::U8> a_scales,
                        ffi::Buffer<ffi::U8> b, ffi::Buffer<ffi::U8> b_scales,
                        ffi::Result<ffi::Buffer<ffi::BF16>> d, ffi::Result<ffi::Buffer<ffi::U8>> workspace) {
  const auto a_dims = a.dimensions();
  const auto b_dims = b.dimensions();
  const auto d_dims = d->dimensions();
  if (a_dims.size() < 2) return InvalidArgument("w4a4 gemm: a must be [..., M, K/2]; got " + ShapeString(a_dims));
  if (b_dims.size() != 2 || b_dims[1] != a_dims.back()) {
    return InvalidArgument("w4a4 gemm: b must be [N, K/2] with K/2 = " + std::to_string(a_dims.back()) + "; got " +
                           ShapeString(b_dims));
  }
  Operands op;
  op.m = LeadingRows(a_dims);
  op.k = 2 * a_dims.back();
  op.n = b_dims[0];
  const auto a_scale_shape = GetScaleShape(op.m, op.k, ScaleLayout::kSwizzled128x4);
  const auto b_scale_shape = GetScaleShape(op.n, op.k, ScaleLayout::kSwizzled128x4);
  if (!SameShape(a_scales.dimensions(), a_scale_shape) || !SameShape(b_scales.dimensions(), b_scale_shape)) {
    return InvalidArgument("w4a4 gemm: scales must be swizzled_128x4 " + ScaleShapeString(a_scale_shape) +
                           " (a) and " + ScaleShapeString(b_scale_shape) + " (b); got " +
                           ShapeString(a_scales.dimensions()) + " and " + ShapeString(b_scales.dimensions()));
  }
  bool d_ok = d_dims.size() == a_dims.size() && d_dims.back() == op.n;
  for (size_t i = 0; d_ok && i + 1 < a_dims.size(); ++i) d_ok = d_dims[i] == a_dims[i];
  if (!d_ok) return InvalidArgument("w4a4 gemm: d must be [..., M, N] matching a; got " + ShapeString(d_dims));
  const auto [implementable, reason] = Sm100W4A4CanImplement(op.m, op.n, op.k);
  if (!implementable) return InvalidArgument(reason);
  if (op.m == 0 || op.n == 0) return ffi::Error::Success();  // empty output, nothing to launch

  if (ffi::Error err = CheckDevice(stream); err.failure()) return err;
  if (op.k == 0) {  // empty reduction: D = 0 (0x0000 is bf16 +0)
    const cudaError_t e = cudaMemsetAsync(d->untyped_data(), 0, d->size_bytes(), stream);
    if (e != cudaSuccess) return ffi::Error(ffi::ErrorCode::kInternal, cudaGetErrorString(e));
    return ffi::Error::Success();
  }
  op.a = a.untyped_data();
  op.a_scales = a_scales.untyped_data();
  op.b = b.untyped_data();
  op.b_scales = b_scales.untyped_data();
  op.d = d->untyped_data();
  op.workspace = workspace->untyped_data();
  op.workspace_bytes = workspace->size_bytes();
  // TMA descriptors need 16-byte aligned global addresses; XLA's buffers are,
  // but a hand-written custom call might slice one.
  for (const void* p : {op.a, op.a_scales, op.b, op.b_scales, static_cast<const void*>(op.d)}) {
    if (!Aligned16(p)) return InvalidArgument("w4a4 gemm: every operand must be 16-byte aligned (TMA)");
  }
  return WithConfigForM(op.m, [&](auto config) { return RunGemm<decltype(config)>(stream, op); });
}

}  // namespace

/////////////////////////////////////////////////////////////////////////////////////////////////
/// Exported host queries and the handler
/////////////////////////////////////////////////////////////////////////////////////////////////

std::pair<bool, std::string> Sm100W4A4CanImplement(int64_t m, int64_t n, int64_t k) {
  const std::string problem = "M=" + std::to_string(m) + ", N=" + std::to_string(n) + ", K=" + std::to_string(k);
  constexpr int64_t kMaxExtent = std::numeric_limits<int32_t>::max();
  if (m < 0 || n < 0 || k < 0) return {false, "negative extent in " + problem};
  if (m > kMaxExtent || n > kMaxExtent || k > kMaxExtent) {
    return {false, problem + ": CUTLASS takes int32 extents; split the problem"};
  }
  if (k % kBlockSize != 0) {
    return {false, problem + ": K must be a multiple of 32 (one E8M0 scale per 32 elements; TMA also needs the "
                             "K/2-byte rows to be 16-byte multiples)"};
  }
  if (n % AlignmentD != 0) {
    return {false, problem + ": N must be a multiple of 8 (the bf16 output is stored with TMA, which needs "
                             "16-byte rows)"};
  }
  if (m == 0 || n == 0 || k == 0) return {true, ""};  // handled without CUTLASS
  Operands op;
  op.m = m;
  op.n = n;
  op.k = k;
  return WithConfigForM(m, [&](auto config) -> std::pair<bool, std::string> {
    using Config = decltype(config);
    if (Config::Gemm::can_implement(MakeArguments<Config>(op)) != cutlass::Status::kSuccess) {
      return {false, problem + ": CUTLASS Gemm::can_implement refused it for tile config " + Config::Name()};
    }
    return {true, ""};
  });
}

int64_t Sm100W4A4WorkspaceBytes(int64_t m, int64_t n, int64_t k) {
  if (!Sm100W4A4CanImplement(m, n, k).first) return -1;
  if (m == 0 || n == 0 || k == 0) return 0;
  Operands op;
  op.m = m;
  op.n = n;
  op.k = k;
  return WithConfigForM(m, [&](auto config) {
    using Config = decltype(config);
    return static_cast<int64_t>(Config::Gemm::get_workspace_size(MakeArguments<Config>(op)));
  });
}

std::string Sm100W4A4ConfigName(int64_t m) {
  return WithConfigForM(m, [](auto config) { return decltype(config)::Name(); });
}

// Not marked kCmdBufferCompatible: CUTLASS's initialize() sets function
// attributes (and lazy module loading may load the kernel) on the host each
// call; whether that is legal under XLA's stream capture is unverified
// without a Blackwell GPU.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp4W4A4GemmSm100, W4A4GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()  // XLA's CUDA stream
                                  .Arg<ffi::Buffer<ffi::U8>>()   // a: E2M1 packed [..., M, K/2]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // a_scales: E8M0 swizzled [RoundUp(M,128), RoundUp(K/32,4)]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // b: E2M1 packed weights [N, K/2]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // b_scales: E8M0 swizzled [RoundUp(N,128), RoundUp(K/32,4)]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // d: bf16 [..., M, N]
                                  .Ret<ffi::Buffer<ffi::U8>>());  // workspace: [Sm100W4A4WorkspaceBytes(M, N, K)]

}  // namespace jax_mxfp4
