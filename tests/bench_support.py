"""Builders shared by the benchmark-harness tests (tests/test_benchmarks*.py).

A synthetic XSpace (text proto) shaped like the JAX profiler's GPU output
(planes ``/device:GPU:0`` with ``Stream #`` lines, kernel / memcpy / memset
events, host annotations), device events, and synthetic results and cases.
"""

from __future__ import annotations

import copy
import os
import sys

# The benchmarks package lives at the repository root. Appended, not
# prepended: the root also holds the jax_mxfp4 sources, and the tests must
# import the installed (compiled) package ahead of them.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from benchmarks import bench_gemm  # noqa: E402
from benchmarks import harness as H  # noqa: E402


US = 1_000_000  # ps per us


# ---------------------------------------------------------------------------
# Synthetic XSpace (text proto) builder.

class XSpaceBuilder:
    """Builds an XSpace text proto for ``jax.profiler.ProfileData.from_text_proto``."""

    def __init__(self):
        self.planes = []

    def plane(self, name, lines, plane_id=None):
        """lines: {line name: [(event name, start_us, dur_us, {stat: str value})]} (times absolute)."""
        self.planes.append((plane_id if plane_id is not None else len(self.planes) + 1, name, lines))
        return self

    def text(self) -> str:
        out = []
        for pid, pname, lines in self.planes:
            ev_ids, st_ids, body = {}, {}, []
            for li, (lname, events) in enumerate(lines.items()):
                evs = []
                for name, start_us, dur_us, stats in events:
                    eid = ev_ids.setdefault(name, len(ev_ids) + 1)
                    st = " ".join(
                        f'stats {{ metadata_id: {st_ids.setdefault(k, len(st_ids) + 1)} str_value: "{v}" }}'
                        for k, v in stats.items())
                    evs.append(f"events {{ metadata_id: {eid} offset_ps: {round(start_us * US)} "
                               f"duration_ps: {round(dur_us * US)} {st} }}")
                body.append(f'lines {{ id: {li + 1} name: "{lname}" timestamp_ns: 0 {" ".join(evs)} }}')
            meta = [f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}' for n, i in ev_ids.items()]
            meta += [f'stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}' for n, i in st_ids.items()]
            out.append(f'planes {{ id: {pid} name: "{pname}" {" ".join(body)} {" ".join(meta)} }}')
        return "\n".join(out)

    def profile(self):
        from jax.profiler import ProfileData

        return ProfileData.from_text_proto(self.text())


KD = {"kernel_details": "regs:32 static_shared:0 dynamic_shared:0 grid:132,1,1 block:256,1,1"}


def gpu_calls(t0_us, n_calls, kernels, call_gap_us=60.0):
    """Events of n_calls identical calls: kernels = [(name, dur_us)] back to back (1 us apart)."""
    events, t = [], t0_us
    for _ in range(n_calls):
        for name, dur in kernels:
            events.append((name, t, dur, dict(KD, hlo_op="fusion")))
            t += dur + 1.0
        t += call_gap_us
    return events, t


def two_case_trace(host_shift_us=0.0, with_annotations=True, n_calls=4):
    """Case 0: 1 kernel of 3 us per call; case 1: 3 kernels (2, 5, 1 us) + a memcpy per call."""
    ev0, t_end0 = gpu_calls(100.0, n_calls, [("quantize_kernel", 3.0)])
    t1 = t_end0 + 4000.0  # the inserted idle gap (4 ms)
    ev1, t_end1 = gpu_calls(t1, n_calls, [("fusion_a", 2.0), ("fusion_b", 5.0), ("fusion_c", 1.0)])
    memcpy = [("MemcpyDtoD", t1 + 9.5, 0.4, {"memcpy_details": "kind_src:device kind_dst:device size:64"})]
    lines = {
        "Stream #7(Kernel,MemcpyD2D)": ev0 + ev1 + memcpy,
        "XLA Ops": [("fusion", 100.0, 5000.0, {})],  # a derived line: must be ignored
        "CUPTI overhead": [("overhead", 50.0, 30.0, {})],
    }
    b = XSpaceBuilder().plane("/device:GPU:0", lines)
    host = {"python": []}
    if with_annotations:
        s = host_shift_us
        host["python"] = [(f"{H.ANNOTATION_PREFIX}0", 90.0 + s, t_end0 - 90.0, {}),
                          (f"{H.ANNOTATION_PREFIX}1", t1 - 10.0 + s, t_end1 - t1 + 10.0, {})]
    b.plane("/host:CPU", host)
    return b.profile()


def _ev(name, start, dur, kind="kernel"):
    return H.DeviceEvent(name, start * 1e3, (start + dur) * 1e3, kind)


TABLE = {"row_params": ["K", "M"], "columns": [
    {"kind": "time", "label": "ours (us)", "impl": "ours"},
    {"kind": "time", "label": "base (us)", "impl": "base"},
    {"kind": "time", "label": "gone (us)", "impl": "never_ran"},
    {"kind": "ratio", "label": "ours vs base", "impl": "ours", "baseline": "base"},
    {"kind": "metric", "label": "GB/s", "impl": "ours", "metric": "gbps", "fmt": "{:.0f}"},
]}


def _case(impl, k, m, dev_us, wall_us=50.0, **kw):
    c = {"benchmark": "t", "impl": impl, "role": kw.pop("role", "ours" if impl == "ours" else "baseline"),
         "params": {"K": k, "M": m}, "device_time_us": None if dev_us is None else {"median": dev_us, "min": dev_us,
                                                                                    "max": dev_us, "mean": dev_us, "n": 3},
         "wall_time_us": {"median": wall_us, "min": wall_us, "max": wall_us, "mean": wall_us, "n": 3},
         "kernels_per_call": 1, "metrics": {}, "ratios": {}, "rotation": {"used": False, "copies": 1}}
    c.update(kw)
    return c


def fake_result(benchmark="t", cases=None, kind="NVIDIA H100 80GB HBM3", table=TABLE):
    return {
        "schema_version": H.SCHEMA_VERSION, "benchmark": benchmark, "run_id": "r1",
        "device": {"kind": kind, "platform": "gpu", "slug": H.device_slug(kind), "count": 1},
        "software": {"jax": "0.11.2", "jaxlib": "0.11.2", "python": "3.12.1"},
        "date_utc": "2026-11-25T00:00:00Z", "git": {"commit": "0123456789abcdef", "dirty": False},
        "command": "python -m benchmarks.bench_t", "cases": cases if cases is not None else [],
        "targets": [H.target("fast", True, "yes", "ours")], "table": copy.deepcopy(table), "notes": [], "errors": [],
    }


def _gcase(impl, k, n, m, t, role=None, check=None):
    c = _case(impl, k, n, t, role=role or ("ours" if impl == "marlin" else "baseline"))
    c["params"] = {"K": k, "N": n, "M": m, "dtype": "bfloat16"}
    c["flops"] = 2.0 * m * n * k
    c["bytes_moved"] = bench_gemm.weight_bytes(impl, k, n) + 2 * m * (k + n)
    c["extra"] = {"weight_bytes": bench_gemm.weight_bytes(impl, k, n)}
    c["check"] = check
    return c
