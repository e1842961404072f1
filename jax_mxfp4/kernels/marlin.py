"""``marlin``: the Marlin-style W4A16 GEMM for Ampere/Hopper (``csrc/marlin``).

MXFP4 weights stay 4-bit in HBM, repacked once at load into the tile order
the kernel's ``mma.sync`` fragments want (``prepare_marlin_weights``), and are
dequantized in registers; activations and output are bfloat16 or float16,
accumulation float32. Selected on compute capability 8.x and 9.x.

On compute capability 9.0 (H100/H200) M > 32 runs on the kernel's ``wgmma``
(sm_90a) tile configurations, M <= 32 and other GPUs on ``mma.sync``. For large
M the GEMM is compute-bound and the kernel trails cuBLAS's dense GEMM; from
``dense_from_tokens`` rows on, ``apply`` dequantizes the prepared weights and
calls a dense ``jnp.dot`` instead. That crossover is a measurement per device
and layer size, recorded with its data (``DENSE_CROSSOVER``), as is the one
device-specific launch choice: two CTAs per SM at M <= 8 on an H200
(``TWO_CTAS_PER_SM``).
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp4 import _native
from jax_mxfp4.kernels.base import (
    LinearConfig,
    Mxfp4LinearKernel,
    PreparedWeights,
    default_device,
    register_kernel,
    tokens_of,
)
from jax_mxfp4.kernels.marlin_weights import UNIT_N, marlin_layout, prepare_marlin_weights, prepared_specs
from jax_mxfp4.primitives import marlin_dequantize, marlin_gemm
from jax_mxfp4.sharding import check_whole_units

__all__ = ["DENSE_CROSSOVER", "DENSE_FROM_TOKENS", "DENSE_FROM_TOKENS_MMA_SYNC", "TWO_CTAS_PER_SM", "MarlinKernel",
           "dense_from_tokens", "planned_ctas_per_sm"]

#: M (tokens) from which a Marlin layer on a compute capability 9.0 GPU runs as
#: dequantize + dense GEMM (``dense_matmul``) on a device without a row in
#: ``DENSE_CROSSOVER``; None: always the Marlin kernel. First measured on an H200
#: (commit 514ee22, the kernel's first wgmma configurations: at M = 512 the
#: dense path won on five of the six benchmark shapes) and confirmed there at
#: commit 2c729a5 (below): four of six.
DENSE_FROM_TOKENS: int | None = 512

#: The crossover per device (``device_kind``), by the layer's weight count
#: N x K: rows ``(min_weights, tokens)``; the row with the largest
#: ``min_weights`` <= N x K applies, and M >= ``tokens`` runs the dense path.
#: Why it depends on both: the dense path pays a dequantization pass of ~2.5
#: bytes of HBM traffic per weight (write bf16, read FP4) on top of cuBLAS, the
#: kernel pays for running below cuBLAS's rate in its wgmma loop (~600 against
#: ~800 TFLOP/s); the pass weighs more on the H100's lower bandwidth, and
#: small layers (16-23 columns of 256 features) fill the SMs badly at M in the
#: hundreds. Measured with the kernel and the dense path timed side by side in
#: one run per device at M = 256, 384, 512, 768, 1024: bench rows "marlin" (the
#: dispatch) against "marlin_kernel" / "marlin_dense" (the other side) in
#: benchmarks/results/gemm-nvidia-h100-80gb-hbm3.json (run of commit 29f1ffb,
#: this table's first H100 data) and gemm-nvidia-h200.json (runs of c5e6e42;
#: the H200's earlier data is in results/superseded/); device
#: times in us (memsets counted), kernel vs dense:
#:
#: * H100, N x K < 2^25 (4096x4096, 2880x5760): 384 40.2 vs 40.4, 41.7 vs 35.4;
#:   512 40.8 vs 38.1, 51.3 vs 38.1. N x K >= 2^25 (4096x14336, 14336x4096,
#:   8192x8192, 8192x28672): 512 132.1 vs 143.3, 108.8 vs 130.6, 138.4 vs 147.6,
#:   415.5 vs 500.5 (the kernel 1.07-1.20x); 768 185.5 vs 170.1, 170.3 vs 166.8,
#:   198.7 vs 189.1, 650.1 vs 649.6 (dense 1.00-1.09x).
#: * H100 again at commit 871b682 (the warp-specialized wgmma128ws kernel on
#:   the stripe plans; two runs of the six shapes at M = 256 ... 1024, the
#:   first and second number of each pair, and one of 8192x28672 at M = 1024
#:   ... 2048): the rows above are kept for N x K < 2^27 (768: 4096x14336 179.5 /
#:   179.7 vs 169.3 / 169.8, dense 1.06x; 8192x8192 190.9 / 191.1 vs 193.8 /
#:   194.3 and 14336x4096 164.8 / 164.8 vs 165.4 / 164.8, within 1.5% either
#:   way), but 8192x28672 now keeps the
#:   kernel past 768: 768 625.9 / 620.9 vs 645.8 / 645.2, 1024 756.2 / 756.2 vs
#:   772.0 / 773.4 (and 751.0 vs 769.9 in the third run), 1280 964.9 vs 932.6,
#:   1536 1170.4 vs 1058.6, 2048 1504.6 vs 1338.7. First set to 1152 by
#:   interpolation; at commit 48ad645 (one run, between the grid points;
#:   results/superseded/gemm-nvidia-h100-80gb-hbm3-crossover-runs-48ad645.json)
#:   8192x28672 at 1088 859.1 vs 836.7 and at 1152 861.7 vs 840.6 (dense
#:   1.03x): M = 1025 ... 1152 is the kernel's ninth 128-row tile, so 1025.
#:   The same run between 512 and 768 on the layers of 2^25 ... 2^27: 576
#:   149.5 vs 149.5, 141.3 vs 145.5, 165.8 vs 155.8; 640 150.4 vs 156.2, 142.5
#:   vs 146.8, 168.2 vs 168.5; 704 178.3 vs 179.0, 163.2 vs 162.5, 191.0 vs
#:   186.9 (4096x14336, 14336x4096, 8192x8192: within 6% either way, the
#:   kernel ahead on average), so 768 stays; 8192x28672 there 515.4 vs
#:   569.0, 521.9 vs 585.4, 617.1 vs 652.7 (the kernel 1.06-1.12x).
#: * H200 at commit c5e6e42 (wgmma128ws; the six shapes at M = 256 ... 8192
#:   and the four larger ones at 576, 640, 704, on one machine; whole in
#:   results/superseded/gemm-nvidia-h200-crossover-runs-c5e6e42.json) and
#:   3e5fbd1 (this table; M = 512 and 8192x28672 at 576 ... 704 re-timed on
#:   the same machine). N x K < 2^25 (2880x5760, 4096x4096): 256 32.8 vs
#:   31.8, 25.6 vs 30.2; 384 39.5 vs 31.6, 39.8 vs 36.7: dense from 384, as
#:   before. N x K >= 2^25 (4096x14336, 14336x4096, 8192x8192, 8192x28672):
#:   384 100.4 vs 98.5, 105.7 vs 103.2, 101.5 vs 112.9, 306.1 vs 377.7; 512
#:   124.9 / 124.5 vs 123.2 / 127.6, 107.8 / 108.0 vs 114.8 / 115.1, 129.5 /
#:   129.0 vs 129.6 / 129.0, 396.3 / 390.4 vs 434.2 / 427.8 (c5e6e42 /
#:   3e5fbd1: the kernel up to 1.10x, the dense path at most 1.4%); 576 148.0
#:   vs 136.0, 135.9 vs 131.8, 161.3 vs 139.7, 516.9 / 514.6 vs 499.9 / 496.9
#:   (dense 1.03-1.15x, and at every M measured above: 640, 704, 768, 1024
#:   ...). So 513: the kernel's time steps with each 128-row tile (M = 513
#:   ... 640 is five tiles: 8192x28672 514.6 / 520.4 us at 576 / 640 against
#:   390.4 at 512), the dense path's grows with M and is below the step at
#:   576 already. Before (run of 2c729a5, the first wgmma kernel) the rows
#:   for >= 2^25 were 512 below 2^27 (dense won two of three at 512) and 768
#:   above (8192x28672: 512 412.1 vs 438.4, 768 648.7 vs 590.2, nothing
#:   between).
#:
#: The thresholds between the measured sizes (2^25 between 16.8M and 58.7M
#: weights, 2^27 between 67M and 235M) are a choice, not a measurement.
DENSE_CROSSOVER: dict[str, tuple[tuple[int, int], ...]] = {
    "NVIDIA H100 80GB HBM3": ((0, 384), (1 << 25, 768), (1 << 27, 1025)),
    "NVIDIA H200": ((0, 384), (1 << 25, 513)),
}

#: The same crossover where the kernel runs its mma.sync configurations only
#: (compute capability 8.x). Measured on an H100 with those configurations
#: (benchmarks/results/gemm-nvidia-h100-80gb-hbm3.json, rows "marlin",
#: "marlin_dense" and "marlin_kernel"; commit e5c6640): at M = 256 the dense
#: path is as fast as the kernel or faster on all six benchmark shapes
#: (4096x4096: 33.5 vs 38.5 us; 8192x28672: 396 vs 398 us), at M = 128 the
#: kernel wins on all six (8192x8192: 69.9 vs 118 us). No A100 was measured.
DENSE_FROM_TOKENS_MMA_SYNC: int | None = 256

#: Devices (``device_kind``) on which the kernel runs two CTAs per SM at M <=
#: ``max_tokens`` for weights of N x K >= ``min_weights`` elements: the small8
#: tile (108 registers, ~88 KB of shared memory per CTA) fits twice per SM,
#: and twice the warps hide more latency where the kernel, not HBM, is the
#: limit. Measured with the self-test, one binary, alternating rounds
#: (benchmarks/results/selftest/marlin-two-ctas-*.json, commit 1dec80e): on
#: the H200 8192x28672 1.12-1.13x, 8192x8192 1.02-1.03x (the two shapes at
#: or above 2^26 weights), 4096x14336 / 14336x4096 0.99-1.03x, 4096x4096
#: 0.91-0.92x (short stripes: more split-K columns than the warps gain);
#: on the H100 0.87-1.03x (8192x28672 0.98-0.99x), so it is not listed.
TWO_CTAS_PER_SM: dict[str, dict[str, int]] = {
    "NVIDIA H200": {"max_tokens": 8, "min_weights": 1 << 26},
}


def planned_ctas_per_sm(tokens: int, config: LinearConfig, device_kind: str) -> int:
    """CTAs per SM the kernel's launch is planned for (``TWO_CTAS_PER_SM``)."""
    rule = TWO_CTAS_PER_SM.get(device_kind)
    if rule and tokens <= rule["max_tokens"] and config.out_features * config.in_features >= rule["min_weights"]:
        return 2
    return 1


# SM count used when the device cannot be queried at trace time (e.g. tracing
# on a CPU host for a GPU): any value is correct, the device's own is fastest.
_FALLBACK_SM_COUNT = 132


def _has_wgmma(device=None) -> bool:
    """``device`` (default: the default device) is compute capability 9.0 (H100/H200):
    the kernel's sm_90a ``wgmma`` configurations can run there (and nowhere else)."""
    device = device or default_device()
    return _native.is_cuda_device(device) and tuple(_native.cuda_compute_capability(device)) == (9, 0)


def _sm_count() -> int:
    device = default_device()
    if not _native.is_cuda_device(device):
        return _FALLBACK_SM_COUNT
    count = int(_native.ext.marlin_device_sm_count(int(getattr(device, "local_hardware_id", device.id) or 0)))
    return count if count > 0 else _FALLBACK_SM_COUNT


def dense_from_tokens(config: LinearConfig, device=None) -> int | None:
    """M from which ``matmul`` runs the dense path for this layer on ``device``
    (default: the default device): ``DENSE_CROSSOVER``'s row for the layer's N x K
    where the device's kind has one, else the crossover of its instruction path
    (``DENSE_FROM_TOKENS`` with wgmma, ``DENSE_FROM_TOKENS_MMA_SYNC`` without)."""
    device = device or default_device()
    rows = DENSE_CROSSOVER.get(device.device_kind)  # (devices of compute capability 9.0 only)
    if rows is None:
        return DENSE_FROM_TOKENS if _has_wgmma(device) else DENSE_FROM_TOKENS_MMA_SYNC
    weights = config.out_features * config.in_features
    return max((row for row in rows if row[0] <= weights), key=lambda row: row[0])[1]


@register_kernel
class MarlinKernel(Mxfp4LinearKernel):
    name = "marlin"
    description = "Marlin-style W4A16 GEMM, mma.sync (SM80/SM90) + wgmma (SM90) (csrc/marlin)"

    def is_supported(self, device):
        if not _native.is_cuda_device(device):
            return False, f"needs a CUDA GPU of compute capability 8.x or 9.x (this is a {device.platform} device)"
        if not _native.cuda_enabled():
            return False, "this build has no CUDA kernels (nvcc was not found at install time)"
        cc = _native.cuda_compute_capability(device)
        if cc[0] not in (8, 9):
            return False, (f"compiled for sm_80 and sm_90a only; {device.device_kind} is compute capability "
                           f"{cc[0]}.{cc[1]}")
        return True, ""

    def can_implement(self, config: LinearConfig):
        if config.activation_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return False, (f"computes in bfloat16/float16; {config.activation_dtype} activations run on another "
                           "kernel (cast x to bfloat16 to use this one)")
        if not _native.cuda_enabled():
            return False, "this build has no CUDA kernels"
        reason = _native.ext.marlin_can_implement(config.out_features, config.in_features)
        return (not reason), reason

    def prepare_weights(self, w_packed, w_scales, config: LinearConfig) -> PreparedWeights:
        tiles, scales, _ = prepare_marlin_weights(w_packed, w_scales, config.activation_dtype)
        return PreparedWeights({"tiles": tiles, "scales": scales}, self.name, config)

    def prepared_specs(self, config, mesh, n_axes, k_axes):
        check_whole_units(mesh, n_axes, config.out_features, UNIT_N, "N", "feature units of the Marlin layout")
        return prepared_specs(n_axes, k_axes)

    def describe_path(self, config: LinearConfig, device) -> str:
        dense_from = dense_from_tokens(config, device)
        if dense_from is None:
            return "the Marlin kernel at every M"
        where = (f"the crossover for {config.out_features} x {config.in_features} weights on "
                 f"{device.device_kind}" + (" (DENSE_CROSSOVER)" if device.device_kind in DENSE_CROSSOVER else ""))
        if config.tokens is None:
            return f"the Marlin kernel below M = {dense_from}, dequantize + cuBLAS from it ({where})"
        if config.tokens >= dense_from:
            return f"dequantize + cuBLAS: M = {config.tokens} >= {dense_from}, {where}"
        return f"the Marlin kernel: M = {config.tokens} < {dense_from}, {where}"

    def matmul(self, x, weights: PreparedWeights):
        tokens = tokens_of(x.shape)
        dense_from = dense_from_tokens(weights.config)
        if dense_from is not None and tokens >= dense_from:
            return self.dense_matmul(x, weights)
        return self.kernel_matmul(x, weights)

    def kernel_matmul(self, x, weights: PreparedWeights, *, ctas_per_sm: int | None = None,
                      wgmma: bool | None = None):
        """The Marlin GEMM kernel at any M (``matmul`` uses it below ``dense_from_tokens()``).

        ``ctas_per_sm``: None (default) plans the launch for the CTAs per SM of
        ``planned_ctas_per_sm`` (the measured per-device choice); a number forces it (a
        grid of that many times the SM count; benchmarks compare the two).
        ``wgmma``: None (default) uses the Hopper ``wgmma`` configurations for
        M > 32 where the device is compute capability 9.0; False forces the
        ``mma.sync`` ones (benchmarks compare the two); True on another device is
        an error."""
        config = weights.config
        if ctas_per_sm is None:
            tokens = tokens_of(x.shape)
            ctas_per_sm = planned_ctas_per_sm(tokens, config, default_device().device_kind)
        has_wgmma = _has_wgmma()
        if wgmma and not has_wgmma:
            raise ValueError(f"wgmma=True needs a compute capability 9.0 GPU; the default device is "
                             f"{default_device().device_kind}")
        return marlin_gemm.marlin_gemm(x, weights.arrays["tiles"], weights.arrays["scales"],
                                       n=config.out_features, k=config.in_features,
                                       sm_count=ctas_per_sm * _sm_count(),
                                       use_wgmma=has_wgmma if wgmma is None else wgmma)

    def dense_matmul(self, x, weights: PreparedWeights):
        """The large-M path: dequantize the prepared weights in one pass
        (``marlin_dequantize``, CUDA), then a dense GEMM (cuBLAS)."""
        config = weights.config
        layout = marlin_layout(config.out_features, config.in_features, config.activation_dtype)
        w = marlin_dequantize.marlin_dequantize(weights.arrays["tiles"], weights.arrays["scales"], layout)
        # bf16/fp16 in and out: cuBLAS accumulates in float32 and rounds once. (Asking for a
        # float32 result and rounding after would add a convert pass over [M, N] at large M.)
        return jnp.einsum("...k,nk->...n", x, w.astype(x.dtype))
