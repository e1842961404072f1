// Device-side dequantization of the prepared Marlin layout (marlin_layout.h:
// "Output 1", "Output 2" and "Scale mapping"): a word's registers by
// rotate-and-mask, the packed E8M0 block multipliers, the float32 row factor.
// Used by the GEMM (marlin_kernel.cuh) and the dense dequantization
// (marlin_dequantize.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../cuda_helpers.cuh"
#include "marlin_layout.h"

namespace jax_mxfp4 {
namespace marlin {

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

// All 4 registers of a word: r[p] = E2M1 pairs x 2^-126 (bf16) / 2^-14 (f16).
template <InputDType kD>
__device__ __forceinline__ void ExtractRegisters(uint32_t w, uint32_t (&r)[4]) {
  r[0] = ExtractRegister<kD, 0>(w);
  r[1] = ExtractRegister<kD, 1>(w);
  r[2] = ExtractRegister<kD, 2>(w);
  r[3] = ExtractRegister<kD, 3>(w);
}

// Word -> the 4 B registers {k16 step 0: b0, b1; step 1: b0, b1}, scaled.
template <InputDType kD>
__device__ __forceinline__ void DequantWord(uint32_t w, uint32_t mult, uint32_t (&b)[4]) {
  b[0] = Mul2<kD>(ExtractRegister<kD, 0>(w), mult);
  b[1] = Mul2<kD>(ExtractRegister<kD, 1>(w), mult);
  b[2] = Mul2<kD>(ExtractRegister<kD, 2>(w), mult);
  b[3] = Mul2<kD>(ExtractRegister<kD, 3>(w), mult);
}

// A lane's 16 bytes of a unit (word j = n8 tile j) and its 4 multiplier bytes
// -> the scaled B registers of all four n8 tiles (bt[j] as DequantWord).
template <InputDType kD>
__device__ __forceinline__ void DequantUnit(uint4 w, uint32_t sw, uint32_t (&bt)[4][4]) {
  uint32_t mult[4];
  BlockMultipliers<kD>(sw, mult);
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) DequantWord<kD>(words[j], mult[j], bt[j]);
}

// Where the weights are the MMA's A operand (mma.sync small8, wgmma): the m16
// A fragment of features 16h..16h+15 at k16 step s. n8 tiles 2h and 2h + 1 are
// rows g and g + 8, and a tile's B registers {k 2t.., k 2t+8..} are the A
// registers {a0 | a2} (tile 2h) and {a1 | a3} (tile 2h + 1).
__device__ __forceinline__ void WeightsAFragment(const uint32_t (&bt)[4][4], int h, int s,
                                                 uint32_t (&fa)[4]) {
  fa[0] = bt[2 * h][2 * s];
  fa[1] = bt[2 * h + 1][2 * s];
  fa[2] = bt[2 * h][2 * s + 1];
  fa[3] = bt[2 * h + 1][2 * s + 1];
}

// float32 row factor F[n] from its 4 byte planes (marlin_layout.h, Output 2).
__device__ __forceinline__ float RowFactor(const uint8_t* planes, int n_pad, int n) {
  const uint32_t bits = static_cast<uint32_t>(planes[n]) |
                        (static_cast<uint32_t>(planes[n_pad + n]) << 8) |
                        (static_cast<uint32_t>(planes[2 * n_pad + n]) << 16) |
                        (static_cast<uint32_t>(planes[3 * n_pad + n]) << 24);
  return __uint_as_float(bits);
}

}  // namespace marlin
}  // namespace jax_mxfp4
