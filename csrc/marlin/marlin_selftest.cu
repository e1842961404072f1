// Standalone GPU self-test and benchmark of the Marlin MXFP4 GEMM (no Python,
// no XLA). Prepares weights on the host with marlin_layout.h's PrepareHost (the
// same spec the jnp preparation is tested against), runs MarlinGemm for bf16
// and fp16 over a grid of M and (N, K), checks against an fp32/fp64 reference
// computed from the canonical MXFP4 tensors, and times every case.
//
// Build (from the repository root; ~1-2 min on 2 cores):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_80,code=sm_80 \
//        -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        csrc/marlin/marlin_selftest.cu csrc/marlin/marlin_gemm.cu csrc/marlin/marlin_plan.cc -o marlin_selftest
//   add  -DMARLIN_SELFTEST_CUBLAS -lcublas  to also time cuBLAS bf16/fp16 GEMMs.
// Run:
//   ./marlin_selftest                 full grid, PASS/FAIL + timing table
//   ./marlin_selftest --quick         few small shapes, no timing (for sanitizers)
//   compute-sanitizer --tool memcheck  ./marlin_selftest --quick
//   compute-sanitizer --tool racecheck ./marlin_selftest --quick
// Options: --dtype bf16|f16, --sms N (plan for N SMs, e.g. 2x the SM count to
// run 2 CTAs per SM), --reps N, --no-timing, --shape NxK and --m M (repeatable;
// replace the default grid, e.g. for a single case under ncu), --mma-sync (no
// wgmma rows on Hopper), --config NAME (force one row of the tile table, e.g.
// `--config small --m 8` against the default small8: the data behind max_m).
// Exit status: 0 all PASS, 1 any FAIL or CUDA error, 2 no usable GPU.
//
// Correctness criterion, per case: ||C - ref||_F / ||ref||_F <= bound, with
//   bound = 2^-8 (bf16) / 2^-10 (fp16): the kernel's only intended error is the
//   final rounding of C to the 16-bit type (relative <= 2^-9 / 2^-12 per
//   element; fp32 accumulation adds ~1e-6), so the bound has a 2-4x margin
//   while any layout/indexing bug gives O(1). NaN anywhere fails (the output is
//   poisoned with 0xFF bytes = NaN before every run, so an unwritten element
//   fails too), except in the special case's NaN-scale column, which must be
//   all NaN.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "../cuda_helpers.cuh"
#include "marlin_gemm.h"
#include "marlin_layout.h"

#if defined(MARLIN_SELFTEST_CUBLAS)
#include <cublas_v2.h>
#endif

using jax_mxfp4::InputDType;
namespace marlin = jax_mxfp4::marlin;

#define CHECK_CUDA(expr) JAX_MXFP4_CUDA_CHECK_OR_DIE(expr)

namespace {

// ---------------------------------------------------------------------------
// Host utilities.

struct Rng {  // splitmix64: reproducible across platforms
  uint64_t s;
  uint64_t Next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double Uniform() { return (Next() >> 11) * (1.0 / 9007199254740992.0); }
  int Int(int lo, int hi) { return lo + static_cast<int>(Next() % (hi - lo + 1)); }  // [lo, hi]
  double Normal() {  // Box-Muller
    const double u = std::max(Uniform(), 1e-300), v = Uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }
};

template <typename T>
struct DeviceBuffer {  // RAII cudaMalloc
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n = 0) { Resize(n); }
  ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void Resize(size_t n) {
    if (ptr) CHECK_CUDA(cudaFree(ptr));
    ptr = nullptr;
    count = n;
    if (n) CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(T)));
  }
  size_t bytes() const { return count * sizeof(T); }
};

uint16_t FloatToBits(float x, InputDType dt) {
  uint32_t f;
  std::memcpy(&f, &x, 4);
  return dt == InputDType::kBF16 ? jax_mxfp4::F32BitsToBf16Bits(f) : jax_mxfp4::F32BitsToF16Bits(f);
}
double BitsToDouble(uint16_t h, InputDType dt) {
  const uint32_t f = dt == InputDType::kBF16 ? jax_mxfp4::Bf16BitsToF32Bits(h) : jax_mxfp4::F16BitsToF32Bits(h);
  float x;
  std::memcpy(&x, &f, 4);
  return x;
}
const char* DTypeName(InputDType dt) { return dt == InputDType::kBF16 ? "bf16" : "f16"; }

// ---------------------------------------------------------------------------
// GPU reference: dequantize the canonical tensors, then a tiled fp32 GEMM that
// accumulates each 64-wide k slab in fp32 and the slabs in fp64.

__global__ void DequantCanonicalKernel(const uint8_t* w_packed, const uint8_t* w_scales, int n, int k,
                                       float* w) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(n) * k) return;
  const int64_t row = i / k, col = i % k;
  const uint32_t code = (w_packed[row * (k / 2) + col / 2] >> (4 * (col % 2))) & 0xF;
  const uint32_t bits = jax_mxfp4::DequantizeToF32Bits(code, w_scales[row * (k / 32) + col / 32]);
  w[i] = __uint_as_float(bits);
}

__global__ void BitsToFloatKernel(const uint16_t* a, int64_t count, int is_bf16, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  out[i] = is_bf16 ? __uint_as_float(static_cast<uint32_t>(a[i]) << 16) : __half2float(__ushort_as_half(a[i]));
}

constexpr int kRefTile = 32;
__global__ void ReferenceGemmKernel(const float* a, const float* w, int m, int n, int k, float* c) {
  __shared__ float sa[kRefTile][kRefTile + 1], sw[kRefTile][kRefTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8 threads, 4 rows each
  const int row0 = blockIdx.y * kRefTile, col0 = blockIdx.x * kRefTile;
  double total[4] = {0, 0, 0, 0};
  float slab[4] = {0, 0, 0, 0};
  for (int k0 = 0; k0 < k; k0 += kRefTile) {
    for (int r = ty; r < kRefTile; r += 8) {
      const int ar = row0 + r, wr = col0 + r, kk = k0 + tx;
      sa[r][tx] = (ar < m && kk < k) ? a[static_cast<int64_t>(ar) * k + kk] : 0.f;
      sw[r][tx] = (wr < n && kk < k) ? w[static_cast<int64_t>(wr) * k + kk] : 0.f;
    }
    __syncthreads();
    for (int q = 0; q < 4; ++q)
      for (int kk = 0; kk < kRefTile; ++kk) slab[q] = fmaf(sa[ty + 8 * q][kk], sw[tx][kk], slab[q]);
    __syncthreads();
    if ((k0 / kRefTile) % 2 == 1 || k0 + kRefTile >= k)
      for (int q = 0; q < 4; ++q) total[q] += slab[q], slab[q] = 0.f;
  }
  for (int q = 0; q < 4; ++q) {
    const int r = row0 + ty + 8 * q, cc = col0 + tx;
    if (r < m && cc < n) c[static_cast<int64_t>(r) * n + cc] = static_cast<float>(total[q]);
  }
}

// ---------------------------------------------------------------------------
// One (N, K) weight: canonical host tensors, prepared device buffers, and the
// fp32 dequantized weight for the reference.

struct Weight {
  int n = 0, k = 0;
  bool special = false;             // NaN-scale row and wide scale ranges
  int nan_row = -1;
  std::vector<uint8_t> w_packed, w_scales;
  DeviceBuffer<uint8_t> d_packed, d_scales;
  DeviceBuffer<float> d_wf32;
};

void MakeWeight(Weight& w, int n, int k, bool special, Rng& rng) {
  w.n = n, w.k = k, w.special = special;
  const int kb = k / 32;
  w.w_packed.resize(static_cast<size_t>(n) * k / 2);
  w.w_scales.resize(static_cast<size_t>(n) * kb);
  for (auto& b : w.w_packed) b = static_cast<uint8_t>(rng.Next());
  for (int r = 0; r < n; ++r) {
    // Typical checkpoint rows: largest block scale 2^-9..2^-3, others up to 12
    // binades lower (exact in both dtypes, see marlin_layout.h contract).
    int smax = rng.Int(118, 124), spread = 12;
    // Special rows: largest scale > 2^1 (|w| up to 96: the bf16 row offset
    // path) and a 40-binade spread (f16 blocks beyond the exact range).
    if (special && r % 4 == 1) smax = rng.Int(129, 131), spread = 40;
    for (int b = 0; b < kb; ++b) w.w_scales[r * kb + b] = static_cast<uint8_t>(smax - rng.Int(0, spread));
    w.w_scales[r * kb + rng.Int(0, kb - 1)] = static_cast<uint8_t>(smax);
  }
  if (special) {
    w.nan_row = n / 2;
    w.w_scales[w.nan_row * kb + rng.Int(0, kb - 1)] = jax_mxfp4::kE8M0Nan;
  }
  DeviceBuffer<uint8_t> packed(w.w_packed.size()), scales(w.w_scales.size());
  CHECK_CUDA(cudaMemcpy(packed.ptr, w.w_packed.data(), packed.bytes(), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(scales.ptr, w.w_scales.data(), scales.bytes(), cudaMemcpyHostToDevice));
  w.d_wf32.Resize(static_cast<size_t>(n) * k);
  const int64_t total = static_cast<int64_t>(n) * k;
  DequantCanonicalKernel<<<static_cast<unsigned>((total + 255) / 256), 256>>>(packed.ptr, scales.ptr, n, k,
                                                                               w.d_wf32.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());  // before `packed` / `scales` are freed
}

// Prepared copies for one dtype, back to back in one allocation; timing
// rotates through them so that small weights come from HBM, not from L2
// (copies * bytes >= 2.5 x L2 unless that would need > 4096 copies).
struct Prepared {
  DeviceBuffer<uint8_t> tiles, scales;
  size_t tiles_stride = 0, scales_stride = 0;  // bytes per copy, 256-aligned
  int copies = 0;
  size_t weight_bytes = 0;  // tiles + multiplier rows (what the kernel streams)
  bool l2_resident = false;  // all copies together still fit in L2
  const uint8_t* Tiles(int i) const { return tiles.ptr + i * tiles_stride; }
  const uint8_t* Scales(int i) const { return scales.ptr + i * scales_stride; }
};

void Prepare(const Weight& w, InputDType dt, bool timing, size_t l2_bytes, Prepared& out) {
  const marlin::PreparedShape s = marlin::GetPreparedShape(w.n, w.k);
  std::vector<uint8_t> tiles(s.tiles_rows * s.tiles_cols), scales(s.scales_rows * s.scales_cols);
  marlin::PrepareHost(w.w_packed.data(), w.w_scales.data(), w.n, w.k, dt, tiles.data(), scales.data());
  out.tiles_stride = (tiles.size() + 255) / 256 * 256;
  out.scales_stride = (scales.size() + 255) / 256 * 256;
  const size_t per_copy = out.tiles_stride + out.scales_stride;
  out.copies = timing ? static_cast<int>(std::min<size_t>(4096, (5 * l2_bytes / 2) / per_copy + 1)) : 1;
  out.l2_resident = out.copies * per_copy < 2 * l2_bytes;
  out.tiles.Resize(out.copies * out.tiles_stride);
  out.scales.Resize(out.copies * out.scales_stride);
  for (int i = 0; i < out.copies; ++i) {
    CHECK_CUDA(cudaMemcpy(out.tiles.ptr + i * out.tiles_stride, tiles.data(), tiles.size(), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(out.scales.ptr + i * out.scales_stride, scales.data(), scales.size(), cudaMemcpyHostToDevice));
  }
  out.weight_bytes = tiles.size() + static_cast<size_t>(w.k / 32) * s.scales_cols;
}

// ---------------------------------------------------------------------------
// One case: (weight, dtype, M).

struct Options {
  bool quick = false, timing = true;
  int sms_override = 0, reps = 0;
  bool bf16 = true, f16 = true;
  std::vector<std::pair<int, int>> shapes;  // --shape NxK (repeatable): replaces the grid
  std::vector<int> ms;                      // --m M (repeatable): replaces the M list
  bool use_wgmma = false;                   // set from the device (9.0) unless --mma-sync
  bool force_mma_sync = false;
  std::string tile_config;                  // --config NAME: force a tile-table row ("": by M)
  const char* TileConfig() const { return tile_config.empty() ? nullptr : tile_config.c_str(); }
};

struct Result {
  bool pass = false;
  double rel_err = 0, bound = 0;
  long long nan_bad = 0;
  double us = 0, gbps = 0, tflops = 0, cublas_us = 0;
};

std::string RunMarlin(const void* a, const Prepared& prep, int copy, void* c, DeviceBuffer<uint8_t>& ws,
                      int m, const Weight& w, InputDType dt, int sms, const Options& opt, cudaStream_t stream) {
  marlin::MarlinGemmArgs args{};
  args.a = a;
  args.tiles = prep.Tiles(copy);
  args.scales = prep.Scales(copy);
  args.c = c;
  args.workspace = ws.ptr;
  args.workspace_bytes = static_cast<int64_t>(ws.bytes());
  args.m = m, args.n = w.n, args.k = w.k, args.dtype = dt, args.sm_count = sms;
  args.use_wgmma = opt.use_wgmma;
  args.tile_config = opt.TileConfig();
  return marlin::MarlinGemm(args, stream);
}

double Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

Result RunCase(const Weight& w, const Prepared& prep, InputDType dt, int m, int sms, const Options& opt,
               Rng& rng, cudaStream_t stream) {
  Result res;
  const int n = w.n, k = w.k;
  // Activations ~ N(0, 1), rounded to the 16-bit type; the reference uses the same values.
  std::vector<uint16_t> a_bits(static_cast<size_t>(m) * k);
  for (auto& v : a_bits) v = FloatToBits(static_cast<float>(rng.Normal()), dt);
  DeviceBuffer<uint16_t> d_a(a_bits.size()), d_c(static_cast<size_t>(m) * n);
  DeviceBuffer<float> d_af(a_bits.size()), d_ref(static_cast<size_t>(m) * n);
  CHECK_CUDA(cudaMemcpy(d_a.ptr, a_bits.data(), d_a.bytes(), cudaMemcpyHostToDevice));
  const int64_t ws_bytes = marlin::MarlinWorkspaceBytes(m, n, k, sms, opt.use_wgmma, opt.TileConfig());
  if (ws_bytes < 0) {
    std::printf("  MarlinWorkspaceBytes refused m=%d n=%d k=%d\n", m, n, k);
    return res;
  }
  DeviceBuffer<uint8_t> ws(static_cast<size_t>(ws_bytes));
  // Poison the workspace too: only the counters may be assumed zeroed (by MarlinGemm).
  if (ws_bytes) CHECK_CUDA(cudaMemset(ws.ptr, 0xA5, ws.bytes()));

  // Reference.
  BitsToFloatKernel<<<static_cast<unsigned>((a_bits.size() + 255) / 256), 256>>>(
      d_a.ptr, static_cast<int64_t>(a_bits.size()), dt == InputDType::kBF16, d_af.ptr);
  CHECK_CUDA(cudaGetLastError());
  ReferenceGemmKernel<<<dim3((n + kRefTile - 1) / kRefTile, (m + kRefTile - 1) / kRefTile), dim3(32, 8)>>>(
      d_af.ptr, w.d_wf32.ptr, m, n, k, d_ref.ptr);
  CHECK_CUDA(cudaGetLastError());

  // The poison memset and the reference ran on the legacy default stream,
  // which a non-blocking stream does not wait for: finish them first.
  CHECK_CUDA(cudaDeviceSynchronize());

  // Kernel under test, on a poisoned output.
  CHECK_CUDA(cudaMemsetAsync(d_c.ptr, 0xFF, d_c.bytes(), stream));
  const std::string err = RunMarlin(d_a.ptr, prep, 0, d_c.ptr, ws, m, w, dt, sms, opt, stream);
  if (!err.empty()) {
    std::printf("  MarlinGemm failed: %s\n", err.c_str());
    return res;
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  CHECK_CUDA(cudaDeviceSynchronize());

  std::vector<uint16_t> c(static_cast<size_t>(m) * n);
  std::vector<float> ref(c.size());
  CHECK_CUDA(cudaMemcpy(c.data(), d_c.ptr, d_c.bytes(), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(ref.data(), d_ref.ptr, d_ref.bytes(), cudaMemcpyDeviceToHost));

  // Spot-check the GPU reference itself against fp64 on the host.
  for (int s = 0; s < 16; ++s) {
    const int r = rng.Int(0, m - 1), col = rng.Int(0, n - 1);
    if (col == w.nan_row) continue;
    double exact = 0, mag = 0;
    for (int kk = 0; kk < k; ++kk) {
      const uint32_t code = (w.w_packed[static_cast<size_t>(col) * (k / 2) + kk / 2] >> (4 * (kk % 2))) & 0xF;
      float wv;
      const uint32_t bits = jax_mxfp4::DequantizeToF32Bits(code, w.w_scales[static_cast<size_t>(col) * (k / 32) + kk / 32]);
      std::memcpy(&wv, &bits, 4);
      const double term = BitsToDouble(a_bits[static_cast<size_t>(r) * k + kk], dt) * wv;
      exact += term, mag += std::fabs(term);
    }
    if (std::fabs(exact - ref[static_cast<size_t>(r) * n + col]) > 1e-5 * mag + 1e-30) {
      std::printf("  reference self-check failed at (%d, %d): %g vs %g\n", r, col, exact,
                  ref[static_cast<size_t>(r) * n + col]);
      return res;
    }
  }

  double num = 0, den = 0;
  for (int r = 0; r < m; ++r)
    for (int col = 0; col < n; ++col) {
      const size_t i = static_cast<size_t>(r) * n + col;
      const double got = BitsToDouble(c[i], dt);
      if (col == w.nan_row) {  // NaN scale block: the whole column must be NaN
        if (!std::isnan(got)) ++res.nan_bad;
        continue;
      }
      if (std::isnan(got) || std::isinf(got)) {
        ++res.nan_bad;
        continue;
      }
      num += (got - ref[i]) * (got - ref[i]);
      den += static_cast<double>(ref[i]) * ref[i];
    }
  res.rel_err = std::sqrt(num / std::max(den, 1e-300));
  res.bound = dt == InputDType::kBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -10);
  res.pass = res.nan_bad == 0 && res.rel_err <= res.bound;

  if (!opt.timing) return res;
  // Timing: warm up, then one event pair per launch, median; rotate weight copies.
  const int copies = prep.copies;
  const int reps = opt.reps > 0 ? opt.reps : (w.n * static_cast<double>(w.k) * m > 1e11 ? 20 : 100);
  for (int i = 0; i < 3; ++i) {
    const std::string e = RunMarlin(d_a.ptr, prep, i % copies, d_c.ptr, ws, m, w, dt, sms, opt, stream);
    if (!e.empty()) std::printf("  %s\n", e.c_str()), std::exit(1);
  }
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(ev[2 * i], stream));
    const std::string e = RunMarlin(d_a.ptr, prep, i % copies, d_c.ptr, ws, m, w, dt, sms, opt, stream);
    if (!e.empty()) std::printf("  %s\n", e.c_str()), std::exit(1);
    CHECK_CUDA(cudaEventRecord(ev[2 * i + 1], stream));
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) CHECK_CUDA(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) CHECK_CUDA(cudaEventDestroy(e));
  res.us = Median(ms) * 1e3;
  res.gbps = prep.weight_bytes / (res.us * 1e-6) / 1e9;
  res.tflops = 2.0 * m * n * static_cast<double>(k) / (res.us * 1e-6) / 1e12;

#if defined(MARLIN_SELFTEST_CUBLAS)
  {  // Dense 16-bit GEMM of the same shape (C = A W^T, W [n, k] row-major), for ratios.
    static cublasHandle_t handle = nullptr;
    if (!handle && cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) std::printf("cublasCreate failed\n"), std::exit(1);
    if (cublasSetStream(handle, stream) != CUBLAS_STATUS_SUCCESS) std::printf("cublasSetStream failed\n"), std::exit(1);
    DeviceBuffer<uint16_t> d_w(static_cast<size_t>(n) * k);
    CHECK_CUDA(cudaMemset(d_w.ptr, 0x3C, d_w.bytes()));
    const cudaDataType_t t = dt == InputDType::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
    const float alpha = 1.f, beta = 0.f;
    auto gemm = [&]() {  // column-major view: C^T[n, m] = W[n, k] . A^T[k, m]
      return cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, d_w.ptr, t, k, d_a.ptr, t, k,
                          &beta, d_c.ptr, t, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    };
    for (int i = 0; i < 3; ++i)
      if (gemm() != CUBLAS_STATUS_SUCCESS) std::printf("  cublasGemmEx failed\n"), std::exit(1);
    std::vector<cudaEvent_t> ev2(2 * reps);
    for (auto& e : ev2) CHECK_CUDA(cudaEventCreate(&e));
    for (int i = 0; i < reps; ++i) {
      CHECK_CUDA(cudaEventRecord(ev2[2 * i], stream));
      if (gemm() != CUBLAS_STATUS_SUCCESS) std::printf("  cublasGemmEx failed\n"), std::exit(1);
      CHECK_CUDA(cudaEventRecord(ev2[2 * i + 1], stream));
    }
    CHECK_CUDA(cudaStreamSynchronize(stream));
    for (int i = 0; i < reps; ++i) CHECK_CUDA(cudaEventElapsedTime(&ms[i], ev2[2 * i], ev2[2 * i + 1]));
    for (auto& e : ev2) CHECK_CUDA(cudaEventDestroy(e));
    res.cublas_us = Median(ms) * 1e3;
  }
#endif
  return res;
}

// Device-to-device copy bandwidth (read + write), the practical HBM ceiling.
double MeasureCopyGBps(cudaStream_t stream) {
  const size_t bytes = size_t{1} << 30;
  DeviceBuffer<uint8_t> src(bytes), dst(bytes);
  CHECK_CUDA(cudaMemsetAsync(src.ptr, 1, bytes, stream));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<float> ms(5);
  for (int i = 0; i < 6; ++i) {
    CHECK_CUDA(cudaEventRecord(e0, stream));
    CHECK_CUDA(cudaMemcpyAsync(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice, stream));
    CHECK_CUDA(cudaEventRecord(e1, stream));
    CHECK_CUDA(cudaEventSynchronize(e1));
    if (i) CHECK_CUDA(cudaEventElapsedTime(&ms[i - 1], e0, e1));
  }
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  return 2.0 * bytes / (Median(ms) * 1e-3) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") opt.quick = true, opt.timing = false;
    else if (a == "--mma-sync") opt.force_mma_sync = true;
    else if (a == "--config" && i + 1 < argc) opt.tile_config = argv[++i];
    else if (a == "--no-timing") opt.timing = false;
    else if (a == "--sms" && i + 1 < argc) opt.sms_override = std::atoi(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) opt.reps = std::atoi(argv[++i]);
    else if (a == "--dtype" && i + 1 < argc) {
      const std::string d = argv[++i];
      opt.bf16 = d == "bf16", opt.f16 = d == "f16";
    } else if (a == "--shape" && i + 1 < argc) {
      int n = 0, k = 0;
      if (std::sscanf(argv[++i], "%dx%d", &n, &k) != 2 || n < 1 || k < 32 || k % 32) {
        std::printf("--shape wants NxK with K %% 32 == 0\n");
        return 2;
      }
      opt.shapes.emplace_back(n, k);
    } else if (a == "--m" && i + 1 < argc) {
      opt.ms.push_back(std::atoi(argv[++i]));
    } else {
      std::printf("usage: %s [--quick] [--no-timing] [--sms N] [--reps N] [--dtype bf16|f16]\n"
                  "          [--shape NxK]... [--m M]... [--mma-sync] [--config NAME]\n", argv[0]);
      return 2;
    }
  }
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    std::printf("SKIP: no CUDA device (exit 2)\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  if (prop.major < 8) {
    std::printf("SKIP: %s is sm_%d%d; the kernel needs sm_80+ (exit 2)\n", prop.name, prop.major, prop.minor);
    return 2;
  }
  const int dev_sms = marlin::MarlinDeviceSmCount(0);
  const int sms = opt.sms_override > 0 ? opt.sms_override : dev_sms;
  opt.use_wgmma = prop.major == 9 && prop.minor == 0 && !opt.force_mma_sync;
  std::printf("device: %s (sm_%d%d, %d SMs, L2 %d MB); planning for %d SMs, %s above M = 32\n", prop.name,
              prop.major, prop.minor, dev_sms, prop.l2CacheSize >> 20, sms, opt.use_wgmma ? "wgmma" : "mma.sync");
  if (opt.use_wgmma)
    for (int m : {64, 128}) {  // the wgmma rows' cluster split-K capacity (MakePlan)
      const marlin::ClusterCapacity c = marlin::MarlinClusterCapacity(0, m, 4096, 4096, true);
      std::printf("clusters of 2 / 4 / 8 CTAs the device runs at once (M = %d row): %d / %d / %d\n", m,
                  c.clusters[1], c.clusters[2], c.clusters[3]);
    }
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double copy_gbps = opt.timing ? MeasureCopyGBps(stream) : 0;
  if (opt.timing) std::printf("device copy bandwidth (read+write): %.0f GB/s\n", copy_gbps);

  struct Shape {
    int n, k;
    bool special;
  };
  std::vector<Shape> shapes;
  std::vector<int> ms;
  std::vector<int> plan_sms = {sms};
  if (opt.quick) {
    shapes = {{96, 96, false}, {200, 320, false}, {64, 1056, true}, {288, 4160, false}};
    ms = {1, 7, 33, 70};
    if (opt.sms_override == 0) plan_sms.push_back(5);  // more split-K columns per CTA
  } else {
    shapes = {{4096, 4096, false},  {14336, 4096, false}, {4096, 14336, false}, {8192, 8192, false},
              {28672, 8192, false}, {5760, 2880, false},  {200, 4160, false},   {96, 96, false},
              {256, 512, true}};
    ms = {1, 7, 16, 33, 64, 129, 256, 1024};
  }
  if (!opt.shapes.empty()) {
    shapes.clear();
    for (const auto& nk : opt.shapes) shapes.push_back({nk.first, nk.second, false});
  }
  if (!opt.ms.empty()) ms = opt.ms;
  std::vector<InputDType> dtypes;
  if (opt.bf16) dtypes.push_back(InputDType::kBF16);
  if (opt.f16) dtypes.push_back(InputDType::kF16);

  Rng rng{0x5EED0001ull};
  int failures = 0, cases = 0;
  std::printf("\n%-5s %6s %6s %5s %4s | %-4s %9s %8s | %9s %8s %6s %7s %9s | plan\n", "dtype", "N", "K", "M",
              "sms", "res", "rel_err", "bound", "time_us", "GB/s", "%copy", "TFLOP/s", "cublas_us");
  for (const Shape& sh : shapes) {
    Weight w;
    MakeWeight(w, sh.n, sh.k, sh.special, rng);
    for (InputDType dt : dtypes) {
      Prepared prep;
      Prepare(w, dt, opt.timing, static_cast<size_t>(prop.l2CacheSize), prep);
      for (int m : ms)
        for (int s : plan_sms) {
          const Result r = RunCase(w, prep, dt, m, s, opt, rng, stream);
          ++cases;
          failures += r.pass ? 0 : 1;
          std::printf("%-5s %6d %6d %5d %4d | %-4s %9.2e %8.1e |", DTypeName(dt), sh.n, sh.k, m, s,
                      r.pass ? "PASS" : "FAIL", r.rel_err, r.bound);
          if (opt.timing)
            std::printf(" %9.2f %8.0f %5.1f%% %7.1f %9.2f |", r.us, r.gbps, 100.0 * r.gbps / copy_gbps,
                        r.tflops, r.cublas_us);
          else
            std::printf(" %9s %8s %6s %7s %9s |", "-", "-", "-", "-", "-");
          const marlin::ClusterCapacity capacity =
              marlin::MarlinClusterCapacity(0, m, sh.n, sh.k, opt.use_wgmma, opt.TileConfig());
          std::printf(" %s%s%s\n",
                      marlin::MarlinDescribePlan(m, sh.n, sh.k, s, opt.use_wgmma, opt.TileConfig(), &capacity).c_str(),
                      opt.timing && prep.l2_resident ? " [weights L2-resident]" : "",
                      r.nan_bad ? (" nan_bad=" + std::to_string(r.nan_bad)).c_str() : "");
        }
    }
  }
  CHECK_CUDA(cudaStreamDestroy(stream));
  std::printf("\n%s: %d / %d cases passed\n", failures ? "FAIL" : "PASS", cases - failures, cases);
  if (opt.timing)
    std::printf("(GB/s = prepared weight bytes / kernel time; %%copy = that / device copy bandwidth;\n"
                " time includes the counter-zeroing kernel or the reduction pass when the plan splits K)\n");
  return failures ? 1 : 0;
}
