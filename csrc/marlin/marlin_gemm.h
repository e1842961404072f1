// Marlin-style W4A16 GEMM for MXFP4 weights on SM80/SM90:
//   C[M, N] = A[M, K] @ dequant(W)^T,  A and C bf16 or fp16, fp32 accumulation,
// W prepared once at load into the layout of marlin_layout.h.
//
// Host API (plain C++, no XLA dependency; marlin_plan.cc and marlin_gemm.cu) and the XLA FFI
// handler symbol (marlin_ffi.cc). Typical use from Python at trace time:
//   MarlinCanImplement(n, k)                 -> "" or why not
//   MarlinWorkspaceBytes(m, n, k, sm_count, use_wgmma)
//                                            -> size of the handler's
//                                               workspace result, uint8[W]
// and at run time the handler `MarlinMxfp4GemmFfi` with the attributes
// n, k, dtype, sm_count, use_wgmma (see marlin_ffi.cc for the exact binding).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../mxfp4.h"
#include "marlin_plan.h"

namespace jax_mxfp4 {
namespace marlin {

// "" when the kernel can run a layer with N = n output features and K = k
// inputs (with prepared weights of that size), otherwise the reason.
std::string MarlinCanImplement(int64_t n, int64_t k);

// Bytes of scratch the GEMM needs for M = m rows on a device with `sm_count`
// SMs (the same sm_count must be passed at run time). 0 when the problem
// needs no cross-CTA reduction. Returns -1 for an unsupported shape.
// `use_wgmma` selects the Hopper (sm_90a, wgmma) tile configurations for
// M > 32; it must match MarlinGemmArgs::use_wgmma.
// `tile_config` (nullptr: the planner's choice by M) forces a row of the tile
// table by name (marlin_tiles.h), for the self-test's side-by-side timing of
// configurations; it must match MarlinGemmArgs::tile_config.
int64_t MarlinWorkspaceBytes(int64_t m, int64_t n, int64_t k, int sm_count, bool use_wgmma,
                             const char* tile_config = nullptr);

// Number of SMs of CUDA device `device`, queried once per device and cached
// (thread-safe). Returns 0 if the query fails.
int MarlinDeviceSmCount(int device);

// Human-readable launch plan ("small m16xn128xk256 grid=128 iters=16 ...
// split=last-cta ws=..."; split= no | last-cta | pass | clusterS, the
// SplitReduce of the row), for benchmarks and the self-test. Without
// `capacity` the trace-time plan (never a cluster plan, see MakePlan); with
// MarlinClusterCapacity's, the one MarlinGemm launches on that device.
std::string MarlinDescribePlan(int64_t m, int64_t n, int64_t k, int sm_count, bool use_wgmma,
                               const char* tile_config = nullptr, const ClusterCapacity* capacity = nullptr);

// The cluster capacity of device `device` for the cluster row MarlinGemm
// tries for these sizes (ClusterRowOf; queried once per device and row,
// cached; all zero where that row has no cluster split-K, the device is not
// compute capability 9.0 or a query fails). Needs a CUDA device.
ClusterCapacity MarlinClusterCapacity(int device, int64_t m, int64_t n, int64_t k, bool use_wgmma,
                                      const char* tile_config = nullptr);

struct MarlinGemmArgs {
  const void* a;          // [m, k] activations, row-major, dtype `dtype`
  const uint8_t* tiles;   // prepared weights, uint8[k/32, N_pad * 16]
  const uint8_t* scales;  // prepared scales,  uint8[k/32 + 4, N_pad]
  void* c;                // [m, n] output, row-major, dtype `dtype`
  void* workspace;        // MarlinWorkspaceBytes(m, n, k, sm_count) bytes
  int64_t workspace_bytes;
  int64_t m, n, k;        // true sizes; k % 32 == 0
  InputDType dtype;       // kBF16 or kF16 (the dtype the weights were prepared for)
  int sm_count;           // as passed to MarlinWorkspaceBytes
  bool use_wgmma;         // as passed to MarlinWorkspaceBytes; only on compute capability 9.0
  const char* tile_config = nullptr;  // as passed to MarlinWorkspaceBytes (nullptr: by M)
};

// Enqueue the GEMM on `stream` (asynchronous; no host synchronization, no
// allocation): the GEMM kernel, after a small kernel that zeroes the arrival
// counters (split-K with SplitReduce::kLastCta) or followed by the reduction
// kernel (split-K with SplitReduce::kPass), or alone, launched in clusters
// (a cluster plan of SplitReduce::kCluster: MarlinClusterCapacity decides).
// Returns "" or an error message (argument or CUDA error).
std::string MarlinGemm(const MarlinGemmArgs& args, cudaStream_t stream);

}  // namespace marlin
}  // namespace jax_mxfp4

// XLA FFI handler (defined in marlin_ffi.cc with XLA_FFI_DEFINE_HANDLER_SYMBOL).
// Declared with forward-declared C types so this header needs no XLA include.
struct XLA_FFI_Error;
struct XLA_FFI_CallFrame;
extern "C" XLA_FFI_Error* MarlinMxfp4GemmFfi(XLA_FFI_CallFrame* call_frame);
