// Tile configurations of the Marlin GEMM: every kernel variant is instantiated
// from the table below (marlin_kernel.cuh, launched by marlin_gemm.cu) and the planner picks one of its rows
// per launch (marlin_plan.cc). Host and device code; compile-time only.
#pragma once

#include <climits>
#include <cstddef>
#include <utility>

#include "marlin_layout.h"

namespace jax_mxfp4 {
namespace marlin {

// Which devices a row serves, and with which tensor-core instruction.
enum class MmaPath {
  kAny,       // mma.sync, every device (SM80 and SM90)
  kMmaSync,   // mma.sync, only where wgmma is not used (SM80, or use_wgmma off)
  kWgmma,     // wgmma.mma_async (sm_90a), only with use_wgmma on an SM90 device
};

// How a split-K column (one cut by a stripe boundary) is summed.
enum class SplitReduce {
  kLastCta,  // in the GEMM kernel: the CTA that arrives last sums every partial
             // (arrival counters, zeroed by a small kernel before the launch)
  kPass,     // a second kernel right after the GEMM, one block per slice of
             // each split column (no counters)
  kCluster,  // (sm_90) where every column's cluster runs at once and they
             // fill >= 2/3 of the SMs (MakePlan): each column's k tiles are
             // cut evenly over a thread-block cluster of 2-8 CTAs, which sum
             // their partial tiles through distributed shared memory (no
             // workspace, no second kernel); otherwise MakePlan takes the
             // next row for this M and N (wgmma128 -> wgmma128ws), or, for a
             // forced row, this row's stripes with kPass
};

// Who copies global -> shared.
enum class Loader {
  kAllWarps,           // every warp issues its share of each stage's cp.async, then computes
  kProducerWarpgroup,  // (wgmma rows) a third warpgroup only copies (40 registers,
                       // setmaxnreg), mbarriers per pipeline slot; the 8 MMA warps only
                       // dequantize and issue wgmma (marlin_kernel_ws.cuh)
};

struct TileConfig {
  const char* name;
  int tile_m;    // tokens (rows of A / C) per column: 8, or a multiple of 16
  int n_tile;    // output features per column (multiple of 32 * warps_n)
  int k_tile;    // k per pipeline stage (multiple of 32 * warps_k)
  int warps_n;   // warps side by side along N
  int warps_k;   // warps splitting each stage's k (reduced in shared memory)
  int stages;    // cp.async buffers; stages - 1 tiles are in flight
  int max_m;     // host heuristic: first config of the path with M <= max_m
  int min_n;     //   and N >= min_n is used
  MmaPath path;
  SplitReduce reduce;  // see SplitReduce; the partial tile's size decides it
  Loader loader;
};

// Why these numbers (NOTES.md has the arithmetic):
//  * 256 threads = 8 warps: 2 per SM sub-partition for latency hiding while
//    each thread keeps up to ~200 registers (1 CTA per SM).
//  * small8: M <= 8, tokens on the MMA's n8 side: the dequantized weights
//    are mma.sync's A operand (an m16 slice = two n8 tiles' B fragments,
//    register for register, as for wgmma below) and the activations its B
//    operand (one ldmatrix.x4 = both k16 halves of a scale block), so a
//    32-feature unit costs 4 mma.m16n8k16 per scale block instead of 8.
//    Measured (H200, compute alone, the weights' loads removed): halving
//    the MMAs of `small` cut 8192x28672 from 57 to 39 us: at M <= 16 the
//    MMA count matters, not bytes in flight (7 stages in flight instead of
//    3 changed nothing) nor the MMAs' dependency chain (two or four
//    independent accumulator chains: 0.98-1.03x).
//  * small: M <= 16 is weight-bandwidth bound. 16 KB of weights per stage and
//    3 stages in flight = 48 KB per SM, twice what Little's law asks for HBM3
//    (3 TB/s x ~1 us / 132 SMs ~ 23 KB). n_tile 128 keeps N/n_tile columns
//    plentiful so stripes stay short.
//  * smalln: small with n_tile 256 (8 x 1 warps, 3 stages) for N >= 16384:
//    half the columns, so half the column ends (warps_k reduction, split-K
//    arrival) per weight byte. Measured (self-test, small and smalln forced,
//    same machine): 8192x28672 1.09x (H100) / 1.10x (H200) at M = 16;
//    N = 5760..14336 0.99-1.04x, N = 4096 0.87-0.95x, hence the bound. The
//    same tile for M <= 8 (small8 with n_tile 256) lost on the H100
//    (0.86-0.99x; 8192x28672 0.99x) while the H200 gained 1.09x there: not used.
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
//  * wgmma128ws: wgmma128's tile run by the warp-specialized kernel
//    (marlin_kernel_ws.cuh: a producer warpgroup issues every copy, the 8
//    MMA warps only dequantize and issue wgmma; 8 stages of 25 KB, which
//    only SM90's 227 KB hold). MakePlan gives it the plans where wgmma128's
//    clusters do not fit (the stripes). Measured (H200 self-test, both rows
//    forced, same binary, alternating; NOTES.md section 8): 1.003-1.047x on
//    every stripe plan of the six benchmark shapes at M = 128..1024; where
//    wgmma128 has a cluster plan it stays ahead on five of six (0.88-0.985x).
//  * reduce: the rows whose split-K partial tile is 64-128 KB (large, the
//    wgmma rows) sum it in the reduction pass; one CTA summing 4-9 of them
//    alone was the tail at M = 64..256 (self-test A/B: 0.97-1.18x H200,
//    0.99-1.16x H100, then 0.98-1.12x and 0.99-1.09x more on the H100 for
//    the pass's batched loads and column grid; NOTES.md section 4). The
//    4-16 KB rows keep the last CTA: no second launch. wgmma128 (kCluster)
//    splits a column over a 2/4/8-CTA cluster instead where all columns'
//    clusters run at once on >= 2/3 of the SMs (H100 self-test: 1.05-1.20x
//    on those plans); wgmma64 keeps the pass (with the cluster code its
//    unchanged plans ran 0.91x: ptxas rescheduled its main loop).
constexpr TileConfig kTileConfigs[] = {
    // name    tile_m n_tile k_tile w_n w_k stages max_m min_n  path  reduce  loader
    {"small8", 8, 128, 256, 4, 2, 4, 8, 0, MmaPath::kAny, SplitReduce::kLastCta, Loader::kAllWarps},
    {"smalln", 16, 256, 256, 8, 1, 3, 16, 16384, MmaPath::kAny, SplitReduce::kLastCta, Loader::kAllWarps},
    {"small", 16, 128, 256, 4, 2, 4, 16, 0, MmaPath::kAny, SplitReduce::kLastCta, Loader::kAllWarps},
    {"medium", 32, 128, 256, 4, 2, 4, 32, 0, MmaPath::kAny, SplitReduce::kLastCta, Loader::kAllWarps},
    {"large", 64, 256, 64, 4, 2, 5, INT_MAX, 0, MmaPath::kMmaSync, SplitReduce::kPass, Loader::kAllWarps},
    {"wgmma64", 64, 256, 64, 8, 1, 8, 64, 0, MmaPath::kWgmma, SplitReduce::kPass,
     Loader::kAllWarps},  // M = 33..64 on SM90
    {"wgmma128", 128, 256, 64, 8, 1, 6, INT_MAX, 0, MmaPath::kWgmma, SplitReduce::kCluster, Loader::kAllWarps},
    {"wgmma128ws", 128, 256, 64, 8, 1, 8, INT_MAX, 0, MmaPath::kWgmma, SplitReduce::kPass,
     Loader::kProducerWarpgroup},
};
constexpr int kNumTileConfigs = sizeof(kTileConfigs) / sizeof(kTileConfigs[0]);
constexpr int kThreads = 256;  // the MMA warps of a CTA (and every thread of kAllWarps rows)
constexpr int kProducerThreads = 128;  // the copying warpgroup of Loader::kProducerWarpgroup rows
// Largest cluster of SplitReduce::kCluster (8: the portable cluster size).
constexpr int kMaxClusterSplit = 8;

// Every size the kernel derives from a row of the table, as compile-time
// constants (a struct of static ints rather than a local TileConfig: device
// lambdas may read these without capturing anything).
template <int kCfg>
struct Geometry {
  static constexpr int kNTile = kTileConfigs[kCfg].n_tile;
  static constexpr int kKTile = kTileConfigs[kCfg].k_tile;
  static constexpr int kWarpsN = kTileConfigs[kCfg].warps_n;
  static constexpr int kWarpsK = kTileConfigs[kCfg].warps_k;
  static constexpr int kStages = kTileConfigs[kCfg].stages;
  static constexpr bool kWgmma = kTileConfigs[kCfg].path == MmaPath::kWgmma;
  static constexpr int kTileM = kTileConfigs[kCfg].tile_m;  // rows of A / C per column
  static constexpr bool kProducerWarpgroup = kTileConfigs[kCfg].loader == Loader::kProducerWarpgroup;
  // Threads of a CTA, and those of them that issue the cp.async copies.
  static constexpr int kBlockThreads = kThreads + (kProducerWarpgroup ? kProducerThreads : 0);
  static constexpr int kLoadThreads = kProducerWarpgroup ? kProducerThreads : kThreads;
  // Which operand is the MMA's A (its m16 / m64 side). Activations (m16
  // blocks of tokens) for the mma.sync rows with tile_m >= 16; the
  // dequantized weights for wgmma and for a token tile of 8, which then
  // sits on the MMA's n8 side.
  static constexpr bool kWeightsA = kWgmma || kTileM < 16;
  static constexpr int kMBlocks = kWeightsA ? 0 : kTileM / 16;  // m16 token blocks (activations A)
  static constexpr int kKbTile = kKTile / kBlockK;      // scale blocks per stage
  static constexpr int kUnitsTile = kNTile / kUnitN;    // units across the CTA tile
  static constexpr int kUnitsWarp = kUnitsTile / kWarpsN;
  static constexpr int kKbWarp = kKbTile / kWarpsK;     // scale blocks per warp per stage
  static constexpr int kN8Warp = 4 * kUnitsWarp;        // n8 tiles per warp
  // Accumulators per thread: activations A: m16 token blocks x n8 feature
  // tiles; weights A: per unit two m16 feature slices x n8 token tiles.
  static constexpr int kFrags = kWeightsA ? kUnitsWarp * 2 * (kTileM / 8) : kMBlocks * kN8Warp;
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
  static constexpr bool kReducePass = kTileConfigs[kCfg].reduce != SplitReduce::kLastCta;
  // Cluster split-K: the CTA's partial tile goes to its own shared memory
  // (the pipeline buffers, idle by then), each CTA of the cluster sums one
  // slice of all of them.
  static constexpr bool kClusterSplit = kTileConfigs[kCfg].reduce == SplitReduce::kCluster;
  // The reduction pass: a block of kThreads sums kReduceChunks float4s per
  // thread of one slice; kReduceSlices blocks cover a partial tile.
  static constexpr int kReduceChunks = 4;
  static constexpr int kReduceSlices = kPartialChunks / (kThreads * kReduceChunks);
  // Stages - 1 tiles are in flight, less one more for wgmma, whose last group
  // of a stage may still read it while the next stage starts.
  static constexpr int kLag = kWgmma ? 1 : 0;
  // Loader::kProducerWarpgroup: a full and an empty mbarrier per slot, after the stages.
  static constexpr int kBarrierBytes = kProducerWarpgroup ? 16 * kStages : 0;
  static constexpr int kSmemBytes = 16 * (kStages * kStageChunks + kRedChunks) + 16 + kBarrierBytes +
                                    (kWgmma ? 1024 : 0);  // + flag (+ barriers) (+ alignment)

  static constexpr bool kValid =
      kWarpsN * kWarpsK * 32 == kThreads && kNTile % (kUnitN * kWarpsN) == 0 &&
      kKTile % (kBlockK * kWarpsK) == 0 &&
      kKTile >= 64 &&                          // XOR swizzle: >= 8 chunks per A row
      (!kReducePass || kPartialChunks % (kThreads * kReduceChunks) == 0) &&
      (!kClusterSplit || (kWgmma && kPartialChunks % (kThreads * kMaxClusterSplit) == 0 &&
                          kPartialChunks <= kStages * kStageChunks)) &&
      kLoadThreads % kARowChunks == 0 &&          // fixed thread -> A column ...
      (kLoadThreads / kARowChunks) % 8 == 0 &&    // ... and fixed row % 8 across chunks
      kAChunks % kLoadThreads == 0 &&             // every thread copies whole A chunks
      // B: a fixed unit per copying warp (kAllWarps), or a fixed set of units
      // (producer warpgroup: warp w copies units w, w + 4, ...)
      (kProducerWarpgroup ? kUnitsTile % (kLoadThreads / 32) == 0 : (kLoadThreads / 32) % kUnitsTile == 0) &&
      kBChunks % kLoadThreads == 0 && kSChunks <= kLoadThreads && kStages >= 2 + kLag &&
      (kWeightsA || kTileM % 16 == 0) &&
      // mma.sync with weights A: one n8 token tile, read by one ldmatrix.x4.
      (kWgmma || !kWeightsA || kTileM == 8) &&
      // SM80 has 163 KB of opt-in shared memory, SM90 (the only home of the wgmma rows) 227 KB.
      kSmemBytes <= (kWgmma ? 227 : 160) * 1024 &&
      // The producer warpgroup feeds the wgmma consumers, whose columns it never waits for.
      (!kProducerWarpgroup || (kWgmma && !kClusterSplit && kReducePass)) &&
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

}  // namespace marlin
}  // namespace jax_mxfp4
