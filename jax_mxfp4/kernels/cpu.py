"""``cpu``: the C++ CPU custom call (``csrc/ffi_cpu.cc``) through ``mxfp4_gemm``.

A real loop nest (dequantize a panel of 8 weight rows, float32 dot products),
single-threaded on XLA's compute thread. Preferred over ``xla`` on CPU so the
package's own handler is what runs there.
"""

from __future__ import annotations

from jax_mxfp4.kernels.base import LinearConfig, Mxfp4LinearKernel, PreparedWeights, register_kernel
from jax_mxfp4.primitives import gemm

__all__ = ["CpuFfiKernel"]


@register_kernel
class CpuFfiKernel(Mxfp4LinearKernel):
    name = "cpu"
    description = "C++ CPU custom call (csrc/ffi_cpu.cc)"

    def is_supported(self, device):
        if device.platform != "cpu":
            return False, f"runs on CPU devices only (this is a {device.platform} device)"
        return True, ""

    def can_implement(self, config: LinearConfig):
        return True, ""

    def prepare_weights(self, w_packed, w_scales, config: LinearConfig) -> PreparedWeights:
        return PreparedWeights({"packed": w_packed, "scales": w_scales}, self.name, config)

    def matmul(self, x, weights: PreparedWeights):
        return gemm.gemm(x, weights.arrays["packed"], weights.arrays["scales"])
