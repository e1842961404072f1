// The prepared ("Marlin") layout of MXFP4 weights: THE one specification.
//
// Everything that produces or consumes prepared weights derives from the
// constants and functions in this header: the CUDA kernels (marlin_kernel.cuh,
// marlin_dequantize.cu), the host-side preparation used by the GPU self-test
// (PrepareHost below) and its inverse used by the CPU handlers (UnprepareHost,
// marlin_cpu.cc), and the jnp preparation in jax_mxfp4/kernels/marlin_weights.py,
// which tests/test_marlin_layout.py checks against this file (it parses the
// extraction tables below and compares PrepareHost's bytes with Python's,
// byte for byte).
//
// ---------------------------------------------------------------------------
// Input (canonical MXFP4, DESIGN.md section 2)
//   w_packed uint8[N, K/2]   E2M1 codes, element 2i in the low nibble of byte i
//   w_scales uint8[N, K/32]  E8M0 bytes, scale 2^(byte - 127), 0xFF = NaN
//   K % 32 == 0; N >= 1. The output feature index is n, the reduction index k.
//
// Glossary
//   Kb      K / 32: number of scale blocks along K.
//   N_pad   N rounded up to a multiple of 32 (zero codes in the padding).
//   unit    32 output features x 32 k = one scale block of 32 rows; the
//           atom of the layout (512 bytes of codes). U = N_pad / 32 units per kb.
//   lane    the thread of a warp (0..31) that consumes 16 bytes of a unit;
//           g = lane / 4 ("groupID" in the PTX ISA), t = lane % 4.
//   j       word (0..3) of a lane's 16 bytes = one n8 tile of the unit.
//   p       one 32-bit mma B-fragment register produced from a word (0..3),
//           p = 2 s + h: s = k16 half of the scale block, h = register of the
//           m16n8k16 B fragment (k rows 2t..2t+1 or 2t+8..2t+9).
//   e       element of a register: 0 = low 16 bits (even k), 1 = high.
//
// Output 1: tiles uint8[Kb, N_pad * 16]
//   Byte offset ((kb * U + u) * 32 + lane) * 16 + 4 j + (0..3) is the
//   little-endian 32-bit word W(kb, u, lane, j) holding the 8 codes
//     n = 32 u + 8 j + g
//     k = 32 kb + 16 s + 8 h + 2 t + e       for s, h, e in {0, 1}
//   i.e. exactly the B-fragment elements (PTX ISA "Matrix Fragments for
//   mma.m16n8k16 with floating point type": B row = 2t + e (+8), col = g) of
//   n8 tile j for both k16 halves of the block. A warp reading unit (kb, u)
//   reads 512 contiguous bytes, lane l the 16 bytes at 16 l: each thread's
//   16-byte load feeds its B fragments with no shuffling.
//   Bits inside a word are NOT nibble-ordered: bit b of the code of element
//   (p, e) (b: 0 = mantissa m, 1 = e0, 2 = e1, 3 = sign) lives at word bit
//     SourceBit(p, e, b) = (16 e + kTarget[b] + rot) mod 32
//   where kTarget is the bit of the field in a 16-bit float (below) and rot is
//   the rotation of the extraction group of register p that contains field b
//   (tables kMarlinExtract*). The kernel then builds register p as
//     R_p = OR over groups (rotr(W, rot) & FieldMask(fields))
//   i.e. 1 or 2 funnel-shifts + 1 or 2 LOP3 per register, 9 (bf16) or 10 (f16)
//   integer instructions for 8 codes instead of ~16 with nibble order. The
//   tables were found by exhaustive search (NOTES.md); every word bit is used
//   exactly once (checked by tests/test_marlin_layout.py).
//
//   The register R_p as a 16-bit float pair is Raw(code) per element:
//     bf16: sign -> bit 15, (e1 e0 m) -> bits 8..6  =>  Raw = E2M1(code) * 2^-126
//     f16:  sign -> bit 15, (e1 e0 m) -> bits 11..9 =>  Raw = E2M1(code) * 2^-14
//   (E2M1 exponent field e1e0 lands in the low bits of the float exponent, m in
//   the top mantissa bit; E2M1 0.5 = exponent 0, m = 1 becomes the float's
//   subnormal 2^-127 / 2^-15, so no special case.)
//
// Output 2: scales uint8[Kb + 4, N_pad]
//   Rows 0..Kb-1: block multiplier bytes. Byte (kb, 32 u + 4 g + j) belongs to
//   n = 32 u + 8 j + g (the 4 bytes a lane needs for its 4 n8 tiles are one
//   aligned 32-bit word). The multiplier of block (n, kb) is the 16-bit float
//     bf16: bits = byte << 7   (byte = biased exponent, 2^(byte - 127))
//     f16:  bits = byte << 8   (byte = biased exponent << 2, 2^(byte/4 - 15))
//   and the kernel's B operand is  Raw(code) * multiplier, rounded to T
//   (exact, see the accuracy contract).
//   Rows Kb..Kb+3: byte planes of the float32 row factor F[n]: byte (Kb + i, n)
//   is byte i of the little-endian float32 F[n] (natural n order, unlike the
//   multiplier rows). Output C[m, n] = F[n] * sum_k A[m, k] * B[k, n].
//   Padding columns n >= N: codes 0, multiplier bytes 0, F = 0.
//
// Scale mapping (per output feature n; s = E8M0 byte of block (n, kb);
// smax = largest non-NaN s in row n, 127 if there is none):
//   bf16: off = max(0, smax - 128);  byte = s + 126 - off  (0 if < 1)
//         multiplier = 2^(s - 1 - off); Raw * multiplier = E2M1 * 2^(s - 127 - off)
//   f16:  off = smax - 128;          byte = (s - 98 - off) << 2  (0 if s - 98 - off < 1)
//         multiplier = 2^(s - 113 - off); Raw * multiplier = E2M1 * 2^(s - 127 - off)
//   F[n] = 2^off, exact float32 (off in [-128, 126]; 2^-127, 2^-128 subnormal).
//   A NaN block (s = 0xFF) gets the infinite multiplier (bf16 byte 0xFF, f16
//   byte 0x7C) and makes F[n] a quiet NaN (bits 0x7FC00000 | (off + 128): the
//   payload keeps `off` so the layout stays invertible): the whole output
//   column n is NaN, as in the reference (NaN * anything, 0 included, is NaN).
//
// Accuracy contract (what the kernel computes vs jax_mxfp4.reference):
//   The B operand Raw * multiplier equals the exact dequantized weight divided
//   by 2^off, bit for bit, for every block with
//     bf16: s >= smax - 133 (always when smax <= 128, i.e. all |w| <= 12)
//     f16:  s >= smax - 24
//   Other blocks of the row (more than 2^133 resp. 2^24 below the row's largest
//   scale) are rounded to the 16-bit subnormal grid or flushed to zero: their
//   absolute error is below 2^-25 * 2^(smax - 127), under half an ulp of the
//   row's largest representable weight in f16. The sum runs on tensor cores in
//   fp32 (products of 16-bit operands are exact; the order of the fp32
//   additions differs from the reference), the row factor is an exact power of
//   two, and C is rounded once to T. Weights whose exact value overflows
//   float32 (s >= 0xFD with large codes) are computed as finite where the
//   reference dequantization gives Inf.
#pragma once

#include <cstdint>
#include <cstring>

#include "../mxfp4.h"

namespace jax_mxfp4 {
namespace marlin {

// Layout atoms (see the glossary above).
constexpr int kUnitN = 32;                          // output features per unit
constexpr int kBlockK = 32;                         // k per scale block (OCP MX)
constexpr int kLaneBytes = 16;                      // bytes of a unit per lane
constexpr int kUnitBytes = 32 * kLaneBytes;         // 512 = 32 x 32 codes / 2
constexpr int kRowFactorPlanes = 4;                 // float32 bytes after the Kb rows

// One extraction group of register p: R_p |= rotr(W, rot) & FieldMask(fields).
// fields: bit mask over code bits (8 = sign, 4 = e1, 2 = e0, 1 = m); 0 = unused.
struct ExtractGroup {
  int rot;
  int fields;
};

MXFP4_HD constexpr bool IsBf16(InputDType dt) { return dt == InputDType::kBF16; }

// The tables live inside constexpr functions (not at namespace scope) so host
// and device code can both evaluate them. tests/test_marlin_layout.py parses
// them from this file: keep the one-line-per-row format.

// Code bit b (0 = m, 1 = e0, 2 = e1, 3 = sign) -> bit inside a 16-bit half.
MXFP4_HD constexpr int TargetBit(InputDType dt, int b) {
  // clang-format off
  constexpr int kTargetBitBf16[4] = {6, 7, 8, 15};
  constexpr int kTargetBitF16[4] = {9, 10, 11, 15};
  // clang-format on
  return IsBf16(dt) ? kTargetBitBf16[b] : kTargetBitF16[b];
}

// Group `group` (0 or 1) of register p (0..3). Found by exhaustive search for
// the fewest SHF + LOP3 per word under the constraint that every word bit is
// used once (NOTES.md): 9 instructions (bf16), 10 (f16) for 4 registers.
MXFP4_HD constexpr ExtractGroup Extract(InputDType dt, int p, int group) {
  // clang-format off
  constexpr ExtractGroup kMarlinExtractBf16[4][2] = {
      {{0, 0xF}, {0, 0x0}},
      {{4, 0xF}, {0, 0x0}},
      {{10, 0xF}, {0, 0x0}},
      {{6, 0x4}, {14, 0xB}},
  };
  constexpr ExtractGroup kMarlinExtractF16[4][2] = {
      {{4, 0xF}, {0, 0x0}},
      {{7, 0xF}, {0, 0x0}},
      {{0, 0x4}, {11, 0xB}},
      {{0, 0x1}, {13, 0xE}},
  };
  // clang-format on
  return IsBf16(dt) ? kMarlinExtractBf16[p][group] : kMarlinExtractF16[p][group];
}

// Mask of the register bits (both halves) that a group with `fields` fills.
MXFP4_HD constexpr uint32_t FieldMask(InputDType dt, int fields) {
  uint32_t mask = 0;
  for (int b = 0; b < 4; ++b) {
    if (fields & (1 << b)) mask |= (1u << TargetBit(dt, b)) | (1u << (16 + TargetBit(dt, b)));
  }
  return mask;
}

// Word bit that holds code bit b of element (register p, half e).
MXFP4_HD constexpr int SourceBit(InputDType dt, int p, int e, int b) {
  const ExtractGroup g0 = Extract(dt, p, 0);
  const int rot = (g0.fields & (1 << b)) ? g0.rot : Extract(dt, p, 1).rot;
  return (16 * e + TargetBit(dt, b) + rot) % 32;
}

// Position of an element inside its unit (the inverse view of the layout).
struct UnitCoord {
  int lane, j, p, e;
};
// n_in_unit in [0, 32), k_in_block in [0, 32).
MXFP4_HD constexpr UnitCoord CoordOf(int n_in_unit, int k_in_block) {
  const int g = n_in_unit % 8, j = n_in_unit / 8;
  const int s = k_in_block / 16, h = (k_in_block / 8) % 2;
  const int t = (k_in_block % 8) / 2, e = k_in_block % 2;
  return UnitCoord{4 * g + t, j, 2 * s + h, e};
}

// ---------------------------------------------------------------------------
// Shapes.

MXFP4_HD constexpr int64_t PaddedN(int64_t n) { return RoundUp(n, kUnitN); }

struct PreparedShape {
  int64_t tiles_rows, tiles_cols;    // uint8[Kb, N_pad * 16]
  int64_t scales_rows, scales_cols;  // uint8[Kb + 4, N_pad]
};

MXFP4_HD constexpr PreparedShape GetPreparedShape(int64_t n, int64_t k) {
  return PreparedShape{k / kBlockK, PaddedN(n) * (kUnitBytes / kUnitN), k / kBlockK + kRowFactorPlanes,
                       PaddedN(n)};
}

// ---------------------------------------------------------------------------
// Scale mapping (see "Scale mapping" above).

inline int RowOffset(int smax, InputDType dt) {
  return IsBf16(dt) ? (smax > 128 ? smax - 128 : 0) : smax - 128;
}

inline uint8_t MultiplierByte(uint8_t s, int off, InputDType dt) {
  if (s == kE8M0Nan) return IsBf16(dt) ? 0xFF : 0x7C;  // infinite multiplier
  if (IsBf16(dt)) {
    const int e = static_cast<int>(s) + 126 - off;  // <= 254 because off >= smax - 128
    return e < 1 ? 0 : static_cast<uint8_t>(e);
  }
  const int e = static_cast<int>(s) - 98 - off;  // <= 30 because off == smax - 128
  return e < 1 ? 0 : static_cast<uint8_t>(e << 2);
}

// float32 bits of 2^off (off in [-128, 126]), or a quiet NaN carrying off + 128.
inline uint32_t RowFactorBits(int off, bool nan_row) {
  if (nan_row) return 0x7FC00000u | static_cast<uint32_t>(off + 128);
  if (off >= -126) return static_cast<uint32_t>(off + 127) << 23;
  return 0x00400000u >> (-127 - off);  // subnormal 2^-127, 2^-128
}

// Inverse of the scale mapping (unprepare_marlin_weights in marlin_weights.py
// implements the same): the row offset from a row factor's float32 bits, and
// the canonical E8M0 byte of a multiplier byte. A multiplier byte 0 is a block
// the accuracy contract flushed to zero: it comes back as scale byte 0.
MXFP4_HD constexpr int RowOffsetOfFactorBits(uint32_t f) {
  const int exp_field = static_cast<int>((f >> 23) & 0xFFu);
  if (exp_field == 0xFF) return static_cast<int>(f & 0xFFu) - 128;  // NaN row: off + 128 in the payload
  if (f == 0x00400000u) return -127;
  if (f == 0x00200000u) return -128;
  return exp_field > 0 ? exp_field - 127 : 0;
}

MXFP4_HD constexpr uint8_t CanonicalScaleByte(uint8_t mult, int off, InputDType dt) {
  if (mult == (IsBf16(dt) ? 0xFF : 0x7C)) return kE8M0Nan;
  if (mult == 0) return 0;
  const int s = IsBf16(dt) ? static_cast<int>(mult) - 126 + off : (static_cast<int>(mult) >> 2) + 98 + off;
  return static_cast<uint8_t>(s);
}

// Byte offset of the 32-bit word (kb, unit, lane, j) inside `tiles`.
MXFP4_HD constexpr int64_t WordOffset(int64_t kb, int64_t n_pad, int64_t unit, int lane, int j) {
  return kb * n_pad * (kUnitBytes / kUnitN) + unit * kUnitBytes + lane * kLaneBytes + j * 4;
}

// ---------------------------------------------------------------------------
// Host reference preparation (used by the GPU self-test; the library prepares
// with jnp in jax_mxfp4/kernels/marlin_weights.py, tested equal to this).
//   w_packed uint8[n, k/2], w_scales uint8[n, k/32] (linear layout)
//   tiles    uint8[k/32, N_pad * 16], scales uint8[k/32 + 4, N_pad]
inline void PrepareHost(const uint8_t* w_packed, const uint8_t* w_scales, int64_t n, int64_t k,
                        InputDType dt, uint8_t* tiles, uint8_t* scales) {
  const int64_t kb_count = k / kBlockK, n_pad = PaddedN(n), units = n_pad / kUnitN;
  int src_bit[4][2][4];
  for (int p = 0; p < 4; ++p)
    for (int e = 0; e < 2; ++e)
      for (int b = 0; b < 4; ++b) src_bit[p][e][b] = SourceBit(dt, p, e, b);

  for (int64_t kb = 0; kb < kb_count; ++kb)
    for (int64_t u = 0; u < units; ++u)
      for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < 4; ++j) {
          const int64_t row = kUnitN * u + 8 * j + lane / 4;
          uint32_t word = 0;
          for (int p = 0; p < 4; ++p)
            for (int e = 0; e < 2; ++e) {
              const int64_t col = kBlockK * kb + 16 * (p / 2) + 8 * (p % 2) + 2 * (lane % 4) + e;
              uint32_t code = 0;
              if (row < n) code = (w_packed[row * (k / 2) + col / 2] >> (4 * (col % 2))) & 0xFu;
              for (int b = 0; b < 4; ++b) word |= ((code >> b) & 1u) << src_bit[p][e][b];
            }
          uint8_t* dst = tiles + ((kb * units + u) * 32 + lane) * kLaneBytes + 4 * j;
          for (int i = 0; i < 4; ++i) dst[i] = static_cast<uint8_t>(word >> (8 * i));
        }

  std::memset(scales, 0, static_cast<size_t>((kb_count + kRowFactorPlanes) * n_pad));
  for (int64_t row = 0; row < n; ++row) {
    int smax = -1;
    bool nan_row = false;
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      const uint8_t s = w_scales[row * kb_count + kb];
      if (s == kE8M0Nan) nan_row = true;
      else if (s > smax) smax = s;
    }
    if (smax < 0) smax = kE8M0Bias;
    const int off = RowOffset(smax, dt);
    const int64_t u = row / kUnitN, g = row % 8, j = (row % kUnitN) / 8;
    const int64_t col = kUnitN * u + 4 * g + j;
    for (int64_t kb = 0; kb < kb_count; ++kb)
      scales[kb * n_pad + col] = MultiplierByte(w_scales[row * kb_count + kb], off, dt);
    const uint32_t f = RowFactorBits(off, nan_row);
    for (int i = 0; i < kRowFactorPlanes; ++i)
      scales[(kb_count + i) * n_pad + row] = static_cast<uint8_t>(f >> (8 * i));
  }
}

// ---------------------------------------------------------------------------
// Host inverse of PrepareHost (unprepare_marlin_weights in marlin_weights.py is
// its jnp twin): prepared tiles/scales of an [n, k] weight -> canonical
// w_packed uint8[n, k/2] and linear w_scales uint8[n, k/32]. Codes round-trip
// exactly; a block the accuracy contract flushed (multiplier byte 0) comes back
// as scale byte 0. Used by the CPU handlers of the Marlin custom calls
// (marlin_cpu.cc), which then compute with the canonical CPU code.
inline void UnprepareHost(const uint8_t* tiles, const uint8_t* scales, int64_t n, int64_t k, InputDType dt,
                          uint8_t* w_packed, uint8_t* w_scales) {
  const int64_t kb_count = k / kBlockK, n_pad = PaddedN(n);
  int src_bit[4][2][4];
  for (int p = 0; p < 4; ++p)
    for (int e = 0; e < 2; ++e)
      for (int b = 0; b < 4; ++b) src_bit[p][e][b] = SourceBit(dt, p, e, b);

  for (int64_t row = 0; row < n; ++row) {
    const int64_t u = row / kUnitN;
    const int r = static_cast<int>(row % kUnitN);
    uint32_t factor = 0;
    for (int i = 0; i < kRowFactorPlanes; ++i)
      factor |= static_cast<uint32_t>(scales[(kb_count + i) * n_pad + row]) << (8 * i);
    const int off = RowOffsetOfFactorBits(factor);
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      const uint8_t mult = scales[kb * n_pad + kUnitN * u + 4 * (r % 8) + r / 8];
      w_scales[row * kb_count + kb] = CanonicalScaleByte(mult, off, dt);
      for (int kk = 0; kk < kBlockK; kk += 2) {
        uint8_t byte = 0;
        for (int e2 = 0; e2 < 2; ++e2) {
          const UnitCoord c = CoordOf(r, kk + e2);
          const uint8_t* src = tiles + WordOffset(kb, n_pad, u, c.lane, c.j);
          const uint32_t word = static_cast<uint32_t>(src[0]) | (static_cast<uint32_t>(src[1]) << 8) |
                                (static_cast<uint32_t>(src[2]) << 16) | (static_cast<uint32_t>(src[3]) << 24);
          uint32_t code = 0;
          for (int b = 0; b < 4; ++b) code |= ((word >> src_bit[c.p][c.e][b]) & 1u) << b;
          byte |= static_cast<uint8_t>(code << (4 * e2));
        }
        w_packed[row * (k / 2) + (kBlockK * kb + kk) / 2] = byte;
      }
    }
  }
}

}  // namespace marlin
}  // namespace jax_mxfp4
