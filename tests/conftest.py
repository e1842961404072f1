"""Shared test configuration.

GPU tests carry the ``gpu`` marker and are skipped, with the reason shown in
the summary (``pytest -rs``), when jax has no CUDA device; on a GPU machine
they run on the GPU (see README, "Testing on a GPU"). Every other test runs
with the CPU as jax's default device, also on a GPU machine, so the CPU
custom calls are what they test wherever the suite runs.
"""

import os

import hypothesis
import jax
import numpy as np
import pytest

hypothesis.settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
hypothesis.settings.register_profile("thorough", max_examples=2000, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def has_cuda_device() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda_device():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: jax sees no 'gpu' devices here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


@pytest.fixture(autouse=True)
def _default_device(request):
    if "gpu" in request.keywords:
        with jax.default_device(jax.devices("gpu")[0]):
            yield
    else:
        with jax.default_device(jax.devices("cpu")[0]):
            yield
