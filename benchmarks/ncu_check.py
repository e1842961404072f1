"""Cross-checks the profiler's device times against Nsight Compute (ncu).

For a few cases, runs the benchmark in ``--ncu-worker`` mode under
``ncu --clock-control none --cache-control none --metrics
gpu__time_duration.sum --csv --profile-from-start off`` (only the timed calls,
inside cuProfilerStart/Stop, are profiled; one process per case), parses the
CSV, and compares the per-call kernel time with the device time in this run's
results JSON (``--out``, else benchmarks/results) for the same case.

    python -m benchmarks.ncu_check --out OUT_DIR [--only quantize|gemm] [--print-cmd]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

from benchmarks import harness as H

ITERS = 5

# (benchmark, impl, params for matching, bench CLI args)
CASES = [
    ("quantize", "ours", {"K": 8192, "M": 128, "layout": "linear"},
     ["--ks", "8192", "--ms", "128", "--layouts", "linear", "--impls", "ours"]),
    ("quantize", "jnp", {"K": 8192, "M": 128, "layout": "linear"},
     ["--ks", "8192", "--ms", "128", "--layouts", "linear", "--impls", "jnp"]),
    ("quantize", "ours", {"K": 8192, "M": 4096, "layout": "linear"},
     ["--ks", "8192", "--ms", "4096", "--layouts", "linear", "--impls", "ours"]),
    ("gemm", "bf16", {"K": 8192, "N": 8192, "M": 16}, ["--shapes", "8192x8192", "--ms", "16", "--impls", "bf16"]),
    ("gemm", "xla_mxfp4", {"K": 8192, "N": 8192, "M": 16},
     ["--shapes", "8192x8192", "--ms", "16", "--impls", "xla_mxfp4"]),
    ("gemm", "int4_pc", {"K": 8192, "N": 8192, "M": 16},
     ["--shapes", "8192x8192", "--ms", "16", "--impls", "int4_pc"]),
    ("gemm", "ours", {"K": 8192, "N": 8192, "M": 16}, ["--shapes", "8192x8192", "--ms", "16", "--impls", "ours"]),
]


def trace_time(results_dirs, bench: str, impl: str, params: dict) -> tuple[float | None, str | None]:
    """Device time (us) of the matching case in the newest results JSON of ``bench``."""
    for d in results_dirs:
        for path in sorted(glob.glob(os.path.join(d, f"{bench}*.json")), key=os.path.getmtime, reverse=True):
            if "cpu-smoke" in path:
                continue
            try:
                r = H.load_result(path)
            except H.SchemaError:
                continue
            for c in r["cases"]:
                if (c["impl"] == impl or (impl == "ours" and c.get("role") == "ours")) and all(
                        c["params"].get(k) == v for k, v in params.items()):
                    return (c.get("device_time_us") or {}).get("median"), c["impl"]
    return None, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="quantize or gemm")
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--timeout", type=int, default=240, help="per case (s)")
    ap.add_argument("--print-cmd", action="store_true", help="print the ncu command lines and exit")
    args = ap.parse_args(argv)
    if not args.print_cmd and shutil.which(args.ncu) is None:
        print(f"ncu_check: '{args.ncu}' is not on PATH", file=sys.stderr)
        return 2
    rows, out = [], []
    for bench, impl, params, cli in CASES:
        if args.only and bench != args.only:
            continue
        cmd = H.ncu_command(["-m", f"benchmarks.bench_{bench}", "--ncu-worker", "--trace-iters", str(ITERS),
                             "--warmup", "2", *cli], ncu=args.ncu)
        if args.print_cmd:
            print(" ".join(cmd))
            continue
        t0 = time.time()
        print(f"--- {bench} {impl} {params}: {' '.join(cmd)}", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=H.REPO_ROOT)
            text = proc.stdout + "\n" + proc.stderr
        except subprocess.TimeoutExpired as err:
            text, proc = f"timeout after {args.timeout}s: {err}", None
        rec = {"benchmark": bench, "impl": impl, "params": params, "command": cmd,
               "returncode": proc.returncode if proc else None, "elapsed_s": time.time() - t0}
        try:
            kernels = H.parse_ncu_csv(text)
            per = H.ncu_per_call(kernels, ITERS)
            rec.update(ncu_time_us=per["time_us"], ncu_kernels_per_call=per["kernels_per_call"],
                       ncu_kernels=per.get("kernels"), ncu_error=per["error"])
        except H.HarnessError as err:
            rec.update(ncu_time_us=None, ncu_error=str(err)[:3000])
            print(f"    ncu output did not parse: {err}\n    last output:\n{text[-3000:]}", flush=True)
        dirs = [d for d in (args.out, H.RESULTS_DIR) if d]
        rec["trace_time_us"], rec["trace_impl"] = trace_time(dirs, bench, impl, params)
        out.append(rec)
        nt = (rec.get("ncu_time_us") or {}).get("median")
        tt = rec["trace_time_us"]
        rows.append(f"{bench:9s} {rec['trace_impl'] or impl:12s} {json.dumps(params):42s} ncu "
                    f"{H.fmt_time_us(nt):>8s} us  trace {H.fmt_time_us(tt):>8s} us  "
                    f"ratio {H.fmt_ratio(nt / tt) if nt and tt else '-':>6s}  kernels/call "
                    f"{rec.get('ncu_kernels_per_call')}  {rec.get('ncu_error') or ''}")
        print("    " + rows[-1], flush=True)
    if args.print_cmd:
        return 0
    if args.out:
        path = os.path.join(args.out, "ncu_check.json")
        with open(path, "w") as f:
            json.dump(H.sanitize(out), f, indent=1, default=str)
        print(f"wrote {path}")
    print("\nncu (clocks/caches untouched) vs JAX profiler device time, per call:")
    print("\n".join(rows))
    return 0 if all(r.get("ncu_time_us") for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
