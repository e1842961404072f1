"""Decode step of a Llama-3-8B-shaped decoder stack (issue 8): bf16 vs MXFP4 W4A16.

One jitted decode step: for each layer RMSNorm -> fused QKV projection ->
RoPE -> grouped-query attention of the new token over a fixed KV cache of
``--cache-len`` tokens (plus itself) -> O projection -> residual -> RMSNorm
-> fused gate/up projection -> SiLU * up -> down projection -> residual;
then a final RMSNorm (and, with ``--lm-head``, a bf16 LM head, unquantized in
both variants as MXFP4 checkpoints keep it). The layers are unrolled in the
jit by default (``--mode scan`` stacks them under ``lax.scan``; XLA's while
loop costs ~12 us per iteration on an H100). Weights are random; MXFP4
weights are prepared once with ``jax_mxfp4.prepare_weights`` (kernel chosen
by the registry, ``--kernel`` forces one).

Reported per batch: step time (wall, median over jitted calls) and device
time (sum of kernel, memset and memcpy durations), tokens/s (= batch / wall step time) and the
MXFP4 / bf16 ratio. Target: batch 1 >= 2.5x bf16 tokens/s.

    python -m benchmarks.bench_decode [--quick] [--layers 32] [--batches 1,16] [--out DIR]
    python -m benchmarks.bench_decode --cpu-smoke --out /tmp/d
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

from benchmarks import harness as H

BENCH = "decode"
MATCH = ("batch", "layers", "cache_len")
TABLE = {
    "row_params": list(MATCH),
    "columns": [
        *(H.time_col(f"{v} step (us, wall)", v, field="wall") for v in ("bf16", "mxfp4")),
        H.ratio_col("mxfp4 vs bf16 (wall)", "mxfp4", "bf16", field="wall"),
        *(H.time_col(f"{v} step (us, device)", v) for v in ("bf16", "mxfp4")),
        H.ratio_col("mxfp4 vs bf16 (device)", "mxfp4", "bf16"),
        *(H.metric_col(f"{v} tok/s", v, "tokens_per_s", "{:.0f}") for v in ("bf16", "mxfp4")),
        H.metric_col("mxfp4 kernels/step", "mxfp4", "kernels", "{:.0f}"),
    ],
    "note": "tokens/s = batch / median wall time of one jitted decode step",
}


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    layers: int = 32
    cache_len: int = 1024
    vocab: int = 128256
    eps: float = 1e-5
    rope_theta: float = 500000.0

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


SMOKE = Config(hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, layers=2, cache_len=16, vocab=1024)


def linear_shapes(cfg: Config, fused: bool) -> dict[str, tuple[int, int]]:
    """{name: (K, N)} of one layer's projections."""
    h, i = cfg.hidden, cfg.intermediate
    if fused:
        return {"wqkv": (h, cfg.qkv_out), "wo": (cfg.heads * cfg.head_dim, h), "wgu": (h, 2 * i), "wd": (i, h)}
    return {"wq": (h, cfg.heads * cfg.head_dim), "wk": (h, cfg.kv_heads * cfg.head_dim),
            "wv": (h, cfg.kv_heads * cfg.head_dim), "wo": (cfg.heads * cfg.head_dim, h),
            "wg": (h, i), "wu": (h, i), "wd": (i, h)}


def weight_bytes(cfg: Config, variant: str, fused: bool = True) -> int:
    per = sum(k * n for k, n in linear_shapes(cfg, fused).values())
    b = per * (2 if variant == "bf16" else (0.5 + 1 / 32))
    return int(b * cfg.layers)


# ---------------------------------------------------------------------------
# The model.

def rmsnorm(x, w, eps):
    import jax.numpy as jnp
    from jax import lax

    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x, position: int, theta: float):
    """Rotate-half RoPE of x[..., head_dim] at a fixed position."""
    import jax.numpy as jnp

    hd = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = position * inv
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q, k_new, v_new, k_cache, v_cache, cfg: Config):
    """q [B, heads*hd], k/v_new [B, kv*hd], caches [B, kv, C, hd] -> [B, heads*hd].

    The caches are stored in the layout both contractions read directly and
    the new token is merged into the softmax without concatenating, so no
    step copies or transposes a cache (a decode step reads each cache once).
    """
    import jax.numpy as jnp

    b = q.shape[0]
    g = cfg.heads // cfg.kv_heads
    q = rope(q.reshape(b, cfg.heads, cfg.head_dim), cfg.cache_len, cfg.rope_theta)
    k_new = rope(k_new.reshape(b, cfg.kv_heads, cfg.head_dim), cfg.cache_len, cfg.rope_theta)
    v_new = v_new.reshape(b, cfg.kv_heads, cfg.head_dim)
    qg = q.reshape(b, cfg.kv_heads, g, cfg.head_dim)
    scale = 1.0 / math.sqrt(cfg.head_dim)
    s_cache = jnp.einsum("bkgd,bkcd->bkgc", qg, k_cache, preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("bkgd,bkd->bkg", qg, k_new, preferred_element_type=jnp.float32)[..., None] * scale
    top = jnp.maximum(jnp.max(s_cache, axis=-1, keepdims=True), s_new)
    e_cache, e_new = jnp.exp(s_cache - top), jnp.exp(s_new - top)
    denom = jnp.sum(e_cache, axis=-1, keepdims=True) + e_new
    o = jnp.einsum("bkgc,bkcd->bkgd", e_cache.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    o = (o + e_new * v_new[:, :, None, :].astype(jnp.float32)) / denom
    return o.reshape(b, cfg.heads * cfg.head_dim).astype(q.dtype)


def make_linear(variant: str):
    import jax.numpy as jnp

    import jax_mxfp4

    if variant == "bf16":
        return lambda h, w: jnp.dot(h, w)
    return lambda h, w: jax_mxfp4.mxfp4_linear(h, w)


def decoder_layer(x, p, kc, vc, cfg: Config, linear, fused: bool, reduce=None):
    """One layer. ``reduce`` sums the O and down projections' partial products
    over tensor-parallel shards (``lax.psum``; see bench_decode_tp); None: unsharded."""
    import jax
    import jax.numpy as jnp

    reduce = reduce or (lambda y: y)

    qd, kvd = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    h = rmsnorm(x, p["ln1"], cfg.eps)
    if fused:
        qkv = linear(h, p["wqkv"])
        q, k, v = qkv[:, :qd], qkv[:, qd:qd + kvd], qkv[:, qd + kvd:]
    else:
        q, k, v = linear(h, p["wq"]), linear(h, p["wk"]), linear(h, p["wv"])
    x = x + reduce(linear(attention(q, k, v, kc, vc, cfg), p["wo"]))
    h = rmsnorm(x, p["ln2"], cfg.eps)
    if fused:
        gu = linear(h, p["wgu"])
        g, u = gu[:, :cfg.intermediate], gu[:, cfg.intermediate:]
    else:
        g, u = linear(h, p["wg"]), linear(h, p["wu"])
    a = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(x.dtype)
    return x + reduce(linear(a, p["wd"]))


def make_step(cfg: Config, variant: str, fused: bool, mode: str, lm_head: bool):
    import jax
    from jax import lax

    linear = make_linear(variant)

    def finish(x, final):
        x = rmsnorm(x, final["norm"], cfg.eps)
        if lm_head:
            return jax.numpy.dot(x, final["lm_head"])
        return x

    if mode == "unroll":
        def step(x, layers, caches, final):
            for p, (kc, vc) in zip(layers, caches):
                x = decoder_layer(x, p, kc, vc, cfg, linear, fused)
            return finish(x, final)
    elif mode == "scan":
        def step(x, layers, caches, final):
            def body(x, lp):
                p, (kc, vc) = lp
                return decoder_layer(x, p, kc, vc, cfg, linear, fused), None

            x, _ = lax.scan(body, x, (layers, caches))
            return finish(x, final)
    else:
        raise ValueError(f"--mode {mode!r}: use unroll or scan")
    return jax.jit(step)


# ---------------------------------------------------------------------------
# Weights.

def random_mxfp4(key, k: int, n: int):
    import jax
    import jax.numpy as jnp

    kp, ks = jax.random.split(key)
    packed = jax.random.bits(kp, (n, k // 2), jnp.uint8)
    # Scales 2^-12 .. 2^-9: dequantized weights of magnitude <= 6 * 2^-9 ~ 0.012.
    scales = jax.random.randint(ks, (n, k // 32), 115, 119, jnp.int32).astype(jnp.uint8)
    return packed, scales


def make_layers(cfg: Config, variant: str, fused: bool, key, kernel: str | None):
    """Per-layer param dicts; for mxfp4 also the canonical weights of layer 0 (for the check)."""
    import jax
    import jax.numpy as jnp

    import jax_mxfp4

    layers, canon0 = [], None
    for li in range(cfg.layers):
        lk = jax.random.fold_in(key, li)
        p = {"ln1": jnp.ones((cfg.hidden,), jnp.bfloat16), "ln2": jnp.ones((cfg.hidden,), jnp.bfloat16)}
        for j, (name, (k, n)) in enumerate(linear_shapes(cfg, fused).items()):
            wk = jax.random.fold_in(lk, j)
            if variant == "bf16":
                p[name] = jax.random.normal(wk, (k, n), jnp.bfloat16) * jnp.bfloat16(0.02)
            else:
                packed, scales = random_mxfp4(wk, k, n)
                p[name] = jax_mxfp4.prepare_weights(packed, scales, kernel=kernel)
                if li == 0:
                    canon0 = canon0 or {}
                    canon0[name] = (packed, scales)
        layers.append(p)
    return layers, canon0


def make_caches(cfg: Config, batch: int, key):
    import jax
    import jax.numpy as jnp

    shape = (batch, cfg.kv_heads, cfg.cache_len, cfg.head_dim)  # the layout attention() reads
    return [(jax.random.normal(jax.random.fold_in(key, 2 * i), shape, jnp.bfloat16),
             jax.random.normal(jax.random.fold_in(key, 2 * i + 1), shape, jnp.bfloat16))
            for i in range(cfg.layers)]


def stack(trees):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def layer_check(cfg: Config, canon0, kernel_name: str, fused: bool, caches, key) -> dict:
    """Layer 0 with the chosen kernel vs the same layer with the 'xla' kernel (batch of the caches)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_mxfp4

    if kernel_name == "xla":
        return {"note": "kernel is 'xla': nothing to compare with", "ok": True}
    b = caches[0][0].shape[0]
    x = jax.random.normal(key, (b, cfg.hidden), jnp.bfloat16)
    base = {"ln1": jnp.ones((cfg.hidden,), jnp.bfloat16), "ln2": jnp.ones((cfg.hidden,), jnp.bfloat16)}
    p_ours = dict(base, **{n: jax_mxfp4.prepare_weights(*w, kernel=kernel_name) for n, w in canon0.items()})
    p_xla = dict(base, **{n: jax_mxfp4.prepare_weights(*w, kernel="xla") for n, w in canon0.items()})
    f = jax.jit(lambda x, p, kc, vc: decoder_layer(x, p, kc, vc, cfg, make_linear("mxfp4"), fused))
    y = np.asarray(f(x, p_ours, *caches[0]), np.float64)
    r = np.asarray(f(x, p_xla, *caches[0]), np.float64)
    err = float(np.linalg.norm(y - r) / max(np.linalg.norm(r), 1e-30)) if np.all(np.isfinite(y)) else float("nan")
    ok = math.isfinite(err) and err < 2e-2
    H.log(f"  layer-0 check {kernel_name} vs xla: rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    if not ok:
        H.loud(f"DECODE LAYER CHECK FAIL: {kernel_name} vs xla rel err {err}")
    return {"rel_err_vs_xla_kernel": err, "ok": ok}


def finite_check(out) -> dict:
    import numpy as np

    a = np.asarray(out, np.float32)
    ok = bool(np.all(np.isfinite(a)))
    if not ok:
        H.loud("decode step produced non-finite values")
    return {"finite": ok, "rms": float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))}


# ---------------------------------------------------------------------------

# The results plot (render.plot_result arguments); report.py re-draws it after a merge.
PLOT = {"x": "batch", "panels": ["layers", "cache_len"], "field": "wall", "ylabel": "step time, wall (us)"}


def postprocess(res: dict) -> dict:
    for c in res["cases"]:
        c["ratios"] = {}
        c["metrics"] = {}
        if c.get("kernels_per_call") is not None:
            c["metrics"]["kernels"] = c["kernels_per_call"]
        tw, _ = H.case_time_us(c, "wall")
        td, fb = H.case_time_us(c, "device")
        b = c["params"]["batch"]
        if tw:
            c["metrics"]["tokens_per_s"] = b / (tw * 1e-6)
        if td and not fb:
            c["metrics"]["tokens_per_s_device"] = b / (td * 1e-6)
        wb = (c.get("extra") or {}).get("weight_bytes")
        if wb and td:
            c["metrics"]["weight_gbps"] = wb / (td * 1e3)
    H.add_ratio(res, "mxfp4", "bf16", MATCH, field="wall", name="vs_bf16_wall")
    H.add_ratio(res, "mxfp4", "bf16", MATCH, field="device", name="vs_bf16_device")
    out = []
    b1 = [c for c in res["cases"] if c["impl"] == "mxfp4" and c["params"]["batch"] == 1 and "vs_bf16_wall" in c["ratios"]]
    if b1:
        r = min(c["ratios"]["vs_bf16_wall"] for c in b1)
        rd = min((c["ratios"].get("vs_bf16_device") or float("nan")) for c in b1)
        out.append(H.target("batch 1: >= 2.5x bf16 tokens/s", r >= 2.5,
                            f"{r:.2f}x on wall step time ({rd:.2f}x on device time); kernel "
                            f"{(b1[0].get('extra') or {}).get('kernel')}", "mxfp4", "wall"))
    else:
        out.append(H.target("batch 1: >= 2.5x bf16 tokens/s", None, "batch 1 not measured for both variants"))
    res["targets"] = out
    return res


def add_args(ap) -> None:
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --quick 8)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--cache-len", type=int, default=None, help="KV cache length attended to (default 1024)")
    ap.add_argument("--kernel", default=None, help="force the MXFP4 kernel (default: registry selection)")
    ap.add_argument("--mode", default="unroll", choices=("unroll", "scan"))
    ap.add_argument("--unfused", action="store_true", help="separate q/k/v and gate/up projections")
    ap.add_argument("--lm-head", action="store_true", help="add a bf16 LM head (vocab 128256) to both variants")
    ap.add_argument("--variants", default="bf16,mxfp4")


def describe(c: H.Case, rec: dict) -> str:
    return (f"  {c.impl:6s} batch {c.params['batch']:3d}: wall {H.fmt_time_us((rec['wall_time_us'] or {}).get('median'))} us, "
            f"device {H.fmt_time_us((rec['device_time_us'] or {}).get('median'))} us, kernels/step "
            f"{rec['kernels_per_call']}, compile {rec['compile_s'] or 0:.1f}s")


def main(argv=None) -> int:
    args, s, t_start = H.start(__doc__, add_args, argv)
    import jax

    import jax_mxfp4

    cfg = SMOKE if args.cpu_smoke else Config()
    layers_default = SMOKE.layers if args.cpu_smoke else (8 if args.quick else 32)
    cfg = dataclasses.replace(cfg, layers=args.layers or layers_default,
                              cache_len=args.cache_len or cfg.cache_len)
    batches = H.parse_int_list(args.batches) or ([1, 4] if args.cpu_smoke else [1, 16])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    fused = not args.unfused
    if not args.cpu_smoke:
        s.trace_iters = args.trace_iters or 5
        s.wall_budget_s = 0.5
    bench = H.bench_name(BENCH, args)
    result = H.new_result(bench, s, TABLE)
    result["params"] = {**dataclasses.asdict(cfg), "batches": batches, "mode": args.mode, "fused": fused,
                        "lm_head": args.lm_head}
    H.log(f"config: {cfg}; batches {batches}; mode {args.mode}; fused {fused}; lm_head {args.lm_head}")
    key = jax.random.PRNGKey(2026)

    final = {"norm": jax.numpy.ones((cfg.hidden,), jax.numpy.bfloat16)}
    if args.lm_head:
        final["lm_head"] = jax.random.normal(jax.random.fold_in(key, 99), (cfg.hidden, cfg.vocab),
                                             jax.numpy.bfloat16) * jax.numpy.bfloat16(0.02)
    caches_by_b = {b: make_caches(cfg, b, jax.random.fold_in(key, 1000 + b)) for b in batches}
    if args.mode == "scan":
        caches_by_b = {b: stack(c) for b, c in caches_by_b.items()}

    with H.interruptible(result):
        for variant in variants:
            t0 = time.time()
            kernel = None
            try:
                layers, canon0 = make_layers(cfg, variant, fused, jax.random.fold_in(key, 7), args.kernel)
            except Exception as err:  # noqa: BLE001 - reported; the other variant still runs
                msg = f"{variant}: building weights failed: {type(err).__name__}: {err}"
                H.loud(msg)
                result["errors"].append(msg)
                continue
            if variant != "bf16":
                kernel = next(v for v in layers[0].values() if isinstance(v, jax_mxfp4.PreparedWeights)).kernel
                k0, n0 = next(iter(linear_shapes(cfg, fused).values()))
                H.log(jax_mxfp4.explain_selection((1, k0), jax.numpy.bfloat16, (n0, k0), kernel=args.kernel))
                result["notes"].append(f"mxfp4 kernel: {kernel}" + (" (forced)" if args.kernel else " (registry selection)"))
            H.log(f"\n--- {variant}: {cfg.layers} layers built in {time.time() - t0:.1f}s"
                  f" ({weight_bytes(cfg, variant, fused) / 1e9:.2f} GB of projection weights)")
            if args.mode == "scan":
                layers = stack(layers)
            step = make_step(cfg, variant, fused, args.mode, args.lm_head)
            cases = []
            for b in batches:
                x = jax.random.normal(jax.random.fold_in(key, 5000 + b), (b, cfg.hidden), jax.numpy.bfloat16)
                params = {"batch": b, "layers": cfg.layers, "cache_len": cfg.cache_len}
                wb = weight_bytes(cfg, variant, fused)
                cases.append(H.Case(BENCH, variant, params, step, [(x, layers, caches_by_b[b], final)],
                                    role="ours" if variant != "bf16" else "baseline", bytes_moved=wb,
                                    rotation=H.rotation_info(wb, 1, s.l2_bytes), check=finite_check,
                                    extra={"weight_bytes": wb, "kernel": kernel or "jnp.dot", "mode": args.mode,
                                           "fused": fused}))
            H.run_cases(cases, s, group_name=f"{bench}-{variant}")
            if variant != "bf16" and canon0 is not None and not args.ncu_worker:
                chk = layer_check(cfg, canon0, kernel, fused, make_caches(dataclasses.replace(cfg, layers=1), 1, key), key)
                for c in cases:
                    c.check_result = dict(c.check_result or {}, layer0=chk)
            H.record_cases(result, cases, describe)
            del cases, layers, step
            jax.clear_caches()
            H.checkpoint(result, args, postprocess)
    return H.conclude(result, args, t_start, name="decode", postprocess=postprocess,
                      plot=PLOT,
                      failed=lambda r: bool(r["errors"]))


if __name__ == "__main__":
    sys.exit(main())
