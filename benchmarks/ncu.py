"""Nsight Compute cross-check helpers: the ncu command line, its CSV, per-call times, cuProfilerStart/Stop."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import sys
from typing import Sequence

from benchmarks.common import HarnessError, summarize


NCU_METRIC = "gpu__time_duration.sum"
_NCU_UNITS_NS = {
    "ns": 1.0, "nsecond": 1.0, "nsec": 1.0,
    "us": 1e3, "usecond": 1e3, "usec": 1e3,
    "ms": 1e6, "msecond": 1e6, "msec": 1e6,
    "s": 1e9, "second": 1e9,
}


@dataclasses.dataclass(frozen=True)
class NcuKernel:
    id: int
    name: str
    duration_ns: float
    stream: str = ""
    grid: str = ""
    block: str = ""


def ncu_command(python_argv: Sequence[str], *, ncu: str = "ncu", kernel_regex: str | None = None,
                profile_from_start: bool = False, python: str | None = None,
                extra_args: Sequence[str] = ()) -> list[str]:
    """The ncu command line that times every kernel of ``python <python_argv>``.

    Clocks and caches as the application finds them (``--clock-control none
    --cache-control none``; ncu's defaults lock base clocks and flush caches),
    one metric (``gpu__time_duration.sum``), CSV in base units. Unless
    ``profile_from_start``, only kernels inside ``cuda_profiler_range()`` (the
    benches' ``--ncu-worker`` mode) are profiled, which keeps compile-time
    autotuning kernels out.
    """
    cmd = [ncu, "--clock-control", "none", "--cache-control", "none", "--metrics", NCU_METRIC,
           "--csv", "--print-units", "base", "--target-processes", "all"]
    if not profile_from_start:
        cmd += ["--profile-from-start", "off"]
    if kernel_regex:
        cmd += ["--kernel-name", f"regex:{kernel_regex}"]
    cmd += list(extra_args)
    cmd += [python or sys.executable, *python_argv]
    return cmd


def parse_ncu_csv(text: str, metric: str = NCU_METRIC) -> list[NcuKernel]:
    """Kernel durations from ``ncu --csv --metrics gpu__time_duration.sum`` output.

    Skips ncu's ``==PROF==``/``==WARNING==`` lines and the program's own
    output before the header; accepts thousands separators and any time unit.
    """
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        head = "\n".join(lines[:20])
        raise HarnessError(f"no ncu CSV header (a line starting with '\"ID\"') in ncu output; first lines:\n{head}")
    body = [ln for ln in lines[start:] if ln.strip() and not ln.startswith("==")]
    out = []
    for row in csv.DictReader(io.StringIO("\n".join(body))):
        if row.get("Metric Name") != metric:
            continue
        unit = (row.get("Metric Unit") or "").strip()
        if unit not in _NCU_UNITS_NS:
            raise HarnessError(f"unknown ncu time unit {unit!r} in row {row}")
        raw = (row.get("Metric Value") or "").replace(",", "").strip()
        try:
            value = float(raw)
        except ValueError as err:
            raise HarnessError(f"bad ncu metric value {row.get('Metric Value')!r} in row {row}") from err
        out.append(NcuKernel(
            id=int(row["ID"]), name=row.get("Kernel Name", ""), duration_ns=value * _NCU_UNITS_NS[unit],
            stream=row.get("Stream", ""), grid=row.get("Grid Size", ""), block=row.get("Block Size", "")))
    out.sort(key=lambda k: k.id)
    return out


def ncu_per_call(kernels: Sequence[NcuKernel], n_calls: int) -> dict:
    """Per-call device time from ncu rows of ``n_calls`` identical calls (in launch order)."""
    if not kernels:
        return {"time_us": None, "kernels_per_call": 0, "error": "ncu profiled no kernels"}
    if len(kernels) % n_calls:
        return {"time_us": summarize([sum(k.duration_ns for k in kernels) / 1e3 / n_calls]),
                "kernels_per_call": len(kernels) / n_calls,
                "error": f"{len(kernels)} kernels do not divide into {n_calls} calls; mean only"}
    k = len(kernels) // n_calls
    per = [sum(x.duration_ns for x in kernels[i * k:(i + 1) * k]) / 1e3 for i in range(n_calls)]
    return {"time_us": summarize(per), "kernels_per_call": k,
            "kernels": sorted({x.name[:160] for x in kernels}), "error": None}


@contextlib.contextmanager
def cuda_profiler_range():
    """cuProfilerStart/Stop around the block (for ``ncu --profile-from-start off``)."""
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")

    def check(rc, what):
        if rc != 0:
            raise HarnessError(f"{what} failed with CUresult {rc}")

    check(lib.cuInit(0), "cuInit")
    ctx = ctypes.c_void_p()
    check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    pushed, dev = False, ctypes.c_int(0)
    if not ctx.value:
        check(lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        check(lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
        pushed = True
    check(lib.cuProfilerStart(), "cuProfilerStart")
    try:
        yield
    finally:
        lib.cuProfilerStop()
        if pushed:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
            lib.cuDevicePrimaryCtxRelease_v2(dev)
