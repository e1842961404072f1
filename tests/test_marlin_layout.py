"""CPU-side proof of the Marlin MXFP4 weight layout (no GPU needed).

Checks the layout of ``jax_mxfp4.kernels.marlin_weights.prepare_marlin_weights``:
that the kernel's tile table and the layout's extraction tables are the ones in
the C++ sources (parsed from them); that every bit of a word is used once and
the device code's dequantization bit tricks (marlin_bits.py) turn each code
into its E2M1 value; that each lane's 16-byte load holds exactly its mma
B-fragments; that preparation round-trips and rejects bad input; and that
Python preparation equals the header's C++ ``PrepareHost`` byte for byte
(compiled with g++; skipped, saying so, without it).

The kernel itself, emulated in numpy on these buffers, is tested in
test_marlin_emulation.py.
"""

from __future__ import annotations

import re
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from jax_mxfp4.kernels import marlin_weights as mw
from marlin_bits import (DTYPES, E2M1, LAYOUT_H, ROOT, U32, compile_probe, extract_register, field_mask,
                         half_to_f64, needs_compiler, tile_configs)
from marlin_emulator import random_weights

# ---------------------------------------------------------------------------
# Tables parsed from the C++ sources.


def _parse_extract(name):
    text = LAYOUT_H.read_text()
    m = re.search(name + r"\[4\]\[2\] = \{(.*?)\n\s*\};", text, re.S)
    pairs = re.findall(r"\{(\d+), (0x[0-9A-Fa-f]+)\}", m.group(1))
    flat = [(int(r), int(f, 16)) for r, f in pairs]
    return tuple((flat[2 * p], flat[2 * p + 1]) for p in range(4))


def _parse_target(name):
    m = re.search(name + r"\[4\] = \{([^}]*)\}", LAYOUT_H.read_text())
    return tuple(int(v) for v in m.group(1).split(","))


def test_tables_match_header():
    assert _parse_extract("kMarlinExtractBf16") == mw.EXTRACT["bfloat16"]
    assert _parse_extract("kMarlinExtractF16") == mw.EXTRACT["float16"]
    assert _parse_target("kTargetBitBf16") == mw.TARGET_BIT["bfloat16"]
    assert _parse_target("kTargetBitF16") == mw.TARGET_BIT["float16"]
    assert [c["name"] for c in tile_configs()] == ["small8", "smalln", "small", "medium", "large", "wgmma64", "wgmma128", "wgmma128ws"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_word_bit_used_once(dtype):
    table = mw.source_bit_table(dtype)
    assert sorted(table.ravel().tolist()) == list(range(32))


# ---------------------------------------------------------------------------
# Bits, lanes, round trip.


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_bits_exhaustive(dtype):
    """Every code in every (register, half) slot of a word, other bits random:
    the extracted 16-bit pattern is E2M1(code) * 2^-126 (bf16) / 2^-14 (f16)."""
    name = mw._dtype_name(dtype)
    src = mw.source_bit_table(dtype)
    rng = np.random.default_rng(1)
    raw_scale = 2.0**-126 if name == "bfloat16" else 2.0**-14
    for p in range(4):
        for e in range(2):
            for code in range(16):
                words = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(U32)
                for b in range(4):
                    bit = U32(1 << int(src[p, e, b]))
                    words = np.where((code >> b) & 1, words | bit, words & ~bit).astype(U32)
                reg = extract_register(words, name, p)
                half = ((reg >> U32(16 * e)) & U32(0xFFFF)).astype(np.uint16)
                other = ((reg >> U32(16 * (1 - e))) & U32(0xFFFF)).astype(np.uint16)
                got = half_to_f64(half, name)
                np.testing.assert_array_equal(got, E2M1[code] * raw_scale)
                assert np.all(np.signbit(got) == bool(code & 8))
                # the other half only holds its own element's bits: no leak
                assert np.all((other & ~np.uint16(field_mask(name, 0xF) & 0xFFFF)) == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(32, 32), (200, 320), (96, 96), (64, 4160), (33, 64)])
def test_round_trip(dtype, n, k):
    rng = np.random.default_rng(n * 7 + k)
    # Lossless range: f16 flushes blocks > 29 binades below the row max.
    lo, hi = (100, 140) if mw._dtype_name(dtype) == "bfloat16" else (110, 139)
    w_packed, w_scales = random_weights(rng, n, k, lo, hi)
    w_scales[0, 0] = 255  # NaN blocks round-trip too
    tiles, scales, layout = mw.prepare_marlin_weights(w_packed, w_scales, dtype)
    assert tiles.shape == layout.tiles_shape and scales.shape == layout.scales_shape
    assert tiles.dtype == np.uint8 and scales.dtype == np.uint8
    wp, ws = mw.unprepare_marlin_weights(tiles, scales, layout)
    np.testing.assert_array_equal(wp, w_packed)
    np.testing.assert_array_equal(ws, w_scales)


def _lane_view(tiles, layout):
    """[kb, unit, lane, 16 bytes] view: what each lane's LDS.128 reads."""
    return np.asarray(tiles).reshape(layout.kb, layout.n_pad // 32, 32, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lane_bytes_are_its_fragments(dtype):
    """Spell out the contract of one 16-byte load: lane l of unit (kb, u) holds,
    in word j, exactly the B-fragment elements (k = 16s + 8h + 2t + e, n = 8j + g)
    of n8 tile j for both k16 steps."""
    name = mw._dtype_name(dtype)
    raw_scale = 2.0**-126 if name == "bfloat16" else 2.0**-14
    rng = np.random.default_rng(3)
    n, k = 64, 96
    w_packed, w_scales = random_weights(rng, n, k)
    tiles, _, layout = mw.prepare_marlin_weights(w_packed, w_scales, dtype)
    codes = np.stack([w_packed & 15, w_packed >> 4], -1).reshape(n, k)
    view = _lane_view(tiles, layout).view(U32)  # [kb, u, lane, 4 words]
    for kb in range(layout.kb):
        for u in range(layout.n_pad // 32):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for j in range(4):
                    word = view[kb, u, lane, j : j + 1]
                    for p in range(4):
                        reg = extract_register(word, name, p)
                        s, h = p // 2, p % 2
                        for e in range(2):
                            kk = 32 * kb + 16 * s + 8 * h + 2 * t + e
                            nn = 32 * u + 8 * j + g
                            half = np.uint16((reg[0] >> U32(16 * e)) & U32(0xFFFF))
                            assert half_to_f64(half, name) == E2M1[codes[nn, kk]] * raw_scale
                            assert bool(half & 0x8000) == bool(codes[nn, kk] & 8)


def test_prepare_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        mw.prepare_marlin_weights(np.zeros((4, 15), np.uint8), np.zeros((4, 1), np.uint8), jnp.bfloat16)
    with pytest.raises(ValueError, match="linear uint8"):
        mw.prepare_marlin_weights(np.zeros((4, 16), np.uint8), np.zeros((4, 2), np.uint8), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mw.prepare_marlin_weights(np.zeros((4, 16), np.uint8), np.zeros((4, 1), np.uint8), jnp.float32)
    lay = mw.marlin_layout(200, 4160, jnp.float16)
    assert (lay.n_pad, lay.tiles_shape, lay.scales_shape) == (224, (130, 3584), (134, 224))


# ---------------------------------------------------------------------------
# Cross-check with the C++ PrepareHost (compiled here, host code only).

_PREPARE_PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "marlin/marlin_layout.h"
int main(int argc, char** argv) {
  const long n = atol(argv[1]), k = atol(argv[2]);
  const int dt = atoi(argv[3]);
  std::vector<uint8_t> wp(n * k / 2), ws(n * k / 32);
  FILE* f = fopen(argv[4], "rb");
  if (fread(wp.data(), 1, wp.size(), f) != wp.size() || fread(ws.data(), 1, ws.size(), f) != ws.size()) return 2;
  fclose(f);
  const auto s = jax_mxfp4::marlin::GetPreparedShape(n, k);
  std::vector<uint8_t> tiles(s.tiles_rows * s.tiles_cols), scales(s.scales_rows * s.scales_cols);
  jax_mxfp4::marlin::PrepareHost(wp.data(), ws.data(), n, k, static_cast<jax_mxfp4::InputDType>(dt),
                                 tiles.data(), scales.data());
  f = fopen(argv[5], "wb");
  fwrite(tiles.data(), 1, tiles.size(), f);
  fwrite(scales.data(), 1, scales.size(), f);
  fclose(f);
  return 0;
}
"""


@needs_compiler("g++", "the C++ PrepareHost")
@pytest.mark.parametrize("dtype", DTYPES)
def test_python_prepare_equals_cpp_prepare(dtype, tmp_path):
    src = tmp_path / "probe.cc"
    src.write_text(_PREPARE_PROBE)
    exe = tmp_path / "probe"
    compile_probe(["g++", "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)])
    dt_code = 1 if mw._dtype_name(dtype) == "bfloat16" else 2
    rng = np.random.default_rng(4)
    for n, k in [(200, 320), (32, 32), (77, 4160)]:
        w_packed, w_scales = random_weights(rng, n, k, 0, 254)
        w_scales[3, -1] = 255
        w_scales[5, :] = 255
        (tmp_path / "in.bin").write_bytes(w_packed.tobytes() + w_scales.tobytes())
        subprocess.run([str(exe), str(n), str(k), str(dt_code), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
        tiles, scales, layout = mw.prepare_marlin_weights(w_packed, w_scales, dtype)
        blob = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.uint8)
        nt = int(np.prod(layout.tiles_shape))
        np.testing.assert_array_equal(blob[:nt], np.asarray(tiles).ravel())
        np.testing.assert_array_equal(blob[nt:], np.asarray(scales).ravel())
