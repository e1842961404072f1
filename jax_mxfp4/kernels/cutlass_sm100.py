"""``cutlass_sm100``: native W4A4 on Blackwell's block-scaled tensor cores.

A W4A4 layer quantizes its activations with the quantize custom call straight
into the swizzled_128x4 scale layout and runs the CUTLASS SM100 block-scaled
GEMM (``csrc/sm100/w4a4_gemm.cu``). Selected only on compute capability 10.0
(the build carries sm_100a code only); everywhere else a W4A4 layer runs as
fake-quantized activations on the best W4A16 kernel, with the same numerics up
to accumulation order. Compiled and host-tested; not yet run on Blackwell.
The GEMM custom call also has a CPU handler (tests, sharding rules on host
devices); the registry still never selects this kernel off Blackwell.
"""

from __future__ import annotations


from jax_mxfp4 import _native
from jax_mxfp4.formats import BLOCK_SIZE
from jax_mxfp4.layout import SWIZZLE_COLS, SWIZZLE_ROWS
from jax_mxfp4.kernels.base import LinearConfig, Mxfp4LinearKernel, PreparedWeights, register_kernel
from jax_mxfp4.kernels.sm100_weights import prepare_sm100_weights, prepared_specs
from jax_mxfp4.primitives import quantize, sm100_gemm
from jax_mxfp4.sharding import check_whole_units

__all__ = ["CutlassSm100Kernel"]


@register_kernel
class CutlassSm100Kernel(Mxfp4LinearKernel):
    name = "cutlass_sm100"
    description = "CUTLASS SM100 block-scaled W4A4 GEMM (csrc/sm100)"
    native_w4a4 = True

    def is_supported(self, device):
        if not _native.is_cuda_device(device):
            return False, f"needs a CUDA GPU of compute capability 10.0 (this is a {device.platform} device)"
        if not _native.ext.has_sm100_gemm:
            return False, "this build has no SM100 kernel (nvcc >= 12.8 was not found at install time)"
        cc = _native.cuda_compute_capability(device)
        if cc != (10, 0):
            return False, (
                f"needs compute capability 10.0 (B200/GB200: the build carries sm_100a code only); "
                f"{device.device_kind} is {cc[0]}.{cc[1]}"
            )
        return True, ""

    def can_implement(self, config: LinearConfig):
        if config.activation_format != "mxfp4":
            return False, "W4A4 only: W4A16 layers (bf16/fp16 activations) run on a W4A16 kernel"
        if not _native.ext.has_sm100_gemm:
            return False, "this build has no SM100 kernel"
        ok, reason = _native.ext.sm100_w4a4_can_implement(config.tokens or 1, config.out_features,
                                                          config.in_features)
        return bool(ok), reason

    def prepare_weights(self, w_packed, w_scales, config: LinearConfig) -> PreparedWeights:
        return PreparedWeights(prepare_sm100_weights(w_packed, w_scales), self.name, config)

    def prepared_specs(self, config, mesh, n_axes, k_axes):
        check_whole_units(mesh, n_axes, config.out_features, SWIZZLE_ROWS, "N", "rows of swizzled scale tiles")
        check_whole_units(mesh, k_axes, config.in_features, SWIZZLE_COLS * BLOCK_SIZE, "K",
                          "columns of swizzled scale tiles")
        return prepared_specs(n_axes, k_axes)

    def matmul(self, x, weights: PreparedWeights):
        return w4a4_linear(x, weights.arrays["packed"], weights.arrays["scales"],
                           rounding=weights.config.activation_rounding).astype(x.dtype)


def w4a4_linear(x, w_packed, w_scales_swizzled, *, rounding="floor"):
    """Quantize ``x`` (swizzled scales) and multiply on the block-scaled tensor cores.

    Jit-able; abstract evaluation works on any backend (``jax.eval_shape``),
    including M not a multiple of 128: the activations' scale buffer is padded
    to ``scale_shape(M, K, "swizzled_128x4")`` by the quantize primitive.
    """
    a, a_scales = quantize.quantize(x, scale_layout="swizzled_128x4", rounding=rounding)
    return sm100_gemm.sm100_w4a4_gemm(a, a_scales, w_packed, w_scales_swizzled)


