"""Benchmarks for jax_mxfp4 (run as ``python -m benchmarks.bench_<name>`` from the repo root).

``harness`` is the shared library (timing, device-trace parsing, results
JSON, tables, plots); ``report`` regenerates the README performance section.
"""
