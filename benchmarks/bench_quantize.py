"""Activation quantization (issue 5): ours vs the jnp reference vs a same-bytes copy.

Times, in one process and one device trace per K:

* ``ours``: ``jax_mxfp4.quantize_mxfp4`` (the CUDA custom call on GPU, the C++
  handler on CPU);
* ``jnp``: ``jax_mxfp4.reference.quantize_reference`` under ``jax.jit`` (what
  XLA alone gives);
* ``copy``: a jitted op that reads x and writes as many bytes as ours writes
  for the packed values (XOR of 4 words into 1): the bandwidth reference at
  this size;

plus, once, a large device-to-device copy whose (read + written) GB/s is the
ceiling that "% of copy bandwidth" refers to. Every ``ours`` output is
checked bit for bit against ``jnp`` on fresh random data.

    python -m benchmarks.bench_quantize [--quick] [--out DIR]
    python -m benchmarks.bench_quantize --cpu-smoke --out /tmp/q   # CPU, tiny
"""

from __future__ import annotations

import functools
import sys

from benchmarks import harness as H

BENCH = "quantize"
FULL_K = [2880, 4096, 8192, 14336]
FULL_M = [1, 16, 128, 1024, 4096, 16384]
QUICK_K = [8192]
QUICK_M = [1, 128, 4096]
SMOKE_K = [256, 512]
SMOKE_M = [1, 64]
LAYOUTS = ["linear", "swizzled_128x4"]
MATCH = ("K", "M", "layout", "rounding")
BIG_MK = 4096 * 8192

TABLE = {
    "row_params": list(MATCH),
    "columns": [
        *(H.time_col(label, impl) for impl, label in (("ours", "ours (us)"), ("jnp", "jnp (us)"),
                                                      ("copy", "same-bytes copy (us)"))),
        H.ratio_col("ours vs jnp", "ours", "jnp"),
        H.metric_col("ours GB/s", "ours", "gbps", "{:.0f}"),
        H.metric_col("ours % copy BW", "ours", "pct_copy_bw", "{:.0f}%"),
        *(H.metric_col(f"{impl} kernels", impl, "kernels", "{:.0f}") for impl in ("ours", "jnp")),
    ],
    "note": ("median device time per call (sum of kernel, memset and memcpy durations from the JAX profiler's device trace); "
             "'% copy BW' = (bytes read + written) / time over the same run's large-copy GB/s"),
}


def quantize_bytes(m: int, k: int, layout: str) -> dict:
    from jax_mxfp4.layout import scale_shape

    rows, cols = scale_shape(m, k, layout)
    return {"read": m * k * 2, "packed": m * k // 2, "scales": rows * cols}


def same_bytes_copy(x):
    """Reads bf16 x[M, K] once and writes M*K/2 bytes (what ours writes for the packed values)."""
    import jax.numpy as jnp
    from jax import lax

    m, k = x.shape
    u = lax.bitcast_convert_type(x.reshape(m, k // 2, 2), jnp.uint32).reshape(m, k // 8, 4)
    return u[..., 0] ^ u[..., 1] ^ u[..., 2] ^ u[..., 3]


def make_check(x, layout, rounding):
    """Bit-exact comparison of ours with the jnp reference on the same input."""
    import numpy as np

    from jax_mxfp4 import reference

    def check(out):
        ref_p, ref_s = reference.quantize_reference(x, scale_layout=layout, rounding=rounding)
        p, s = out
        ok_p = bool(np.array_equal(np.asarray(p), np.asarray(ref_p)))
        ok_s = bool(np.array_equal(np.asarray(s), np.asarray(ref_s)))
        if not (ok_p and ok_s):
            H.loud(f"quantize MISMATCH vs reference: M,K={x.shape} layout={layout} rounding={rounding} "
                   f"packed equal={ok_p} scales equal={ok_s}")
        return {"bit_exact_vs_jnp": ok_p and ok_s}

    return check


def build_cases(k: int, ms, layouts, roundings, s: H.Settings, args, seed: int):
    import jax
    import jax.numpy as jnp

    import jax_mxfp4
    from jax_mxfp4 import reference

    cases = []
    for m in ms:
        for layout in layouts:
            nb = quantize_bytes(m, k, layout)
            moved = nb["read"] + nb["packed"] + nb["scales"]
            copies = H.rotation_copies(moved, s.l2_bytes)
            rot = H.rotation_info(moved, copies, s.l2_bytes)
            key = jax.random.PRNGKey(seed + 7919 * m + k)
            xs = [(jax.random.normal(jax.random.fold_in(key, i), (m, k), jnp.float32) * 3).astype(jnp.bfloat16)
                  for i in range(copies)]
            arg_sets = [(x,) for x in xs]
            for rounding in roundings:
                params = {"K": k, "M": m, "layout": layout, "rounding": rounding, "dtype": "bfloat16"}
                if H.selected("ours", args):
                    fn = jax.jit(functools.partial(jax_mxfp4.quantize_mxfp4, scale_layout=layout, rounding=rounding))
                    cases.append(H.Case(BENCH, "ours", params, fn, arg_sets, role="ours", bytes_moved=moved,
                                        rotation=rot, check=None if args.ncu_worker else make_check(xs[0], layout, rounding)))
                if H.selected("jnp", args):
                    fn = jax.jit(functools.partial(reference.quantize_reference, scale_layout=layout, rounding=rounding))
                    cases.append(H.Case(BENCH, "jnp", params, fn, arg_sets, role="baseline", bytes_moved=moved,
                                        rotation=rot))
            if H.selected("copy", args):
                for rounding in roundings:  # one per rounding so rows match (usually one)
                    params = {"K": k, "M": m, "layout": layout, "rounding": rounding, "dtype": "bfloat16"}
                    cases.append(H.Case(BENCH, "copy", params, jax.jit(same_bytes_copy), arg_sets, role="ceiling",
                                        bytes_moved=nb["read"] + nb["packed"], rotation=rot,
                                        notes=["reads x, writes M*K/2 bytes (XOR of 4 words)"]))
    return cases


# The results plot (render.plot_result arguments); report.py re-draws it after a merge.
PLOT = {"x": "M", "panels": ["K", "layout"], "field": "device"}


def postprocess(res: dict) -> dict:
    """Metrics, ratios and targets from the cases (pure; runs again after a merge)."""
    cb = res.get("copy_bandwidth") or {}
    copy_gbps = cb.get("device_gbps") or cb.get("wall_gbps")
    for c in res["cases"]:
        c["ratios"] = {}
        t, _ = H.case_time_us(c)
        c["metrics"] = {k: v for k, v in c["metrics"].items() if k == "kernels"}
        if c.get("kernels_per_call") is not None:
            c["metrics"]["kernels"] = c["kernels_per_call"]
        if t and c.get("bytes_moved"):
            c["metrics"]["gbps"] = c["bytes_moved"] / (t * 1e3)
            if copy_gbps:
                c["metrics"]["pct_copy_bw"] = 100.0 * c["metrics"]["gbps"] / copy_gbps
    H.add_ratio(res, "ours", "jnp", MATCH)
    H.add_ratio(res, "ours", "copy", MATCH, name="vs_same_bytes_copy")
    H.add_ratio(res, "jnp", "ours", MATCH, name="vs_ours")
    res["targets"] = targets(res)
    return res


def targets(res: dict) -> list[dict]:
    ours = [c for c in res["cases"] if c["impl"] == "ours" and not c.get("error")]
    basis = "device" if all(c.get("device_time_us") for c in ours) else "wall (device time missing)"
    out = []
    big = [c for c in ours if c["params"]["M"] * c["params"]["K"] >= BIG_MK and "pct_copy_bw" in c["metrics"]]
    if big:
        worst = min(big, key=lambda c: c["metrics"]["pct_copy_bw"])
        out.append(H.target(">= 85% of copy bandwidth at M*K >= 4096*8192",
                            worst["metrics"]["pct_copy_bw"] >= 85.0,
                            f"worst {worst['metrics']['pct_copy_bw']:.0f}% at {_p(worst)} over {len(big)} cases",
                            "ours", basis))
    else:
        out.append(H.target(">= 85% of copy bandwidth at M*K >= 4096*8192", None, "no such case in this run"))
    small = [c for c in ours if c["params"]["M"] <= 128 and c["params"]["K"] == 8192]
    if small:
        def extra_ops(c):
            return (c.get("memsets_per_call") or 0) + (c.get("memcpys_per_call") or 0)

        bad = [c for c in small if c.get("kernels_per_call") != 1 or extra_ops(c) > 0
               or (H.case_time_us(c)[0] or 1e9) > 4.0]
        worst = max(small, key=lambda c: H.case_time_us(c)[0] or 1e9)
        ops = max(extra_ops(c) for c in small)
        out.append(H.target("one kernel of <= 4 us at M <= 128, K = 8192", not bad,
                            f"slowest {H.fmt_time_us(H.case_time_us(worst)[0])} us with "
                            f"{worst.get('kernels_per_call')} kernel(s) at {_p(worst)}"
                            + (f"; up to {ops:g} memset/memcpy per call" if ops else "")
                            + f"; {len(bad)}/{len(small)} miss", "ours", basis))
    else:
        out.append(H.target("one kernel of <= 4 us at M <= 128, K = 8192", None, "no such case in this run"))
    with_jnp = [c for c in ours if "vs_jnp" in c["ratios"]]
    if with_jnp:
        worst = min(with_jnp, key=lambda c: c["ratios"]["vs_jnp"])
        out.append(H.target("faster than jnp everywhere", worst["ratios"]["vs_jnp"] > 1.0,
                            f"lowest speedup {worst['ratios']['vs_jnp']:.2f}x at {_p(worst)}", "ours", basis))
        large = [c for c in with_jnp if c["params"]["M"] >= 1024]
        if large:
            w = min(large, key=lambda c: c["ratios"]["vs_jnp"])
            out.append(H.target(">= 3x jnp at M >= 1024", w["ratios"]["vs_jnp"] >= 3.0,
                                f"lowest {w['ratios']['vs_jnp']:.2f}x at {_p(w)}", "ours", basis))
    else:
        out.append(H.target("faster than jnp everywhere", None, "ours or jnp missing"))
    bad_bits = [c for c in ours if (c.get("check") or {}).get("bit_exact_vs_jnp") is False]
    checked = [c for c in ours if (c.get("check") or {}).get("bit_exact_vs_jnp") is not None]
    out.append(H.target("bit-exact vs the jnp reference (fresh random data)", (not bad_bits) if checked else None,
                        f"{len(checked) - len(bad_bits)}/{len(checked)} cases exact", "ours", "correctness"))
    return out


def _p(c: dict) -> str:
    p = c["params"]
    return f"M={p['M']} K={p['K']} {p['layout']}"


def add_args(ap) -> None:
    ap.add_argument("--ks", default=None, help="comma-separated K values")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--layouts", default=None, help="linear,swizzled_128x4")
    ap.add_argument("--roundings", default="floor", help="comma-separated rounding modes (floor, rceil, ...)")
    H.add_copy_mib_arg(ap)


def describe(c: H.Case, rec: dict) -> str:
    t, fb = H.case_time_us(rec)
    return (f"  {c.label():60s} device {H.fmt_time_us(t)} us{' (wall)' if fb else ''}  "
            f"wall {H.fmt_time_us((rec['wall_time_us'] or {}).get('median'))} us  "
            f"kernels {rec['kernels_per_call']}  compile {rec['compile_s'] or 0:.2f}s")


def main(argv=None) -> int:
    args, s, t_start = H.start(__doc__, add_args, argv)
    ks, ms = H.pick_sizes(args, smoke=(SMOKE_K, SMOKE_M), quick=(QUICK_K, QUICK_M), full=(FULL_K, FULL_M))
    ks = H.parse_int_list(args.ks) or ks
    ms = H.parse_int_list(args.ms) or ms
    layouts = args.layouts.split(",") if args.layouts else LAYOUTS
    roundings = [r.strip() for r in args.roundings.split(",") if r.strip()]
    bench = H.bench_name(BENCH, args)
    result = H.new_result(bench, s, TABLE)
    result["params"] = {"K": ks, "M": ms, "layouts": layouts, "roundings": roundings}
    H.measure_ceiling(result, s, args)

    with H.interruptible(result):
        for gi, k in H.budgeted_groups(
                ks, args, result, t_start, postprocess=postprocess,
                skipped_msg=lambda rest, elapsed: f"budget {args.budget_s:.0f}s: skipped K in {rest} "
                                                  f"(elapsed {elapsed:.0f}s)"):
            H.log(f"\n--- K={k}: M in {ms}, layouts {layouts}, rounding {roundings}")
            cases = build_cases(k, ms, layouts, roundings, s, args, seed=1000 + gi)
            H.run_cases(cases, s, group_name=f"{bench}-K{k}")
            H.record_cases(result, cases, describe)
            del cases
    return H.conclude(result, args, t_start, name="quantize", postprocess=postprocess,
                      plot=PLOT)


if __name__ == "__main__":
    sys.exit(main())
