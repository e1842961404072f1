"""Shared by the Flax layer tests (test_flax_linen.py, test_flax_nnx.py)."""

import pytest

from jax_mxfp4 import reference
from jax_mxfp4.kernels import base as kernel_base


class RepackKernel(kernel_base.Mxfp4LinearKernel):
    """A test kernel with its own weight layout (transposed, bits inverted) that counts preparations."""

    description = "test: inverted, transposed weights"

    def __init__(self, name: str):
        self.name = name
        self.prepares = 0

    def is_supported(self, device):
        return True, ""

    def can_implement(self, config):
        return True, ""

    def prepare_weights(self, w_packed, w_scales, config):
        self.prepares += 1
        return kernel_base.PreparedWeights({"tiles": ~w_packed.T, "scales": w_scales}, self.name, config)

    def matmul(self, x, weights):
        return reference.matmul_reference(x, ~weights.arrays["tiles"].T, weights.arrays["scales"])


def repack_kernel_fixture(name: str):
    """A fixture yielding a ``RepackKernel`` called ``name``, registered for the test's duration."""

    @pytest.fixture
    def repack_kernel():
        kernel = RepackKernel(name)
        kernel_base.REGISTRY.append(kernel)
        yield kernel
        kernel_base.REGISTRY.remove(kernel)

    return repack_kernel
