"""Runs the shapes the performance targets are about, for Nsight Compute (``tools/device_session.sh profile``).

    ncu --set detailed --kernel-name regex:QuantizeKernel python tools/profile_driver.py quantize
    ncu --set detailed --kernel-name regex:Marlin python tools/profile_driver.py marlin

quantize: bf16 x, linear scales, K = 8192 at M = 4096 (the bandwidth target)
and M = 128 (the small-M latency target). marlin: bf16 x, M = 16 on
8192x28672 and 8192x8192 (the small-M targets) and M = 128 on 8192x8192 (the
2x bf16 target). Every case runs twice (the first call compiles, so profile
the second: ``--launch-skip`` per kernel is not needed when ncu filters by
name and the driver calls each compiled case ``CALLS`` times). Command
buffers (CUDA graphs) are off so that ncu sees plain launches.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_mxfp4  # noqa: E402

CALLS = 2
QUANTIZE = ((4096, 8192), (128, 8192))  # (M, K)
MARLIN = ((16, 8192, 28672), (16, 8192, 8192), (128, 8192, 8192))  # (M, K, N)


def main(which: str) -> None:
    rng = np.random.default_rng(0)
    if which == "quantize":
        for m, k in QUANTIZE:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            f = jax.jit(lambda v: jax_mxfp4.quantize_mxfp4(v))
            for _ in range(CALLS):
                jax.block_until_ready(f(x))
            print(f"quantize M={m} K={k}: {CALLS} calls", flush=True)
    else:
        for m, k, n in MARLIN:
            wp = jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8)
            ws = jnp.asarray(rng.integers(115, 119, (n, k // 32)), jnp.uint8)
            prepared = jax_mxfp4.prepare_weights(wp, ws, activation_dtype=jnp.bfloat16, kernel="marlin")
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            f = jax.jit(jax_mxfp4.mxfp4_linear)
            for _ in range(CALLS):
                jax.block_until_ready(f(x, prepared))
            print(f"marlin M={m} K={k} N={n}: {CALLS} calls", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("quantize", "marlin"):
        sys.exit("usage: profile_driver.py quantize|marlin")
    main(sys.argv[1])
