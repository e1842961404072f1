"""The examples the README points at run and say what they should."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args, timeout=300):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    # The example imports what this test process imports (installed package or source tree).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_quickstart():
    out = run_example("quickstart.py")
    assert re.search(r"relative error vs the bf16 product:\s+0\.\d+", out)
    assert "kernel '" in out and "custom calls in the jitted computation" in out


def test_tensor_parallel_one_all_reduce_no_gather():
    out = run_example("tensor_parallel.py", "--hidden", "256", "--ffn", "1024", "--tokens", "16")
    assert "mesh: {'data': 1, 'model': 8}" in out
    blocks = re.findall(r"collectives in the compiled HLO: \{'all-reduce': (\d+), 'all-gather': (\d+)", out)
    assert blocks == [("1", "0"), ("1", "0")], out
    for err in re.findall(r"relative error vs the unsharded reference block: ([0-9.e+-]+)", out):
        assert float(err) < 1e-2
