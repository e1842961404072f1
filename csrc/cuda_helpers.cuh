// Shared CUDA helpers: error checking (host) and thin PTX wrappers (device).
//
// Every wrapper is one PTX instruction (or a fixed pair) with a link to its
// section of the PTX ISA, so kernels read as the algorithm and the exact
// instruction stays visible. Wrappers that have no side effect are plain
// `asm` (not `volatile`) so the compiler may schedule and deduplicate them;
// those that touch memory or synchronize are `asm volatile` with a "memory"
// clobber where ordering matters.
//
// PTX ISA: https://docs.nvidia.com/cuda/parallel-thread-execution/index.html
// (anchors below are relative to that page).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace jax_mxfp4 {

// ===========================================================================
// Host: error checking
// ===========================================================================

// "file:line: cudaErrorName (message)" for a failed CUDA runtime call.
inline std::string CudaErrorString(cudaError_t err, const char* file, int line, const char* what) {
  return std::string(file) + ":" + std::to_string(line) + ": " + what + " failed: " +
         cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

}  // namespace jax_mxfp4

// Evaluate a CUDA runtime call; on failure return the error string from the
// enclosing function (which must return std::string, empty = success).
#define JAX_MXFP4_CUDA_RETURN_IF_ERROR(expr)                                           \
  do {                                                                                 \
    const cudaError_t jax_mxfp4_err_ = (expr);                                         \
    if (jax_mxfp4_err_ != cudaSuccess)                                                 \
      return ::jax_mxfp4::CudaErrorString(jax_mxfp4_err_, __FILE__, __LINE__, #expr);  \
  } while (0)

// For test programs: print and exit(1) on failure.
#define JAX_MXFP4_CUDA_CHECK_OR_DIE(expr)                                                        \
  do {                                                                                           \
    const cudaError_t jax_mxfp4_err_ = (expr);                                                   \
    if (jax_mxfp4_err_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s\n",                                                               \
                   ::jax_mxfp4::CudaErrorString(jax_mxfp4_err_, __FILE__, __LINE__, #expr).c_str()); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

#if defined(__CUDACC__)

namespace jax_mxfp4 {
namespace ptx {

// ===========================================================================
// Device: asynchronous global -> shared copies (cp.async, SM80+)
// #data-movement-and-conversion-instructions-cp-async
// ===========================================================================

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy that zero-fills the destination when `pred` is false.
// Uses the "src-size" operand: with src-size = 0 no global byte is read and
// all 16 destination bytes are written with zeros, so residue handling needs
// no separate shared-memory clear. `.cg` caches in L2 only (the data is
// consumed from shared memory, L1 would only be polluted).
__device__ __forceinline__ void CpAsync16ZeroFill(void* smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)),
               "l"(gmem), "r"(src_bytes)
               : "memory");
}

// As above with an L2 cache policy (from CreatePolicy*): used for weights,
// which every CTA reads exactly once when no other CTA needs the same tile.
__device__ __forceinline__ void CpAsync16ZeroFillHint(void* smem, const void* gmem, bool pred,
                                                      uint64_t policy) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(
                   SmemAddr(smem)),
               "l"(gmem), "r"(src_bytes), "l"(policy)
               : "memory");
}

// Close the current group of cp.async operations (one group per pipeline
// stage). Committing an empty group is legal and keeps the group count per
// loop iteration uniform. #data-movement-and-conversion-instructions-cp-async-commit-group
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Block until at most `kPending` committed groups are still in flight.
// #data-movement-and-conversion-instructions-cp-async-wait-group
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// L2 eviction policies (createpolicy, SM80+). "fraction 1.0" applies the
// priority to every access made with the policy.
// #data-movement-and-conversion-instructions-createpolicy
__device__ __forceinline__ uint64_t CreatePolicyEvictFirst() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ uint64_t CreatePolicyEvictNormal() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// ===========================================================================
// Device: shared -> register matrix loads and tensor-core MMA
// ===========================================================================

// Four 8x8 b16 matrices from shared memory into the layout mma expects.
// Lane l supplies the address of row (l % 8) of matrix (l / 8); lane l
// receives, for matrix i, register i = elements (row l/4, cols 2(l%4), +1).
// #warp-level-matrix-instructions-ldmatrix
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem)));
}

// D = A * B + D for one m16n8k16 tile, fp32 accumulation.
// Fragments (#warp-level-matrix-fragment-mma-16816-float), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..),
//                   a[3] = (g+8, 2t+8..)
//   B (16x8, col):  b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8..2t+9, n g)
//   C/D (16x8):     c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// Each 32-bit register holds two 16-bit values, lower column/row in the low half.
template <typename T>
__device__ __forceinline__ void MmaM16N8K16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1);

template <>
__device__ __forceinline__ void MmaM16N8K16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                           uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void MmaM16N8K16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                    uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ===========================================================================
// Device: integer bit manipulation
// ===========================================================================

// Rotate right: bit b of the result is bit (b + n) % 32 of x (one SHF.R.W).
// #integer-arithmetic-instructions-shf
__device__ __forceinline__ uint32_t RotR(uint32_t x, int n) { return __funnelshift_r(x, x, n); }

// Byte permute: result byte i = byte sel[4i+3:4i] of the 8-byte value {b, a}
// (a = bytes 0..3, b = bytes 4..7). #data-movement-and-conversion-instructions-prmt
template <uint32_t kSel>
__device__ __forceinline__ uint32_t Prmt(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "n"(kSel));
  return r;
}

// Three-input logic op with an 8-bit truth table (LOP3). The compiler forms
// LOP3 on its own for plain &,|,^ expressions; this exists for the rare
// expression it does not. #logic-and-shift-instructions-lop3
template <uint32_t kLut>
__device__ __forceinline__ uint32_t Lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return r;
}

// ===========================================================================
// Device: exact packed 16-bit multiplies
// ===========================================================================
//
// The MXFP4 dequantization multiplies values that may be subnormal in the
// 16-bit type (the E2M1 value 0.5 is placed as a subnormal, see
// marlin/marlin_layout.h). These wrappers pin the instruction and its rounding
// so the result never depends on compiler flags such as -ftz / --use_fast_math:
// no `.ftz` qualifier, round to nearest even.

// bf16x2 multiply. SM90 has mul.bf16x2; SM80 has only fma.bf16x2, so add -0.0
// (x * y + (-0) == x * y for every x * y, including -0).
// #half-precision-floating-point-instructions-mul, -fma
__device__ __forceinline__ uint32_t MulBf16x2(uint32_t a, uint32_t b) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
#else
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
#endif
  return r;
}

// f16x2 multiply, subnormals preserved (no .ftz).
__device__ __forceinline__ uint32_t MulF16x2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// Two floats -> packed 16-bit pair (lo in the low half), round to nearest even.
template <typename T>
__device__ __forceinline__ uint32_t PackFloat2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t PackFloat2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t PackFloat2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ T FloatTo(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 FloatTo<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half FloatTo<__half>(float x) {
  return __float2half_rn(x);
}

// ===========================================================================
// Device: warpgroup MMA (wgmma, sm_90a only) with A from registers
// #asynchronous-warpgroup-level-matrix-instructions
// ===========================================================================
//
// Compiled only for the arch-specific Hopper target (sm_90a defines
// __CUDA_ARCH_FEAT_SM90_ALL); in every other compilation the wrappers trap, and
// the host never launches a kernel that uses them there (the caller checks
// the device: MarlinGemmArgs::use_wgmma).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JAX_MXFP4_HAS_WGMMA 1
#endif

// Order this thread's register writes (fragments, zeroed accumulators) before
// the warpgroup's next wgmma reads them.
__device__ __forceinline__ void WgmmaFence() {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommit() {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Wait until at most kPending committed wgmma groups are in flight. Their
// accumulators and A registers must not be touched before this.
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Make this thread's generic-proxy shared-memory writes (cp.async included)
// visible to the async proxy that wgmma reads shared memory through.
__device__ __forceinline__ void FenceProxyAsyncShared() {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// mbarrier and register reallocation for the warp-specialized wgmma kernel
// (sm_90a; same guard as wgmma). A pipeline slot's "full" barrier completes
// when every producer thread's copies into it have landed (one asynchronous
// arrival per thread: CpAsyncArriveNoinc); its "empty" barrier when every
// consumer thread is done reading it.
// #parallel-synchronization-and-communication-instructions-mbarrier
__device__ __forceinline__ void MbarrierInit(uint64_t* bar, uint32_t arrivals) {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(arrivals) : "memory");
#endif
}
// Orders the initializations before the barriers' first use by other threads.
__device__ __forceinline__ void FenceMbarrierInit() {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// One arrival where `pred` holds, with release semantics (the arriving
// thread's earlier shared-memory reads and writes happen before the phase
// completes), as a predicated instruction: no branch, since a divergent
// branch between wgmma instructions makes ptxas serialize them.
__device__ __forceinline__ void MbarrierArriveIf(uint64_t* bar, bool pred) {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(
                   SmemAddr(bar)),
               "r"(static_cast<int>(pred))
               : "memory");
#endif
}
// One arrival, made when all of this thread's earlier cp.async copies have
// completed (.noinc: the arrival is one of the barrier's initial count).
// #data-movement-and-conversion-instructions-cp-async-mbarrier-arrive
__device__ __forceinline__ void CpAsyncArriveNoinc(uint64_t* bar) {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(SmemAddr(bar)) : "memory");
#endif
}
// Blocks until the barrier's phase of the given parity has completed
// (acquire: what the arrivals ordered before it is visible after).
__device__ __forceinline__ void MbarrierWait(uint64_t* bar, uint32_t parity) {
#if defined(JAX_MXFP4_HAS_WGMMA)
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(SmemAddr(bar)), "r"(parity)
        : "memory");
  } while (!done);
#else
  __trap();  // (never reached: only sm_90a kernels wait on mbarriers)
#endif
}
// Per-warpgroup register budget (every warp of the warpgroup executes it):
// a producer warpgroup gives registers back, the consumers take them.
// #miscellaneous-instructions-setmaxnreg
template <int kRegs>
__device__ __forceinline__ void SetMaxNRegDec() {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void SetMaxNRegInc() {
#if defined(JAX_MXFP4_HAS_WGMMA)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// Pins a register for the compiler (no instruction): accumulators of an
// in-flight wgmma must not be moved across the wait by the optimizer.
__device__ __forceinline__ void RegisterFence(float& r) { asm volatile("" : "+f"(r)::"memory"); }
// The same for a wgmma A-fragment register: its value (and so its physical
// register) stays alive up to here, after the wait that retired the wgmma
// reading it, so ptxas cannot give the register to a newer value while the
// asynchronous MMA may still read it.
__device__ __forceinline__ void RegisterFence(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// Shared-memory matrix descriptor for a K-major operand stored in the
// 128-byte swizzle layout: rows of 128 bytes (64 16-bit elements of K), the
// 16-byte chunk c of row r at chunk c ^ (r % 8), 8-row atoms of 1024 bytes
// (the atom must be 1024-byte aligned). `smem` points at the first element
// of the k16 step (atom base + 32 bytes per step); the stride between 8-row
// groups is 1024 bytes; the leading offset is unused in swizzled K-major
// layouts (set to 1 as CUTLASS does). #asynchronous-warpgroup-level-matrix-shared-memory-layout-matrix-descriptor
__device__ __forceinline__ uint64_t SmemDescSwizzle128(const void* smem) {
  const uint64_t addr = SmemAddr(smem);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// D[64 x kN] += A[64 x 16] * B[16 x kN], fp32 accumulation, asynchronous
// (wgmma.mma_async; group it with WgmmaCommit, wait with WgmmaWait). A comes
// from registers in the mma.m16n8k16 A-fragment layout, warp w of the
// warpgroup holding rows 16w..16w+15: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..),
// a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..). B is K-major in shared memory
// (descriptor). D: d[4i + 0..1] = (row 16w + g, cols 8i + 2t..2t+1),
// d[4i + 2..3] = (row 16w + g + 8, same cols).
template <typename T, int kN>
__device__ __forceinline__ void WgmmaM64K16RS(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc_b);

// The four specializations differ only in the PTX type and N; the operand
// lists are spelled once per N. Operands: d[0, N/2), then a[0..3] (%A0..),
// desc_b (%DESC) and the scale-d flag (%SD, always 1: accumulate).
#define JAX_MXFP4_WGMMA_D32 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define JAX_MXFP4_WGMMA_D64 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define JAX_MXFP4_WGMMA_OUT32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define JAX_MXFP4_WGMMA_OUT64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#if defined(JAX_MXFP4_HAS_WGMMA)
#define JAX_MXFP4_WGMMA_RS(T, PTX_TYPE, N, NREG, A0, A1, A2, A3, DESC, SD)                          \
  template <>                                                                                      \
  __device__ __forceinline__ void WgmmaM64K16RS<T, N>(float(&d)[N / 2], const uint32_t(&a)[4],     \
                                                     uint64_t desc_b) {                             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #SD ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " "        \
                 JAX_MXFP4_WGMMA_D##NREG ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #DESC  \
                 ", p, 1, 1, 0;\n}\n"                                                              \
                 : JAX_MXFP4_WGMMA_OUT##NREG                                                       \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));               \
  }
#else
#define JAX_MXFP4_WGMMA_RS(T, PTX_TYPE, N, NREG, A0, A1, A2, A3, DESC, SD)                  \
  template <>                                                                              \
  __device__ __forceinline__ void WgmmaM64K16RS<T, N>(float(&)[N / 2], const uint32_t(&)[4], \
                                                     uint64_t) {                           \
    __trap();                                                                              \
  }
#endif
JAX_MXFP4_WGMMA_RS(__nv_bfloat16, "bf16", 64, 32, 32, 33, 34, 35, 36, 37)
JAX_MXFP4_WGMMA_RS(__nv_bfloat16, "bf16", 128, 64, 64, 65, 66, 67, 68, 69)
JAX_MXFP4_WGMMA_RS(__half, "f16", 64, 32, 32, 33, 34, 35, 36, 37)
JAX_MXFP4_WGMMA_RS(__half, "f16", 128, 64, 64, 65, 66, 67, 68, 69)
#undef JAX_MXFP4_WGMMA_RS

// ===========================================================================
// Device: thread-block clusters (sm_90) and distributed shared memory
// #cluster-of-cooperative-thread-arrays, #data-movement-and-conversion-instructions-mapa
// ===========================================================================
//
// Compiled for sm_90+; elsewhere they trap (the host launches clusters only
// on a compute capability 9.0 device, like the wgmma kernels).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define JAX_MXFP4_HAS_CLUSTERS 1
#endif

// Every thread of every CTA of the cluster arrives, then waits for all:
// release / acquire, so shared-memory writes before it (by any CTA of the
// cluster) are visible to distributed shared-memory reads after it.
__device__ __forceinline__ void ClusterSync() {
#if defined(JAX_MXFP4_HAS_CLUSTERS)
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
// The address, in the cluster's shared window, of this CTA's shared-memory
// address `smem_addr` in the CTA of cluster rank `rank`.
__device__ __forceinline__ uint32_t MapSharedToRank(uint32_t smem_addr, uint32_t rank) {
  uint32_t r = 0;
#if defined(JAX_MXFP4_HAS_CLUSTERS)
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(smem_addr), "r"(rank));
#else
  __trap();
#endif
  return r;
}
__device__ __forceinline__ float4 LoadSharedCluster(uint32_t cluster_addr) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#if defined(JAX_MXFP4_HAS_CLUSTERS)
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(cluster_addr)
               : "memory");
#else
  __trap();
#endif
  return v;
}

// ===========================================================================
// Device: cross-CTA signalling through global memory
// ===========================================================================
//
// The split-K arrival: every thread has written its part of the CTA's
// partial tile; the CTA synchronizes, then one thread bumps the column's
// counter with a release-acquire atomic at GPU scope. bar.sync orders the
// other threads' writes before that thread's release (PTX memory model:
// release is cumulative over what precedes it in causality order, the same
// pattern as CUTLASS's split-K semaphore), and the acquire half orders the
// CTA's later reads of other CTAs' partials (after the second bar.sync)
// after every earlier arrival's writes. Only the CTA that sees the final
// count reads the others' data; nobody waits on anybody, so the scheme is
// correct whether or not all CTAs are resident at once (unlike a spin lock).
// No per-thread __threadfence: fence.sc.gpu also waits for the thread's
// loads still in flight, i.e. it drained the cp.async pipeline at every
// split column.
__device__ __forceinline__ int AtomicAddAcqRelGpu(int* counter, int value) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(counter), "r"(value) : "memory");
  return old;
}

// Returns, in every thread of the CTA, the counter value before this CTA's
// increment. `broadcast` is one int of shared memory.
__device__ __forceinline__ int CtaArrive(int* counter, int* broadcast) {
  __syncthreads();
  if (threadIdx.x == 0) *broadcast = AtomicAddAcqRelGpu(counter, 1);
  __syncthreads();
  return *broadcast;
}

}  // namespace ptx
}  // namespace jax_mxfp4

#endif  // __CUDACC__
