"""Benchmark harness: timing, device-trace parsing, results JSON, tables, plots.

How a case is timed (``run_cases``), all in one process:

1. compile (first call, timed as ``compile_s``), then ``warmup`` calls;
2. wall time: N calls, each ``jax.block_until_ready``-ed, median (N adapts to
   the call's cost); this includes the ~50 us host dispatch of a jitted call;
3. device time: every case of a group runs inside ONE ``jax.profiler`` trace
   session. Each case is wrapped in a ``TraceAnnotation`` and separated from
   the next by an idle gap; its calls are 1 untimed + ``trace_iters`` timed
   calls, each blocked. The device plane's kernel events (lines
   ``Stream #...`` of plane ``/device:GPU:<n>``; memcpy/memset excluded and
   reported apart) are assigned to cases by the annotation windows (fallback:
   the idle gaps), split per call, and summed: ``device_time_us`` is the
   median over calls of the sum of kernel durations of one call. On CPU the
   "device" events are XLA's op events (stat ``hlo_op``) on ``/host:CPU``.

Inputs whose working set fits in L2 are rotated among several copies
(``rotation_copies``) so that device time measures HBM, not L2.

``ncu_command`` / ``parse_ncu_csv`` give the Nsight Compute cross-check
(``benchmarks/ncu_check.py`` drives it).

Results: one JSON per (benchmark, device) in ``benchmarks/results`` (schema in
``validate_result``), a PNG per benchmark, and markdown tables
(``render_table``) that ``benchmarks/report.py`` puts in the README.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import datetime
import glob
import io
import json
import math
import os
import platform as _platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

SCHEMA_VERSION = 1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
COMPILE_CACHE_DIR = os.path.join(REPO_ROOT, "benchmarks", ".cache", "jax")
ANNOTATION_PREFIX = "mxfp4bench#"
MIB = 1 << 20

# L2 sizes by device kind substring (bytes). jax does not expose the L2 size.
L2_BYTES_BY_KIND = (
    ("H100", 50 * MIB),
    ("H200", 50 * MIB),
    ("H800", 50 * MIB),
    ("GH200", 50 * MIB),
    ("B200", 126 * MIB),
    ("B100", 126 * MIB),
    ("GB200", 126 * MIB),
    ("A100", 40 * MIB),
    ("A800", 40 * MIB),
    ("L40", 96 * MIB),
    ("L4", 48 * MIB),
    ("A10", 6 * MIB),
)
DEFAULT_GPU_L2_BYTES = 64 * MIB
DEFAULT_CPU_L2_BYTES = 32 * MIB

# Device-plane lines that are derived summaries, never raw activity.
_DERIVED_LINES = (
    "XLA Modules", "XLA Ops", "Steps", "Framework Ops", "Framework Name Scope", "Source code",
    "XLA TraceMe", "TensorFlow Ops", "TensorFlow Name Scope", "Async XLA Ops", "Launch Stats",
    "CUPTI overhead", "_counters_", "Counters", "SparseCore",
)


class HarnessError(RuntimeError):
    """A benchmark cannot produce trustworthy numbers; the message says why."""


class SchemaError(ValueError):
    """A results JSON does not match the schema (``validate_result``)."""


def log(msg: str = "") -> None:
    print(msg, flush=True)


def loud(msg: str) -> None:
    """A warning that must not be missed in a long log."""
    bar = "!" * 78
    print(f"\n{bar}\n!! {msg.replace(chr(10), chr(10) + '!! ')}\n{bar}\n", flush=True)


# ---------------------------------------------------------------------------
# Statistics.

def summarize(values: Iterable[float | None]) -> dict | None:
    """{median, min, max, mean, n} of the finite values; None if there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "mean": statistics.fmean(vals),
        "n": len(vals),
    }


def fmt_time_us(us: float | None) -> str:
    if us is None or not math.isfinite(us):
        return "-"
    if us >= 100:
        return f"{us:.0f}"
    if us >= 10:
        return f"{us:.1f}"
    return f"{us:.2f}"


def fmt_ratio(r: float | None) -> str:
    if r is None or not math.isfinite(r):
        return "-"
    return f"{r:.2f}x"


# ---------------------------------------------------------------------------
# Profiler trace parsing (pure: works on any jax.profiler.ProfileData).

@dataclasses.dataclass(frozen=True)
class DeviceEvent:
    name: str
    start_ns: float
    end_ns: float
    kind: str  # kernel | memcpy | memset | graph | other | op (CPU)
    line: str = ""

    @property
    def duration_ns(self) -> float:
        return self.end_ns - self.start_ns


def _stat_names(event) -> set[str]:
    names = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for item in event.stats:
            if item and item[0] is not None:
                names.add(item[0])
    return names


def _is_derived_line(name: str) -> bool:
    return any(name.startswith(d) for d in _DERIVED_LINES)


def _classify_gpu_event(name: str, stats: set[str]) -> str:
    low = name.lower()
    if "memcpy_details" in stats or low.startswith("memcpy"):
        return "memcpy"
    if "memset_details" in stats or low.startswith("memset"):
        return "memset"
    if "kernel_details" in stats:
        return "kernel"
    if "cuda_graph_exec_id" in stats:
        return "graph"
    return "other"


def describe_planes(profile_data) -> dict[str, list[str]]:
    """{plane name: [line names]}: printed when no device events are found."""
    return {p.name: [ln.name for ln in p.lines] for p in profile_data.planes}


def extract_device_events(profile_data, platform: str) -> tuple[list[DeviceEvent], dict]:
    """Device activity events of a trace, and diagnostics.

    GPU (``platform`` 'gpu'/'cuda'/'rocm'): every event on the ``Stream #..``
    lines of planes ``/device:GPU:<n>`` (if a plane has no such line, all its
    non-derived lines, with a warning). CPU: XLA op events (stat ``hlo_op``)
    on ``/host:CPU``.
    """
    diag: dict[str, Any] = {"warnings": [], "device_planes": [], "lines_used": []}
    events: list[DeviceEvent] = []
    planes = list(profile_data.planes)
    if platform == "cpu":
        for plane in planes:
            if plane.name != "/host:CPU":
                continue
            diag["device_planes"].append(plane.name)
            for line in plane.lines:
                for ev in line.events:
                    if ev.duration_ns <= 0 or ev.name.startswith("end: "):
                        continue
                    if "hlo_op" not in _stat_names(ev):
                        continue
                    events.append(DeviceEvent(ev.name, ev.start_ns, ev.end_ns, "op", line.name))
        return events, diag
    prefix = "/device:GPU:" if platform in ("gpu", "cuda", "rocm") else "/device:"
    for plane in planes:
        if not plane.name.startswith(prefix):
            continue
        diag["device_planes"].append(plane.name)
        lines = list(plane.lines)
        used = [ln for ln in lines if ln.name.startswith("Stream #")]
        if not used:
            used = [ln for ln in lines if not _is_derived_line(ln.name)]
            if used:
                diag["warnings"].append(
                    f"plane {plane.name} has no 'Stream #' lines; using lines {[ln.name for ln in used]}")
        for line in used:
            diag["lines_used"].append(f"{plane.name}:{line.name}")
            for ev in line.events:
                if ev.duration_ns <= 0:
                    continue
                kind = _classify_gpu_event(ev.name, _stat_names(ev))
                events.append(DeviceEvent(ev.name, ev.start_ns, ev.end_ns, kind, line.name))
    return events, diag


def timing_kinds(events: Sequence[DeviceEvent]) -> tuple[str, ...]:
    """Which event kinds make up 'device time' in this trace.

    Kernels (events with ``kernel_details``) when there are any; else CUDA
    graph events; else unclassified activity; on CPU, op events.
    """
    kinds = {e.kind for e in events}
    for k in ("op", "kernel", "graph", "other"):
        if k in kinds:
            return (k,)
    return ()


def extract_annotations(profile_data, prefix: str = ANNOTATION_PREFIX) -> dict[str, tuple[float, float]]:
    """{annotation name: (start_ns, end_ns)} of host events whose name starts with ``prefix``."""
    out: dict[str, tuple[float, float]] = {}
    for plane in profile_data.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            for ev in line.events:
                if ev.name.startswith(prefix) and ev.name not in out:
                    out[ev.name] = (ev.start_ns, ev.end_ns)
    return out


def split_at_largest_gaps(events: Sequence[DeviceEvent], n: int) -> list[list[DeviceEvent]] | None:
    """Splits time-sorted events into ``n`` groups at the ``n-1`` largest idle gaps."""
    evs = sorted(events, key=lambda e: e.start_ns)
    if n <= 0 or len(evs) < n:
        return None
    if n == 1:
        return [evs]
    gaps = []
    running_end = evs[0].end_ns
    for i in range(1, len(evs)):
        gaps.append((evs[i].start_ns - running_end, i))
        running_end = max(running_end, evs[i].end_ns)
    cuts = sorted(i for _, i in sorted(gaps, reverse=True)[: n - 1])
    groups, prev = [], 0
    for c in cuts:
        groups.append(evs[prev:c])
        prev = c
    groups.append(evs[prev:])
    return groups


def split_calls(events: Sequence[DeviceEvent], n_calls: int) -> tuple[list[list[DeviceEvent]] | None, str]:
    """Splits one case's events into its ``n_calls`` calls.

    'chunk': the count divides evenly and every chunk has the same kernel
    sequence (the usual case: one jitted program, calls serialized).
    'gaps': otherwise, at the largest idle gaps (calls are separated by host
    dispatch, kernels of one call are back to back).
    """
    evs = sorted(events, key=lambda e: e.start_ns)
    if len(evs) < n_calls or n_calls <= 0:
        return None, f"{len(evs)} events for {n_calls} calls"
    if len(evs) % n_calls == 0:
        k = len(evs) // n_calls
        chunks = [evs[i * k:(i + 1) * k] for i in range(n_calls)]
        names0 = collections.Counter(e.name for e in chunks[0])
        if all(collections.Counter(e.name for e in c) == names0 for c in chunks):
            return chunks, "chunk"
    return split_at_largest_gaps(evs, n_calls), "gaps"


def device_timing(events: Sequence[DeviceEvent], n_calls: int, drop_first: int = 1,
                  kinds: Sequence[str] = ("kernel",)) -> dict:
    """Per-call device time of one case from its events (``n_calls`` includes ``drop_first``).

    Returns {time_us: summarize(sum of durations per call), span_us (median
    first-start..last-end per call), kernels_per_call, kernels: [{name,
    median_us}] (when every call ran the same sequence), memcpy_us_per_call,
    memset_us_per_call, method, error}.
    """
    timed = [e for e in events if e.kind in kinds]
    out: dict[str, Any] = {
        "time_us": None, "span_us": None, "kernels_per_call": None, "kernels": [],
        "memcpy_us_per_call": sum(e.duration_ns for e in events if e.kind == "memcpy") / 1e3 / n_calls,
        "memset_us_per_call": sum(e.duration_ns for e in events if e.kind == "memset") / 1e3 / n_calls,
        "memcpys_per_call": sum(1 for e in events if e.kind == "memcpy") / n_calls,
        "memsets_per_call": sum(1 for e in events if e.kind == "memset") / n_calls,
        "method": None, "error": None,
    }
    calls, method = split_calls(timed, n_calls)
    if calls is None:
        out["error"] = f"cannot split device events into calls: {method}"
        return out
    calls = calls[drop_first:]
    out["method"] = method
    out["time_us"] = summarize(sum(e.duration_ns for e in c) / 1e3 for c in calls)
    spans = [(max(e.end_ns for e in c) - min(e.start_ns for e in c)) / 1e3 for c in calls if c]
    out["span_us"] = statistics.median(spans) if spans else None
    counts = [len(c) for c in calls]
    out["kernels_per_call"] = int(statistics.median(counts))
    if len(set(counts)) > 1:
        out["error"] = f"calls ran different numbers of kernels: {sorted(set(counts))}"
    # Per kernel name: launches per call and median total time per call (first call's order).
    order = list(dict.fromkeys(e.name for e in calls[0]))
    per_call = [collections.defaultdict(float) for _ in calls]
    for acc, c in zip(per_call, calls):
        for e in c:
            acc[e.name] += e.duration_ns / 1e3
    first = collections.Counter(e.name for e in calls[0])
    rows = [{"name": name[:160], "count": first[name], "median_us": statistics.median(a[name] for a in per_call)}
            for name in order]
    rows.sort(key=lambda r: -r["median_us"])
    out["kernels"] = rows[:32]
    return out


def _gap_groups(timed: Sequence[DeviceEvent], n: int, gap_ns: float) -> tuple[list | None, str]:
    groups = split_at_largest_gaps(timed, n)
    if groups is None:
        return None, f"{len(timed)} device events for {n} cases"
    for a, b in zip(groups, groups[1:]):
        gap = b[0].start_ns - max(e.end_ns for e in a)
        if gap < 0.5 * gap_ns:
            return None, (f"a boundary gap is {gap / 1e3:.0f} us but the inserted idle gaps are "
                          f"{gap_ns / 1e3:.0f} us (a case has a long internal pause?)")
    return groups, ""


def assign_group_events(profile_data, keys: Sequence[str], platform: str, gap_ns: float
                        ) -> tuple[dict[str, list[DeviceEvent]] | None, dict]:
    """Assigns a group trace's device events to its cases (annotation ``keys``, in run order).

    Two independent methods: the host annotation windows (tolerance 0.4 x
    gap; needs the host and device clocks aligned, which XLA's CUPTI
    collector does) and the idle gaps inserted between cases (needs every
    pause inside a case to be shorter than half the inserted gap). When both
    work they must agree, else the gaps win with a warning (a clock offset
    would shift events into a neighbour's window). Returns ({key: events},
    diagnostics) or (None, diagnostics) with ``diag['error']`` set.
    """
    events, diag = extract_device_events(profile_data, platform)
    kinds = timing_kinds(events)
    diag["timing_kinds"] = list(kinds)
    diag["n_events"] = len(events)
    timed = sorted((e for e in events if e.kind in kinds), key=lambda e: e.start_ns)
    if not timed:
        diag["error"] = ("no device events in the trace (is CUPTI available to the JAX profiler?); "
                         f"planes and lines: {json.dumps(describe_planes(profile_data))[:4000]}")
        return None, diag
    others = [e for e in events if e.kind not in kinds]

    by_ann = None
    windows = extract_annotations(profile_data)
    missing = [k for k in keys if k not in windows]
    if missing:
        diag["warnings"].append(f"annotations missing from the host plane: {missing[:5]}")
    else:
        tol = 0.4 * gap_ns
        by_ann = {k: [] for k in keys}
        for e in events:
            # The window holding the event's start, else the nearest one within the tolerance.
            dist = {k: max(windows[k][0] - e.start_ns, e.start_ns - windows[k][1], 0.0) for k in keys}
            k = min(keys, key=lambda k: dist[k])
            if dist[k] <= tol:
                by_ann[k].append(e)
        n_in = sum(1 for k in keys for e in by_ann[k] if e.kind in kinds)
        if n_in < 0.99 * len(timed) or not all(any(e.kind in kinds for e in by_ann[k]) for k in keys):
            diag["warnings"].append(f"annotation windows hold {n_in}/{len(timed)} device events "
                                    "(host/device clocks misaligned?)")
            by_ann = None

    groups, why = _gap_groups(timed, len(keys), gap_ns)
    by_gap = None
    if groups is not None:
        by_gap = {}
        for k, g in zip(keys, groups):
            lo, hi = g[0].start_ns, max(e.end_ns for e in g)
            by_gap[k] = list(g) + [e for e in others if lo <= e.start_ns <= hi]
    elif by_ann is None:
        diag["error"] = f"cannot assign device events to cases: no usable annotations, and by idle gaps: {why}"
        return None, diag

    def ids(assign, k):
        return {(e.start_ns, e.name) for e in assign[k] if e.kind in kinds}

    if by_ann is not None and by_gap is not None:
        if all(ids(by_ann, k) == ids(by_gap, k) for k in keys):
            diag["assignment"] = "annotation=gaps"
            return by_ann, diag
        diag["warnings"].append("annotation windows and idle gaps disagree on which events belong to which "
                                "case; using the idle gaps")
        diag["assignment"] = "gaps"
        return by_gap, diag
    if by_ann is not None:
        diag["warnings"].append(f"idle gaps could not confirm the annotation windows: {why}")
        diag["assignment"] = "annotation"
        return by_ann, diag
    diag["assignment"] = "gaps"
    return by_gap, diag


# ---------------------------------------------------------------------------
# Nsight Compute cross-check.

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


# ---------------------------------------------------------------------------
# Environment and run metadata.

def device_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def l2_bytes_for(device) -> int:
    if device.platform == "cpu":
        return DEFAULT_CPU_L2_BYTES
    kind = device.device_kind
    for sub, size in L2_BYTES_BY_KIND:
        if sub in kind:
            return size
    return DEFAULT_GPU_L2_BYTES


def git_info(repo: str = REPO_ROOT) -> dict:
    def run(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=30)

    try:
        head = run("rev-parse", "HEAD")
        if head.returncode == 0:
            status = run("status", "--porcelain", "--untracked-files=no")
            return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": os.environ.get("JAX_MXFP4_GIT_COMMIT", "unknown"), "dirty": None}


def run_metadata(benchmark: str, argv: Sequence[str] | None = None) -> dict:
    import jax
    import jaxlib
    import numpy as np

    dev = jax.devices()[0]
    try:
        from jax_mxfp4 import _native
        cuda_enabled = bool(_native.cuda_enabled())
    except Exception as err:  # noqa: BLE001 - metadata only
        cuda_enabled = f"unknown ({err})"
    try:
        import jax_mxfp4
        kernels = [k.name for k in jax_mxfp4.kernels.REGISTRY]
        version = jax_mxfp4.__version__
    except Exception as err:  # noqa: BLE001
        kernels, version = [], f"unknown ({err})"
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        rel = os.path.relpath(os.path.abspath(argv[0]), REPO_ROOT)
        if rel.startswith("benchmarks" + os.sep) and rel.count(os.sep) == 1:
            argv = ["-m", rel[:-3].replace(os.sep, ".")] + argv[1:]
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "device": {
            "kind": dev.device_kind,
            "platform": dev.platform,
            "count": jax.device_count(),
            "slug": device_slug(dev.device_kind),
            "compute_capability": getattr(dev, "compute_capability", None),
        },
        "software": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "python": _platform.python_version(),
            "numpy": np.__version__,
            "jax_mxfp4": version,
            "cuda_kernels_built": cuda_enabled,
            "registered_kernels": kernels,
        },
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git": git_info(),
        "command": " ".join([os.path.basename(sys.executable)] + argv),
    }


# ---------------------------------------------------------------------------
# Rotation (keep L2 out of the measurement).

def rotation_copies(working_set_bytes: float, l2_bytes: int, *, max_copies: int = 64,
                    target_factor: float = 4.0) -> int:
    """How many copies of a call's inputs to rotate among: 1 if the working
    set is >= 2x L2, else enough copies for ``target_factor`` x L2 (<= ``max_copies``)."""
    if working_set_bytes >= 2 * l2_bytes:
        return 1
    need = math.ceil(target_factor * l2_bytes / max(float(working_set_bytes), 1.0))
    return int(min(max_copies, max(2, need)))


def rotation_info(working_set_bytes: float, copies: int, l2_bytes: int) -> dict:
    return {
        "used": copies > 1,
        "copies": int(copies),
        "working_set_bytes": int(working_set_bytes),
        "rotated_bytes": int(working_set_bytes * copies),
        "l2_bytes": int(l2_bytes),
        "exceeds_l2": working_set_bytes * copies > l2_bytes,
    }


# ---------------------------------------------------------------------------
# Running cases.

@dataclasses.dataclass
class Settings:
    warmup: int = 5
    min_wall_iters: int = 10
    max_wall_iters: int = 200
    wall_budget_s: float = 0.25
    trace: bool = True
    trace_iters: int = 10
    gap_s: float = 0.004
    traces_dir: str | None = None  # where traces are kept: always with keep_traces, else on trouble
    keep_traces: bool = False
    l2_bytes: int = DEFAULT_GPU_L2_BYTES
    platform: str = "gpu"
    ncu_worker: bool = False


@dataclasses.dataclass
class Case:
    """One (implementation, shape) to time.

    ``fn`` is called as ``fn(*arg_sets[i % len(arg_sets)])`` (rotation);
    ``check``, if given, gets the first call's output and returns a dict that
    is recorded (e.g. a relative error).
    """

    benchmark: str
    impl: str
    params: dict
    fn: Callable
    arg_sets: Sequence[tuple]
    role: str = "ours"  # ours | baseline | peer | ceiling
    bytes_moved: float | None = None
    flops: float | None = None
    rotation: dict | None = None
    notes: list = dataclasses.field(default_factory=list)
    check: Callable | None = None
    hlo_hook: Callable[[str], dict] | None = None  # gets the optimized HLO text
    extra: dict = dataclasses.field(default_factory=dict)  # recorded as-is
    # Filled by run_cases.
    compiled: Any = None
    hlo_info: dict | None = None
    compile_s: float | None = None
    wall_s: list = dataclasses.field(default_factory=list)
    device: dict | None = None
    check_result: dict | None = None
    error: str | None = None

    def call(self, i: int):
        fn = self.compiled if self.compiled is not None else self.fn
        return fn(*self.arg_sets[i % len(self.arg_sets)])

    def compile(self) -> None:
        """Ahead-of-time compile (jitted ``fn``): times it, runs ``hlo_hook``; calls then use it."""
        t0 = time.perf_counter()
        if hasattr(self.fn, "lower"):
            self.compiled = self.fn.lower(*self.arg_sets[0]).compile()
            if self.hlo_hook is not None:
                try:
                    self.hlo_info = self.hlo_hook(self.compiled.as_text())
                except Exception as err:  # noqa: BLE001 - analysis only
                    self.hlo_info = {"error": f"{type(err).__name__}: {err}"}
        self.compile_s = time.perf_counter() - t0

    def label(self) -> str:
        ps = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.impl}[{ps}]"


def _block(x):
    import jax

    return jax.block_until_ready(x)


def _prepare_and_time_wall(case: Case, s: Settings) -> None:
    case.compile()
    t0 = time.perf_counter()
    out = _block(case.call(0))
    if case.compiled is None:  # not jitted: the first call is the compile
        case.compile_s = time.perf_counter() - t0
    if case.check is not None:
        case.check_result = case.check(out)
    del out
    warm = []
    for i in range(s.warmup):
        t0 = time.perf_counter()
        _block(case.call(i + 1))
        warm.append(time.perf_counter() - t0)
    est = statistics.median(warm) if warm else case.compile_s
    n = int(min(s.max_wall_iters, max(s.min_wall_iters, s.wall_budget_s / max(est, 1e-7))))
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        _block(case.call(i))
        ts.append(time.perf_counter() - t0)
    case.wall_s = ts


def _load_trace(logdir: str):
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise HarnessError(f"the profiler wrote no *.xplane.pb under {logdir}: {os.listdir(logdir)}")
    return ProfileData.from_file(files[-1]), files[-1]


def _profile_options(strict: bool):
    import jax

    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # no Python function events
    opts.host_tracer_level = 2  # keeps TraceAnnotation events
    opts.enable_hlo_proto = False  # smaller traces
    opts.raise_error_on_start_failure = strict
    return opts


def _start_trace(logdir: str) -> None:
    """Starts the JAX profiler; if a tracer (e.g. CUPTI) fails to start, says so loudly and retries leniently."""
    import jax

    try:
        jax.profiler.start_trace(logdir, profiler_options=_profile_options(strict=True))
    except Exception as err:  # noqa: BLE001
        loud(f"the JAX profiler reported a start failure: {type(err).__name__}: {err}\n"
             "retrying without raise_error_on_start_failure; device times may be missing")
        with contextlib.suppress(Exception):
            jax.profiler.stop_trace()
        jax.profiler.start_trace(logdir, profiler_options=_profile_options(strict=False))


def _trace_group(cases: Sequence[Case], s: Settings, group_name: str) -> None:
    import jax

    keys = [f"{ANNOTATION_PREFIX}{i}" for i in range(len(cases))]
    n_calls = s.trace_iters + 1  # the first call of each case is untimed
    with tempfile.TemporaryDirectory(prefix="mxfp4bench-trace-") as logdir:
        _start_trace(logdir)
        try:
            for key, case in zip(keys, cases):
                time.sleep(s.gap_s)
                with jax.profiler.TraceAnnotation(key):
                    for i in range(n_calls):
                        _block(case.call(i))
            time.sleep(s.gap_s)
        finally:
            jax.profiler.stop_trace()
        pd, path = _load_trace(logdir)
        assigned, diag = assign_group_events(pd, keys, s.platform, s.gap_s * 1e9)
        kinds = diag.get("timing_kinds") or ["kernel"]
        timings = {}
        if assigned is not None:
            for key, case in zip(keys, cases):
                timings[key] = device_timing(assigned[key], n_calls, drop_first=1, kinds=kinds)
        trouble = assigned is None or bool(diag.get("warnings")) or any(t["error"] for t in timings.values())
        if s.traces_dir and (s.keep_traces or trouble):
            os.makedirs(s.traces_dir, exist_ok=True)
            kept = os.path.join(s.traces_dir, f"{group_name}.xplane.pb")
            shutil.copy(path, kept)
            if trouble:
                log(f"  [trace {group_name}] kept the trace for inspection: {kept} (planes/lines: "
                    f"{json.dumps(describe_planes(pd))[:1500]})")
    for w in diag.get("warnings", []):
        log(f"  [trace {group_name}] warning: {w}")
    if assigned is None:
        loud(f"DEVICE TIME UNAVAILABLE for trace group {group_name}: {diag.get('error')}\n"
             "Wall times are still reported. Fix harness.extract_device_events for this trace layout.")
        for case in cases:
            case.device = {"time_us": None, "error": diag.get("error"), "method": None}
        return
    for key, case in zip(keys, cases):
        dt = timings[key]
        dt["method"] = f"{diag['assignment']}/{dt['method']}" if dt["method"] else None
        dt["event_kind"] = kinds[0]
        if dt["error"]:
            log(f"  [trace {group_name}] {case.label()}: {dt['error']}")
        case.device = dt


def run_cases(cases: Sequence[Case], s: Settings, group_name: str = "group") -> list[Case]:
    """Compiles, warms up and wall-times each case, then device-times them all in one trace.

    A case whose compile or call raises is marked with ``error`` (printed
    loudly) and the others go on.
    """
    live = []
    for case in cases:
        try:
            if s.ncu_worker:
                _ncu_worker_case(case, s)
            else:
                _prepare_and_time_wall(case, s)
            live.append(case)
        except Exception as err:  # noqa: BLE001 - recorded and reported, never silent
            case.error = f"{type(err).__name__}: {err}"
            loud(f"case {case.label()} FAILED: {case.error[:2000]}")
    if s.trace and live and not s.ncu_worker:
        try:
            _trace_group(live, s, group_name)
        except Exception as err:  # noqa: BLE001
            loud(f"device trace of group {group_name} failed: {type(err).__name__}: {err}")
            for case in live:
                case.device = {"time_us": None, "error": f"trace failed: {err}", "method": None}
    return list(cases)


def _ncu_worker_case(case: Case, s: Settings) -> None:
    """Compile + warm up, then ``trace_iters`` calls inside cuProfilerStart/Stop (for ncu)."""
    case.compile()
    _block(case.call(0))
    for i in range(s.warmup):
        _block(case.call(i + 1))
    with cuda_profiler_range():
        for i in range(s.trace_iters):
            _block(case.call(i))
    log(f"NCU_WORKER_CASE {case.label()} calls={s.trace_iters}")


def measure_copy_bandwidth(s: Settings, nbytes: int) -> dict:
    """Device-to-device copy bandwidth: a jitted ``x ^ c`` over ``nbytes`` of uint32
    (reads nbytes, writes nbytes; XLA cannot elide it). Returns {bytes_moved,
    device_gbps, wall_gbps, record}."""
    import jax
    import jax.numpy as jnp

    n = nbytes // 4
    fn = jax.jit(lambda x: x ^ jnp.uint32(0x5A5A5A5A))
    x = jax.random.bits(jax.random.PRNGKey(7), (n,), jnp.uint32)
    case = Case("copy", "copy", {"bytes": int(nbytes)}, fn, [(x,)], role="ceiling", bytes_moved=2 * n * 4,
                rotation=rotation_info(2 * n * 4, 1, s.l2_bytes))
    run_cases([case], s, "copy_bandwidth")
    rec = case_record(case)
    dev = (rec["device_time_us"] or {}).get("median")
    wall = rec["wall_time_us"]["median"] if rec["wall_time_us"] else None
    out = {
        "bytes_moved": int(2 * n * 4),
        "device_gbps": (2 * n * 4) / (dev * 1e3) if dev else None,
        "wall_gbps": (2 * n * 4) / (wall * 1e3) if wall else None,
        "record": rec,
    }
    log(f"copy bandwidth ({nbytes / MIB:.0f} MiB read + written): device "
        f"{out['device_gbps'] or float('nan'):.0f} GB/s, wall {out['wall_gbps'] or float('nan'):.0f} GB/s")
    del x
    return out


def case_time_us(rec: dict, field: str = "device") -> tuple[float | None, bool]:
    """(time in us, is_wall_fallback) of a case record: device median, else wall median."""
    if field == "device":
        d = rec.get("device_time_us")
        if d and d.get("median") is not None:
            return d["median"], False
    w = rec.get("wall_time_us")
    if w and w.get("median") is not None:
        return w["median"], field == "device"
    return None, False


def case_record(case: Case) -> dict:
    dev = case.device or {}
    rec = {
        "benchmark": case.benchmark,
        "impl": case.impl,
        "role": case.role,
        "params": dict(case.params),
        "device_time_us": dev.get("time_us"),
        "device_span_us": dev.get("span_us"),
        "device_time_method": dev.get("method"),
        "device_time_error": dev.get("error"),
        "wall_time_us": summarize(t * 1e6 for t in case.wall_s),
        "compile_s": case.compile_s,
        "kernels_per_call": dev.get("kernels_per_call"),
        "kernels": dev.get("kernels", []),
        "memcpy_us_per_call": dev.get("memcpy_us_per_call"),
        "memset_us_per_call": dev.get("memset_us_per_call"),
        "memsets_per_call": dev.get("memsets_per_call"),
        "memcpys_per_call": dev.get("memcpys_per_call"),
        "rotation": case.rotation or {"used": False, "copies": len(case.arg_sets)},
        "bytes_moved": case.bytes_moved,
        "flops": case.flops,
        "metrics": {},
        "ratios": {},
        "check": case.check_result,
        "hlo": case.hlo_info,
        "extra": dict(case.extra),
        "error": case.error,
        "notes": list(case.notes),
    }
    if rec["kernels_per_call"] is not None:
        rec["metrics"]["kernels"] = rec["kernels_per_call"]
    t, _ = case_time_us(rec)
    if t:
        if case.bytes_moved:
            rec["metrics"]["gbps"] = case.bytes_moved / (t * 1e3)
        if case.flops:
            rec["metrics"]["tflops"] = case.flops / (t * 1e6)
    return rec


# ---------------------------------------------------------------------------
# Results: build, validate, write, load, merge.

def new_result(benchmark: str, settings: Settings, table: dict, argv: Sequence[str] | None = None) -> dict:
    res = run_metadata(benchmark, argv)
    res["run_id"] = f"{res['date_utc']}-{os.getpid()}"
    res["settings"] = dataclasses.asdict(settings)
    res["copy_bandwidth"] = None
    res["cases"] = []
    res["targets"] = []
    res["table"] = table
    res["notes"] = []
    res["errors"] = []
    return res


def _row_key(params: dict, row_params: Sequence[str]) -> tuple:
    return tuple(params.get(p) for p in row_params)


def find_case(result: dict, impl: str, params: dict, match: Sequence[str]) -> dict | None:
    key = _row_key(params, match)
    for c in result["cases"]:
        if c["impl"] == impl and _row_key(c["params"], match) == key:
            return c
    return None


def add_ratio(result: dict, impl: str, baseline: str, match: Sequence[str], field: str = "device",
              name: str | None = None) -> None:
    """case.ratios[name or 'vs_<baseline>'] = time(baseline) / time(impl) (speedup; >1 = impl faster)."""
    for c in result["cases"]:
        if c["impl"] != impl:
            continue
        b = find_case(result, baseline, c["params"], match)
        if b is None:
            continue
        t, _ = case_time_us(c, field)
        tb, _ = case_time_us(b, field)
        if t and tb:
            c["ratios"][name or f"vs_{baseline}"] = tb / t


def target(name: str, ok: bool | None, detail: str, impl: str | None = None, basis: str = "device") -> dict:
    return {"name": name, "status": "N/A" if ok is None else ("PASS" if ok else "MISS"),
            "detail": detail, "impl": impl, "basis": basis}


_REQUIRED_TOP = {
    "schema_version": int, "benchmark": str, "device": dict, "software": dict, "date_utc": str,
    "git": dict, "command": str, "cases": list, "targets": list, "table": dict,
}
_REQUIRED_CASE = {
    "benchmark": str, "impl": str, "params": dict, "metrics": dict, "ratios": dict, "rotation": dict,
}


def validate_result(d: Any) -> dict:
    """Checks a results dict against the schema; raises ``SchemaError`` listing every problem."""
    problems = []
    if not isinstance(d, dict):
        raise SchemaError("results must be a JSON object")
    for k, t in _REQUIRED_TOP.items():
        if k not in d:
            problems.append(f"missing top-level key {k!r}")
        elif not isinstance(d[k], t):
            problems.append(f"{k!r} must be {t.__name__}, got {type(d[k]).__name__}")
    if isinstance(d.get("schema_version"), int) and d["schema_version"] > SCHEMA_VERSION:
        problems.append(f"schema_version {d['schema_version']} is newer than this harness ({SCHEMA_VERSION})")
    for k in ("kind", "platform", "slug"):
        if isinstance(d.get("device"), dict) and not isinstance(d["device"].get(k), str):
            problems.append(f"device.{k} must be a string")
    for k in ("jax", "jaxlib"):
        if isinstance(d.get("software"), dict) and not isinstance(d["software"].get(k), str):
            problems.append(f"software.{k} must be a string")
    if isinstance(d.get("git"), dict) and "commit" not in d["git"]:
        problems.append("git.commit missing")
    table = d.get("table")
    if isinstance(table, dict):
        if not isinstance(table.get("row_params"), list):
            problems.append("table.row_params must be a list")
        if not isinstance(table.get("columns"), list):
            problems.append("table.columns must be a list")
        else:
            for i, col in enumerate(table["columns"]):
                if not isinstance(col, dict) or col.get("kind") not in ("time", "ratio", "metric", "param"):
                    problems.append(f"table.columns[{i}] needs kind time|ratio|metric|param")
                elif "label" not in col:
                    problems.append(f"table.columns[{i}] needs a label")
    for i, c in enumerate(d.get("cases") or []):
        if not isinstance(c, dict):
            problems.append(f"cases[{i}] must be an object")
            continue
        for k, t in _REQUIRED_CASE.items():
            if not isinstance(c.get(k), t):
                problems.append(f"cases[{i}].{k} must be {t.__name__}")
        for k in ("device_time_us", "wall_time_us"):
            v = c.get(k)
            if v is not None and not (isinstance(v, dict) and isinstance(v.get("median"), (int, float))):
                problems.append(f"cases[{i}].{k} must be null or an object with a numeric median")
        if "device_time_us" not in c or "wall_time_us" not in c:
            problems.append(f"cases[{i}] needs device_time_us and wall_time_us (null allowed)")
        kpc = c.get("kernels_per_call")
        if kpc is not None and not isinstance(kpc, (int, float)):
            problems.append(f"cases[{i}].kernels_per_call must be a number or null")
    for i, t in enumerate(d.get("targets") or []):
        if not isinstance(t, dict) or t.get("status") not in ("PASS", "MISS", "N/A"):
            problems.append(f"targets[{i}] needs status PASS|MISS|N/A")
    if problems:
        raise SchemaError("invalid benchmark results:\n  " + "\n  ".join(problems))
    return d


def load_result(path: str) -> dict:
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as err:
            raise SchemaError(f"{path}: not valid JSON: {err}") from err
    try:
        return validate_result(d)
    except SchemaError as err:
        raise SchemaError(f"{path}: {err}") from err


def result_filename(result: dict) -> str:
    return f"{result['benchmark']}-{result['device']['slug']}.json"


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _case_key(c: dict) -> tuple:
    return c["impl"], json.dumps(c["params"], sort_keys=True, default=str)


def merge_results(old: dict, new: dict) -> dict:
    """``new`` plus the cases of ``old`` that ``new`` does not re-measure (same device only)."""
    if old["device"]["kind"] != new["device"]["kind"]:
        raise HarnessError(f"cannot merge results of {old['device']['kind']} into {new['device']['kind']}")
    new_keys = {_case_key(c) for c in new["cases"]}
    kept = [c for c in old["cases"] if _case_key(c) not in new_keys]
    merged = dict(new)
    merged["cases"] = kept + list(new["cases"])
    notes = list(old.get("notes", []))
    if kept and old.get("run_id") != new.get("run_id"):
        notes.append(f"{len(kept)} cases come from an earlier run ({old['date_utc']}, commit "
                     f"{str(old['git'].get('commit'))[:10]}: {old['command']})")
    merged["notes"] = list(dict.fromkeys(notes + list(new.get("notes", []))))
    merged["errors"] = list(dict.fromkeys(list(old.get("errors", [])) + list(new.get("errors", []))))
    return merged


def write_json(result: dict, path: str) -> str:
    """Validates ``result`` and writes it to ``path`` atomically."""
    result = sanitize(json.loads(json.dumps(result, default=_json_default)))
    validate_result(result)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def sanitize(obj):
    """Replaces NaN/inf floats by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------
# Tables.

def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def render_table(result: dict) -> str:
    """Markdown table of a result, from its ``table`` descriptor.

    Column kinds: ``param`` (a row parameter), ``time`` (an impl's median
    device time in us; '(w)' marks a wall-time fallback), ``ratio``
    (time(baseline) / time(impl): >1 means impl is faster), ``metric`` (an
    impl's ``metrics[metric]``).
    """
    table = result["table"]
    rows_p = table["row_params"]
    cols = table["columns"]
    by_row: dict[tuple, dict[str, dict]] = {}
    for c in result["cases"]:
        by_row.setdefault(_row_key(c["params"], rows_p), {})[c["impl"]] = c
    # Drop columns whose impl never ran.
    present = {c["impl"] for c in result["cases"]}
    cols = [col for col in cols if col["kind"] == "param"
            or (col.get("impl") in present and col.get("baseline", col.get("impl")) in present)]
    header = [p for p in rows_p] + [col["label"] for col in cols if col["kind"] != "param"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key in sorted(by_row, key=lambda k: tuple(_sort_key(v) for v in k)):
        cases = by_row[key]
        cells = [str(v) for v in key]
        for col in cols:
            kind = col["kind"]
            if kind == "param":
                continue
            field = col.get("field", "device")
            c = cases.get(col["impl"])
            if kind == "time":
                t, fb = case_time_us(c, field) if c else (None, False)
                cells.append(fmt_time_us(t) + (" (w)" if fb and t is not None else ""))
            elif kind == "ratio":
                b = cases.get(col["baseline"])
                t, _ = case_time_us(c, field) if c else (None, False)
                tb, _ = case_time_us(b, field) if b else (None, False)
                cells.append(fmt_ratio(tb / t) if t and tb else "-")
            elif kind == "metric":
                v = (c or {}).get("metrics", {}).get(col["metric"])
                fmt = col.get("fmt", "{:.1f}")
                cells.append(fmt.format(v) if isinstance(v, (int, float)) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_targets(result: dict) -> str:
    out = []
    for t in result.get("targets", []):
        impl = f" [{t['impl']}]" if t.get("impl") else ""
        out.append(f"- **{t['status']}**{impl} {t['name']}: {t['detail']}")
    return "\n".join(out)


def describe_run(result: dict) -> str:
    g = result["git"]
    commit = (g.get("commit") or "unknown")[:10] + ("+dirty" if g.get("dirty") else "")
    sw = result["software"]
    return (f"{result['device']['kind']} ({result['device']['platform']}), jax {sw['jax']} / jaxlib {sw['jaxlib']}, "
            f"commit {commit}, {result['date_utc']}")


def print_summary(result: dict) -> None:
    log(f"\n=== {result['benchmark']}: {describe_run(result)}")
    if result.get("copy_bandwidth") and result["copy_bandwidth"].get("device_gbps"):
        log(f"copy bandwidth (same run): {result['copy_bandwidth']['device_gbps']:.0f} GB/s")
    log(render_table(result))
    if result.get("targets"):
        log("targets:")
        log(render_targets(result))
    if result.get("errors"):
        log("errors:")
        for e in result["errors"]:
            log(f"  - {e}")


# ---------------------------------------------------------------------------
# Plots.

def plot_result(result: dict, path: str, *, x: str, panels: Sequence[str], field: str = "device",
                impls: Sequence[str] | None = None, ylabel: str | None = None) -> str | None:
    """Time vs ``x`` (log-log), one panel per combination of ``panels`` params, one line per impl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        loud(f"matplotlib is not installed ({err}); no plot written for {result['benchmark']}")
        return None
    cases = [c for c in result["cases"] if impls is None or c["impl"] in impls]
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        groups.setdefault(tuple(c["params"].get(p) for p in panels), []).append(c)
    if not groups:
        return None
    keys = sorted(groups, key=lambda k: tuple(_sort_key(v) for v in k))
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        by_impl: dict[str, list[tuple]] = {}
        for c in groups[key]:
            t, _ = case_time_us(c, field)
            xv = c["params"].get(x)
            if t and isinstance(xv, (int, float)):
                by_impl.setdefault(c["impl"], []).append((xv, t))
        for impl, pts in sorted(by_impl.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(", ".join(f"{p}={v}" for p, v in zip(panels, key)), fontsize=9)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel or f"{field} time (us)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{result['benchmark']} — {describe_run(result)}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Command line plumbing shared by the benchmarks.

def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few cases (smoke run on the GPU)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run on CPU with tiny shapes (tests the harness; numbers mean nothing)")
    parser.add_argument("--out", default=None, help="directory for JSON, PNG and traces of this run")
    parser.add_argument("--results-dir", default=None,
                        help=f"also write the JSON here (default {RESULTS_DIR}; not with --cpu-smoke)")
    parser.add_argument("--no-results", action="store_true", help="do not write into benchmarks/results")
    parser.add_argument("--merge", action="store_true",
                        help="merge into an existing results JSON (keeps cases this run does not re-measure)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--trace-iters", type=int, default=None, help="timed calls per case in the device trace")
    parser.add_argument("--no-trace", action="store_true", help="wall time only (no profiler)")
    parser.add_argument("--keep-traces", action="store_true",
                        help="keep every profiler trace (*.xplane.pb) under OUT/traces (default: only "
                             "traces whose parsing had trouble)")
    parser.add_argument("--l2-mib", type=float, default=None, help="L2 size used to decide input rotation")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new shape groups after this many seconds (results so far are kept)")
    parser.add_argument("--impls", default=None, help="comma-separated implementation names to run (default all)")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help=f"do not use the persistent compilation cache ({COMPILE_CACHE_DIR})")
    parser.add_argument("--ncu-worker", action="store_true",
                        help="no profiler: run the selected cases inside cuProfilerStart/Stop for "
                             "`ncu --profile-from-start off` (see benchmarks/ncu_check.py)")
    parser.add_argument("--allow-cpu", action="store_true", help="run the full shapes even without a GPU")


def init_platform(args) -> Settings:
    """Selects the platform, checks it, configures caches; returns the Settings."""
    import jax

    if args.cpu_smoke:
        jax.config.update("jax_platforms", "cpu")
    try:
        dev = jax.devices()[0]
    except RuntimeError as err:
        raise SystemExit(f"jax cannot initialize a backend: {err}") from err
    if dev.platform != "gpu" and not (args.cpu_smoke or args.allow_cpu or args.ncu_worker):
        raise SystemExit(
            f"jax's default device is {dev.device_kind} ({dev.platform}), not a GPU: the CUDA plugin did not "
            f"load (jax.devices() = {jax.devices()}). Use --cpu-smoke for the CPU smoke run, or --allow-cpu.")
    if dev.platform == "gpu" and not args.no_compile_cache:
        os.makedirs(COMPILE_CACHE_DIR, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE_DIR)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    s = Settings()
    s.platform = dev.platform
    s.l2_bytes = int(args.l2_mib * MIB) if args.l2_mib else l2_bytes_for(dev)
    if args.cpu_smoke or dev.platform == "cpu":
        s.warmup, s.min_wall_iters, s.max_wall_iters, s.wall_budget_s, s.trace_iters = 1, 3, 10, 0.05, 3
        s.gap_s = 0.02  # host thread pools are noisy: wider gaps between cases
    if args.warmup is not None:
        s.warmup = args.warmup
    if args.trace_iters is not None:
        s.trace_iters = args.trace_iters
    s.trace = not args.no_trace
    s.ncu_worker = args.ncu_worker
    if args.out:
        s.traces_dir = os.path.join(args.out, "traces")
    s.keep_traces = args.keep_traces
    log(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; L2 for rotation "
        f"{s.l2_bytes / MIB:.0f} MiB; warmup {s.warmup}, trace iters {s.trace_iters}, trace {'on' if s.trace else 'off'}")
    return s


def output_dirs(args) -> list[str]:
    dirs = []
    if args.out:
        dirs.append(args.out)
    if args.ncu_worker:
        return []
    if not args.no_results and (args.results_dir or not args.cpu_smoke):
        dirs.append(args.results_dir or RESULTS_DIR)
    return dirs


def selected(name: str, args) -> bool:
    if not args.impls:
        return True
    return name in {s.strip() for s in args.impls.split(",")}


def parse_int_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def parse_shapes(text: str | None) -> list[tuple[int, int]] | None:
    """'4096x4096,8192x28672' -> [(4096, 4096), (8192, 28672)] (K x N)."""
    if not text:
        return None
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        k, n = item.lower().split("x")
        out.append((int(k), int(n)))
    return out


@contextlib.contextmanager
def interruptible(result: dict):
    """Turns SIGINT (``timeout -s INT`` in run_all.sh) into a recorded error so partial results get written."""
    try:
        yield
    except KeyboardInterrupt:
        msg = "interrupted by SIGINT (time limit?): the results are partial"
        loud(msg)
        result["errors"].append(msg)
        result["interrupted"] = True


def finish(result: dict, args, *, postprocess: Callable[[dict], dict] | None = None,
           plot: dict | None = None, final: bool = True) -> dict:
    """Writes the results JSON (and, if ``final``, the PNG) into every output directory.

    With ``--merge`` the cases of an existing file that this run did not
    re-measure are kept. ``postprocess`` (ratios, metrics, targets: a pure
    function of the cases) runs after merging, on a copy. Returns the
    (last) written result; prints the summary when ``final``.
    """
    import copy

    dirs = output_dirs(args)
    out = None
    for d in dirs:
        path = os.path.join(d, result_filename(result))
        res = copy.deepcopy(result)
        if args.merge and os.path.exists(path):
            try:
                res = merge_results(load_result(path), res)
            except (SchemaError, HarnessError) as err:
                loud(f"not merging into {path}: {err}")
        if postprocess:
            res = postprocess(res)
        write_json(res, path)
        if final:
            log(f"wrote {path}")
        if final and plot is not None:
            png = path[:-len(".json")] + ".png"
            try:
                if plot_result(res, png, **plot):
                    log(f"wrote {png}")
            except Exception as err:  # noqa: BLE001 - a plot never sinks a run
                loud(f"plot {png} failed: {type(err).__name__}: {err}")
        out = res
    if out is None:
        out = postprocess(copy.deepcopy(result)) if postprocess else result
    if final:
        print_summary(sanitize(out))
    return out
