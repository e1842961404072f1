"""Command line plumbing shared by the benchmark scripts: arguments, platform, output, the main-loop steps."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Callable, Sequence

from benchmarks.common import COMPILE_CACHE_DIR, MIB, RESULTS_DIR, HarnessError, SchemaError, log, loud
from benchmarks.render import plot_result, print_summary
from benchmarks.results_io import case_record, load_result, merge_results, result_filename, sanitize, write_json
from benchmarks.runner import Case, Settings, l2_bytes_for, measure_copy_bandwidth


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


# ---------------------------------------------------------------------------
# The steps every bench script's main() goes through.

def start(description: str, add_args: Callable[[argparse.ArgumentParser], None], argv=None
          ) -> tuple[argparse.Namespace, Settings, float]:
    """Parses the common and the bench's own arguments (``add_args``), initializes the platform.

    Returns (args, settings, start time).
    """
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    add_args(ap)
    args = ap.parse_args(argv)
    s = init_platform(args)
    return args, s, time.time()


def add_copy_mib_arg(parser) -> None:
    parser.add_argument("--copy-mib", type=float, default=None, help="size of the bandwidth-ceiling copy (MiB read)")


def bench_name(base: str, args) -> str:
    """The benchmark name recorded in the results: ``base``, ``base-quick`` or ``base-cpu-smoke``."""
    return base + ("-quick" if args.quick else "") + ("-cpu-smoke" if args.cpu_smoke else "")


def pick_sizes(args, *, smoke, quick, full):
    """``smoke`` with --cpu-smoke, else ``quick`` with --quick, else ``full``."""
    if args.cpu_smoke:
        return smoke
    if args.quick:
        return quick
    return full


def measure_ceiling(result: dict, s: Settings, args) -> None:
    """``result['copy_bandwidth']``: the same run's copy ceiling (``--copy-mib``, default 16 MiB on
    CPU, 1 GiB otherwise); not measured in ``--ncu-worker`` mode."""
    if not args.ncu_worker:
        copy_mib = args.copy_mib or (16 if s.platform == "cpu" else 1024)
        result["copy_bandwidth"] = measure_copy_bandwidth(s, int(copy_mib * MIB))


def checkpoint(result: dict, args, postprocess: Callable[[dict], dict]) -> None:
    """Writes the partial results after a group (so a timeout loses nothing); not with ``--ncu-worker``."""
    if not args.ncu_worker:
        finish(result, args, postprocess=postprocess, final=False)


def budgeted_groups(items: Sequence, args, result: dict, t_start: float, *,
                    skipped_msg: Callable[[Sequence, float], str], postprocess: Callable[[dict], dict]):
    """Yields (index, item) of the shape groups in order, under ``--budget-s``.

    Before a group: if the elapsed time plus the previous group's time would
    pass the budget, records ``skipped_msg(remaining items, elapsed s)`` as an
    error (loudly) and stops. After a group: ``checkpoint``.
    """
    last_group_s = 0.0
    for i, item in enumerate(items):
        elapsed = time.time() - t_start
        if args.budget_s and elapsed + last_group_s > args.budget_s:
            msg = skipped_msg(items[i:], elapsed)
            loud(msg)
            result["errors"].append(msg)
            break
        t0 = time.time()
        yield i, item
        last_group_s = time.time() - t0
        checkpoint(result, args, postprocess)


def record_cases(result: dict, cases: Sequence[Case], describe: Callable[[Case, dict], str]) -> None:
    """Appends each run case's record (and its error) to ``result`` and logs ``describe(case, record)``."""
    for c in cases:
        rec = case_record(c)
        result["cases"].append(rec)
        if c.error:
            result["errors"].append(f"{c.label()}: {c.error[:500]}")
        log(describe(c, rec))


def any_case_failed(result: dict) -> bool:
    return any(c.get("error") for c in result["cases"])


def conclude(result: dict, args, t_start: float, *, name: str, postprocess: Callable[[dict], dict], plot: dict,
             failed: Callable[[dict], bool] = any_case_failed, after_finish: Callable[[], None] | None = None) -> int:
    """Final write (JSON, PNG, summary) and the exit code of a bench's main().

    ``--ncu-worker``: nothing is written; 1 if any error was recorded. Else
    130 if interrupted, 1 if ``failed(result)``, 0 otherwise.
    """
    if args.ncu_worker:
        return 1 if result["errors"] else 0
    result["elapsed_s"] = time.time() - t_start
    finish(result, args, postprocess=postprocess, plot=plot)
    if after_finish is not None:
        after_finish()
    log(f"\n{name} benchmark done in {time.time() - t_start:.0f}s")
    if result.get("interrupted"):
        return 130
    return 1 if failed(result) else 0
