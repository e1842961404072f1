"""A tensor-parallel MXFP4 MLP block across the available devices.

    python examples/tensor_parallel.py [--hidden 1024] [--ffn 4096] [--tokens 64]

Column-parallel up projection (weights split along N), GELU, row-parallel
down projection (weights split along K in whole 32-element blocks): the
Megatron pattern, with one all-reduce per block and no weight ever gathered.
Two ways are shown and checked against the unsharded block:

1. ``jax.jit`` with ``NamedSharding`` inputs: the weights are prepared once
   for the registry's kernel (Marlin on Ampere/Hopper, the ``cpu`` kernel on
   CPU devices) and placed with ``shard_prepared_weights``; the MXFP4
   primitives' own partitioning rules (Shardy) split the custom calls.
2. ``jax.shard_map``: every device runs its local shard of the canonical
   weights with the kernel the registry picks for it (Marlin on
   Ampere/Hopper) and one ``psum`` joins the row-parallel partial products.

Prints the mesh, the shardings and the collectives found in each compiled
HLO, and compares each sharded result with the same block run on one device
(same kernels) and with the reference math; it exits with status 1 if a
sharded result is off by more than bfloat16 rounding (``REL_TOL``) or the
weights are all-gathered. On a machine with one CPU device the script asks
XLA for 8 host devices, so the sharding is real even without GPUs; on a GPU
host it shards over the GPUs.
"""

from __future__ import annotations

import argparse
import os
import re

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only affects the CPU platform: gives a CPU-only machine 8 devices to shard over.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_mxfp4  # noqa: E402
from jax_mxfp4 import reference  # noqa: E402
from jax_mxfp4.sharding import shard_prepared_weights, shard_weights  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
#: Largest relative error (Frobenius) of a sharded block vs the one-device block and the
#: reference: the block's output is bfloat16 (relative rounding 2**-9), and a sharded
#: row-parallel GEMM sums its partial products in another order.
REL_TOL = 1e-2


def collective_counts(hlo: str) -> dict[str, int]:
    """How many of each collective the compiled HLO runs (``-start`` forms counted once)."""
    counts = {}
    for op in COLLECTIVES:
        counts[op] = len(re.findall(rf"= [^=\n]*\b{op}(?:-start)?\(", hlo))
    return counts


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    devices = jax.devices()
    n = len(devices)
    mesh = Mesh(np.array(devices).reshape(1, n), ("data", "model"))
    print(f"mesh: {dict(mesh.shape)} over {n} x {devices[0].device_kind} ({devices[0].platform})")
    if args.ffn % n or args.hidden % 32 or (args.ffn // n) % 32:
        raise SystemExit(f"--ffn must split into {n} shards of whole 32-element blocks, --hidden a multiple of 32")

    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (args.tokens, args.hidden), jnp.float32).astype(jnp.bfloat16)
    w_up = jax.random.normal(k2, (args.ffn, args.hidden), jnp.float32) * args.hidden**-0.5
    w_down = jax.random.normal(k3, (args.hidden, args.ffn), jnp.float32) * args.ffn**-0.5
    up = jax_mxfp4.quantize_mxfp4(w_up)      # [ffn, hidden/2], [ffn, hidden/32]
    down = jax_mxfp4.quantize_mxfp4(w_down)  # [hidden, ffn/2], [hidden, ffn/32]

    # Unsharded reference block.
    h_ref = jax.nn.gelu(reference.matmul_reference(x, *up))
    y_ref = reference.matmul_reference(h_ref, *down)

    failures = []

    def check(name, y, y_one, hlo):
        counts = collective_counts(hlo)
        errs = (rel_err(y, y_one), rel_err(y, y_ref))
        print(f"   collectives in the compiled HLO: {counts}")
        print(f"   relative error vs the same block on one device: {errs[0]:.2e}; vs the reference: {errs[1]:.2e}")
        if max(errs) > REL_TOL:
            failures.append(f"{name}: relative error {max(errs):.2e} > {REL_TOL}")
        if counts["all-gather"] or counts["all-to-all"]:
            failures.append(f"{name}: the compiled program gathers ({counts})")

    # ---- 1. jit + NamedSharding: the primitives' partitioning rules. ----
    up_w = jax_mxfp4.prepare_weights(*up)      # once, for the registry's kernel on this device
    down_w = jax_mxfp4.prepare_weights(*down)
    kernel = up_w.kernel
    up_sharded = shard_prepared_weights(up_w, mesh, n_axis="model")      # column-parallel: split N
    down_sharded = shard_prepared_weights(down_w, mesh, k_axis="model")  # row-parallel: split K
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    print(f"  {'x':14s} {str(x_sharded.shape):14s} {x_sharded.sharding.spec}")
    for layer, w in (("up", up_sharded), ("down", down_sharded)):
        for name, arr in w.arrays.items():
            print(f"  {layer + '.' + name:14s} {str(arr.shape):14s} {arr.sharding.spec}")

    def block(x, up_w, down_w):
        h = jax.nn.gelu(jax_mxfp4.mxfp4_linear(x, up_w))
        return jax_mxfp4.mxfp4_linear(h, down_w)

    auto = jax.jit(block)
    y_auto = auto(x_sharded, up_sharded, down_sharded)
    hlo = auto.lower(x_sharded, up_sharded, down_sharded).compile().as_text()
    one = devices[0]
    y_one = jax.jit(block)(jax.device_put(x, one), jax.device_put(up_w, one), jax.device_put(down_w, one))
    print(f"\n1. jit + shardings, kernel {kernel!r}: output sharding {y_auto.sharding.spec}")
    check("jit + shardings", y_auto, y_one, hlo)

    # ---- 2. shard_map: local shards with the registry's kernel per device. ----
    def local_block(x, up_p, up_s, down_p, down_s):
        h = jax.nn.gelu(jax_mxfp4.mxfp4_matmul(x, up_p, up_s))                     # [tokens, ffn / n]
        partial = jax_mxfp4.mxfp4_matmul(h.astype(jnp.float32), down_p, down_s)    # float32 partials
        return jax.lax.psum(partial, "model").astype(x.dtype)                      # one all-reduce

    manual = jax.jit(jax.shard_map(
        local_block, mesh=mesh,
        in_specs=(P("data", None), P("model", None), P("model", None), P(None, "model"), P(None, "model")),
        out_specs=P("data", None)))
    up_canonical = shard_weights(*up, mesh, n_axis="model")      # column-parallel: split N
    down_canonical = shard_weights(*down, mesh, k_axis="model")  # row-parallel: split K
    y_manual = manual(x_sharded, *up_canonical, *down_canonical)
    hlo = manual.lower(x_sharded, *up_canonical, *down_canonical).compile().as_text()
    local = jax_mxfp4.select_kernel(
        jax_mxfp4.kernels.LinearConfig(args.hidden, args.ffn // n, tokens=args.tokens)).kernel.name
    def one_device_block(x, up_p, up_s, down_p, down_s):
        h = jax.nn.gelu(jax_mxfp4.mxfp4_matmul(x, up_p, up_s))
        return jax_mxfp4.mxfp4_matmul(h, down_p, down_s)

    y_one = jax.jit(one_device_block)(*(jax.device_put(a, one) for a in (x, *up, *down)))
    print(f"\n2. shard_map, kernel {local!r} on each device: output sharding {y_manual.sharding.spec}")
    check("shard_map", y_manual, y_one, hlo)

    if failures:
        raise SystemExit("FAILED:\n  " + "\n  ".join(failures))
    print("\nOK: both sharded blocks match the one-device block and the reference; no weight was gathered.")


if __name__ == "__main__":
    main()
