"""Benchmark harness: timing, device-trace parsing, results JSON, tables, plots.

How a case is timed (``run_cases``), all in one process:

1. compile (first call, timed as ``compile_s``), then ``warmup`` calls;
2. wall time: N calls, each ``jax.block_until_ready``-ed, median (N adapts to
   the call's cost); this includes the ~50 us host dispatch of a jitted call;
3. device time: every case of a group runs inside ONE ``jax.profiler`` trace
   session. Each case is wrapped in a ``TraceAnnotation`` and separated from
   the next by an idle gap; its calls are 1 untimed + ``trace_iters`` timed
   calls, each blocked. The device plane's kernel events (lines
   ``Stream #...`` of plane ``/device:GPU:<n>``; memcpy/memset excluded and
   reported apart) are assigned to cases by the annotation windows, checked
   against the idle gaps (``assign_group_events`` says which wins when they
   disagree), split per call, and summed: ``device_time_us`` is the
   median over calls of the summed durations of one call's kernels and of the
   memsets/memcpys nearest to it (``ATTACHED_KINDS``). On CPU the
   "device" events are XLA's op events (stat ``hlo_op``) on ``/host:CPU``.

Inputs whose working set fits in L2 are rotated among several copies
(``rotation_copies``) so that device time measures HBM, not L2.

``ncu_command`` / ``parse_ncu_csv`` give the Nsight Compute cross-check
(``benchmarks/ncu_check.py`` drives it).

Results: one JSON per (benchmark, device) in ``benchmarks/results`` (schema in
``validate_result``), a PNG per benchmark, and markdown tables
(``render_table``) that ``benchmarks/report.py`` puts in the README.

This module is the facade the benchmark scripts import (``from benchmarks
import harness as H``); the code lives in, by concept:

- ``common``: paths, errors, ``log``/``loud``, ``summarize``, formatting;
- ``trace_timing``: profiler-trace parsing, case assignment, per-call device time;
- ``ncu``: Nsight Compute command line, CSV parsing, cuProfilerStart/Stop;
- ``runner``: ``Settings``, ``Case``, ``run_cases``, rotation, copy bandwidth;
- ``results_io``: run metadata, case records, ratios/targets, schema, JSON IO, merging;
- ``render``: markdown tables, target lists, plots;
- ``cli``: common arguments, platform setup, output, ``finish`` and the
  shared main-loop steps of the bench scripts.
"""

# Re-exports: every public name of the harness modules.
from benchmarks.cli import (  # noqa: F401
    add_common_args, add_copy_mib_arg, any_case_failed, bench_name, budgeted_groups, checkpoint, conclude, finish,
    init_platform, interruptible, measure_ceiling, output_dirs, parse_int_list, parse_shapes, pick_sizes,
    record_cases, selected, start,
)
from benchmarks.common import (  # noqa: F401
    ANNOTATION_PREFIX, COMPILE_CACHE_DIR, MIB, REPO_ROOT, RESULTS_DIR, SCHEMA_VERSION, HarnessError, SchemaError,
    fmt_ratio, fmt_time_us, log, loud, summarize,
)
from benchmarks.ncu import NCU_METRIC, NcuKernel, cuda_profiler_range, ncu_command, ncu_per_call, parse_ncu_csv  # noqa: F401
from benchmarks.render import (  # noqa: F401
    describe_run, metric_col, plot_result, print_summary, ratio_col, render_table, render_targets, time_col,
)
from benchmarks.results_io import (  # noqa: F401
    add_ratio, case_record, case_time_us, device_slug, find_case, git_info, load_result, merge_results, new_result,
    result_filename, run_metadata, sanitize, target, validate_result, write_json,
)
from benchmarks.runner import (  # noqa: F401
    DEFAULT_CPU_L2_BYTES, DEFAULT_GPU_L2_BYTES, L2_BYTES_BY_KIND, Case, Settings, l2_bytes_for,
    measure_copy_bandwidth, rotation_copies, rotation_info, run_cases,
)
from benchmarks.trace_timing import (  # noqa: F401
    DeviceEvent, assign_group_events, describe_planes, device_timing, extract_annotations, extract_device_events,
    split_at_largest_gaps, split_calls, timing_kinds,
)
