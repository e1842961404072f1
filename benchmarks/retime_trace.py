"""Re-derives the device times of one trace group from a kept profiler trace.

    python -m benchmarks.retime_trace RESULTS_JSON TRACE.xplane.pb IMPL [--note TEXT]

A run keeps the trace of every group whose device time it could not split
(see ``runner._trace_group``). After fixing the parser, this recomputes the
``device_time_*``, kernel and memset fields of that group's cases — the cases
of ``IMPL`` in the results file, in run order — with the current
``trace_timing`` code and the run's own settings, re-runs the benchmark's
postprocessing (ratios, targets, table) and records a note. Wall times and
everything else measured stay as they were. The trace is data from the device
run; nothing is estimated.
"""

from __future__ import annotations

import argparse
import importlib

from benchmarks import harness as H
from benchmarks.trace_timing import assign_group_events, device_timing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("trace")
    ap.add_argument("impl", help="implementation whose cases formed the trace group, in run order")
    ap.add_argument("--note", default="", help="why the group was re-timed")
    args = ap.parse_args(argv)

    import jax.profiler

    result = H.load_result(args.results)
    settings = result["settings"]
    cases = [c for c in result["cases"] if c["impl"] == args.impl]
    if not cases:
        raise SystemExit(f"no cases of {args.impl!r} in {args.results}")
    keys = [f"{H.ANNOTATION_PREFIX}{i}" for i in range(len(cases))]
    n_calls = settings["trace_iters"] + 1
    pd = jax.profiler.ProfileData.from_file(args.trace)
    assigned, diag = assign_group_events(pd, keys, settings["platform"], settings["gap_s"] * 1e9, n_calls=n_calls,
                                       planes=settings.get("device_planes"))
    if assigned is None:
        raise SystemExit(f"cannot assign the trace's events: {diag.get('error')}")
    kinds = diag.get("timing_kinds") or ["kernel"]
    for key, rec in zip(keys, cases):
        dt = device_timing(assigned[key], n_calls, drop_first=1, kinds=kinds)
        if dt["error"]:
            raise SystemExit(f"{args.impl} {rec['params']}: {dt['error']}")
        rec["device_time_us"] = dt["time_us"]
        rec["device_span_us"] = dt["span_us"]
        rec["device_time_method"] = f"{diag['assignment']}/{dt['method']}"
        rec["device_time_error"] = None
        rec["kernels_per_call"] = dt["kernels_per_call"]
        rec["kernels"] = dt["kernels"]
        rec["attached_time_us"] = dt["attached_us"]
        for field in ("memcpy_us_per_call", "memset_us_per_call", "memsets_per_call", "memcpys_per_call"):
            rec[field] = dt[field]
        print(f"{args.impl} {rec['params']}: device {dt['time_us']['median']:.1f} us, "
              f"{dt['kernels_per_call']} kernels + {dt['memsets_per_call']:.0f} memsets per call")
    bench = importlib.import_module(f"benchmarks.bench_{result['benchmark'].split('-')[0]}")
    result = bench.postprocess(result)
    result["notes"].append(
        f"device times of the {args.impl!r} cases re-derived from the run's kept trace by "
        f"benchmarks/retime_trace.py ({diag['assignment']}): {args.note}".rstrip(": "))
    H.write_json(result, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
