// The wgmma consumer step of the Marlin GEMM's wgmma rows (sm_90a), shared by
// the all-warps kernel (marlin_kernel.cuh) and the warp-specialized one
// (marlin_kernel_ws.cuh): one pipeline stage of k_tile = 2 scale blocks.
//
// Warp w dequantizes unit w (its lane's 16 bytes: 4 n8 tiles x 32 k) into the
// A fragments of both m64 halves of its warpgroup. Half h takes n8 tiles 2h
// (rows g of the warp's m16 slice) and 2h + 1 (rows g + 8): the tiles' B
// registers {k 2t.., k 2t+8..} are the A registers {a0 | a2} and {a1 | a3}.
// One wgmma group per scale block, at most two in flight: block j waits for
// group j - 2, then dequantizes while group j - 1 runs. Group j's fragments
// stay in frag[j % 2] (k_tile = 2 blocks: j % 2 = kbl) until the wait that
// retires it. PTX makes touching a register an in-flight wgmma reads
// undefined, and ptxas, which takes the wgmma instruction for the value's
// last use, did reuse those registers for the next block's dequantization
// before the wait (seen in the SASS; corrupted fp16 results once nothing
// else delayed the warps). tools/check_wgmma_registers.py checks the SASS.
#pragma once

#include <cstdint>

#include "../cuda_helpers.cuh"
#include "marlin_dequant.cuh"
#include "marlin_layout.h"
#include "marlin_tiles.h"

namespace jax_mxfp4 {
namespace marlin {

// The A fragments of the wgmma groups in flight: [block % 2][k16 step s][half h][register].
using WgmmaFragments = uint32_t[2][2][2][4];

// Keeps buffer `buf`'s registers alive up to here (see above).
__device__ __forceinline__ void FenceFragments(WgmmaFragments& frag, int buf) {
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) ptx::RegisterFence(frag[buf][s][h][e]);
}

// One stage from `stage` (A tile, then B units, then multiplier bytes, as the
// loaders store them) by warp `warp` (unit) and lane `lane` (g = lane / 4: the
// lane's multiplier word, computed once by the caller). `after_wait(kbl)` runs once scale block kbl's wait has
// retired every group but the newest: at kbl = 1 that is every group that
// read the previous stage (the warp-specialized kernel releases its slot there).
template <int kCfg, typename T, typename AfterWait>
__device__ __forceinline__ void WgmmaStage(const uint4* stage, int warp, int lane, int g,
                                           float (&acc)[Geometry<kCfg>::kFrags][4], WgmmaFragments& frag,
                                           AfterWait after_wait) {
  using G = Geometry<kCfg>;
  static_assert(G::kWgmma && G::kKbTile == 2, "frag is indexed by the scale block's parity");
  constexpr InputDType kD = DTypeOf<T>::kValue;
  const uint4* const sb = stage + G::kAChunks;
  const uint32_t* const ss = reinterpret_cast<const uint32_t*>(sb + G::kBChunks);
#pragma unroll
  for (int kbl = 0; kbl < G::kKbTile; ++kbl) {
    const uint4 w = sb[(kbl * G::kUnitsTile + warp) * 32 + lane];        // LDS.128
    const uint32_t sw = ss[(kbl * G::kNTile + warp * kUnitN) / 4 + g];  // 4 multiplier bytes
    ptx::WgmmaWait<1>();
    FenceFragments(frag, kbl);  // group j - 2, which read frag[kbl], is done
    after_wait(kbl);
    uint32_t bt[4][4];
    DequantUnit<kD>(w, sw, bt);
    ptx::WgmmaFence();
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t(&fa)[4] = frag[kbl][s][h];
        WeightsAFragment(bt, h, s, fa);
        // k16 step 2 kbl + s = 32 bytes into each 128-byte swizzled row.
        ptx::WgmmaM64K16RS<T, G::kTileM>(reinterpret_cast<float(&)[G::kTileM / 2]>(acc[h * (G::kTileM / 8)]),
                                         fa, ptx::SmemDescSwizzle128(stage + 4 * kbl + 2 * s));
      }
    ptx::WgmmaCommit();
  }
}

// The end of a column's main loop: every group retired, the accumulators final.
template <int kCfg>
__device__ __forceinline__ void WgmmaRetireAll(float (&acc)[Geometry<kCfg>::kFrags][4], WgmmaFragments& frag) {
  ptx::WgmmaWait<0>();
  FenceFragments(frag, 0);
  FenceFragments(frag, 1);
#pragma unroll
  for (int i = 0; i < Geometry<kCfg>::kFrags; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) ptx::RegisterFence(acc[i][e]);
}

}  // namespace marlin
}  // namespace jax_mxfp4
