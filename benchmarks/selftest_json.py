"""Turns logs of the standalone Marlin self-test (csrc/marlin/marlin_selftest.cu) into one results JSON.

The self-test times the kernel alone (CUDA events around each launch, the split-K
counter memset or reduction pass included; no XLA), so it can force a row of the tile table
(``--config``) and compare configurations in the same process: the data behind a
row's ``max_m``. ``tools/device_session.sh selftest-small8`` writes such logs.

    python -m benchmarks.selftest_json --out benchmarks/results/selftest/FILE.json \\
        --commit SHA LOG [LOG ...]

Each log contributes its timing rows (dtype, N, K, M, time, GB/s, plan) under the
command line it records (the stage logs start with ``=== NAME: CMD``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

#: How the self-test times a case (the same for every log).
METHOD = ("CUDA events around each launch (median of --reps), the split-K counter memset or reduction pass "
          "included, no XLA; weights rotated over copies that exceed L2")

_ROW = re.compile(
    r"^(?P<dtype>bf16|f16)\s+(?P<n>\d+)\s+(?P<k>\d+)\s+(?P<m>\d+)\s+(?P<sms>\d+)\s+\|\s+(?P<res>PASS|FAIL)\s+"
    r"(?P<rel_err>\S+)\s+\S+\s+\|\s+(?P<us>[\d.]+)\s+(?P<gbps>[\d.]+)\s+[\d.]+%\s+\S+\s+(?P<cublas>\S+)\s+\|\s+"
    r"(?P<plan>.*)$"
)
_DEVICE = re.compile(r"^device: (?P<name>.+?) \(sm_(?P<sm>\d+), (?P<sms>\d+) SMs")
_COPY = re.compile(r"^device copy bandwidth \(read\+write\): (?P<gbps>\d+) GB/s")


def parse_log(path: str) -> dict:
    """{command, device, copy_gbps, rows}; raises ValueError on a log without timing rows."""
    command, device, copy_gbps, rows = None, None, None, []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("=== ") and ": " in line and command is None:
                command = line.split(": ", 1)[1]
            elif m := _DEVICE.match(line):
                device = {"name": m["name"], "sm": int(m["sm"]), "sm_count": int(m["sms"])}
            elif m := _COPY.match(line):
                copy_gbps = float(m["gbps"])
            elif m := _ROW.match(line):
                plan = m["plan"].strip()
                rows.append({
                    "dtype": m["dtype"], "N": int(m["n"]), "K": int(m["k"]), "M": int(m["m"]),
                    "sms": int(m["sms"]), "pass": m["res"] == "PASS", "rel_err": float(m["rel_err"]),
                    "time_us": float(m["us"]), "weight_gbps": float(m["gbps"]),
                    "config": plan.split()[0], "plan": plan,
                })
                if float(m["cublas"]) > 0:  # built with -DMARLIN_SELFTEST_CUBLAS: cuBLAS timed beside it
                    rows[-1]["cublas_us"] = float(m["cublas"])
    if not rows:
        raise ValueError(f"{path}: no timing rows (was the self-test run with timing?)")
    return {"log": os.path.basename(path), "command": command, "device": device, "copy_gbps": copy_gbps,
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", required=True, help="the commit the self-test was built from")
    ap.add_argument("--note", action="append", default=[], help="free-text note (repeatable)")
    args = ap.parse_args(argv)
    runs = [parse_log(p) for p in args.logs]
    devices = {json.dumps(r["device"], sort_keys=True) for r in runs}
    if len(devices) != 1:
        print(f"logs come from different devices: {sorted(devices)}", file=sys.stderr)
        return 1
    doc = {
        "benchmark": "marlin_selftest",
        "device": runs[0]["device"],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": {"commit": args.commit},
        "method": METHOD,
        "runs": runs,
        "notes": args.note,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {sum(len(r['rows']) for r in runs)} rows from {len(runs)} logs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
