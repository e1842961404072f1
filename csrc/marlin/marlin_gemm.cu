// Host side of the Marlin W4A16 MXFP4 GEMM (marlin_gemm.h): checks the
// arguments, plans the launch (marlin_plan.cc; the device's cluster capacity
// for the cluster split-K rows) and launches the kernel of the plan's tile
// row (marlin_kernel.cuh), then the split-K reduction pass where the plan
// needs it (marlin_split_reduce.cuh).
#include <atomic>
#include <mutex>
#include <string>
#include <utility>

#include "../cuda_helpers.cuh"
#include "marlin_gemm.h"
#include "marlin_kernel.cuh"
#include "marlin_kernel_ws.cuh"
#include "marlin_kernel_params.cuh"
#include "marlin_plan.h"
#include "marlin_split_reduce.cuh"
#include "marlin_tiles.h"

namespace jax_mxfp4 {
namespace marlin {
namespace {

// ===========================================================================
// Host: launch (the plan comes from marlin_plan.cc).
// ===========================================================================

// Per-device "dynamic shared memory opt-in done" flags, per kernel instance.
constexpr int kMaxDevices = 64;

// Zeroes a split-K plan's per-column arrival counters right before the GEMM
// kernel, on its stream. A kernel, not cudaMemsetAsync: in XLA's CUDA graphs
// a memset node left the GPU idle ~1.3 us before it and ~2.0 us after it, a
// kernel node ~0.1 us (medians over the 768 Marlin calls of a 16-layer decode
// trace on an H100; benchmarks/results/ab/decode-counter-zeroing-*.json).
constexpr int kZeroThreads = 256;
__global__ void __launch_bounds__(kZeroThreads) MarlinZeroCountersKernel(int* counters, int count) {
  const int i = blockIdx.x * kZeroThreads + threadIdx.x;
  if (i < count) counters[i] = 0;
}

// A launch of `threads`-thread CTAs with `smem` bytes of dynamic shared memory
// in clusters of `cluster` CTAs along x (cudaLaunchKernelEx and
// cudaOccupancyMaxActiveClusters take the same description); `attribute`
// holds the cluster dimension the config points to.
cudaLaunchConfig_t ClusterLaunchConfig(int grid, int threads, int smem, cudaStream_t stream, int cluster,
                                       cudaLaunchAttribute& attribute) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// The GEMM kernel of row kCfg: the all-warps kernel or the warp-specialized one.
template <int kCfg, typename T>
constexpr auto GemmKernelOf() {
  if constexpr (Geometry<kCfg>::kProducerWarpgroup) return &MarlinMxfp4GemmKernelWs<kCfg, T>;
  else return &MarlinMxfp4GemmKernel<kCfg, T>;
}

// The GEMM kernel, then, if the plan splits K and the row sums split columns
// in the reduction pass, that pass over the plan's columns (a plan with a
// split has n_cols < 4 x #SMs: see MakePlan).
template <int kCfg, typename T>
std::string LaunchConfig(const KernelParams& params, const Plan& plan, cudaStream_t stream) {
  constexpr int kSmem = Geometry<kCfg>::kSmemBytes;
  constexpr int kBlock = Geometry<kCfg>::kBlockThreads;
  auto* kernel = GemmKernelOf<kCfg, T>();
  static std::atomic<bool> smem_set[kMaxDevices];
  int device = 0;
  JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (device < 0 || device >= kMaxDevices) return "jax_mxfp4 marlin: device ordinal out of range";
  if (!smem_set[device].load(std::memory_order_acquire)) {
    // Above 48 KB of dynamic shared memory needs this per device; idempotent.
    JAX_MXFP4_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    smem_set[device].store(true, std::memory_order_release);
  }
  if (plan.cluster > 1) {  // cluster split-K
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config =
        ClusterLaunchConfig(plan.grid, kBlock, kSmem, stream, plan.cluster, attribute);
    JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&config, kernel, params));
  } else {
    kernel<<<plan.grid, kBlock, kSmem, stream>>>(params);
  }
  // cudaGetLastError reports launch-configuration errors of this launch (and
  // could report an earlier asynchronous error of another kernel).
  JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if constexpr (Geometry<kCfg>::kReducePass) {
    if (plan.split && plan.cluster <= 1) {
      MarlinSplitReduceKernel<kCfg, T><<<plan.n_cols * Geometry<kCfg>::kReduceSlices, kThreads, 0, stream>>>(
          params);
      JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    }
  }
  return "";
}

// Clusters of 2, 4, 8 CTAs of row kCfg's kernel the current device runs at
// once; all zero for a row without cluster split-K or if a query fails.
template <int kCfg>
ClusterCapacity QueryClusterCapacity() {
  ClusterCapacity cap;
  if constexpr (Geometry<kCfg>::kClusterSplit) {
    constexpr int kSmem = Geometry<kCfg>::kSmemBytes;
    auto* kernel = GemmKernelOf<kCfg, __nv_bfloat16>();  // (f16: the same resources)
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess)
      return ClusterCapacity{};
    for (int log2 = 1, size = 2; size <= kMaxClusterSplit; ++log2, size *= 2) {
      cudaLaunchAttribute attribute;
      const cudaLaunchConfig_t config =
          ClusterLaunchConfig(size, Geometry<kCfg>::kBlockThreads, kSmem, nullptr, size, attribute);
      if (cudaOccupancyMaxActiveClusters(&cap.clusters[log2], kernel, &config) != cudaSuccess) {
        (void)cudaGetLastError();  // clear it: not a launch error
        return ClusterCapacity{};
      }
    }
  }
  return cap;
}

template <size_t... kIs>
ClusterCapacity QueryClusterCapacityDispatch(int cfg, std::index_sequence<kIs...>) {
  ClusterCapacity cap;
  ((cfg == static_cast<int>(kIs) ? (cap = QueryClusterCapacity<kIs>(), 0) : 0), ...);
  return cap;
}

// The cluster capacity of tile row `cfg` on device `device` (compute
// capability 9.0 only), queried once per device and row.
ClusterCapacity CachedClusterCapacity(int device, int cfg) {
  static std::once_flag once[kMaxDevices][kNumTileConfigs];
  static ClusterCapacity cache[kMaxDevices][kNumTileConfigs];
  std::call_once(once[device][cfg], [device, cfg] {
    int current = 0, major = 0, minor = 0;
    if (cudaGetDevice(&current) != cudaSuccess || (current != device && cudaSetDevice(device) != cudaSuccess))
      return;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
        major == 9 && minor == 0)
      cache[device][cfg] = QueryClusterCapacityDispatch(cfg, std::make_index_sequence<kNumTileConfigs>{});
    if (current != device) cudaSetDevice(current);
  });
  return cache[device][cfg];
}

template <typename T, size_t... kIs>
std::string LaunchDispatch(const KernelParams& params, const Plan& plan, cudaStream_t stream,
                           std::index_sequence<kIs...>) {
  std::string result = "jax_mxfp4 marlin: no kernel for config " + std::to_string(plan.cfg);
  ((plan.cfg == static_cast<int>(kIs) ? (result = LaunchConfig<kIs, T>(params, plan, stream), 0) : 0), ...);
  return result;
}

}  // namespace

// ===========================================================================
// Exported host API (marlin_gemm.h).
// ===========================================================================

int MarlinDeviceSmCount(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v > 0) return v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  cache[device].store(v, std::memory_order_relaxed);
  return v;
}

ClusterCapacity MarlinClusterCapacity(int device, int64_t m, int64_t n, int64_t k, bool use_wgmma,
                                      const char* tile_config) {
  const int row = ClusterRowOf(m, n, use_wgmma, tile_config);
  if (!use_wgmma || device < 0 || device >= kMaxDevices || !MarlinCanImplement(n, k).empty() || row < 0)
    return ClusterCapacity{};
  return CachedClusterCapacity(device, row);
}

std::string MarlinGemm(const MarlinGemmArgs& args, cudaStream_t stream) {
  const std::string why = MarlinCanImplement(args.n, args.k);
  if (!why.empty()) return "jax_mxfp4 marlin: " + why;
  if (args.dtype != InputDType::kBF16 && args.dtype != InputDType::kF16)
    return "jax_mxfp4 marlin: dtype must be bf16 or f16";
  if (args.m < 0) return "jax_mxfp4 marlin: negative M";
  if (args.m == 0) return "";
  int device = 0;
  JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (args.use_wgmma) {  // the sm_80 cubin has no wgmma: never launch it elsewhere
    int major = 0, minor = 0;
    JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    if (major != 9 || minor != 0)
      return "jax_mxfp4 marlin: use_wgmma needs a compute capability 9.0 device (sm_90a code), this is " +
             std::to_string(major) + "." + std::to_string(minor);
  }
  // What the device fits of the cluster row tried for these sizes (all zero:
  // no cluster plan, the same plan as without a capacity).
  const ClusterCapacity capacity =
      MarlinClusterCapacity(device, args.m, args.n, args.k, args.use_wgmma, args.tile_config);
  Plan plan;
  if (!MakePlan(args.m, args.n, args.k, args.sm_count, args.use_wgmma, &plan, args.tile_config, &capacity))
    return "jax_mxfp4 marlin: cannot plan M=" + std::to_string(args.m) +
           (args.tile_config ? std::string(" with tile config ") + args.tile_config : std::string());
  const int64_t need = plan.counter_bytes + plan.partial_bytes;
  if (args.workspace_bytes < need || (need > 0 && args.workspace == nullptr))
    return "jax_mxfp4 marlin: workspace has " + std::to_string(args.workspace_bytes) +
           " bytes, needs " + std::to_string(need);
  // Pointers are 16-byte aligned for cp.async (XLA buffers are >= 64-aligned).
  const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 != 0; };
  if (misaligned(args.a) || misaligned(args.tiles) || misaligned(args.scales) ||
      (need > 0 && misaligned(args.workspace)))
    return "jax_mxfp4 marlin: operands must be 16-byte aligned";
  if (reinterpret_cast<uintptr_t>(args.c) % 4 != 0)  // paired 16-bit stores
    return "jax_mxfp4 marlin: the output must be 4-byte aligned";

  KernelParams kp;
  kp.a = args.a;
  kp.tiles = reinterpret_cast<const uint4*>(args.tiles);
  kp.scales = args.scales;
  kp.c = args.c;
  kp.counters = plan.counter_bytes > 0 ? static_cast<int*>(args.workspace) : nullptr;
  kp.partials = plan.split
                    ? reinterpret_cast<float*>(static_cast<uint8_t*>(args.workspace) + plan.counter_bytes)
                    : nullptr;
  kp.m = static_cast<int>(args.m);
  kp.n = static_cast<int>(args.n);
  kp.n_pad = static_cast<int>(PaddedN(args.n));
  kp.kb_count = static_cast<int>(args.k / kBlockK);
  kp.k_tiles = plan.k_tiles;
  kp.m_chunks = plan.m_chunks;
  kp.iters = plan.iters;
  kp.total_tiles = static_cast<int>(plan.total);
  kp.stream_weights = plan.m_chunks == 1 ? 1 : 0;
  kp.cluster_split = plan.cluster;

  if (plan.counter_bytes > 0) {  // arrival counters start at zero; partial tiles need no init
    const int count = static_cast<int>(plan.counter_bytes / sizeof(int));
    MarlinZeroCountersKernel<<<(count + kZeroThreads - 1) / kZeroThreads, kZeroThreads, 0, stream>>>(kp.counters,
                                                                                                    count);
    JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  const auto seq = std::make_index_sequence<kNumTileConfigs>{};
  if (args.dtype == InputDType::kBF16)
    return LaunchDispatch<__nv_bfloat16>(kp, plan, stream, seq);
  return LaunchDispatch<__half>(kp, plan, stream, seq);
}

}  // namespace marlin
}  // namespace jax_mxfp4
