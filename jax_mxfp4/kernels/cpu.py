"""``cpu``: the C++ CPU custom call (``csrc/ffi_cpu.cc``) through ``mxfp4_gemm``.

Cache-blocked loops (a dequantization table, 64-column x 512-K weight slices,
an 8x8 FMA micro-kernel), threads over column chunks for large problems.
Preferred over ``xla`` on CPU because it measured faster there (2-core AMD
EPYC dev machine, jax 0.10.2, bf16 activations; see the commit that
introduced the blocking): M=256 K=384 N=1536 4.8 vs 6.8 ms, M=16 K=N=4096
18.8 vs 57.5 ms, M=1 K=N=4096 12.8 vs 70.0 ms, M=512 K=N=2048 54.9 vs
50.5 ms.
"""

from __future__ import annotations

from jax_mxfp4.kernels.base import CanonicalLayoutKernel, PreparedWeights, register_kernel
from jax_mxfp4.primitives import gemm

__all__ = ["CpuFfiKernel"]


@register_kernel
class CpuFfiKernel(CanonicalLayoutKernel):
    name = "cpu"
    description = "C++ CPU custom call (csrc/ffi_cpu.cc)"

    def is_supported(self, device):
        if device.platform != "cpu":
            return False, f"runs on CPU devices only (this is a {device.platform} device)"
        return True, ""

    def matmul(self, x, weights: PreparedWeights):
        return gemm.gemm(x, weights.arrays["packed"], weights.arrays["scales"])
