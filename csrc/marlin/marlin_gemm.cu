// Marlin-style W4A16 GEMM for MXFP4 weights (SM80 / SM90, mma.sync).
//
//   C[M, N] = A[M, K] @ dequant(W)^T       A, C: bf16 or fp16; fp32 accumulation
//
// Weights come prepared in the layout specified in marlin_layout.h (the one
// spec; read it first): each thread's 16-byte load of a 32x32 "unit" holds the
// codes of its mma.m16n8k16 B fragments for 4 n8 tiles x 2 k16 steps, with the
// bits pre-arranged so that a B register is 1-2 funnel shifts + 1-2 LOP3 away,
// and one multiply by a per-block power of two (an exponent byte) applies the
// E8M0 scale. NOTES.md has the performance model behind the constants.
//
// Structure (after IST-DASLab/marlin; our own code):
//   * Work partition ("stripes"): the output is cut into columns of
//     tile_m x n_tile (one per (n tile, m chunk)); each column is a sequence of
//     k_tiles tiles of k_tile. All columns' tiles, k fastest, form one list
//     that is cut into `grid` contiguous stripes of `iters` tiles, one per CTA,
//     so every SM gets the same amount of weight bytes even when N / n_tile is
//     far below the SM count (small M, the bandwidth-bound case). A column cut
//     by a stripe boundary is a split-K column: each CTA that touches it writes
//     an fp32 partial tile to the workspace and bumps the column's counter; the
//     CTA that arrives last sums all partials in CTA order (deterministic) and
//     writes C. Nobody spins, so it is correct without co-residency.
//   * Pipeline: cp.async global->shared with `stages` buffers; a CTA walks its
//     stripe continuously across column boundaries (the epilogue of one column
//     runs while later tiles are already in flight), one __syncthreads/stage.
//   * Warps: warps_n x warps_k. A warp owns n_tile / warps_n columns of the
//     tile and k_tile / warps_k of each stage's k; the warps_k partial sums of a
//     column are reduced in shared memory before the cross-CTA step.
//   * A: ldmatrix.x4 from an XOR-swizzled shared tile (conflict-free).
//   * B: LDS.128 of the lane's 16 bytes, dequant in registers, mma.sync.
//
// Glossary of index names (all counts, not bytes, unless named *_bytes):
//   tile_m = 16 m_blocks   rows of A / C per column
//   kb                     scale block index along K (32 k); kbl: within a stage
//   unit, ul               32-column group of the layout; ul: within the CTA tile
//   col                    column of the stripe list = (n_idx, m_chunk):
//                          n_idx = col / m_chunks (n tile), m_chunk = col % m_chunks
//   kt                     k tile index inside a column, 0..k_tiles-1
//   ld_*                   the loader's position (runs stages-1 tiles ahead)
//   a_row0, a_ch / b_unit, b_kbl0 / s_kbl, s_col
//                          the fixed A / B / multiplier chunk of this thread
//   slot                   pipeline buffer 0..stages-1
//   chunk                  16 bytes of shared memory (one cp.async)
//   frag                   one m16n8 fp32 accumulator (4 floats per thread)
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <type_traits>
#include <utility>

#include "../cuda_helpers.cuh"
#include "marlin_gemm.h"
#include "marlin_layout.h"

namespace jax_mxfp4 {
namespace marlin {
namespace {

// ===========================================================================
// Tile configurations: every kernel variant is instantiated from this table.
// ===========================================================================

// Which devices a row serves, and with which tensor-core instruction.
enum class MmaPath {
  kAny,       // mma.sync, every device (SM80 and SM90)
  kMmaSync,   // mma.sync, only where wgmma is not used (SM80, or use_wgmma off)
  kWgmma,     // wgmma.mma_async (sm_90a), only with use_wgmma on an SM90 device
};

struct TileConfig {
  const char* name;
  int m_blocks;  // m16 blocks per column: tile_m = 16 * m_blocks rows of A/C
  int n_tile;    // output features per column (multiple of 32 * warps_n)
  int k_tile;    // k per pipeline stage (multiple of 32 * warps_k)
  int warps_n;   // warps side by side along N
  int warps_k;   // warps splitting each stage's k (reduced in shared memory)
  int stages;    // cp.async buffers; stages - 1 tiles are in flight
  int max_m;     // host heuristic: first config of the path with M <= max_m is used
  MmaPath path;
};

// Why these numbers (NOTES.md has the arithmetic):
//  * 256 threads = 8 warps: 2 per SM sub-partition for latency hiding while
//    each thread keeps up to ~200 registers (1 CTA per SM).
//  * small: M <= 16 is weight-bandwidth bound. 16 KB of weights per stage and
//    3 stages in flight = 48 KB per SM, twice what Little's law asks for HBM3
//    (3 TB/s x ~1 us / 132 SMs ~ 23 KB). n_tile 128 keeps N/n_tile columns
//    plentiful so stripes stay short.
//  * medium: M 17..32, the same with 32 rows (A doubles; 148 KB of smem).
//  * large: M > 32 in chunks of 64 rows: 64x64 warp tiles (4 m16 x 8 n8)
//    give 32 MMAs per k16 for 4 ldmatrix.x4 + 8 dequantized fragments, so the
//    tensor pipe is the limit; 5 stages keep 32 KB of weights in flight for
//    M = 33..64, where bandwidth and compute are about equal.
//  * wgmma64 / wgmma128 (Hopper): the weights are wgmma's A operand, taken
//    from registers right after dequantization (the mma.sync B fragments of
//    two n8 tiles are exactly an m16 slice of A: no layout change), the
//    activations its B operand, read by the tensor cores from the 128-byte
//    swizzled shared tile (k_tile 64 = one swizzle row). Warp w owns unit w
//    of the 256-feature tile; a warpgroup = 4 units = two m64 halves. Per
//    32-k block a warpgroup issues 4 wgmma (2 k16 steps x 2 halves), 256
//    tensor-core cycles of the SM at 128 tokens, against ~60 instructions
//    of dequantization per warp (4 words), which therefore hide under the
//    asynchronous MMA.
constexpr TileConfig kTileConfigs[] = {
    // name      m_blk n_tile k_tile w_n w_k stages max_m    path
    {"small", 1, 128, 256, 4, 2, 4, 16, MmaPath::kAny},
    {"medium", 2, 128, 256, 4, 2, 4, 32, MmaPath::kAny},
    {"large", 4, 256, 64, 4, 2, 5, INT_MAX, MmaPath::kMmaSync},
    {"wgmma64", 4, 256, 64, 8, 1, 8, 64, MmaPath::kWgmma},  // M = 33..64 on SM90
    {"wgmma128", 8, 256, 64, 8, 1, 6, INT_MAX, MmaPath::kWgmma},
};
constexpr int kNumTileConfigs = sizeof(kTileConfigs) / sizeof(kTileConfigs[0]);
constexpr int kThreads = 256;

// Every size the kernel derives from a row of the table, as compile-time
// constants (a struct of static ints rather than a local TileConfig: device
// lambdas may read these without capturing anything).
template <int kCfg>
struct Geometry {
  static constexpr int kMBlocks = kTileConfigs[kCfg].m_blocks;
  static constexpr int kNTile = kTileConfigs[kCfg].n_tile;
  static constexpr int kKTile = kTileConfigs[kCfg].k_tile;
  static constexpr int kWarpsN = kTileConfigs[kCfg].warps_n;
  static constexpr int kWarpsK = kTileConfigs[kCfg].warps_k;
  static constexpr int kStages = kTileConfigs[kCfg].stages;
  static constexpr bool kWgmma = kTileConfigs[kCfg].path == MmaPath::kWgmma;
  static constexpr int kTileM = 16 * kMBlocks;          // rows of A / C per column
  static constexpr int kKbTile = kKTile / kBlockK;      // scale blocks per stage
  static constexpr int kUnitsTile = kNTile / kUnitN;    // units across the CTA tile
  static constexpr int kUnitsWarp = kUnitsTile / kWarpsN;
  static constexpr int kKbWarp = kKbTile / kWarpsK;     // scale blocks per warp per stage
  static constexpr int kN8Warp = 4 * kUnitsWarp;        // n8 tiles per warp
  static constexpr int kFrags = kMBlocks * kN8Warp;     // accumulators per thread
  // Shared memory, in 16-byte chunks.
  static constexpr int kARowChunks = kKTile / 8;        // per A row of a stage
  static constexpr int kAChunks = kTileM * kARowChunks; // A: tile_m x k_tile, 16-bit
  static constexpr int kBChunks = kKbTile * kUnitsTile * 32;  // units x 32 lanes
  static constexpr int kSChunks = kKbTile * kNTile / 16;      // multiplier bytes
  // wgmma reads A (the activations) through a 128-byte-swizzle descriptor:
  // every stage's A tile starts 1024-byte aligned (64 chunks).
  static constexpr int kStageAlign = kWgmma ? 64 : 1;
  static constexpr int kStageChunks =
      (kAChunks + kBChunks + kSChunks + kStageAlign - 1) / kStageAlign * kStageAlign;
  static constexpr int kRedChunks = (kWarpsK - 1) * kTileM * kNTile / 4;  // warps_k partials
  static constexpr int kPartialChunks = kTileM * kNTile / 4;  // one split-K partial tile
  // Stages - 1 tiles are in flight, less one more for wgmma, whose last group
  // of a stage may still read it while the next stage starts.
  static constexpr int kLag = kWgmma ? 1 : 0;
  static constexpr int kSmemBytes =
      16 * (kStages * kStageChunks + kRedChunks) + 16 + (kWgmma ? 1024 : 0);  // + flag (+ alignment)

  static constexpr bool kValid =
      kWarpsN * kWarpsK * 32 == kThreads && kNTile % (kUnitN * kWarpsN) == 0 &&
      kKTile % (kBlockK * kWarpsK) == 0 &&
      kKTile >= 64 &&                          // XOR swizzle: >= 8 chunks per A row
      kThreads % kARowChunks == 0 &&           // fixed thread -> A column ...
      (kThreads / kARowChunks) % 8 == 0 &&     // ... and fixed row % 8 across chunks
      kAChunks % kThreads == 0 &&              // every thread copies whole A chunks
      (kThreads / 32) % kUnitsTile == 0 &&     // fixed warp -> B unit
      kBChunks % kThreads == 0 && kSChunks <= kThreads && kStages >= 2 + kLag &&
      kSmemBytes <= 160 * 1024 &&  // fits SM80 (163 KB opt-in) and SM90 (227 KB)
      // wgmma: one warp per unit, warpgroup = two m64 halves, A row = one
      // 128-byte swizzle row, m64 x kTileM x k16 with kTileM in {64, 128}.
      (!kWgmma || (kWarpsN == kThreads / 32 && kUnitsTile == kWarpsN && kWarpsK == 1 &&
                   kKTile == 64 && (kTileM == 64 || kTileM == 128)));
};

template <size_t... kIs>
constexpr bool AllConfigsValid(std::index_sequence<kIs...>) {
  return (Geometry<kIs>::kValid && ...);
}
static_assert(AllConfigsValid(std::make_index_sequence<kNumTileConfigs>{}),
              "a row of kTileConfigs violates a kernel assumption (see Geometry::kValid)");

// ===========================================================================
// Kernel parameters (host computes everything derived; see MakePlan).
// ===========================================================================

struct KernelParams {
  const void* a;          // [m, 32 kb_count] activations, row-major, type T
  const uint4* tiles;     // prepared weights [kb_count][n_pad / 32 units][32 lanes] x 16 B
  const uint8_t* scales;  // prepared scales [kb_count + 4][n_pad] bytes
  void* c;                // [m, n] output, row-major, type T
  float* partials;        // split-K partial tiles: [2 grid][tile_m * n_tile] fp32
  int* counters;          // per-column arrival counters [n_cols], zeroed before launch
  int m, n, n_pad;        // true rows of A, true and padded output features
  int kb_count;           // K / 32
  int k_tiles;            // k tiles per column = ceil(kb_count / (k_tile / 32))
  int m_chunks;           // ceil(m / tile_m); col = n_tile_idx * m_chunks + m_chunk
  int iters;              // tiles per CTA stripe
  int total_tiles;        // n_cols * k_tiles
  int stream_weights;     // 1: each weight tile is read by one column -> L2 evict_first
};

// ===========================================================================
// Dequantization (marlin_layout.h: "Output 1" and "Scale mapping").
// ===========================================================================

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<__nv_bfloat16> {
  static constexpr InputDType kValue = InputDType::kBF16;
};
template <>
struct DTypeOf<__half> {
  static constexpr InputDType kValue = InputDType::kF16;
};

// Register p of a word: OR over its (1 or 2) groups of rotr(w, rot) & mask.
// All operands are compile-time: 1-2 SHF.R.W + 1-2 LOP3 in SASS.
template <InputDType kD, int kP>
__device__ __forceinline__ uint32_t ExtractRegister(uint32_t w) {
  constexpr ExtractGroup g0 = Extract(kD, kP, 0);
  constexpr ExtractGroup g1 = Extract(kD, kP, 1);
  constexpr uint32_t mask0 = FieldMask(kD, g0.fields);
  uint32_t r = (g0.rot == 0 ? w : ptx::RotR(w, g0.rot)) & mask0;
  if constexpr (g1.fields != 0) {
    constexpr uint32_t mask1 = FieldMask(kD, g1.fields);
    r |= (g1.rot == 0 ? w : ptx::RotR(w, g1.rot)) & mask1;
  }
  return r;
}

// The 4 packed multipliers of a lane's scale word (byte j -> n8 tile j),
// both halves of each register equal. bf16: bits = byte << 7 (PRMT + SHL);
// f16: bits = byte << 8 (one PRMT, the byte already holds exponent << 2).
template <InputDType kD>
__device__ __forceinline__ void BlockMultipliers(uint32_t sw, uint32_t (&mult)[4]) {
  if constexpr (kD == InputDType::kBF16) {
    mult[0] = ptx::Prmt<0x4040>(sw, 0) << 7;  // bytes (b0, 0, b0, 0)
    mult[1] = ptx::Prmt<0x4141>(sw, 0) << 7;
    mult[2] = ptx::Prmt<0x4242>(sw, 0) << 7;
    mult[3] = ptx::Prmt<0x4343>(sw, 0) << 7;
  } else {
    mult[0] = ptx::Prmt<0x0404>(sw, 0);  // bytes (0, b0, 0, b0)
    mult[1] = ptx::Prmt<0x1414>(sw, 0);
    mult[2] = ptx::Prmt<0x2424>(sw, 0);
    mult[3] = ptx::Prmt<0x3434>(sw, 0);
  }
}

template <InputDType kD>
__device__ __forceinline__ uint32_t Mul2(uint32_t a, uint32_t b) {
  if constexpr (kD == InputDType::kBF16) return ptx::MulBf16x2(a, b);
  else return ptx::MulF16x2(a, b);
}

// Word -> the 4 B registers {k16 step 0: b0, b1; step 1: b0, b1}, scaled.
template <InputDType kD>
__device__ __forceinline__ void DequantWord(uint32_t w, uint32_t mult, uint32_t (&b)[4]) {
  b[0] = Mul2<kD>(ExtractRegister<kD, 0>(w), mult);
  b[1] = Mul2<kD>(ExtractRegister<kD, 1>(w), mult);
  b[2] = Mul2<kD>(ExtractRegister<kD, 2>(w), mult);
  b[3] = Mul2<kD>(ExtractRegister<kD, 3>(w), mult);
}

// float32 row factor F[n] from its 4 byte planes (marlin_layout.h, Output 2).
__device__ __forceinline__ float RowFactor(const uint8_t* planes, int n_pad, int n) {
  const uint32_t bits = static_cast<uint32_t>(planes[n]) |
                        (static_cast<uint32_t>(planes[n_pad + n]) << 8) |
                        (static_cast<uint32_t>(planes[2 * n_pad + n]) << 16) |
                        (static_cast<uint32_t>(planes[3 * n_pad + n]) << 24);
  return __uint_as_float(bits);
}

// ===========================================================================
// The kernel.
// ===========================================================================

// kCfg: row of kTileConfigs (tile shape, warps, stages);
// T:    __nv_bfloat16 or __half, the type of A, C and the dequantized B.
// One CTA (kThreads threads) per stripe; grid = number of stripes <= #SMs.
template <int kCfg, typename T>
__global__ void __launch_bounds__(kThreads, 1) MarlinMxfp4GemmKernel(const KernelParams p) {
  using G = Geometry<kCfg>;
  constexpr InputDType kD = DTypeOf<T>::kValue;

  extern __shared__ uint4 smem_raw[];
  // wgmma stages start 1024-byte aligned (kSmemBytes has the slack for it).
  uint4* const smem =
      G::kWgmma ? smem_raw + ((1024 - (ptx::SmemAddr(smem_raw) & 1023)) & 1023) / 16 : smem_raw;
  uint4* const pipe = smem;                                           // stages x stage
  float4* const red = reinterpret_cast<float4*>(smem + G::kStages * G::kStageChunks);
  int* const flag = reinterpret_cast<int*>(smem + G::kStages * G::kStageChunks + G::kRedChunks);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_n = warp % G::kWarpsN, warp_k = warp / G::kWarpsN;
  const int g = lane / 4, t = lane % 4;  // PTX fragment groupID / threadID_in_group
  const int units = p.n_pad / kUnitN;
  const T* const a = static_cast<const T*>(p.a);

  const int t_begin = blockIdx.x * p.iters;
  const int t_end = min(t_begin + p.iters, p.total_tiles);
  if (t_begin >= t_end) return;  // the host sizes the grid so this never happens
  // Weights are streamed (read once) unless several m chunks share them.
  const uint64_t policy =
      p.stream_weights ? ptx::CreatePolicyEvictFirst() : ptx::CreatePolicyEvictNormal();

  // ---- global -> shared: one stage = A tile, B units, multiplier bytes ----
  // The thread -> chunk map is the same in every stage (Geometry::kValid
  // guarantees the divisibility this needs), so a source address is a
  // per-column base (set by start_column when the loader enters a column)
  // plus a per-stage k offset, and the predicates are "row < m" / "unit <
  // units" (per column) and "scale block < kb_count" (per stage):
  //   A chunk i: row a_row0 + i * kARowStep, 16-byte column a_ch of the tile;
  //              stored at column a_ch ^ (row % 8) (row % 8 is the same for
  //              every i): the 8 rows one ldmatrix phase reads then sit in 8
  //              different 16-byte bank groups (conflict-free).
  //   B chunk i: lane `lane` of unit b_unit, scale block b_kbl0 + i * kBKbStep;
  //              a warp copies one 512-byte unit per instruction (coalesced),
  //              verbatim: the layout already is the consumption order.
  //   S chunk:   16 multiplier bytes at column s_col of scale block s_kbl.
  constexpr int kARowStep = kThreads / G::kARowChunks;
  constexpr int kBKbStep = kThreads / 32 / G::kUnitsTile;
  const int64_t k_elems = static_cast<int64_t>(p.kb_count) * kBlockK;
  const int a_row0 = tid / G::kARowChunks, a_ch = tid % G::kARowChunks;
  const int a_dst0 = a_row0 * G::kARowChunks + (a_ch ^ (a_row0 % 8));
  const int b_unit = (tid / 32) % G::kUnitsTile, b_kbl0 = (tid / 32) / G::kUnitsTile;
  const int s_kbl = tid / (G::kNTile / 16), s_col = 16 * (tid % (G::kNTile / 16));
  const int64_t b_kb_stride = static_cast<int64_t>(units) * 32;  // uint4s per scale-block row

  const T* a_base = a;             // this thread's A chunk 0 at kt = 0
  int a_rows_left = 0;             // rows of A below a_row0 in this m chunk
  const uint4* b_base = p.tiles;   // this thread's B chunk 0 at kt = 0
  bool b_ok = false;               // its unit exists (< units)
  const uint8_t* s_base = p.scales;
  bool s_ok = false;
  auto start_column = [&](int col) {
    const int n_idx = col / p.m_chunks, m_chunk = col - n_idx * p.m_chunks;
    const int row = m_chunk * G::kTileM + a_row0;
    a_rows_left = p.m - row;
    a_base = a + static_cast<int64_t>(row) * k_elems + 8 * a_ch;
    const int unit = n_idx * G::kUnitsTile + b_unit;
    b_ok = unit < units;
    b_base = p.tiles + b_kbl0 * b_kb_stride + 32 * unit + lane;
    const int n0 = n_idx * G::kNTile + s_col;
    s_ok = tid < G::kSChunks && n0 < p.n_pad;
    s_base = p.scales + static_cast<int64_t>(s_kbl) * p.n_pad + n0;
  };

  int ld_col = t_begin / p.k_tiles;  // the next tile to fetch: column, k tile,
  int ld_kt = t_begin - ld_col * p.k_tiles;
  int ld_left = t_end - t_begin;     // and how many of the stripe remain
  start_column(ld_col);
  auto fetch_tile = [&](int slot) {
    if (ld_left > 0) {
      const int kb0 = ld_kt * G::kKbTile;
      const int kb_left = p.kb_count - kb0;  // scale blocks of K from this tile on
      uint4* const sa = pipe + slot * G::kStageChunks;
      uint4* const sb = sa + G::kAChunks;
      uint4* const ss = sb + G::kBChunks;
#pragma unroll
      for (int i = 0; i < G::kAChunks / kThreads; ++i) {
        const bool ok = i * kARowStep < a_rows_left && a_ch / 4 < kb_left;
        const T* src = a_base + i * kARowStep * k_elems + kb0 * kBlockK;
        ptx::CpAsync16ZeroFill(sa + a_dst0 + i * kThreads, ok ? src : a, ok);
      }
#pragma unroll
      for (int i = 0; i < G::kBChunks / kThreads; ++i) {
        const bool ok = b_ok && b_kbl0 + i * kBKbStep < kb_left;
        const uint4* src = b_base + (kb0 + i * kBKbStep) * b_kb_stride;
        ptx::CpAsync16ZeroFillHint(sb + tid + i * kThreads, ok ? src : p.tiles, ok, policy);
      }
      if (tid < G::kSChunks) {
        const bool ok = s_ok && s_kbl < kb_left;
        const uint8_t* src = s_base + static_cast<int64_t>(kb0) * p.n_pad;
        ptx::CpAsync16ZeroFillHint(ss + tid, ok ? src : p.scales, ok, policy);
      }
      --ld_left;
      if (++ld_kt == p.k_tiles) {
        ld_kt = 0;
        ++ld_col;
        if (ld_left > 0) start_column(ld_col);
      }
    }
    ptx::CpAsyncCommit();  // possibly empty: keeps one group per stage
  };

  // ---- shared -> registers -> tensor cores ----
  float acc[G::kFrags][4];
  auto zero_acc = [&]() {
#pragma unroll
    for (int i = 0; i < G::kFrags; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  };

  auto compute_stage = [&](int slot) {
    const uint4* const sa = pipe + slot * G::kStageChunks;
    const uint4* const sb = sa + G::kAChunks;
    const uint32_t* const ss = reinterpret_cast<const uint32_t*>(sb + G::kBChunks);
#pragma unroll
    for (int kw = 0; kw < G::kKbWarp; ++kw) {
      const int kbl = warp_k * G::kKbWarp + kw;
      // A fragments of both k16 halves of this scale block. ldmatrix lanes
      // 0-7 / 8-15 / 16-23 / 24-31 address rows 0-7 / 8-15 / 0-7 / 8-15 of
      // the m16 block at k chunk 2s / 2s / 2s+1 / 2s+1 -> registers a[0..3]
      // in mma order (see MmaM16N8K16).
      uint32_t af[2][G::kMBlocks][4];
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int mb = 0; mb < G::kMBlocks; ++mb) {
          const int row = mb * 16 + (lane % 16), ch = kbl * 4 + 2 * s + lane / 16;
          ptx::LdMatrixX4(af[s][mb], sa + row * G::kARowChunks + (ch ^ (row % 8)));
        }
#pragma unroll
      for (int u = 0; u < G::kUnitsWarp; ++u) {
        const int ul = warp_n * G::kUnitsWarp + u;
        const uint4 w = sb[(kbl * G::kUnitsTile + ul) * 32 + lane];       // LDS.128, lane-contiguous
        const uint32_t sw = ss[(kbl * G::kNTile + ul * kUnitN) / 4 + g];  // 4 multiplier bytes
        uint32_t mult[4];
        BlockMultipliers<kD>(sw, mult);
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t b[4];
          DequantWord<kD>(words[j], mult[j], b);
#pragma unroll
          for (int s = 0; s < 2; ++s)
#pragma unroll
            for (int mb = 0; mb < G::kMBlocks; ++mb)
              ptx::MmaM16N8K16<T>(acc[mb * G::kN8Warp + 4 * u + j], af[s][mb], b[2 * s], b[2 * s + 1]);
        }
      }
    }
  };

  // wgmma: warp w dequantizes unit w (its lane's 16 bytes: 4 n8 tiles x 32 k)
  // into the A fragments of both m64 halves of its warpgroup. Half h takes
  // n8 tiles 2h (rows g of the warp's m16 slice) and 2h + 1 (rows g + 8):
  // the tiles' B registers {k 2t.., k 2t+8..} are the A registers
  // {a0 | a2} and {a1 | a3}. One wgmma group per scale block; the next
  // block's dequantization runs while it executes (at most one group in
  // flight when fragments are rewritten).
  auto compute_stage_wgmma = [&](int slot) {
    if constexpr (G::kWgmma) {  // (instantiated for the mma.sync rows too, never called there)
    const uint4* const sa = pipe + slot * G::kStageChunks;
    const uint4* const sb = sa + G::kAChunks;
    const uint32_t* const ss = reinterpret_cast<const uint32_t*>(sb + G::kBChunks);
#pragma unroll
    for (int kbl = 0; kbl < G::kKbTile; ++kbl) {
      const uint4 w = sb[(kbl * G::kUnitsTile + warp) * 32 + lane];        // LDS.128
      const uint32_t sw = ss[(kbl * G::kNTile + warp * kUnitN) / 4 + g];  // 4 multiplier bytes
      uint32_t mult[4];
      BlockMultipliers<kD>(sw, mult);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
      uint32_t bt[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) DequantWord<kD>(words[j], mult[j], bt[j]);
      ptx::WgmmaWait<1>();
      ptx::WgmmaFence();
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t fa[4] = {bt[2 * h][2 * s], bt[2 * h + 1][2 * s], bt[2 * h][2 * s + 1],
                                  bt[2 * h + 1][2 * s + 1]};
          // k16 step 2 kbl + s = 32 bytes into each 128-byte swizzled row.
          ptx::WgmmaM64K16RS<T, G::kTileM>(
              reinterpret_cast<float(&)[G::kTileM / 2]>(acc[h * (G::kTileM / 8)]), fa,
              ptx::SmemDescSwizzle128(sa + 4 * kbl + 2 * s));
        }
      ptx::WgmmaCommit();
    }
    }
  };

  // ---- end of a column: reduce warps_k, then CTAs, then store ----
  auto slot_of = [&](int cta, int col) {  // partial-tile slot of (CTA, column)
    const int cta_first_col = static_cast<int>(static_cast<int64_t>(cta) * p.iters / p.k_tiles);
    return 2 * cta + (col == cta_first_col ? 0 : 1);
  };

  auto finish_column = [&](int col) {
    if constexpr (G::kWgmma) {  // the accumulators are final once no wgmma is in flight
      ptx::WgmmaWait<0>();
#pragma unroll
      for (int i = 0; i < G::kFrags; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) ptx::RegisterFence(acc[i][e]);
    }
    // 1. warps_k partial sums -> warps with warp_k == 0 (fragment layout,
    //    lane-contiguous float4s: conflict-free).
    if constexpr (G::kWarpsK > 1) {
      if (warp_k > 0) {
#pragma unroll
        for (int i = 0; i < G::kFrags; ++i)
          red[(((warp_k - 1) * G::kWarpsN + warp_n) * G::kFrags + i) * 32 + lane] =
              make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      }
      __syncthreads();
      if (warp_k == 0) {
#pragma unroll
        for (int wk = 1; wk < G::kWarpsK; ++wk)
#pragma unroll
          for (int i = 0; i < G::kFrags; ++i) {
            const float4 v = red[(((wk - 1) * G::kWarpsN + warp_n) * G::kFrags + i) * 32 + lane];
            acc[i][0] += v.x, acc[i][1] += v.y, acc[i][2] += v.z, acc[i][3] += v.w;
          }
      }
      // `red` is next written after the next stage barrier.
    }
    // 2. Split-K column: publish, count arrivals, last one sums in CTA order.
    const int64_t col_tile0 = static_cast<int64_t>(col) * p.k_tiles;
    const int first_cta = static_cast<int>(col_tile0 / p.iters);
    const int last_cta = static_cast<int>((col_tile0 + p.k_tiles - 1) / p.iters);
    bool store = true;
    if (first_cta != last_cta) {
      if (warp_k == 0) {
        float4* const part = reinterpret_cast<float4*>(p.partials) +
                             static_cast<int64_t>(slot_of(blockIdx.x, col)) * G::kPartialChunks;
#pragma unroll
        for (int i = 0; i < G::kFrags; ++i)
          part[(warp_n * G::kFrags + i) * 32 + lane] =
              make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      }
      const int arrived_before = ptx::CtaArrive(p.counters + col, flag);
      store = arrived_before == last_cta - first_cta;
      if (store && warp_k == 0) {
        zero_acc();
        for (int cta = first_cta; cta <= last_cta; ++cta) {  // fixed order: deterministic
          const float4* const part = reinterpret_cast<const float4*>(p.partials) +
                                     static_cast<int64_t>(slot_of(cta, col)) * G::kPartialChunks;
#pragma unroll
          for (int i = 0; i < G::kFrags; ++i) {
            const float4 v = __ldcg(part + (warp_n * G::kFrags + i) * 32 + lane);  // L2, not L1
            acc[i][0] += v.x, acc[i][1] += v.y, acc[i][2] += v.z, acc[i][3] += v.w;
          }
        }
      }
    }
    // 3. C = F[n] * acc, rounded to T; rows >= m and columns >= n skipped.
    if constexpr (G::kWgmma) {
      // Half h, register pair r: feature unit * 32 + 8 (2h + r) + g; frag i:
      // tokens 8i + 2t, 8i + 2t + 1 (WgmmaM64K16RS's D layout).
      if (store) {
        const int n_idx = col / p.m_chunks, m_chunk = col - n_idx * p.m_chunks;
        const uint8_t* const planes = p.scales + static_cast<int64_t>(p.kb_count) * p.n_pad;
        T* const c = static_cast<T*>(p.c);
        const int unit = n_idx * G::kUnitsTile + warp;
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int nf = unit * kUnitN + 8 * (2 * h + r) + g;
            if (nf >= p.n) continue;
            const float f = RowFactor(planes, p.n_pad, nf);
#pragma unroll
            for (int i = 0; i < G::kTileM / 8; ++i)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int row = m_chunk * G::kTileM + 8 * i + 2 * t + e;
                if (row < p.m)
                  c[static_cast<int64_t>(row) * p.n + nf] =
                      ptx::FloatTo<T>(__fmul_rn(acc[h * (G::kTileM / 8) + i][2 * r + e], f));
              }
          }
      }
    } else if (store && warp_k == 0) {
      const int n_idx = col / p.m_chunks, m_chunk = col - n_idx * p.m_chunks;
      const uint8_t* const planes = p.scales + static_cast<int64_t>(p.kb_count) * p.n_pad;
      T* const c = static_cast<T*>(p.c);
      const bool pair_store = (p.n % 2) == 0;  // 4-byte aligned pairs
#pragma unroll
      for (int u = 0; u < G::kUnitsWarp; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n0 = n_idx * G::kNTile + (warp_n * G::kUnitsWarp + u) * kUnitN + 8 * j + 2 * t;
          if (n0 >= p.n) continue;
          const float f0 = RowFactor(planes, p.n_pad, n0);
          const float f1 = RowFactor(planes, p.n_pad, n0 + 1);  // n0 + 1 < n_pad always
#pragma unroll
          for (int mb = 0; mb < G::kMBlocks; ++mb)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int row = m_chunk * G::kTileM + mb * 16 + g + 8 * half;
              if (row >= p.m) continue;
              const float* v = acc[mb * G::kN8Warp + 4 * u + j];
              const float v0 = __fmul_rn(v[2 * half], f0), v1 = __fmul_rn(v[2 * half + 1], f1);
              T* const dst = c + static_cast<int64_t>(row) * p.n + n0;
              if (n0 + 1 < p.n && pair_store) {
                *reinterpret_cast<uint32_t*>(dst) = ptx::PackFloat2<T>(v0, v1);
              } else {
                dst[0] = ptx::FloatTo<T>(v0);
                if (n0 + 1 < p.n) dst[1] = ptx::FloatTo<T>(v1);
              }
            }
        }
    }
    zero_acc();
  };

  // ---- main loop: one tile per iteration, stages - 1 tiles in flight ----
  zero_acc();
#pragma unroll
  for (int s = 0; s < G::kStages - 1 - G::kLag; ++s) fetch_tile(s);
  int slot = 0, fetch_slot = G::kStages - 1 - G::kLag;
  // Tile tt has landed once at most stages - 2 - lag newer groups are
  // pending; the barrier also guarantees every warp is done with slot
  // `fetch_slot` (it held tile tt - 1 - lag: for wgmma, tile tt - 2, whose last
  // group every warp waited for during tile tt - 1), which is refilled next.
  auto run_tile = [&]() {
    ptx::CpAsyncWait<G::kStages - 2 - G::kLag>();
    if constexpr (G::kWgmma) ptx::FenceProxyAsyncShared();  // cp.async data -> wgmma's reads
    __syncthreads();
    fetch_tile(fetch_slot);
    if constexpr (G::kWgmma) compute_stage_wgmma(slot);
    else compute_stage(slot);
    slot = slot + 1 == G::kStages ? 0 : slot + 1;
    fetch_slot = fetch_slot + 1 == G::kStages ? 0 : fetch_slot + 1;
  };
  int col = t_begin / p.k_tiles, kt = t_begin - col * p.k_tiles;
  if constexpr (G::kWgmma) {
    // One outer pass per column, so that the column epilogue follows a loop
    // instead of sitting under a branch: ptxas serializes every wgmma when
    // accumulators are touched on a path it cannot prove convergent.
    for (int left = t_end - t_begin; left > 0; ++col, kt = 0) {
      for (int n_col = min(left, p.k_tiles - kt); n_col > 0; --n_col, --left) run_tile();
      finish_column(col);
    }
  } else {  // (the same walk; this form keeps the mma.sync rows free of spills)
    for (int tt = t_begin; tt < t_end; ++tt) {
      run_tile();
      if (++kt == p.k_tiles || tt + 1 == t_end) {
        finish_column(col);
        kt = 0;
        ++col;
      }
    }
  }
  ptx::CpAsyncWait<0>();  // leave no copy in flight (only empty groups remain)
}

// ===========================================================================
// Host: plan, workspace, launch.
// ===========================================================================

struct Plan {
  int cfg = -1;
  int m_chunks = 0, n_tiles = 0, k_tiles = 0, n_cols = 0;
  int64_t total = 0;
  int iters = 0, grid = 0;
  bool split = false;
  int64_t counter_bytes = 0, partial_bytes = 0;
};

// Rows of the other path are skipped; the last row of each path has
// max_m = INT_MAX, so every M >= 1 finds one.
int SelectConfig(int64_t m, bool wgmma) {
  for (int i = 0; i < kNumTileConfigs; ++i) {
    const MmaPath path = kTileConfigs[i].path;
    if (path == (wgmma ? MmaPath::kMmaSync : MmaPath::kWgmma)) continue;
    if (m <= kTileConfigs[i].max_m) return i;
  }
  return -1;
}

// The one function that turns (m, n, k, sm_count, wgmma) into a launch; used
// by MarlinWorkspaceBytes at trace time and by MarlinGemm at run time.
bool MakePlan(int64_t m, int64_t n, int64_t k, int sm_count, bool wgmma, Plan* plan) {
  if (m < 1 || !MarlinCanImplement(n, k).empty() || sm_count < 1) return false;
  Plan p;
  p.cfg = SelectConfig(m, wgmma);
  if (p.cfg < 0) return false;
  const TileConfig& c = kTileConfigs[p.cfg];
  const int64_t m_chunks = CeilDiv(m, 16 * c.m_blocks);
  const int64_t n_tiles = CeilDiv(n, c.n_tile);
  const int64_t k_tiles = CeilDiv(k / kBlockK, c.k_tile / kBlockK);
  const int64_t n_cols = m_chunks * n_tiles;
  const int64_t total = n_cols * k_tiles;
  if (m > INT_MAX || n_cols > INT_MAX || total > INT_MAX) return false;
  int64_t grid = std::min<int64_t>(sm_count, total);
  int64_t iters = CeilDiv(total, grid);
  // Plenty of columns: give each CTA whole columns (no split-K traffic); the
  // imbalance is at most one column in >= 4.
  if (n_cols >= 4 * static_cast<int64_t>(sm_count)) iters = RoundUp(iters, k_tiles);
  grid = CeilDiv(total, iters);  // every CTA gets >= 1 tile
  p.m_chunks = static_cast<int>(m_chunks);
  p.n_tiles = static_cast<int>(n_tiles);
  p.k_tiles = static_cast<int>(k_tiles);
  p.n_cols = static_cast<int>(n_cols);
  p.total = total;
  p.iters = static_cast<int>(iters);
  p.grid = static_cast<int>(grid);
  // A stripe boundary inside a column exists iff some b * iters (0 < b < grid)
  // is not a multiple of k_tiles, i.e. iff iters is not.
  p.split = grid > 1 && iters % k_tiles != 0;
  if (p.split) {
    p.counter_bytes = RoundUp(4 * n_cols, 256);
    p.partial_bytes = 2 * grid * 16 * c.m_blocks * c.n_tile * static_cast<int64_t>(sizeof(float));
  }
  *plan = p;
  return true;
}

// Per-device "dynamic shared memory opt-in done" flags, per kernel instance.
constexpr int kMaxDevices = 64;

template <int kCfg, typename T>
std::string LaunchConfig(const KernelParams& params, int grid, cudaStream_t stream) {
  constexpr int kSmem = Geometry<kCfg>::kSmemBytes;
  auto* kernel = &MarlinMxfp4GemmKernel<kCfg, T>;
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
  kernel<<<grid, kThreads, kSmem, stream>>>(params);
  // cudaGetLastError reports launch-configuration errors of this launch (and
  // could report an earlier asynchronous error of another kernel).
  JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return "";
}

template <typename T, size_t... kIs>
std::string LaunchDispatch(int cfg, const KernelParams& params, int grid, cudaStream_t stream,
                           std::index_sequence<kIs...>) {
  std::string result = "jax_mxfp4 marlin: no kernel for config " + std::to_string(cfg);
  ((cfg == static_cast<int>(kIs) ? (result = LaunchConfig<kIs, T>(params, grid, stream), 0) : 0), ...);
  return result;
}

}  // namespace

// ===========================================================================
// Exported host API (marlin_gemm.h).
// ===========================================================================

std::string MarlinCanImplement(int64_t n, int64_t k) {
  if (k < kBlockK || k % kBlockK != 0)
    return "K = " + std::to_string(k) + " must be a positive multiple of 32 (MXFP4 block size)";
  if (n < 1) return "N = " + std::to_string(n) + " must be positive";
  // 32-bit indexing inside the kernel: units * 32 lanes, n_pad * (kb + 4).
  const PreparedShape s = GetPreparedShape(n, k);
  if (s.tiles_rows * s.tiles_cols / 16 > INT_MAX || s.scales_rows * s.scales_cols > INT_MAX ||
      k > INT_MAX / 2 || PaddedN(n) > INT_MAX / 2)
    return "N x K = " + std::to_string(n) + " x " + std::to_string(k) + " is too large";
  return "";
}

int64_t MarlinWorkspaceBytes(int64_t m, int64_t n, int64_t k, int sm_count, bool use_wgmma) {
  if (m == 0 && MarlinCanImplement(n, k).empty()) return 0;
  Plan plan;
  if (!MakePlan(m, n, k, sm_count, use_wgmma, &plan)) return -1;
  return plan.counter_bytes + plan.partial_bytes;
}

int MarlinDeviceSmCount(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v > 0) return v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  cache[device].store(v, std::memory_order_relaxed);
  return v;
}

std::string MarlinDescribePlan(int64_t m, int64_t n, int64_t k, int sm_count, bool use_wgmma) {
  Plan p;
  if (!MakePlan(m, n, k, sm_count, use_wgmma, &p)) return "unsupported";
  const TileConfig& c = kTileConfigs[p.cfg];
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "%s m%dxn%dxk%d grid=%d iters=%d cols=%d k_tiles=%d split=%s ws=%lld",
                c.name, 16 * c.m_blocks, c.n_tile, c.k_tile, p.grid, p.iters, p.n_cols,
                p.k_tiles, p.split ? "yes" : "no",
                static_cast<long long>(p.counter_bytes + p.partial_bytes));
  return buf;
}

std::string MarlinGemm(const MarlinGemmArgs& args, cudaStream_t stream) {
  const std::string why = MarlinCanImplement(args.n, args.k);
  if (!why.empty()) return "jax_mxfp4 marlin: " + why;
  if (args.dtype != InputDType::kBF16 && args.dtype != InputDType::kF16)
    return "jax_mxfp4 marlin: dtype must be bf16 or f16";
  if (args.m < 0) return "jax_mxfp4 marlin: negative M";
  if (args.m == 0) return "";
  if (args.use_wgmma) {  // the sm_80 cubin has no wgmma: never launch it elsewhere
    int device = 0, major = 0, minor = 0;
    JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
    JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    if (major != 9 || minor != 0)
      return "jax_mxfp4 marlin: use_wgmma needs a compute capability 9.0 device (sm_90a code), this is " +
             std::to_string(major) + "." + std::to_string(minor);
  }
  Plan plan;
  if (!MakePlan(args.m, args.n, args.k, args.sm_count, args.use_wgmma, &plan))
    return "jax_mxfp4 marlin: cannot plan M=" + std::to_string(args.m);
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
  kp.counters = plan.split ? static_cast<int*>(args.workspace) : nullptr;
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

  if (plan.split)  // arrival counters start at zero; partial tiles need no init
    JAX_MXFP4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(kp.counters, 0, plan.counter_bytes, stream));
  const auto seq = std::make_index_sequence<kNumTileConfigs>{};
  if (args.dtype == InputDType::kBF16)
    return LaunchDispatch<__nv_bfloat16>(plan.cfg, kp, plan.grid, stream, seq);
  return LaunchDispatch<__half>(plan.cfg, kp, plan.grid, stream, seq);
}

}  // namespace marlin
}  // namespace jax_mxfp4
