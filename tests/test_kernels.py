"""Kernel registry and selection on CPU: reasons, forcing, and refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp4
from jax_mxfp4 import kernels, reference
from jax_mxfp4.kernels import KernelUnavailableError, LinearConfig


def test_registry_order_and_names():
    names = [k.name for k in kernels.REGISTRY]
    assert names[-1] == "xla"  # the universal fallback is last
    assert len(set(names)) == len(names)


def test_cpu_device_selects_cpu_kernel_with_reasons():
    sel = kernels.select_kernel(LinearConfig(in_features=64, out_features=8))
    assert sel.kernel.name == "cpu"
    assert sel.forced_by is None
    skipped = dict(sel.skipped)
    assert set(skipped) == {k.name for k in kernels.REGISTRY[: [k.name for k in kernels.REGISTRY].index("cpu")]}
    for reason in skipped.values():
        assert reason  # every skipped kernel says why
    assert "kernel 'cpu'" in sel.explain()


def test_env_var_forces_kernel(monkeypatch):
    monkeypatch.setenv("JAX_MXFP4_KERNEL", "xla")
    sel = kernels.select_kernel(LinearConfig(in_features=64, out_features=8))
    assert sel.kernel.name == "xla" and sel.forced_by == "JAX_MXFP4_KERNEL"
    # The argument takes precedence over the environment.
    assert kernels.select_kernel(LinearConfig(64, 8), kernel="cpu").kernel.name == "cpu"


def test_env_var_unknown_kernel(monkeypatch):
    monkeypatch.setenv("JAX_MXFP4_KERNEL", "magic")
    with pytest.raises(ValueError, match="unknown MXFP4 kernel 'magic'; registered kernels"):
        kernels.select_kernel(LinearConfig(64, 8))


def test_forced_kernel_that_cannot_run_is_an_error():
    class Never(kernels.Mxfp4LinearKernel):
        name = "never"
        description = "test kernel"

        def is_supported(self, device):
            return False, "never runs anywhere"

        def can_implement(self, config):
            return True, ""

        def prepare_weights(self, w_packed, w_scales, config):
            raise AssertionError

        def matmul(self, x, weights):
            raise AssertionError

    kernels.REGISTRY.insert(0, Never())
    try:
        with pytest.raises(KernelUnavailableError, match="'never' \\(forced by argument\\) cannot run.*never runs anywhere"):
            kernels.select_kernel(LinearConfig(64, 8), kernel="never")
        sel = kernels.select_kernel(LinearConfig(64, 8))
        assert dict(sel.skipped)["never"] == "never runs anywhere"
    finally:
        kernels.REGISTRY.pop(0)


def test_prepared_weights_for_another_kernel_are_refused():
    wp, ws = reference.quantize_reference(jnp.ones((8, 64), jnp.float32))
    prepared = jax_mxfp4.prepare_weights(wp, ws, kernel="xla")
    with pytest.raises(ValueError, match="prepared for kernel 'xla' but are applied with 'cpu'"):
        kernels.get_kernel("cpu").apply(jnp.ones((1, 64), jnp.bfloat16), prepared)


def test_prepared_weights_are_a_pytree():
    wp, ws = reference.quantize_reference(jnp.ones((8, 64), jnp.float32))
    prepared = jax_mxfp4.prepare_weights(wp, ws)
    leaves, tree = jax.tree_util.tree_flatten(prepared)
    assert len(leaves) == 2
    again = jax.tree_util.tree_unflatten(tree, leaves)
    assert again.kernel == prepared.kernel and again.config == prepared.config


def test_linear_checks_dtype_and_k():
    wp, ws = reference.quantize_reference(jnp.ones((8, 64), jnp.float32))
    prepared = jax_mxfp4.prepare_weights(wp, ws, activation_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="prepared for bfloat16 activations"):
        jax_mxfp4.mxfp4_linear(jnp.ones((1, 64), jnp.float32), prepared)
    with pytest.raises(ValueError, match="prepared for K=64"):
        jax_mxfp4.mxfp4_linear(jnp.ones((1, 96), jnp.bfloat16), prepared)
    with pytest.raises(TypeError, match="must be PreparedWeights"):
        jax_mxfp4.mxfp4_linear(jnp.ones((1, 64), jnp.bfloat16), (wp, ws))


def test_selection_is_used_by_matmul(monkeypatch):
    wp, ws = reference.quantize_reference(jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)), jnp.float32))
    x = jnp.ones((2, 64), jnp.bfloat16)
    monkeypatch.setenv("JAX_MXFP4_KERNEL", "xla")
    assert "jax_mxfp4_gemm" not in jax.jit(lambda v: jax_mxfp4.mxfp4_matmul(v, wp, ws)).lower(x).as_text()
    monkeypatch.delenv("JAX_MXFP4_KERNEL")
    assert "jax_mxfp4_gemm" in jax.jit(lambda v: jax_mxfp4.mxfp4_matmul(v, wp, ws)).lower(x).as_text()
