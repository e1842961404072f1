"""W4A16 GEMM (issue 6): ours vs bf16 cuBLAS, XLA-native MXFP4 and XLA int4 per-channel.

Implementations, all jitted, timed in one run (one device trace per (K, N)):

* ``bf16``: ``jnp.dot(x, w)`` with ``w bf16[K, N]`` (cuBLAS / XLA's GEMM);
* ``xla_mxfp4``: ``prepare_weights(kernel='xla')`` + ``mxfp4_linear``: jnp
  dequantize + dot in one jit (what XLA alone gives for MXFP4);
* ``int4_pc``: ``jnp.dot(x, w_int4.astype(bf16)) * scale`` with int4 weights
  ``[K, N]`` and a bf16 scale per output channel: the strongest XLA peer
  (XLA fuses the convert into a Triton GEMM; the optimized HLO is checked);
* ours: every registered custom kernel (``marlin``, ``cutlass_sm100``, ...;
  ``--kernels`` to choose); one that is not registered, not supported on
  this device or cannot run the layer is skipped WITH the reason printed.

Reported per case: median device time, wall time, kernels per call, TFLOP/s,
% of the same run's copy bandwidth on the weight bytes, and ratios (speedups)
of ours vs each baseline. Correctness: at one M per shape every
implementation is compared with a float32 reference on fresh random data
(relative error ||out - ref|| / ||ref||).

    python -m benchmarks.bench_gemm [--quick] [--shapes 8192x8192,...] [--ms 1,16] [--out DIR]
    python -m benchmarks.bench_gemm --cpu-smoke --out /tmp/g
"""

from __future__ import annotations

import functools

import math
import re
import sys
import time
from typing import Sequence

from benchmarks import harness as H

BENCH = "gemm"
# (K, N); the order is the order they run in (most informative first, for --budget-s).
FULL_SHAPES = [(8192, 8192), (8192, 28672), (4096, 4096), (4096, 14336), (14336, 4096), (2880, 5760)]
FULL_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192]
QUICK_SHAPES = [(8192, 8192), (4096, 14336)]
QUICK_MS = [1, 16, 128, 1024]
SMOKE_SHAPES = [(256, 512), (512, 256)]
SMOKE_MS = [1, 16, 64]
BASELINES = ("bf16", "xla_mxfp4", "int4_pc")
DEFAULT_OURS = ("marlin", "cutlass_sm100")
MATCH = ("K", "N", "M")
LARGE_WEIGHTS = 50_000_000  # N*K at or above which "large shape" BW targets apply
# Speed targets against bf16 (issue 6): judged by ``targets``, explained by ``target_requirements``.
SMALL_M_VS_BF16 = 3.3   # M <= 16
M128_VS_BF16 = 2.0      # M = 128
LARGE_M_VS_BF16 = 0.95  # M >= 1024
REL_ERR_LIMIT = 1e-2


def mxfp4_weight_bytes(k: int, n: int) -> int:
    return n * k // 2 + n * k // 32


def weight_bytes(impl: str, k: int, n: int) -> int:
    if impl == "bf16":
        return 2 * n * k
    if impl == "int4_pc":
        return n * k // 2 + 2 * n
    return mxfp4_weight_bytes(k, n)


# ---------------------------------------------------------------------------
# HLO analysis of the int4 peer.

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


def hlo_computations(text: str) -> list[tuple[str, bool, str]]:
    """[(name, is_entry, body)] of an HLO module's text."""
    comps, cur, lines = [], None, []
    for line in text.splitlines():
        m = _COMP_HEADER.match(line.strip()) if not line.startswith(" ") else None
        if m and cur is None:
            cur = (m.group(2), bool(m.group(1)))
            lines = []
        elif cur is not None and line.strip() == "}":
            comps.append((cur[0], cur[1], "\n".join(lines)))
            cur = None
        elif cur is not None:
            lines.append(line)
    return comps


_CALLS = re.compile(r"calls=\{?\s*%?([\w.\-]+)")


def analyze_int4_hlo(text: str) -> dict:
    """Did XLA fuse the int4 -> bf16 convert into the GEMM kernel?

    Every fusion instruction of the ENTRY computation is one kernel; its
    contents are the called computation and everything that calls in turn
    (XLA's nested Triton GEMM fusions keep the operand converts in nested
    computations). A GEMM kernel has a ``dot(`` in its contents (or is a
    cuBLAS custom call). Fused: a GEMM kernel reads ``s4`` itself.
    Separate: some non-GEMM kernel reads ``s4`` (it writes bf16 weights to
    memory for the GEMM to read back).
    """
    comps = hlo_computations(text)
    bodies = {name: body for name, _, body in comps}
    entry = next((body for _, is_entry, body in comps if is_entry), "")

    def contents(root: str) -> set[str]:
        seen, todo = set(), [root]
        while todo:
            c = todo.pop()
            if c in seen or c not in bodies:
                continue
            seen.add(c)
            todo += _CALLS.findall(bodies[c])
        return seen

    gemm_kernels, other_kernels = [], []
    for line in entry.splitlines():
        m = _CALLS.search(line)
        if " fusion(" not in line or not m:
            continue
        inside = contents(m.group(1))
        text_inside = "\n".join(bodies[c] for c in inside)
        reads_s4 = "s4[" in text_inside
        if re.search(r"\bdot\(", text_inside) or "gemm" in line:
            gemm_kernels.append((m.group(1), reads_s4))
        else:
            other_kernels.append((m.group(1), reads_s4))
    fused = [n for n, r in gemm_kernels if r]
    separate = [n for n, r in other_kernels if r]
    if "__cublas" in text:
        backend = "cublas"
    elif "triton" in text:
        backend = "triton"
    else:
        backend = "other"
    return {"convert_fused_into_gemm": bool(fused) and not separate, "fused_computations": fused[:4],
            "separate_convert_computations": separate[:4], "gemm_backend": backend}


# ---------------------------------------------------------------------------
# Data and cases.

def rel_err(out, ref) -> float:
    import numpy as np

    o = np.asarray(out, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(o)):
        return float("nan")
    return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))


def make_rel_err_check(ref_fn, label: str):
    def check(out):
        err = rel_err(out, ref_fn())
        ok = math.isfinite(err) and err < REL_ERR_LIMIT
        H.log(f"  check {label}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")
        if not ok:
            H.loud(f"GEMM CORRECTNESS FAIL: {label} rel err {err:.3e} (limit {REL_ERR_LIMIT})")
        return {"rel_err": err, "ok": ok}

    return check


def random_mxfp4(key, k: int, n: int):
    import jax
    import jax.numpy as jnp

    kp, ks = jax.random.split(key)
    packed = jax.random.bits(kp, (n, k // 2), jnp.uint8)
    # Scales 2^-9 .. 2^-3: dequantized weights ~ +-0.002 .. +-0.75.
    scales = jax.random.randint(ks, (n, k // 32), 118, 125, jnp.int32).astype(jnp.uint8)
    return packed, scales


def ours_kernels(args, platform: str) -> list[str]:
    from jax_mxfp4.kernels import REGISTRY

    if args.kernels:
        return [k.strip() for k in args.kernels.split(",") if k.strip()]
    names = [k.name for k in REGISTRY if k.name != "xla" and (k.name != "cpu" or platform == "cpu")]
    return list(dict.fromkeys(list(DEFAULT_OURS) + names))


def resolve_ours(name: str, k: int, n: int, device) -> tuple[str | None, str]:
    """(activation_format, "") if kernel ``name`` can run a KxN layer here, else (None, reason)."""
    import jax.numpy as jnp

    from jax_mxfp4.kernels import REGISTRY, LinearConfig, get_kernel

    if name not in [kk.name for kk in REGISTRY]:
        return None, f"not registered (registered: {[kk.name for kk in REGISTRY]})"
    kern = get_kernel(name)
    ok, reason = kern.is_supported(device)
    if not ok:
        return None, f"not supported on {device.device_kind}: {reason}"
    reasons = []
    for fmt in (None, "mxfp4"):
        cfg = LinearConfig(in_features=k, out_features=n, activation_dtype=jnp.bfloat16, activation_format=fmt)
        ok, reason = kern.can_implement(cfg)
        if ok:
            return fmt, ""
        reasons.append(f"{fmt or 'W4A16'}: {reason}")
    return None, "cannot implement K=%d N=%d: %s" % (k, n, "; ".join(reasons))


def build_shape_cases(k: int, n: int, ms, s: H.Settings, args, seed: int, skipped: list[str]):
    import jax
    import jax.numpy as jnp

    import jax_mxfp4
    from jax_mxfp4 import reference
    from jax_mxfp4.kernels import LinearConfig, get_kernel
    from jax_mxfp4.kernels import marlin as marlin_kernel

    device = jax.devices()[0]
    key = jax.random.PRNGKey(seed)
    check_m = args.check_m if args.check_m in ms else (16 if 16 in ms else ms[0])

    def n_copies(impl):
        return H.rotation_copies(weight_bytes(impl, k, n), s.l2_bytes)

    def per_m_copies(impl, m):
        return H.rotation_copies(weight_bytes(impl, k, n) + 2 * m * k + 2 * m * n, s.l2_bytes)

    xs_by_m = {}
    for m in ms:
        c = max(per_m_copies(impl, m) for impl in BASELINES)
        xs_by_m[m] = [jax.random.normal(jax.random.fold_in(key, 100000 + 97 * m + i), (m, k), jnp.bfloat16)
                      for i in range(c)]

    # Canonical MXFP4 weights (copies for rotation), shared by xla_mxfp4 and ours.
    nw = n_copies("xla_mxfp4")
    canon = [random_mxfp4(jax.random.fold_in(key, 1 + i), k, n) for i in range(nw)]

    impls: list[tuple[str, str, list, object, callable]] = []  # (impl, role, weights list, fn, ref builder)

    if H.selected("bf16", args):
        w = [(jax.random.normal(jax.random.fold_in(key, 200 + i), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
             for i in range(n_copies("bf16"))]
        fn = jax.jit(lambda x, w: jnp.dot(x, w))
        impls.append(("bf16", "baseline", [(wi,) for wi in w], fn,
                      lambda x, w=w[0]: jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                                                precision=jax.lax.Precision.HIGHEST)))
    if H.selected("xla_mxfp4", args):
        prepared = [jax_mxfp4.prepare_weights(p, sc, kernel="xla") for p, sc in canon]
        fn = jax.jit(lambda x, w: jax_mxfp4.mxfp4_linear(x, w))
        impls.append(("xla_mxfp4", "baseline", [(pw,) for pw in prepared], fn,
                      lambda x: reference.matmul_reference(x, *canon[0], out_dtype=jnp.float32)))
    if H.selected("int4_pc", args):
        ws = []
        for i in range(n_copies("int4_pc")):
            kk = jax.random.fold_in(key, 300 + i)
            wi = jax.random.randint(kk, (k, n), -8, 8, jnp.int32).astype(jnp.int4)
            si = (jax.random.uniform(jax.random.fold_in(kk, 1), (n,), jnp.float32, 0.5, 1.5) * 0.01).astype(jnp.bfloat16)
            ws.append((wi, si))
        fn = jax.jit(lambda x, w, sc: jnp.dot(x, w.astype(jnp.bfloat16)) * sc)
        impls.append(("int4_pc", "peer", ws, fn,
                      lambda x, w=ws[0]: jnp.dot(x.astype(jnp.float32), w[0].astype(jnp.float32),
                                                 precision=jax.lax.Precision.HIGHEST) * w[1].astype(jnp.float32)))
    for name in ours_kernels(args, s.platform):
        if not H.selected(name, args) and not (args.impls and H.selected("ours", args)):
            continue
        fmt, reason = resolve_ours(name, k, n, device)
        if reason:
            msg = f"skip ours '{name}' for K={k} N={n}: {reason}"
            H.log("  " + msg)
            skipped.append(msg)
            continue
        try:
            prepared = [jax_mxfp4.prepare_weights(p, sc, kernel=name, activation_format=fmt) for p, sc in canon]
        except Exception as err:  # noqa: BLE001 - reported, the rest of the run goes on
            msg = f"ours '{name}' prepare_weights failed for K={k} N={n}: {type(err).__name__}: {err}"
            H.loud(msg)
            skipped.append(msg)
            continue
        fn = jax.jit(lambda x, w: jax_mxfp4.mxfp4_linear(x, w))
        impl = name if fmt is None else f"{name}_w4a4"
        impls.append((impl, "ours", [(pw,) for pw in prepared], fn,
                      lambda x, fmt=fmt: reference.matmul_reference(x, *canon[0], activation_format=fmt,
                                                                    out_dtype=jnp.float32)))
        if name == "marlin" and fmt is None:
            # The Marlin kernel's large-M path (dequantize the prepared weights, then
            # cuBLAS), timed beside it to measure the crossover (DENSE_CROSSOVER).
            dense = jax.jit(get_kernel("marlin").dense_matmul)
            impls.append(("marlin_dense", "variant", [(pw,) for pw in prepared], dense,
                          lambda x: reference.matmul_reference(x, *canon[0], out_dtype=jnp.float32)))
            # ... and the kernel itself where "marlin" dispatches to the dense path.
            kernel_only = jax.jit(get_kernel("marlin").kernel_matmul)
            impls.append(("marlin_kernel", "variant", [(pw,) for pw in prepared], kernel_only,
                          lambda x: reference.matmul_reference(x, *canon[0], out_dtype=jnp.float32)))
            # ... and, at small M, the kernel launched with the CTAs per SM it does not plan
            # for (TWO_CTAS_PER_SM: one or two; small8's 88 KB of shared memory fits twice).
            for variant, count in (("marlin_1cta", 1), ("marlin_2cta", 2)):
                forced = jax.jit(functools.partial(get_kernel("marlin").kernel_matmul, ctas_per_sm=count))
                impls.append((variant, "variant", [(pw,) for pw in prepared], forced,
                              lambda x: reference.matmul_reference(x, *canon[0], out_dtype=jnp.float32)))
            # ... and, on Hopper above M = 32, the mma.sync tile configurations that the
            # wgmma ones replaced (measured side by side: the choice of instruction path).
            mma_sync = jax.jit(functools.partial(get_kernel("marlin").kernel_matmul, wgmma=False))
            impls.append(("marlin_mmasync", "variant", [(pw,) for pw in prepared], mma_sync,
                          lambda x: reference.matmul_reference(x, *canon[0], out_dtype=jnp.float32)))
        kern = get_kernel(name)
        for m in ms:
            ok, why = kern.can_implement(LinearConfig(k, n, jnp.bfloat16, fmt, tokens=m))
            if not ok:
                skipped.append(f"skip ours '{name}' at M={m} K={k} N={n}: {why}")
                H.log("  " + skipped[-1])

    layer = LinearConfig(k, n, jnp.bfloat16)
    dense_from = marlin_kernel.dense_from_tokens(layer, device)
    cases = []
    for m in ms:
        for impl, role, wsets, fn, ref_fn in impls:
            if impl in ("marlin_1cta", "marlin_2cta"):
                planned = marlin_kernel.planned_ctas_per_sm(m, layer, device.device_kind)
                if m > 32 or impl == f"marlin_{planned}cta":
                    continue  # the small and medium tile configs only; not the launch "marlin" plans
            if impl == "marlin_mmasync" and (m <= 32 or not marlin_kernel._has_wgmma()):
                continue  # the same launch as "marlin" there
            if impl in ("marlin_dense", "marlin_kernel") and m < 64:
                continue  # the dense path is only a candidate at large M
            if impl == "marlin_kernel" and (dense_from is None or m < dense_from):
                continue  # below the crossover "marlin" is the kernel itself
            if role == "ours":
                kern = get_kernel(impl.removesuffix("_w4a4"))
                fmt = "mxfp4" if impl.endswith("_w4a4") else None
                if not kern.can_implement(LinearConfig(k, n, jnp.bfloat16, fmt, tokens=m))[0]:
                    continue
            xs = xs_by_m[m]
            copies = min(per_m_copies(impl, m), max(len(xs), len(wsets)))
            arg_sets = [(xs[i % len(xs)], *wsets[i % len(wsets)]) for i in range(max(copies, 1))]
            wb = weight_bytes(impl, k, n)
            moved = wb + 2 * m * k + 2 * m * n
            params = {"K": k, "N": n, "M": m, "dtype": "bfloat16"}
            check = None
            if m == check_m and not args.ncu_worker:
                x0 = xs[0]
                check = make_rel_err_check(lambda ref_fn=ref_fn, x0=x0: ref_fn(x0), f"{impl} K={k} N={n} M={m}")
            cases.append(H.Case(
                BENCH, impl, params, fn, arg_sets, role=role, bytes_moved=moved, flops=2.0 * m * n * k,
                rotation=H.rotation_info(moved, len(arg_sets), s.l2_bytes), check=check,
                hlo_hook=analyze_int4_hlo if impl == "int4_pc" else None,
                extra={"weight_bytes": wb}))
    return cases


# ---------------------------------------------------------------------------
# Metrics, ratios, targets (pure functions of the cases).

def ours_impls(res: dict) -> list[str]:
    return sorted({c["impl"] for c in res["cases"] if c.get("role") == "ours"})


# The results plot (render.plot_result arguments); report.py re-draws it after a merge.
PLOT = {"x": "M", "panels": ["K", "N"], "field": "device"}


def postprocess(res: dict) -> dict:
    cb = res.get("copy_bandwidth") or {}
    copy_gbps = cb.get("device_gbps") or cb.get("wall_gbps")
    for c in res["cases"]:
        c["ratios"] = {}
        c["metrics"] = {}
        if c.get("kernels_per_call") is not None:
            c["metrics"]["kernels"] = c["kernels_per_call"]
        t, _ = H.case_time_us(c)
        if not t:
            continue
        if c.get("flops"):
            c["metrics"]["tflops"] = c["flops"] / (t * 1e6)
        if c.get("bytes_moved"):
            c["metrics"]["gbps"] = c["bytes_moved"] / (t * 1e3)
        wb = (c.get("extra") or {}).get("weight_bytes")
        if wb:
            c["metrics"]["weight_gbps"] = wb / (t * 1e3)
            if copy_gbps:
                c["metrics"]["weight_bw_pct"] = 100.0 * wb / (t * 1e3) / copy_gbps
    for impl in ours_impls(res):
        for b in BASELINES:
            H.add_ratio(res, impl, b, MATCH)
    for b in ("xla_mxfp4", "int4_pc"):
        H.add_ratio(res, b, "bf16", MATCH)
    res["table"] = make_table(ours_impls(res))
    res["targets"] = targets(res)
    return res


def make_table(ours: Sequence[str]) -> dict:
    cols = [H.time_col(f"{b} (us)", b) for b in BASELINES]
    for o in ours:
        cols.append(H.time_col(f"{o} (us)", o))
    for o in ours:
        cols += [
            H.ratio_col(f"{o} vs bf16", o, "bf16"),
            H.ratio_col(f"{o} vs xla_mxfp4", o, "xla_mxfp4"),
            H.ratio_col(f"{o} vs int4_pc", o, "int4_pc"),
            H.metric_col(f"{o} weight BW %", o, "weight_bw_pct", "{:.0f}%"),
            H.metric_col(f"{o} TFLOP/s", o, "tflops", "{:.1f}"),
        ]
    if not ours:
        cols += [
            H.ratio_col("xla_mxfp4 vs bf16", "xla_mxfp4", "bf16"),
            H.ratio_col("int4_pc vs bf16", "int4_pc", "bf16"),
        ]
    return {"row_params": list(MATCH), "columns": cols,
            "note": "median device time per call (sum of kernel, memset and memcpy durations); ratios are speedups (>1: faster)"}


def _worst(cases, key):
    vals = [c for c in cases if key(c) is not None]
    return min(vals, key=key) if vals else None


def _loc(c) -> str:
    p = c["params"]
    return f"K={p.get('K')} N={p.get('N')} M={p.get('M')}"


def targets(res: dict) -> list[dict]:
    out = []
    ours = ours_impls(res)
    if not ours:
        return [H.target("W4A16 targets", None, "no custom GEMM kernel ran (see 'skipped'); only baselines timed")]
    for o in ours:
        cs = [c for c in res["cases"] if c["impl"] == o and not c.get("error")]
        basis = "device" if all(c.get("device_time_us") for c in cs) else "wall (device time missing)"

        def ratio(b):
            return lambda c: c["ratios"].get(f"vs_{b}")

        def spec(name, sel, key, limit):
            sub = [c for c in cs if sel(c)]
            w = _worst(sub, key)
            if w is None:
                out.append(H.target(name, None, "no such case with both times in this run", o, basis))
            else:
                v = key(w)
                out.append(H.target(name, v >= limit, f"worst {v:.2f} at {_loc(w)} over {len(sub)} cases", o, basis))

        small = lambda c: c["params"]["M"] <= 16  # noqa: E731
        spec(f"M <= 16: >= {SMALL_M_VS_BF16}x bf16", small, ratio("bf16"), SMALL_M_VS_BF16)
        spec("M <= 16, large shapes: >= 75% of HBM BW on weight bytes",
             lambda c: small(c) and c["params"]["K"] * c["params"]["N"] >= LARGE_WEIGHTS,
             lambda c: (c["metrics"].get("weight_bw_pct") or 0) / 100.0 if "weight_bw_pct" in c["metrics"] else None,
             0.75)
        spec("M <= 16: >= 1.7x int4 per-channel", small, ratio("int4_pc"), 1.7)
        spec(f"M = 128: >= {M128_VS_BF16:g}x bf16", lambda c: c["params"]["M"] == 128, ratio("bf16"), M128_VS_BF16)
        spec("any M: never slower than XLA-native MXFP4", lambda c: True, ratio("xla_mxfp4"), 1.0)
        spec(f"M >= 1024: >= {LARGE_M_VS_BF16}x bf16", lambda c: c["params"]["M"] >= 1024, ratio("bf16"),
             LARGE_M_VS_BF16)
        checked = [c for c in cs if c.get("check")]
        bad = [c for c in checked if not c["check"].get("ok")]
        out.append(H.target(f"rel err vs float32 reference < {REL_ERR_LIMIT}", (not bad) if checked else None,
                            f"{len(checked) - len(bad)}/{len(checked)} checked cases ok"
                            + (f"; worst {max(c['check']['rel_err'] or float('nan') for c in checked):.2e}" if checked else ""),
                            o, "correctness"))
    return out


def _times_by_shape(res: dict, impl: str) -> dict:
    """{(K, N, M): case} of ``impl``'s timed cases."""
    return {(c["params"]["K"], c["params"]["N"], c["params"]["M"]): c for c in res["cases"]
            if c["impl"] == impl and not c.get("error") and H.case_time_us(c)[0]}


def target_requirements(res: dict, ours: str = "marlin") -> list[dict]:
    """What each missed speed target would take, per shape, from this result's own rows.

    One row per (target, shape) that ``ours`` misses: the baseline's time, the time
    the target allows, ours, and what that time means in this run's own units:

    * M <= 16, 3.3x bf16 (shapes of >= LARGE_WEIGHTS weights; ours' best M there):
      the weight-byte bandwidth the allowed time implies, as % of the run's copy
      bandwidth (the bandwidth ceiling; ours' own % beside it);
    * M = 128, 2x bf16: the TFLOP/s the allowed time implies, as % of the fastest
      bf16 GEMM (cuBLAS) anywhere in this result;
    * M >= 1024, 0.95x bf16 (each such M that ours misses): for a dequantize-then-GEMM
      path, the time left for the dequantization (allowed - bf16) against the
      dequantization kernel ours ran and the least its bytes take at the copy
      bandwidth; for a fused kernel, the TFLOP/s it would need (beside
      ``<ours>_kernel``'s).
    """
    cb = res.get("copy_bandwidth") or {}
    copy_gbps = cb.get("device_gbps") or cb.get("wall_gbps")
    bf16, mine = _times_by_shape(res, "bf16"), _times_by_shape(res, ours)
    kernel_only = _times_by_shape(res, f"{ours}_kernel")  # the kernel where "ours" ran the dense path
    best_tflops = max((c["metrics"].get("tflops") or 0 for c in bf16.values()), default=0)
    rows = []

    def t(c):
        return H.case_time_us(c)[0]

    for (k, n) in sorted({key[:2] for key in mine}):
        small = [(m, t(bf16[(k, n, m)]) / t(mine[(k, n, m)])) for (kk, nn, m) in mine
                 if (kk, nn) == (k, n) and m <= 16 and (k, n, m) in bf16]
        if small and k * n >= LARGE_WEIGHTS:
            m, ratio = max(small, key=lambda x: x[1])
            if ratio < SMALL_M_VS_BF16:
                base, c = t(bf16[(k, n, m)]), mine[(k, n, m)]
                need = base / SMALL_M_VS_BF16
                wb = c["extra"]["weight_bytes"]
                pct = f"{100 * wb / (need * 1e3) / copy_gbps:.0f}% of copy BW" if copy_gbps else "-"
                own = f"{c['metrics'].get('weight_bw_pct', 0):.0f}%" if copy_gbps else "-"
                rows.append(dict(target=f"M <= 16: {SMALL_M_VS_BF16}x bf16", K=k, N=n, M=m, bf16=base, allowed=need, ours=t(c),
                                 needs=f"weights streamed at {wb / (need * 1e3):.0f} GB/s = {pct} (ours {own})"))
        key = (k, n, 128)
        if key in mine and key in bf16 and t(bf16[key]) / t(mine[key]) < M128_VS_BF16:
            base, c = t(bf16[key]), mine[key]
            need = base / M128_VS_BF16
            tflops = c["flops"] / (need * 1e6)
            rows.append(dict(target=f"M = 128: {M128_VS_BF16:g}x bf16", K=k, N=n, M=128, bf16=base, allowed=need, ours=t(c),
                             needs=f"{tflops:.0f} TFLOP/s = {100 * tflops / best_tflops:.0f}% of the fastest bf16 "
                                   f"GEMM here ({best_tflops:.0f}; ours {c['metrics'].get('tflops', 0):.0f})"))
        for m in sorted(m for (kk, nn, m) in mine if (kk, nn) == (k, n) and m >= 1024):
            key = (k, n, m)
            if key not in bf16 or t(bf16[key]) / t(mine[key]) >= LARGE_M_VS_BF16:
                continue
            base, c = t(bf16[key]), mine[key]
            need = base / LARGE_M_VS_BF16
            deq = [kr["median_us"] for kr in c.get("kernels", []) if "Dequantize" in kr["name"]]
            deq_txt = f"; ours takes {deq[0]:.1f} us for it" if deq else ""
            if copy_gbps:  # its bytes (read FP4, write 16-bit weights) at the run's copy bandwidth
                floor = (c["extra"]["weight_bytes"] + 2 * k * n) / (copy_gbps * 1e3)
                deq_txt += f", >= {floor:.1f} at copy bandwidth"
            tflops = c["flops"] / (need * 1e6)
            fused = kernel_only.get(key)
            fused_txt = f" (the `{ours}_kernel` row: {fused['metrics']['tflops']:.0f})" if fused else ""
            rows.append(dict(target=f"M >= 1024: {LARGE_M_VS_BF16}x bf16", K=k, N=n, M=m, bf16=base, allowed=need, ours=t(c),
                             needs=f"dequantization in <= {need - base:.1f} us{deq_txt}; or a fused kernel at "
                                   f"{tflops:.0f} TFLOP/s{fused_txt}"))
    return rows


def render_extra(res: dict) -> str:
    """Markdown for the README under the table: ``target_requirements`` of "marlin"."""
    rows = target_requirements(res)
    if not rows:
        return ""
    out = ["What each missed target would take, from this file's rows (time allowed = bf16 / the target "
           "ratio; `benchmarks.bench_gemm.target_requirements`):", "",
           "| target | K | N | M | bf16 (us) | allowed (us) | marlin (us) | the allowed time means |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['target']} | {r['K']} | {r['N']} | {r['M']} | {H.fmt_time_us(r['bf16'])} | "
                   f"{H.fmt_time_us(r['allowed'])} | {H.fmt_time_us(r['ours'])} | {r['needs']} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------

def add_args(ap) -> None:
    ap.add_argument("--shapes", default=None, help="comma-separated KxN, e.g. 8192x8192,8192x28672")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--kernels", default=None,
                    help=f"our kernels to time (default: {', '.join(DEFAULT_OURS)} + every registered non-xla kernel)")
    ap.add_argument("--check-m", type=int, default=16, help="M of the correctness spot check per shape")
    H.add_copy_mib_arg(ap)


def describe(c: H.Case, rec: dict) -> str:
    t, fb = H.case_time_us(rec)
    hlo = ""
    if c.hlo_info:
        hlo = f"  hlo: fused={c.hlo_info.get('convert_fused_into_gemm')} backend={c.hlo_info.get('gemm_backend')}"
    return (f"  {c.impl:14s} M={c.params['M']:5d}  device {H.fmt_time_us(t):>8s} us{' (wall)' if fb else ''}"
            f"  wall {H.fmt_time_us((rec['wall_time_us'] or {}).get('median')):>8s} us  kernels "
            f"{rec['kernels_per_call']}  compile {rec['compile_s'] or 0:.2f}s{hlo}")


def note_int4_fusion(result: dict) -> None:
    """Logs and records in how many int4_pc cases XLA fused the int4 -> bf16 convert into the GEMM."""
    int4 = [c for c in result["cases"] if c["impl"] == "int4_pc" and c.get("hlo")]
    if int4:
        unfused = [f"M={c['params']['M']} K={c['params']['K']} N={c['params']['N']}" for c in int4
                   if not c["hlo"].get("convert_fused_into_gemm")]
        note = (f"int4_pc: XLA fused the int4->bf16 convert into the GEMM in {len(int4) - len(unfused)}/{len(int4)} "
                f"cases" + (f"; NOT fused at {unfused[:8]}" if unfused else ""))
        H.log(note)
        result["notes"].append(note)


def main(argv=None) -> int:
    args, s, t_start = H.start(__doc__, add_args, argv)
    import jax

    shapes, ms = H.pick_sizes(args, smoke=(SMOKE_SHAPES, SMOKE_MS), quick=(QUICK_SHAPES, QUICK_MS),
                              full=(FULL_SHAPES, FULL_MS))
    shapes = H.parse_shapes(args.shapes) or shapes
    ms = H.parse_int_list(args.ms) or ms
    bench = H.bench_name(BENCH, args)
    result = H.new_result(bench, s, make_table([]))
    result["params"] = {"shapes": [list(x) for x in shapes], "M": ms}
    result["skipped"] = []
    H.log(f"kernels considered as ours: {ours_kernels(args, s.platform)}")
    H.measure_ceiling(result, s, args)

    def skipped_msg(rest, elapsed):
        return (f"budget {args.budget_s:.0f}s reached after {elapsed:.0f}s: skipped shapes "
                f"{['%dx%d' % sh for sh in rest]}; rerun them with --shapes ... --merge")

    with H.interruptible(result):
        for gi, (k, n) in H.budgeted_groups(shapes, args, result, t_start, skipped_msg=skipped_msg,
                                            postprocess=postprocess):
            t0 = time.time()
            H.log(f"\n--- K={k} N={n}: M in {ms}")
            cases = build_shape_cases(k, n, ms, s, args, seed=5000 + 31 * gi, skipped=result["skipped"])
            H.run_cases(cases, s, group_name=f"{bench}-{k}x{n}")
            H.record_cases(result, cases, describe)
            del cases
            jax.clear_caches()
            compile_total = sum(r["compile_s"] or 0 for r in result["cases"]
                                if r["params"].get("K") == k and r["params"].get("N") == n)
            H.log(f"--- K={k} N={n} took {time.time() - t0:.0f}s, {compile_total:.0f}s of it compiling "
                  f"(total {time.time() - t_start:.0f}s)")
    if not args.ncu_worker:
        note_int4_fusion(result)

    def list_skipped():
        if result["skipped"]:
            H.log("skipped:")
            for msg in dict.fromkeys(result["skipped"]):
                H.log(f"  - {msg}")

    return H.conclude(result, args, t_start, name="gemm", postprocess=postprocess,
                      plot=PLOT, after_finish=list_skipped)


if __name__ == "__main__":
    sys.exit(main())
