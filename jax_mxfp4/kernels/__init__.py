"""MXFP4 linear kernels: the interface, the registry and its members.

Import order below is priority order (``REGISTRY``): the first kernel whose
``is_supported`` and ``can_implement`` accept a layer runs it.
"""

from jax_mxfp4.kernels.base import (
    KERNEL_ENV_VAR,
    REGISTRY,
    KernelSelection,
    KernelUnavailableError,
    LinearConfig,
    Mxfp4LinearKernel,
    PreparedWeights,
    get_kernel,
    select_kernel,
)
from jax_mxfp4.kernels import cutlass_sm100  # noqa: F401  (registers "cutlass_sm100")
from jax_mxfp4.kernels import marlin  # noqa: F401  (registers "marlin")
from jax_mxfp4.kernels import cpu  # noqa: F401  (registers "cpu")
from jax_mxfp4.kernels import xla  # noqa: F401  (registers "xla", the universal fallback)

__all__ = [
    "KERNEL_ENV_VAR",
    "REGISTRY",
    "KernelSelection",
    "KernelUnavailableError",
    "LinearConfig",
    "Mxfp4LinearKernel",
    "PreparedWeights",
    "get_kernel",
    "select_kernel",
]
