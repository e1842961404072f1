"""Runs the package's CUDA kernels through JAX once per interesting case, for compute-sanitizer.

    compute-sanitizer --tool memcheck --kernel-name kns=QuantizeKernel python tools/sanitizer_driver.py quantize
    compute-sanitizer --tool memcheck --kernel-name kns=Marlin python tools/sanitizer_driver.py marlin

Covers every rounding mode and scale layout of the quantize kernel (M = 1,
odd M and K, swizzled padding) and the Marlin GEMM at M = 1, 7, 8, 16, 33, 129
and 300 with N/K residues, split-K and both activation dtypes (every tile
configuration), and the dense dequantization of its large-M path alone
(``marlin_dequantize``: MarlinDequantizeKernel, also for racecheck of its
shared-memory staging). XLA command buffers
(CUDA graphs) are turned off so the sanitizer sees plain launches. Exits 0 and
prints "sanitizer driver: N launches" when every call returned.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_mxfp4  # noqa: E402


def main(which: str):
    rng = np.random.default_rng(0)
    launches = 0
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32) if which == "quantize" else ():
        for rounding in ("floor", "rceil", "compressed_tensors"):
            for layout in ("linear", "swizzled_128x4"):
                for m, k in ((1, 32), (129, 160), (300, 2880)):
                    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
                    out = jax.jit(lambda v: jax_mxfp4.quantize_mxfp4(v, scale_layout=layout, rounding=rounding))(x)
                    jax.block_until_ready(out)
                    launches += 1
    for dtype in (jnp.bfloat16, jnp.float16) if which == "marlin" else ():
        # (16424, 544): the smalln row at M = 16 (N >= 16384), partial last n and k tiles.
        for n, k in ((200, 4160), (5760, 2880), (96, 96), (1024, 2048), (16424, 544)):
            # Random codes and scales; only the Marlin GEMM runs in this process. (The
            # large-M path, dense_matmul, is left to the marlin_dequantize case: with it here,
            # compute-sanitizer 2025.3.1 crashed (SIGSEGV) on the H200 right after the fp16
            # dense path at N = 200, whose dequantization kernel alone is clean.)
            wp = jnp.asarray(rng.integers(0, 256, (n, k // 2), dtype=np.uint8))
            ws = jnp.asarray(rng.integers(110, 130, (n, k // 32)), jnp.uint8)
            prepared = jax_mxfp4.prepare_weights(wp, ws, activation_dtype=dtype, kernel="marlin")
            for m in (1, 7, 8, 16, 33, 129, 300):  # every tile config; also above DENSE_FROM_TOKENS
                x = jnp.asarray(rng.standard_normal((m, k)), dtype)
                print(f"marlin {jnp.dtype(dtype).name} N={n} K={k} M={m}", flush=True)
                jax.block_until_ready(jax.jit(jax_mxfp4.kernels.get_kernel("marlin").kernel_matmul)(x, prepared))
                launches += 1
    for dtype in (jnp.bfloat16, jnp.float16) if which == "marlin_dequantize" else ():
        # The dense dequantization alone: k-block residues (130, 3 blocks for 8-block CTAs),
        # N not a multiple of 32, NaN and flushed scales.
        for n, k in ((200, 4160), (33, 96), (1024, 2048), (8, 8192)):
            wp = jnp.asarray(rng.integers(0, 256, (n, k // 2), dtype=np.uint8))
            ws = np.asarray(rng.integers(100, 140, (n, k // 32)), np.uint8)
            ws[0, 0], ws[-1, :] = 0xFF, np.arange(k // 32) % 256
            prepared = jax_mxfp4.prepare_weights(wp, jnp.asarray(ws), activation_dtype=dtype, kernel="marlin")
            layout = jax_mxfp4.kernels.marlin_weights.marlin_layout(n, k, dtype)
            from jax_mxfp4.primitives.marlin_dequantize import marlin_dequantize

            jax.block_until_ready(jax.jit(lambda t, s: marlin_dequantize(t, s, layout))(
                prepared.arrays["tiles"], prepared.arrays["scales"]))
            launches += 1
    print(f"sanitizer driver: {launches} launches")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("quantize", "marlin", "marlin_dequantize"):
        sys.exit("usage: sanitizer_driver.py quantize|marlin|marlin_dequantize")
    main(sys.argv[1])
