"""Tensor-parallel decode step (issue 10): the Llama-3-8B-shaped stack of bench_decode over 1 and N GPUs.

The decoder layer is bench_decode's; here it runs under ``jax.shard_map``
over a 1-D mesh ``("tp",)`` of the first ``tp`` devices, in the Megatron
layout: the fused QKV and gate/up projections are column-parallel (each
device holds its heads' q/k/v rows and its slice of gate and up), the O and
down projections row-parallel (each device holds the matching K slice), the
KV cache is split by KV head, and each layer ends its two row-parallel
projections with one ``psum`` (an all-reduce of ``[batch, hidden]`` bf16,
as vLLM does). No weight moves between devices.

MXFP4 weights are made once as canonical global arrays, cut into the shards
above (whole 32-element blocks along K), and each shard is prepared by the
kernel the registry picks for the local shape (Marlin on Ampere/Hopper):
``shard_prepared`` stacks the shards' prepared arrays along a leading
``tp`` axis and places shard i on device i. ``bf16`` is the same model with
bf16 weights and ``jnp.dot``.

Reported per (variant, tp, batch): step time (wall: median jitted step;
device: GPU 0's busy time per step, the sum of its kernel, memset and memcpy durations),
collective time (GPU 0's all-reduce kernels; it includes waiting for the
peer GPU) and its share of the device step, tokens/s and the speedup over
tp=1. Check: layer 0 at tp > 1 equals layer 0 at tp = 1 on the same weights and
inputs within ``TP_REL_TOL`` (a target); the whole step's relative error vs
tp = 1 is recorded beside it.

    python -m benchmarks.bench_decode_tp [--tp 1,2] [--layers 16] [--batches 1,16] [--variants mxfp4,bf16]
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.bench_decode_tp --cpu-smoke --out /tmp/d
"""

from __future__ import annotations

import dataclasses
import sys
import time

from benchmarks import bench_decode as D
from benchmarks import harness as H

BENCH = "decode_tp"
MATCH = ("batch", "layers", "cache_len")
#: Largest relative error (Frobenius) of one tp > 1 decoder layer's output vs the same
#: layer at tp = 1 that counts as equal. The layer's output is bf16 (rounding 2**-9 ~ 2e-3
#: relative) and tp > 1 differs only by rounding each row-parallel partial product to bf16
#: before the bf16 all-reduce and by the float32 summation order inside the split GEMMs.
#: The whole step's difference is recorded too, but not held to this bound: over 16 layers
#: of random weights the per-layer rounding differences compound.
TP_REL_TOL = 1e-2


def impl_name(variant: str, tp: int) -> str:
    return f"{variant}_tp{tp}"


def make_table(tps: list[int], variants: list[str]) -> dict:
    top = max(tps)
    cols = []
    for v in variants:
        cols += [H.time_col(f"{v} tp{t} step (us, wall)", impl_name(v, t), field="wall") for t in tps]
        if top > 1 and 1 in tps:
            cols.append(H.ratio_col(f"{v} tp{top} vs tp1 (wall)", impl_name(v, top), impl_name(v, 1), field="wall"))
            cols.append(H.time_col(f"{v} tp{top} step (us, device GPU 0)", impl_name(v, top)))
            cols.append(H.metric_col(f"{v} tp{top} all-reduce share of GPU 0", impl_name(v, top),
                                     "collective_share", "{:.0%}"))
    if "mxfp4" in variants and "bf16" in variants:
        cols.append(H.ratio_col(f"mxfp4 vs bf16 at tp{top} (wall)", impl_name("mxfp4", top),
                                impl_name("bf16", top), field="wall"))
    return {"row_params": list(MATCH), "columns": cols,
            "note": ("device time and all-reduce share are GPU 0's (the all-reduce kernels' time includes "
                     "waiting for the other GPU); tokens/s = batch / wall step time")}


# ---------------------------------------------------------------------------
# Sharding the weights (Megatron layout).

def local_config(cfg: D.Config, tp: int) -> D.Config:
    """The per-device model: heads, KV heads and the intermediate size split ``tp`` ways."""
    for name, v in (("heads", cfg.heads), ("kv_heads", cfg.kv_heads), ("intermediate", cfg.intermediate)):
        if v % tp:
            raise ValueError(f"--tp {tp} must divide {name}={v}")
    if (cfg.intermediate // tp) % 32 or (cfg.heads // tp * cfg.head_dim) % 32:
        raise ValueError(f"--tp {tp}: the row-parallel K slices must be whole 32-element MXFP4 blocks")
    return dataclasses.replace(cfg, heads=cfg.heads // tp, kv_heads=cfg.kv_heads // tp,
                               intermediate=cfg.intermediate // tp)


def column_segments(cfg: D.Config, name: str) -> list[int] | None:
    """Output-feature segments of a column-parallel weight (each split ``tp`` ways), None if row-parallel."""
    if name == "wqkv":
        return [cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    if name == "wgu":
        return [cfg.intermediate, cfg.intermediate]
    if name in ("wo", "wd"):
        return None
    raise ValueError(f"no tensor-parallel layout for {name!r}")


def shard_rows(a, segments: list[int] | None, tp: int, i: int, *, axis: int, block: int = 1):
    """Shard i of ``a`` along ``axis``: column-parallel (``segments``: slice i of every
    segment, concatenated) or, with ``segments`` None, the i-th contiguous chunk.
    ``block`` = elements of the logical axis per element of ``a`` (16 for packed
    K, 32 for scales K): lengths are logical and must split into whole units."""
    import jax.numpy as jnp

    size = a.shape[axis] * block
    segments = segments or [size]
    parts, start = [], 0
    for seg in segments:
        step = seg // tp
        lo, hi = start + i * step, start + (i + 1) * step
        if lo % block or hi % block:
            raise ValueError(f"shard {i} of {tp} [{lo}:{hi}) is not whole units of {block}")
        parts.append(jnp.take(a, jnp.arange(lo // block, hi // block), axis=axis))
        start += seg
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def shard_prepared(shards: list, mesh):
    """Per-device pytrees (same structure and static config) -> one pytree whose leaves
    have a leading ``tp`` axis, shard i on device i (``P("tp")``)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *shards)
    return jax.device_put(stacked, NamedSharding(mesh, P("tp")))


def make_tp_layers(cfg: D.Config, variant: str, key, mesh, kernel: str | None):
    """Per-layer params for ``tp = mesh.size`` devices, from the same global weights for every tp."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_mxfp4

    tp = mesh.size
    replicated = NamedSharding(mesh, P())
    layers = []
    for li in range(cfg.layers):
        lk = jax.random.fold_in(key, li)
        p = {n: jax.device_put(jnp.ones((cfg.hidden,), jnp.bfloat16), replicated) for n in ("ln1", "ln2")}
        for j, (name, (k, n)) in enumerate(D.linear_shapes(cfg, fused=True).items()):
            wk = jax.random.fold_in(lk, j)
            seg = column_segments(cfg, name)
            if variant == "bf16":
                w = jax.random.normal(wk, (k, n), jnp.bfloat16) * jnp.bfloat16(0.02)  # [K, N]
                shards = [shard_rows(w, seg, tp, i, axis=1 if seg else 0) for i in range(tp)]
            else:
                packed, scales = D.random_mxfp4(wk, k, n)  # [N, K/2], [N, K/32]
                shards = []
                for i in range(tp):
                    if seg:  # column-parallel: rows (N)
                        ps, ss = shard_rows(packed, seg, tp, i, axis=0), shard_rows(scales, seg, tp, i, axis=0)
                    else:  # row-parallel: K, in whole blocks
                        ps = shard_rows(packed, None, tp, i, axis=1, block=2)
                        ss = shard_rows(scales, None, tp, i, axis=1, block=32)
                    shards.append(jax_mxfp4.prepare_weights(ps, ss, kernel=kernel))
            p[name] = shard_prepared(shards, mesh)
        layers.append(p)
    return layers


def make_tp_caches(cfg: D.Config, batch: int, key, mesh):
    """bench_decode's caches ``[B, kv, C, hd]``, split by KV head."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    sh = NamedSharding(mesh, P(None, "tp"))
    return [tuple(jax.device_put(c, sh) for c in kv) for kv in D.make_caches(cfg, batch, key)]


def make_tp_step(cfg: D.Config, variant: str, mesh):
    """jit(shard_map(step)): x, norms and the output replicated; weights and caches split."""
    import jax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    tp = mesh.size
    local = local_config(cfg, tp)
    linear = D.make_linear(variant)
    reduce = lambda y: lax.psum(y, "tp")  # noqa: E731 - over one device a no-op, kept so tp=1 is the same program

    def step_local(x, layers, caches, final):
        for p, (kc, vc) in zip(layers, caches):
            p = {n: (jax.tree.map(lambda a: a[0], w) if n not in ("ln1", "ln2") else w) for n, w in p.items()}
            x = D.decoder_layer(x, p, kc, vc, local, linear, True, reduce)
        return D.rmsnorm(x, final["norm"], cfg.eps)

    def layer_specs(p):
        return {n: (P() if n in ("ln1", "ln2") else jax.tree.map(lambda _: P("tp"), w)) for n, w in p.items()}

    def build(layers):
        specs = (P(), [layer_specs(p) for p in layers], [(P(None, "tp"), P(None, "tp"))] * len(layers),
                 {"norm": P()})
        return jax.jit(jax.shard_map(step_local, mesh=mesh, in_specs=specs, out_specs=P()))

    return build


# ---------------------------------------------------------------------------

# The results plot (render.plot_result arguments); report.py re-draws it after a merge.
PLOT = {"x": "batch", "panels": ["layers", "cache_len"], "field": "wall", "ylabel": "step time, wall (us)"}


def postprocess(res: dict) -> dict:
    import re

    tps = sorted({int(re.search(r"_tp(\d+)$", c["impl"]).group(1)) for c in res["cases"]})
    variants = sorted({c["impl"].rsplit("_tp", 1)[0] for c in res["cases"]})
    for c in res["cases"]:
        c["ratios"], c["metrics"] = {}, {}
        if c.get("kernels_per_call") is not None:
            c["metrics"]["kernels"] = c["kernels_per_call"]
        tw, _ = H.case_time_us(c, "wall")
        td, fb = H.case_time_us(c, "device")
        if tw:
            c["metrics"]["tokens_per_s"] = c["params"]["batch"] / (tw * 1e-6)
        coll = (c.get("collective_time_us") or {}).get("median")
        if td and not fb and coll is not None:
            c["metrics"]["collective_us"] = coll
            c["metrics"]["collective_share"] = coll / td
    for v in variants:
        for t in tps:
            if t != 1:
                H.add_ratio(res, impl_name(v, t), impl_name(v, 1), MATCH, field="wall", name="vs_tp1_wall")
                H.add_ratio(res, impl_name(v, t), impl_name(v, 1), MATCH, field="device", name="vs_tp1_device")
    out = []
    for c in res["cases"]:
        chk = c.get("check") or {}
        rel = chk.get("layer0_rel_err_vs_tp1")
        if rel is not None and c["params"]["batch"] == min(x["params"]["batch"] for x in res["cases"]):
            out.append(H.target(f"{c['impl']}: decoder layer 0 output equals tp1's (rel err <= {TP_REL_TOL:g})",
                                rel <= TP_REL_TOL, f"rel err {rel:.2e} (whole step: "
                                f"{chk.get('step_rel_err_vs_tp1', float('nan')):.2e})", c["impl"], "wall"))
    res["targets"] = out
    return res


def add_args(ap) -> None:
    ap.add_argument("--tp", default=None, help="comma-separated tensor-parallel sizes (default 1,<all devices>)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 16; --quick 4)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--cache-len", type=int, default=None, help="KV cache length attended to (default 1024)")
    ap.add_argument("--kernel", default=None, help="force the MXFP4 kernel (default: registry selection)")
    ap.add_argument("--variants", default="mxfp4,bf16")


def main(argv=None) -> int:
    args, s, t_start = H.start(__doc__, add_args, argv)
    import jax
    import numpy as np
    from jax.sharding import Mesh

    cfg = D.SMOKE if args.cpu_smoke else D.Config()
    cfg = dataclasses.replace(cfg, layers=args.layers or H.pick_sizes(args, smoke=2, quick=4, full=16),
                              cache_len=args.cache_len or cfg.cache_len)
    n_dev = jax.device_count()
    tps = H.parse_int_list(args.tp) or sorted({1, n_dev})
    if max(tps) > n_dev:
        raise SystemExit(f"--tp {max(tps)} needs {max(tps)} devices; jax sees {n_dev}")
    batches = H.parse_int_list(args.batches) or ([1, 4] if args.cpu_smoke else [1, 16])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if s.platform == "gpu" and n_dev > 1:
        s.device_planes = ("/device:GPU:0",)  # one GPU's busy time, not the sum over GPUs
    if not args.cpu_smoke:
        s.trace_iters = args.trace_iters or 5
        s.wall_budget_s = 0.5
    bench = H.bench_name(BENCH, args)
    result = H.new_result(bench, s, make_table(tps, variants))
    result["params"] = {**dataclasses.asdict(cfg), "batches": batches, "tp": tps, "devices": n_dev,
                        "variants": variants, "fused": True}
    H.log(f"config: {cfg}; tp {tps} of {n_dev} devices; batches {batches}; variants {variants}")
    key = jax.random.PRNGKey(2026)
    final = {"norm": jax.numpy.ones((cfg.hidden,), jax.numpy.bfloat16)}
    xs = {b: jax.random.normal(jax.random.fold_in(key, 5000 + b), (b, cfg.hidden), jax.numpy.bfloat16)
          for b in batches}
    tp1_out: dict = {}  # (variant, what) -> tp=1 output

    def rel_vs_tp1(variant, tp, what, out) -> float | None:
        a = np.asarray(out, np.float64)
        if tp == 1:
            tp1_out[(variant, what)] = a
            return None
        ref = tp1_out.get((variant, what))
        return None if ref is None else float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))

    def check(variant, tp, b, layer0_rel):
        def f(out):
            r = D.finite_check(out)
            step_rel = rel_vs_tp1(variant, tp, f"step{b}", out)
            if step_rel is not None:
                r["step_rel_err_vs_tp1"] = step_rel
                r["layer0_rel_err_vs_tp1"] = layer0_rel
                H.log(f"  {impl_name(variant, tp)} batch {b}: rel err vs tp1: layer 0 {layer0_rel:.2e}, "
                      f"whole step {step_rel:.2e}")
            return r
        return f

    with H.interruptible(result):
        for variant in variants:
            for tp in tps:
                mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))
                t0 = time.time()
                try:
                    layers = make_tp_layers(cfg, variant, jax.random.fold_in(key, 7), mesh, args.kernel)
                except Exception as err:  # noqa: BLE001 - reported; the other configurations still run
                    msg = f"{impl_name(variant, tp)}: building weights failed: {type(err).__name__}: {err}"
                    H.loud(msg)
                    result["errors"].append(msg)
                    continue
                kernel = "jnp.dot" if variant == "bf16" else layers[0]["wqkv"].kernel
                H.log(f"\n--- {impl_name(variant, tp)}: {cfg.layers} layers built in {time.time() - t0:.1f}s; "
                      f"kernel {kernel}; mesh {dict(mesh.shape)}")
                step = make_tp_step(cfg, variant, mesh)(layers)
                # Layer 0 alone (batch of the first case) vs tp=1: the equality check.
                b0 = batches[0]
                caches0 = make_tp_caches(dataclasses.replace(cfg, layers=1), b0, jax.random.fold_in(key, 1000 + b0), mesh)
                layer0 = make_tp_step(dataclasses.replace(cfg, layers=1), variant, mesh)(layers[:1])
                layer0_rel = rel_vs_tp1(variant, tp, "layer0", layer0(xs[b0], layers[:1], caches0, final))
                if layer0_rel is not None and not layer0_rel <= TP_REL_TOL:
                    H.loud(f"TP CHECK FAIL: {impl_name(variant, tp)} layer 0 differs from tp1: rel err {layer0_rel}")
                del layer0, caches0
                cases = []
                for b in batches:
                    caches = make_tp_caches(cfg, b, jax.random.fold_in(key, 1000 + b), mesh)
                    params = {"batch": b, "layers": cfg.layers, "cache_len": cfg.cache_len}
                    wb = D.weight_bytes(cfg, variant) // tp
                    cases.append(H.Case(BENCH, impl_name(variant, tp), params, step,
                                        [(xs[b], layers, caches, final)],
                                        role="ours" if variant != "bf16" else "baseline", bytes_moved=wb,
                                        check=check(variant, tp, b, layer0_rel),
                                        extra={"weight_bytes_per_device": wb, "kernel": kernel, "tp": tp,
                                               "devices": [str(d) for d in mesh.devices.flat]}))
                H.run_cases(cases, s, group_name=f"{bench}-{impl_name(variant, tp)}")
                H.record_cases(result, cases, describe)
                del cases, layers, step
                jax.clear_caches()
                H.checkpoint(result, args, postprocess)
    return H.conclude(result, args, t_start, name="decode_tp", postprocess=postprocess,
                      plot=PLOT,
                      failed=lambda r: bool(r["errors"]) or any(t["status"] == "MISS" for t in r["targets"]))


def describe(c: H.Case, rec: dict) -> str:
    coll = (rec.get("collective_time_us") or {}).get("median")
    return (f"  {c.impl:9s} batch {c.params['batch']:3d}: wall {H.fmt_time_us((rec['wall_time_us'] or {}).get('median'))} us, "
            f"device (GPU 0) {H.fmt_time_us((rec['device_time_us'] or {}).get('median'))} us, all-reduce "
            f"{H.fmt_time_us(coll)} us, kernels/step {rec['kernels_per_call']}, compile {rec['compile_s'] or 0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
