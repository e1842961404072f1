// MXFP4 element math shared by the CPU handlers and the CUDA kernels.
//
// Formats (OCP Microscaling Formats (MX) spec v1.0, sections 5.3 and 6.3):
//   E2M1: sign, 2 exponent bits, 1 mantissa bit; magnitudes
//         {0, 0.5, 1, 1.5, 2, 3, 4, 6}; no Inf/NaN. Element 2i of a row sits in
//         the LOW nibble of byte i, element 2i+1 in the high nibble.
//   E8M0: unsigned biased exponent, value 2^(byte - 127); 0xFF is NaN.
//
// Everything here works on the IEEE bit patterns with integer arithmetic, so
// results do not depend on the floating-point environment: XLA's CPU threads
// run with flush-to-zero / denormals-are-zero, and real checkpoints contain
// subnormal weights. jax_mxfp4/formats.py implements the same algorithm in
// jnp; the two are tested bit for bit against each other.
//
// Quantizing one 32-element block (DESIGN.md section 2; formats.py has the
// long-form definition of every special case):
//   1. amax = max |x| over the block, taken on the bit patterns.
//   2. The block exponent E from amax by the rounding mode:
//        floor:   E = floor(log2 amax) - 2                  (OCP spec)
//        rceil:   E = ceil(log2(amax / 6))                  (never saturates)
//        compressed_tensors: the compressed-tensors 0.20 rule, see below.
//      E is clamped to [-127, 127]; the scale byte is E + 127.
//   3. Each element's magnitude |x| / 2^E is rounded to the nearest E2M1
//      magnitude, ties to even, saturating at 6. With q = |x| / 2^E the code is
//        [q > 0.25] + [q >= 0.75] + [q > 1.25] + [q >= 1.75]
//        + [q > 2.5] + [q >= 3.5] + [q > 5],
//      evaluated exactly by comparing |x| against t * 2^(E-2) for
//      t in {1, 3, 5, 7, 10, 14, 20}.
#pragma once

#include <cstdint>

#include "scale_layout.h"

#if defined(__CUDACC__)
#define MXFP4_UNROLL _Pragma("unroll")
#else
#define MXFP4_UNROLL
#endif

namespace jax_mxfp4 {

// Values must match Rounding in jax_mxfp4/formats.py (an FFI attribute).
enum class Rounding : int32_t { kFloor = 0, kRceil = 1, kCompressedTensors = 2 };

// Values must match InputDType in jax_mxfp4/formats.py.
enum class InputDType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr uint8_t kE8M0Nan = 0xFF;
constexpr int kE8M0Bias = 127;
constexpr int kMinScaleExponent = -127;  // byte 0x00
constexpr int kMaxScaleExponent = 127;   // byte 0xFE
constexpr uint32_t kF32AbsMask = 0x7FFFFFFFu;
constexpr uint32_t kF32Inf = 0x7F800000u;

MXFP4_HD int FloorLog2U32(uint32_t v) {  // v > 0
#if defined(__CUDA_ARCH__)
  return 31 - __clz(v);
#else
  return 31 - __builtin_clz(v);
#endif
}

// ---------------------------------------------------------------------------
// Conversions between input dtypes and float32 bit patterns (exact).

MXFP4_HD uint32_t Bf16BitsToF32Bits(uint16_t h) { return static_cast<uint32_t>(h) << 16; }

MXFP4_HD uint32_t F16BitsToF32Bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return sign | kF32Inf | (mant << 13);  // Inf / NaN
  if (exp != 0) return sign | ((exp + 112u) << 23) | (mant << 13);
  if (mant == 0) return sign;
  // Subnormal half: mant * 2^-24, normal in float32.
  const int lz = FloorLog2U32(mant);  // 0..9
  const uint32_t f_exp = static_cast<uint32_t>(lz - 24 + 127);
  return sign | (f_exp << 23) | ((mant << (23 - lz)) & 0x7FFFFFu);
}

// Float32 bit pattern of t * 2^p for a small positive integer t, or +Inf bits
// when it overflows. Exact for t < 32 and p >= -149; below that the value is
// floored to the subnormal grid (0 for a power of two), which is what the
// strict comparisons against it need.
MXFP4_HD uint32_t F32BitsOfIntTimesPow2(uint32_t t, int p) {
  const int lz = FloorLog2U32(t);
  const int exp = p + lz;
  if (exp > 127) return kF32Inf;
  if (exp >= -126) {
    return (static_cast<uint32_t>(exp + 127) << 23) | ((t << (23 - lz)) & 0x7FFFFFu);
  }
  const int shift = p + 149;  // value in units of 2^-149
  if (shift >= 0) return t << shift;
  return -shift >= 32 ? 0u : (t >> -shift);  // below the subnormal grid: floor
}

// Float32 bits -> bfloat16 / float16 bits, round to nearest even (NaN kept
// quiet). Used to produce dequantized values without touching the FPU.
MXFP4_HD uint16_t F32BitsToBf16Bits(uint32_t f) {
  if ((f & kF32AbsMask) > kF32Inf) return static_cast<uint16_t>((f >> 16) | 0x40u);
  const uint32_t rounding = 0x7FFFu + ((f >> 16) & 1u);
  return static_cast<uint16_t>((f + rounding) >> 16);
}

MXFP4_HD uint16_t F32BitsToF16Bits(uint32_t f) {
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const uint32_t a = f & kF32AbsMask;
  if (a > kF32Inf) return sign | 0x7E00u;
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: Inf
  const int exp = static_cast<int>(a >> 23) - 127;
  if (exp >= -14) {  // normal half
    const uint32_t mant = a & 0x7FFFFFu;
    uint32_t h = (static_cast<uint32_t>(exp + 15) << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  if (exp < -25) return sign;  // below half the smallest subnormal
  // Subnormal half: value / 2^-24, rounded to nearest even.
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;  // value = mant * 2^(exp-23)
  const int shift = -exp - 1;                         // 14..24 -> units of 2^-24
  const uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  const uint32_t h = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  return sign | static_cast<uint16_t>(h);
}

// ---------------------------------------------------------------------------
// E2M1 and E8M0 decoding.

// E2M1 magnitude code (0..7) as (t, p) with value t * 2^p, t in {0, 1, 3}.
// Arithmetic rather than a table: a table indexed at run time would live in
// local memory in device code.
MXFP4_HD void E2M1Magnitude(uint32_t code3, uint32_t* t, int* p) {
  // codes 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6: e = code >> 1, m = code & 1;
  // 0.5 = 1 * 2^-1, otherwise (1 + m/2) * 2^(e-1) = (m ? 3 : 1) * 2^(e - 1 - m).
  const uint32_t e = (code3 >> 1) & 3u, m = code3 & 1u;
  if (e == 0) {
    *t = m;
    *p = m ? -1 : 0;
    return;
  }
  *t = m ? 3u : 1u;
  *p = static_cast<int>(e) - 1 - static_cast<int>(m);
}

// Float32 bits of the dequantized value code * 2^(scale_byte - 127).
MXFP4_HD uint32_t DequantizeToF32Bits(uint32_t code, uint8_t scale_byte) {
  const uint32_t sign = (code & 8u) << 28;
  if (scale_byte == kE8M0Nan) return 0x7FC00000u;
  uint32_t t;
  int p;
  E2M1Magnitude(code, &t, &p);
  if (t == 0) return sign;
  return sign | F32BitsOfIntTimesPow2(t, p + static_cast<int>(scale_byte) - kE8M0Bias);
}

// ---------------------------------------------------------------------------
// Quantization.

// Result of choosing a block's scale: the E8M0 byte and, for finite blocks,
// the seven decision thresholds |x| is compared against (float32 bits).
struct BlockScale {
  uint8_t byte;
  bool nan_block;
  uint32_t threshold[7];
  // compressed_tensors only: a negative element keeps its sign bit only if
  // |x| exceeds this (float32 bits); below it the library's quotient x / 2^E
  // underflows to -0.0 in the input dtype and the code is 0x0.
  uint32_t sign_threshold;
};

// Threshold multipliers t (threshold = t * 2^(E-2)) and whether the decision
// at that threshold is strict (q > t/4) or not (q >= t/4); the alternation is
// what makes ties round to even. Functions rather than arrays so device code
// can use them.
MXFP4_HD constexpr uint32_t ThresholdT(int i) {
  return i == 0 ? 1 : i == 1 ? 3 : i == 2 ? 5 : i == 3 ? 7 : i == 4 ? 10 : i == 5 ? 14 : 20;
}
MXFP4_HD constexpr bool ThresholdStrict(int i) { return i % 2 == 0; }

// Unbiased block exponent for floor/rceil from amax's float32 bits
// (0 < amax_bits < Inf).
MXFP4_HD int BlockExponentFloorRceil(uint32_t amax_bits, Rounding rounding) {
  int log2_floor;
  uint32_t frac23;  // significand bits after the leading one, as 23 bits
  const uint32_t exp_field = amax_bits >> 23;
  if (exp_field != 0) {
    log2_floor = static_cast<int>(exp_field) - 127;
    frac23 = amax_bits & 0x7FFFFFu;
  } else {  // subnormal amax: normalise the mantissa
    const int lz = FloorLog2U32(amax_bits);
    log2_floor = lz - 149;
    frac23 = (amax_bits << (23 - lz)) & 0x7FFFFFu;
  }
  // floor(log2 amax) - 2 puts amax / 2^E in [4, 8); rceil adds one when the
  // significand exceeds 1.5 (amax / 2^(f-2) > 6).
  int e = log2_floor - 2;
  if (rounding == Rounding::kRceil && frac23 > 0x400000u) e += 1;
  return e;
}

MXFP4_HD BlockScale MakeBlockScale(int exponent) {
  BlockScale s{};
  if (exponent < kMinScaleExponent) exponent = kMinScaleExponent;
  if (exponent > kMaxScaleExponent) exponent = kMaxScaleExponent;
  s.byte = static_cast<uint8_t>(exponent + kE8M0Bias);
  s.nan_block = false;
  s.sign_threshold = 0;
MXFP4_UNROLL
  for (int i = 0; i < 7; ++i) s.threshold[i] = F32BitsOfIntTimesPow2(ThresholdT(i), exponent - 2);
  return s;
}

MXFP4_HD BlockScale NanBlockScale() {
  BlockScale s{};
  s.byte = kE8M0Nan;
  s.nan_block = true;
  return s;
}

// E2M1 magnitude code (0..7) of |x| (float32 bits, sign cleared).
MXFP4_HD uint32_t E2M1MagnitudeCode(uint32_t abs_bits, const BlockScale& s) {
  uint32_t code = 0;
MXFP4_UNROLL
  for (int i = 0; i < 7; ++i) {
    code += ThresholdStrict(i) ? (abs_bits > s.threshold[i]) : (abs_bits >= s.threshold[i]);
  }
  return code;
}

// Unbiased, clamped block exponent for floor / rceil from the block's largest
// |x| bits (finite). An all-zero block gets -127 (byte 0).
MXFP4_HD int FloorRceilExponent(uint32_t amax_bits, Rounding rounding) {
  if (amax_bits == 0) return kMinScaleExponent;
  const int e = BlockExponentFloorRceil(amax_bits, rounding);
  return e < kMinScaleExponent ? kMinScaleExponent : (e > kMaxScaleExponent ? kMaxScaleExponent : e);
}

// 4-bit code of one element for floor / rceil: the sign bit follows the
// input's sign bit (as cvt.rn.satfinite.e2m1x2.f32 does), so -0.0 and
// negatives that round to zero give 0x8.
MXFP4_HD uint32_t E2M1Code(uint32_t f32_bits, const BlockScale& s) {
  if (s.nan_block) return 0;
  return ((f32_bits >> 28) & 8u) | E2M1MagnitudeCode(f32_bits & kF32AbsMask, s);
}

// ---------------------------------------------------------------------------
// compressed_tensors: the rule compressed-tensors 0.20 uses when it writes an
// MXFP4 checkpoint (quantization/utils/mxfp_utils.py round_to_power_2 +
// generate_mx_scales, computed in the weight's dtype W; formats.py has the
// full derivation). With A = amax and f, s its floor(log2) and significand:
//   float32/bfloat16: E = f - 2 + [s >= 1.75], at least -127 (zero and
//                     subnormal A give byte 0);
//   float16:          A >= 2^-14: the same formula; 0.75*2^-14 <= A < 2^-14:
//                     E = -16; A < 0.75*2^-14 (zero included): E = 0 (the
//                     library replaces the zero scale by 1).
// Where the library's bit trick overflows (A >= 1.75 * 2^127, or 57344 in
// float16) E is capped at the largest exponent the library itself ever writes
// (125 / 13), so the block saturates to +-6 * 2^E and stays finite. Elements:
// q = x / 2^E rounded in W, then round-half-even on the E2M1 grid; the sign
// bit is set only for q < 0 strictly, so -0.0, and negatives whose quotient
// underflows to -0.0 in W, give 0x0.

// Exponent of half the smallest subnormal of W: quotients at or below
// 2^this round to zero.
MXFP4_HD constexpr int HalfMinSubnormalExponent(InputDType dtype) {
  return dtype == InputDType::kF32 ? -150 : dtype == InputDType::kBF16 ? -134 : -25;
}

// Unbiased block exponent of the compressed_tensors rule (finite amax).
MXFP4_HD int CompressedTensorsExponent(uint32_t amax_bits, InputDType dtype) {
  int e;
  if (dtype == InputDType::kF16) {
    constexpr uint32_t kF16MinNormal = 0x38800000u;  // 2^-14 as float32 bits
    constexpr uint32_t kF16EpsLimit = 0x38400000u;   // 0.75 * 2^-14
    if (amax_bits < kF16EpsLimit) {
      e = 0;
    } else if (amax_bits < kF16MinNormal) {
      e = -16;
    } else {
      e = static_cast<int>(amax_bits >> 23) - 127 - 2 + ((amax_bits & 0x7FFFFFu) >= 0x600000u);
    }
    return e > 13 ? 13 : e;
  }
  const uint32_t exp_field = amax_bits >> 23;
  e = exp_field == 0 ? kMinScaleExponent
                     : static_cast<int>(exp_field) - 127 - 2 + ((amax_bits & 0x7FFFFFu) >= 0x600000u);
  e = e < kMinScaleExponent ? kMinScaleExponent : e;
  return e > 125 ? 125 : e;
}

// compressed_tensors: |x| must exceed this (float32 bits) for a negative x to
// keep its sign bit (below it x / 2^E underflows to -0.0 in the input dtype).
MXFP4_HD uint32_t CompressedTensorsSignThreshold(int exponent, InputDType dtype) {
  return F32BitsOfIntTimesPow2(1, exponent + HalfMinSubnormalExponent(dtype));
}

// ---------------------------------------------------------------------------
// Mode dispatch: what the CPU handler and the CUDA kernel call.

// The block's exponent from its largest |x| (float32 bits) and the input
// dtype (the compressed_tensors rule works in the input's own precision).
// NaN or Inf in the block (amax_bits >= Inf bits) makes it a NaN block for
// every mode: scale byte 0xFF, all codes 0.
struct BlockExponent {
  int exponent;    // unbiased, in [-127, 127]
  bool nan_block;  // scale byte 0xFF, codes 0
};

MXFP4_HD BlockExponent ChooseBlockExponent(uint32_t amax_bits, Rounding rounding, InputDType dtype) {
  if (amax_bits >= kF32Inf) return BlockExponent{0, true};
  if (rounding == Rounding::kCompressedTensors) {
    return BlockExponent{CompressedTensorsExponent(amax_bits, dtype), false};
  }
  return BlockExponent{FloorRceilExponent(amax_bits, rounding), false};
}

// The block's scale byte and decision thresholds (see BlockScale).
MXFP4_HD BlockScale ChooseBlockScale(uint32_t amax_bits, Rounding rounding, InputDType dtype) {
  const BlockExponent e = ChooseBlockExponent(amax_bits, rounding, dtype);
  if (e.nan_block) return NanBlockScale();
  BlockScale s = MakeBlockScale(e.exponent);
  if (rounding == Rounding::kCompressedTensors) {
    s.sign_threshold = CompressedTensorsSignThreshold(e.exponent, dtype);
  }
  return s;
}

// 4-bit code of one element (float32 bits) in a block with scale `s`.
MXFP4_HD uint32_t EncodeE2M1(uint32_t f32_bits, const BlockScale& s, Rounding rounding) {
  if (rounding != Rounding::kCompressedTensors) return E2M1Code(f32_bits, s);
  if (s.nan_block) return 0;
  const uint32_t abs_bits = f32_bits & kF32AbsMask;
  const bool negative = (f32_bits >> 31) && abs_bits > s.sign_threshold;
  return (negative ? 8u : 0u) | E2M1MagnitudeCode(abs_bits, s);
}

}  // namespace jax_mxfp4
