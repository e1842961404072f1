"""Quantize a bf16 weight to MXFP4, multiply under jit, and show which kernel ran.

    python examples/quickstart.py

Prints the error of the MXFP4 product against the bf16 product, the kernel the
registry picked for this device (and why every kernel before it was
skipped), and whether the jitted computation holds the package's custom call.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jax_mxfp4


def main():
    rng = np.random.default_rng(0)
    m, k, n = 16, 4096, 1024
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.bfloat16)

    # Weights: bf16 [N, K] -> packed E2M1 [N, K/2] + one E8M0 scale per 32 along K.
    w_packed, w_scales = jax_mxfp4.quantize_mxfp4(w)
    print(f"weight {w.shape} {w.dtype} -> packed {w_packed.shape} {w_packed.dtype}, "
          f"scales {w_scales.shape} {w_scales.dtype} ({w.nbytes / (w_packed.nbytes + w_scales.nbytes):.2f}x smaller)")

    matmul = jax.jit(lambda a: jax_mxfp4.mxfp4_matmul(a, w_packed, w_scales))
    y = matmul(x)
    y_bf16 = jnp.dot(x, w.T, preferred_element_type=jnp.float32)
    y_deq = jnp.dot(x.astype(jnp.float32), jax_mxfp4.dequantize_mxfp4(w_packed, w_scales, dtype=jnp.float32).T)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
    print(f"relative error vs the bf16 product:          {rel(y, y_bf16):.4f}  (MXFP4 weight quantization)")
    print(f"relative error vs exact dequantized product: {rel(y, y_deq):.2e}  (kernel arithmetic)")
    print(jax_mxfp4.explain_selection(x.shape, x.dtype, w_packed.shape[:1] + (k,)))
    hlo = matmul.lower(x).as_text()
    calls = sorted({t for t in ("jax_mxfp4_gemm", "jax_mxfp4_marlin_gemm", "jax_mxfp4_sm100_w4a4_gemm")
                    if t in hlo})
    print(f"custom calls in the jitted computation: {calls or 'none (XLA ops only)'}")


if __name__ == "__main__":
    main()
