"""The SASS check that no register an in-flight wgmma reads is overwritten.

tools/check_wgmma_registers.py walks ``cuobjdump -sass`` output. The CPU tests
feed it hand-written SASS with and without the hazard (the Marlin kernel had
it until the fragments were kept alive up to their retiring wait); the GPU
test runs it on the wgmma kernels of the installed extension (needs
cuobjdump, which the CUDA toolkit on the GPU machine has).
"""

import glob
import importlib.util
import os
import shutil
import subprocess

import pytest

import jax_mxfp4

_TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "check_wgmma_registers.py")
_spec = importlib.util.spec_from_file_location("check_wgmma_registers", _TOOL)
checker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checker)


def _sass(body):
    lines = ["        Function : kernel_with_wgmma"]
    for i, ins in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {ins} ;   /* 0x0 */")
    return "\n".join(lines)


def _hazards(body):
    (instrs,) = checker.parse_functions(_sass(body)).values()
    return checker.check(instrs)


# Two groups of one HGMMA each, the second committed while the first runs.
_GROUPS = [
    "HMUL2 R152, R10, R11",
    "WARPGROUP.ARRIVE",
    "HGMMA.64x128x16.F32.BF16 R24, R152, gdesc[UR4], R24, gsb0",
    "HMUL2 R168, R10, R11",
    "WARPGROUP.DEPBAR.LE gsb0, 0x1",
    "WARPGROUP.ARRIVE",
    "HGMMA.64x128x16.F32.BF16 R88, R168, gdesc[UR4], R88, gsb0",
]


def test_clean_sequence_has_no_hazard():
    assert _hazards(_GROUPS + ["WARPGROUP.DEPBAR.LE gsb0, 0x0", "HMUL2 R153, R10, R11"]) == []


def test_write_to_a_fragment_before_its_wait_is_found():
    hazards = _hazards(_GROUPS + ["IMAD R154, R1, R2, RZ", "WARPGROUP.DEPBAR.LE gsb0, 0x0"])
    assert [(ins.split()[0], r) for _, ins, r in hazards] == [("IMAD", 154)]


def test_wait_leaves_only_the_newest_groups_in_flight():
    # After DEPBAR.LE 1 the first group (R152..155) is retired, the second (R168..171) is not.
    body = _GROUPS + ["WARPGROUP.DEPBAR.LE gsb0, 0x1", "MOV R152, R1", "LDS.128 R168, [R2]"]
    assert sorted(r for _, _, r in _hazards(body)) == [168, 169, 170, 171]


def test_loop_carried_hazard_is_found():
    # The write at the loop head hits the group committed at the end of the previous iteration.
    body = [
        "IADD3 R160, R1, R2, RZ",
        "WARPGROUP.DEPBAR.LE gsb0, 0x1",
        "WARPGROUP.ARRIVE",
        "HGMMA.64x128x16.F32.BF16 R24, R160, gdesc[UR4], R24, gsb0",
        "@P0 BRA 0x0",
    ]
    assert {r for _, _, r in _hazards(body)} == {160}


@pytest.mark.gpu
def test_installed_wgmma_kernels_keep_fragments_until_their_wait():
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump (CUDA toolkit) not on PATH")
    (ext,) = glob.glob(os.path.join(os.path.dirname(jax_mxfp4.__file__), "_ext*.so"))
    sass = subprocess.run([cuobjdump, "-sass", ext], check=True, capture_output=True, text=True).stdout
    kernels = {name: instrs for name, instrs in checker.parse_functions(sass).items()
               if "MarlinMxfp4GemmKernel" in name and any(i.startswith("HGMMA") for _, i in instrs)}
    assert len(kernels) == 6  # wgmma64, wgmma128 and wgmma128ws (warp-specialized), bf16 and fp16
    for name, instrs in kernels.items():
        assert checker.check(instrs) == [], name
