"""Device time from a JAX profiler trace (pure: works on any ``jax.profiler.ProfileData``).

``extract_device_events`` reads the device plane's activity (GPU kernels,
memcpys, memsets, graphs; on CPU, XLA op events); ``assign_group_events``
assigns a group trace's events to its cases (annotation windows, checked
against the inserted idle gaps); ``device_timing`` splits one case's events
into its calls and sums them.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import re
import statistics
import warnings
from typing import Any, Sequence

from benchmarks.common import ANNOTATION_PREFIX, summarize


# Device events that are part of a call's GPU work besides its kernels: they count in
# its device time (``device_timing``), e.g. the memset that zeroes a split-K GEMM's
# arrival counters before its kernel.
ATTACHED_KINDS = ("memset", "memcpy")
# Kernels that are inter-device collectives: NCCL's or XLA's own all-reduce kernels on GPUs,
# ops named after the collective (e.g. psum) on CPU.
COLLECTIVE_KERNEL = re.compile(r"nccl|psum|all_?reduce|all-reduce|all_?gather|all-gather|reduce_?scatter|"
                               r"reduce-scatter|all_?to_?all|collective", re.IGNORECASE)

# Device-plane lines that are derived summaries, never raw activity.
_DERIVED_LINES = (
    "XLA Modules", "XLA Ops", "Steps", "Framework Ops", "Framework Name Scope", "Source code",
    "XLA TraceMe", "TensorFlow Ops", "TensorFlow Name Scope", "Async XLA Ops", "Launch Stats",
    "CUPTI overhead", "_counters_", "Counters", "SparseCore",
)


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
    low_stats = {s.lower() for s in stats}  # CUPTI's memset events carry "Memset_details"
    if "memcpy_details" in low_stats or low.startswith("memcpy"):
        return "memcpy"
    if "memset_details" in low_stats or low.startswith("memset"):
        return "memset"
    if "kernel_details" in stats:
        return "kernel"
    if "cuda_graph_exec_id" in stats:
        return "graph"
    return "other"


def describe_planes(profile_data) -> dict[str, list[str]]:
    """{plane name: [line names]}: printed when no device events are found."""
    return {p.name: [ln.name for ln in p.lines] for p in profile_data.planes}


def extract_device_events(profile_data, platform: str, only_planes: Sequence[str] | None = None
                          ) -> tuple[list[DeviceEvent], dict]:
    """Device activity events of a trace, and diagnostics.

    GPU (``platform`` 'gpu'/'cuda'/'rocm'): every event on the ``Stream #..``
    lines of planes ``/device:GPU:<n>`` (if a plane has no such line, all its
    non-derived lines, with a warning); ``only_planes`` (e.g. ``["/device:GPU:0"]``)
    keeps only those planes: on several GPUs, one GPU's time per call, not the
    sum over GPUs. CPU: XLA op events (stat ``hlo_op``) on ``/host:CPU``.
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
        if not plane.name.startswith(prefix) or (only_planes is not None and plane.name not in only_planes):
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
                  kinds: Sequence[str] = ("kernel",), attach: Sequence[str] = ATTACHED_KINDS) -> dict:
    """Per-call device time of one case from its events (``n_calls`` includes ``drop_first``).

    The calls are found from the events of ``kinds`` (``split_calls``); each event
    of ``attach`` (memsets and memcpys: a call's own GPU work, e.g. zeroing its
    split-K counters) then joins the call nearest to it in time
    (``_attach_to_calls``) and counts in that call's time and span. Returns
    {time_us: summarize(sum of durations per call), span_us (median
    first-start..last-end per call), collective_time_us (summarize(sum of the
    durations of collective kernels, ``COLLECTIVE_KERNEL``, per call); a
    collective kernel's duration includes waiting for its peers),
    kernels_per_call, kernels: [{name, median_us}] (when every call ran the
    same sequence; ``kinds`` events only), attached_us (summarize(the attached
    events' durations per call)), memcpy_us_per_call, memset_us_per_call
    (over all ``n_calls``), method, error}.
    """
    timed = [e for e in events if e.kind in kinds]
    out: dict[str, Any] = {
        "time_us": None, "span_us": None, "collective_time_us": None, "kernels_per_call": None, "kernels": [],
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
    extras = _attach_to_calls([e for e in events if e.kind in attach], calls)[drop_first:]
    calls = calls[drop_first:]
    out["method"] = method
    out["time_us"] = summarize(sum(e.duration_ns for e in c + x) / 1e3 for c, x in zip(calls, extras))
    out["attached_us"] = summarize(sum(e.duration_ns for e in x) / 1e3 for x in extras)
    out["collective_time_us"] = summarize(
        sum(e.duration_ns for e in c if COLLECTIVE_KERNEL.search(e.name)) / 1e3 for c in calls)
    spans = [(max(e.end_ns for e in c + x) - min(e.start_ns for e in c + x)) / 1e3
             for c, x in zip(calls, extras) if c]
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


def _attach_to_calls(extra: Sequence[DeviceEvent], calls: Sequence[Sequence[DeviceEvent]]) -> list[list[DeviceEvent]]:
    """Each event of ``extra`` goes to the call nearest to it in time: the one it runs
    inside, else the nearer of the calls before and after it (calls are separated by
    the host's dispatch; a call's own memset runs right before or after its kernels)."""
    bounds = [(min(e.start_ns for e in c), max(e.end_ns for e in c)) for c in calls]
    ends = [hi for _, hi in bounds]
    out: list[list[DeviceEvent]] = [[] for _ in calls]
    for e in extra:
        i = bisect.bisect_left(ends, e.start_ns)  # the first call not finished when e starts
        near = [j for j in (i - 1, i) if 0 <= j < len(calls)]
        if near:
            j = min(near, key=lambda j: max(bounds[j][0] - e.end_ns, e.start_ns - bounds[j][1], 0.0))
            out[j].append(e)
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


def _uneven_case(assign: dict[str, list[DeviceEvent]], keys: Sequence[str], kinds: Sequence[str],
                 n_calls: int) -> str | None:
    """The first case whose timed events do not split into ``n_calls`` calls of one size, else None."""
    for k in keys:
        calls, _ = split_calls([e for e in assign[k] if e.kind in kinds], n_calls)
        if calls is None or len({len(c) for c in calls}) != 1:
            return k
    return None


def assign_group_events(profile_data, keys: Sequence[str], platform: str, gap_ns: float,
                        n_calls: int | None = None, planes: Sequence[str] | None = None
                        ) -> tuple[dict[str, list[DeviceEvent]] | None, dict]:
    """Assigns a group trace's device events to its cases (annotation ``keys``, in run order).

    Two independent methods: the host annotation windows (tolerance 0.4 x
    gap; needs the host and device clocks aligned, which XLA's CUPTI
    collector does) and the idle gaps inserted between cases (needs every
    pause inside a case to be shorter than half the inserted gap). When both
    work they must agree, else the gaps win with a warning (a clock offset
    would shift events into a neighbour's window), unless ``n_calls`` (calls
    per case) is given and only the annotation windows split every case into
    ``n_calls`` calls of the same size: then a pause inside a case was longer
    than the inserted gap (e.g. the host instantiating a CUDA graph during a
    call) and the windows win, with a warning. ``planes``: ``only_planes`` of
    ``extract_device_events``. Returns ({key: events},
    diagnostics) or (None, diagnostics) with ``diag['error']`` set.
    """
    events, diag = extract_device_events(profile_data, platform, planes)
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
        if n_calls:
            bad_gap = _uneven_case(by_gap, keys, kinds, n_calls)
            if bad_gap is not None and _uneven_case(by_ann, keys, kinds, n_calls) is None:
                diag["warnings"].append(
                    "annotation windows and idle gaps disagree on which events belong to which case; using the "
                    f"annotation windows: by the idle gaps, case {bad_gap} does not split into {n_calls} calls of "
                    "one size (a pause inside a case longer than the inserted gap)")
                diag["assignment"] = "annotation"
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
