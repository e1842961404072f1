"""Markdown tables, target lists, run descriptions and plots of a results dict."""

from __future__ import annotations

import math
import os
from typing import Sequence

from benchmarks.common import fmt_ratio, fmt_time_us, log, loud
from benchmarks.results_io import _row_key, case_time_us, sanitize  # noqa: F401


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
# Table descriptor columns (see ``render_table``).

def time_col(label: str, impl: str, field: str | None = None) -> dict:
    """An impl's median time (``field`` 'device', the default, or 'wall')."""
    col = {"kind": "time", "label": label, "impl": impl}
    if field is not None:
        col["field"] = field
    return col


def ratio_col(label: str, impl: str, baseline: str, field: str | None = None) -> dict:
    """time(baseline) / time(impl): > 1 means impl is faster."""
    col = {"kind": "ratio", "label": label, "impl": impl, "baseline": baseline}
    if field is not None:
        col["field"] = field
    return col


def metric_col(label: str, impl: str, metric: str, fmt: str) -> dict:
    """An impl's ``metrics[metric]``, formatted with ``fmt``."""
    return {"kind": "metric", "label": label, "impl": impl, "metric": metric, "fmt": fmt}
