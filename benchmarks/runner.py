"""Running cases: compile, wall time, one profiler trace per group, input rotation, copy bandwidth.

How a case is timed is described in ``benchmarks/harness.py`` (and README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

from benchmarks.common import ANNOTATION_PREFIX, MIB, HarnessError, log, loud
from benchmarks.ncu import cuda_profiler_range
from benchmarks.results_io import case_record
from benchmarks.trace_timing import assign_group_events, describe_planes, device_timing

# L2 sizes by device kind substring (bytes), first match wins (so "A100" before "A10", "L40"
# before "L4"). jax does not expose the L2 size.
L2_BYTES_BY_KIND = tuple((kind, mib * MIB) for kind, mib in (
    ("H100", 50), ("H200", 50), ("H800", 50), ("GH200", 50),
    ("B200", 126), ("B100", 126), ("GB200", 126),
    ("A100", 40), ("A800", 40), ("L40", 96), ("L4", 48), ("A10", 6),
))
DEFAULT_GPU_L2_BYTES = 64 * MIB
DEFAULT_CPU_L2_BYTES = 32 * MIB


def l2_bytes_for(device) -> int:
    if device.platform == "cpu":
        return DEFAULT_CPU_L2_BYTES
    kind = device.device_kind
    for sub, size in L2_BYTES_BY_KIND:
        if sub in kind:
            return size
    return DEFAULT_GPU_L2_BYTES


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
    # Device planes whose events count (None: all). A multi-GPU program sets
    # one GPU's plane, so device time is that GPU's busy time per call.
    device_planes: tuple[str, ...] | None = None


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
        assigned, diag = assign_group_events(pd, keys, s.platform, s.gap_s * 1e9, n_calls=n_calls,
                                             planes=s.device_planes)
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
