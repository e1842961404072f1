"""Results JSON: run metadata, case records, ratios and targets, schema, write/load/merge."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform as _platform
import re
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Sequence

from benchmarks.common import REPO_ROOT, SCHEMA_VERSION, HarnessError, SchemaError, summarize

if TYPE_CHECKING:  # annotations only (runner imports this module)
    from benchmarks.runner import Case, Settings


def device_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def git_info(repo: str = REPO_ROOT) -> dict:
    """{commit, dirty}: ``JAX_MXFP4_GIT_COMMIT`` when set (a copied tree, e.g. on the device
    machine, may carry a stale .git), else the repository's HEAD."""
    if os.environ.get("JAX_MXFP4_GIT_COMMIT"):
        return {"commit": os.environ["JAX_MXFP4_GIT_COMMIT"], "dirty": None, "source": "JAX_MXFP4_GIT_COMMIT"}

    def run(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=30)

    try:
        head = run("rev-parse", "HEAD")
        if head.returncode == 0:
            status = run("status", "--porcelain", "--untracked-files=no")
            return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "dirty": None}


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
        "collective_time_us": dev.get("collective_time_us"),
        "device_time_method": dev.get("method"),
        "device_time_error": dev.get("error"),
        "wall_time_us": summarize(t * 1e6 for t in case.wall_s),
        "compile_s": case.compile_s,
        "kernels_per_call": dev.get("kernels_per_call"),
        "kernels": dev.get("kernels", []),
        "attached_time_us": dev.get("attached_us"),  # the memsets/memcpys inside device_time_us
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
