"""The Marlin MXFP4 kernel's bit- and fragment-level operations, in numpy.

Shared by test_marlin_layout.py and the kernel emulation (marlin_emulator.py,
test_marlin_emulation.py). Each helper mirrors one piece of the device code in
csrc/marlin/ (named in its comment): the dequantization bit tricks on uint32
(funnel-shift rotations, masks, PRMT of the multiplier bytes, the packed
multiply rounded like the GPU), the fragment layouts of ``mma.sync.m16n8k16``
from the PTX ISA, and ``ldmatrix.x4``. Also here: the paths of the C++ sources,
their tile table (``kTileConfigs``, parsed), the library's reference
dequantization, and the compile helpers of the C++ cross-checks.
"""

from __future__ import annotations

import functools
import pathlib
import re
import shutil
import subprocess

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_mxfp4 import formats
from jax_mxfp4.kernels import marlin_weights as mw

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYOUT_H = ROOT / "csrc" / "marlin" / "marlin_layout.h"
TILES_H = ROOT / "csrc" / "marlin" / "marlin_tiles.h"
PLAN_CC = ROOT / "csrc" / "marlin" / "marlin_plan.cc"
DTYPES = (jnp.bfloat16, jnp.float16)
THREADS = 256  # kThreads
# E2M1 value of each 4-bit code (bit 3 = sign).
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])

# ---------------------------------------------------------------------------
# Reference dequantization: the library's (jax_mxfp4.formats, exact float32).


def dequant_ref(w_packed, w_scales):
    codes = formats.unpack_nibbles(w_packed)
    return np.asarray(formats.dequantize_codes(codes, w_scales, jnp.float32), np.float64)


# ---------------------------------------------------------------------------
# The C++ sources: the tile table, and compiling host-code probes.


@functools.lru_cache(None)
def tile_configs():
    text = TILES_H.read_text()
    body = re.search(r"kTileConfigs\[\] = \{(.*?)\n\};", text, re.S).group(1)
    rows = re.findall(
        r'\{"(\w+)",\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\w+),\s*(\d+),\s*MmaPath::k(\w+),'
        r"\s*SplitReduce::k(\w+),\s*Loader::k(\w+)\}",
        body,
    )
    keys = ("tile_m", "n_tile", "k_tile", "warps_n", "warps_k", "stages")
    out = []
    for r in rows:
        cfg = dict(zip(keys, map(int, r[1:7])), name=r[0])
        cfg["max_m"] = 2**31 - 1 if r[7] == "INT_MAX" else int(r[7])
        cfg["min_n"] = int(r[8])
        cfg["path"] = {"Any": "any", "MmaSync": "mma_sync", "Wgmma": "wgmma"}[r[9]]
        cfg["reduce"] = {"LastCta": "last_cta", "Pass": "pass", "Cluster": "cluster"}[r[10]]
        cfg["loader"] = {"AllWarps": "all_warps", "ProducerWarpgroup": "producer_warpgroup"}[r[11]]
        # Geometry::kWeightsA: the dequantized weights are the MMA's A operand
        cfg["weights_a"] = cfg["path"] == "wgmma" or cfg["tile_m"] < 16
        out.append(cfg)
    assert out, "could not parse kTileConfigs"
    return tuple(out)


def needs_compiler(tool: str, what: str):
    """Marks a test that compiles ``what`` with ``tool``: skipped, with that reason, where ``tool`` is not on PATH."""
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"needs {tool} (not on PATH) to compile {what}")


def compile_probe(cmd: list[str]) -> None:
    """Runs a compiler command line; a failed build fails the test with the compiler's output."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}", pytrace=False)


# ---------------------------------------------------------------------------
# Bit-level helpers that mirror the device code.

U32 = np.uint32


def rotr(x, r):
    x = x.astype(U32)
    return x if r == 0 else ((x >> U32(r)) | (x << U32(32 - r))).astype(U32)


def field_mask(name, fields):
    mask = 0
    for b in range(4):
        if fields & (1 << b):
            t = mw.TARGET_BIT[name][b]
            mask |= (1 << t) | (1 << (16 + t))
    return U32(mask)


def extract_register(w, name, p):  # ExtractRegister<kD, p>
    (r0, f0), (r1, f1) = mw.EXTRACT[name][p]
    r = rotr(w, r0) & field_mask(name, f0)
    if f1:
        r = r | (rotr(w, r1) & field_mask(name, f1))
    return r


def prmt(a, b, sel):  # prmt.b32 default mode (selectors < 8 here)
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(np.shape(a), np.uint64)
    for i in range(4):
        byte = (sel >> (4 * i)) & 7
        out |= ((src >> np.uint64(8 * byte)) & np.uint64(0xFF)) << np.uint64(8 * i)
    return out.astype(U32)


def block_multipliers(sw, name):  # BlockMultipliers<kD>
    zero = np.zeros_like(sw)
    if name == "bfloat16":
        return [(prmt(sw, zero, 0x4040 | j | (j << 8)) << U32(7)).astype(U32) for j in range(4)]
    return [prmt(sw, zero, 0x0404 | (j << 4) | (j << 12)) for j in range(4)]


def half_to_f64(bits, name):
    bits = np.asarray(bits, np.uint16)
    # (shared memory the kernel leaves uncopied holds garbage: NaN bit patterns are expected)
    with np.errstate(invalid="ignore"):
        if name == "bfloat16":
            return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return bits.view(np.float16).astype(np.float64)


def f64_to_half(x, name):
    """Round to nearest even in the 16-bit type. Every value rounded here is a
    product of two 16-bit floats with <= 2 + 1 significant bits, exact in
    float64 and (down to 2^-148) in float32, so the float32 step adds no error."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        x32 = np.asarray(x).astype(np.float32)
    if name == "bfloat16":
        return x32.astype(ml_dtypes.bfloat16).view(np.uint16)
    return x32.astype(np.float16).view(np.uint16)


def mul2(a, b, name):  # MulBf16x2 / MulF16x2: per half, exact product rounded once
    out = np.zeros(np.shape(a), U32)
    for half in range(2):
        ha = ((a >> U32(16 * half)) & U32(0xFFFF)).astype(np.uint16)
        hb = ((b >> U32(16 * half)) & U32(0xFFFF)).astype(np.uint16)
        with np.errstate(invalid="ignore", over="ignore"):
            prod = half_to_f64(ha, name) * half_to_f64(hb, name)
        out |= f64_to_half(prod, name).astype(U32) << U32(16 * half)
    return out


def dequant_word(w, mult, name):  # DequantWord<kD>
    return [mul2(extract_register(w, name, p), mult, name) for p in range(4)]


# The PTX fragment maps of mma.m16n8k16 (f16/bf16 inputs, f32 accumulators),
# as (register, half) -> (row, col) for lane l, g = l // 4, t = l % 4.
def _a_coord(lane, reg, half):
    g, t = lane // 4, lane % 4
    return g + 8 * (reg % 2), 2 * t + half + 8 * (reg // 2)


def _b_coord(lane, reg, half):  # (k row, n col)
    g, t = lane // 4, lane % 4
    return 2 * t + half + 8 * reg, g


def _c_coord(lane, i):
    g, t = lane // 4, lane % 4
    return g + 8 * (i // 2), 2 * t + i % 2


LANES = np.arange(32)
_A_IDX = np.array([[_a_coord(lane, r, h) for r in range(4) for h in range(2)] for lane in range(32)])
_B_IDX = np.array([[_b_coord(lane, r, h) for r in range(2) for h in range(2)] for lane in range(32)])
_C_IDX = np.array([[_c_coord(lane, i) for i in range(4)] for lane in range(32)])


def mma(acc, a_regs, b0, b1, name):
    """acc[W, 32, 4] += A @ B for each warp; a_regs[W, 32, 4], b0/b1[W, 32] uint32.

    Returns the operands as the tensor cores see them: A [W, 16, 16], B [W, 16, 8]."""
    w = a_regs.shape[0]
    a_half = np.stack([(a_regs >> U32(16 * h)) & U32(0xFFFF) for h in range(2)], -1)  # W,32,4,2
    a_val = half_to_f64(a_half.reshape(w, 32, 8), name)
    amat = np.zeros((w, 16, 16))
    amat[:, _A_IDX[..., 0], _A_IDX[..., 1]] = a_val
    b_regs = np.stack([b0, b1], -1)
    b_half = np.stack([(b_regs >> U32(16 * h)) & U32(0xFFFF) for h in range(2)], -1)  # W,32,2,2
    b_val = half_to_f64(b_half.reshape(w, 32, 4), name)
    bmat = np.zeros((w, 16, 8))
    bmat[:, _B_IDX[..., 0], _B_IDX[..., 1]] = b_val
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.einsum("wmk,wkn->wmn", amat, bmat)
    acc += d[:, _C_IDX[..., 0], _C_IDX[..., 1]]
    return amat, bmat


def ldmatrix_x4(smem_u16, row_chunk):
    """row_chunk[W, 32]: 16-byte chunk index each lane supplies. Returns [W, 32, 4]."""
    rows = smem_u16.reshape(-1, 8)[row_chunk]  # W, 32 lanes, 8 halves
    out = np.zeros(row_chunk.shape + (4,), U32)
    for i in range(4):
        src_lane = 8 * i + LANES // 4  # matrix i, row l // 4
        lo = rows[:, src_lane, 2 * (LANES % 4)].astype(U32)
        hi = rows[:, src_lane, 2 * (LANES % 4) + 1].astype(U32)
        out[..., i] = lo | (hi << U32(16))
    return out
