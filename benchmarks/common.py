"""Shared basics of the benchmark harness: paths, errors, logging, statistics, formatting."""

from __future__ import annotations

import math
import os
import statistics
from typing import Iterable

SCHEMA_VERSION = 1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
COMPILE_CACHE_DIR = os.path.join(REPO_ROOT, "benchmarks", ".cache", "jax")
ANNOTATION_PREFIX = "mxfp4bench#"
MIB = 1 << 20


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
