"""The Marlin W4A16 kernel: selection and large-M path on CPU, the CUDA kernel on the GPU.

GPU tests compare against ``reference.matmul_reference`` within
``reference.matmul_tolerance`` (float32 accumulation-order bound + one output
ulp) at every benchmark shape and at odd ones (N not a multiple of 64/128,
M = 1, 7, 33, 129), for bfloat16 and float16, with fresh random data.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp4
from jax_mxfp4 import kernels, reference
from jax_mxfp4.kernels import LinearConfig

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
BENCH_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (2880, 5760)]  # (K, N)
ODD_SHAPES = [(4160, 200), (96, 96), (2880, 5760 + 32), (1024, 130), (64, 1)]


def random_weights(rng, n, k):
    w = rng.standard_normal((n, k)) * np.exp2(rng.integers(-8, 1, size=(n, k // 32)).repeat(32, axis=1))
    return reference.quantize_reference(jnp.asarray(w, jnp.float32))


def check_against_reference(y, x, wp, ws):
    """y vs the reference, within the accumulation-order bound (computed on y's device)."""
    want = np.asarray(reference.matmul_reference(x, wp, ws), np.float64)
    tol = np.asarray(reference.matmul_tolerance(x, wp, ws), np.float64)
    got = np.asarray(y, np.float64)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got)), "non-finite output (unwritten or overflowed elements)"
    err = np.abs(got - want)
    bad = err > tol
    assert not bad.any(), (f"{bad.sum()} of {bad.size} elements out of tolerance; worst excess "
                           f"{np.max(err - tol):.3g}, rel {np.linalg.norm(got - want) / np.linalg.norm(want):.3g}")


# ---------------------------------------------------------------------------
# CPU: selection and the dense (large-M) path.


def test_not_selected_on_cpu_with_reason():
    sel = kernels.select_kernel(LinearConfig(4096, 4096))
    assert "marlin" in dict(sel.skipped) and "CUDA GPU" in dict(sel.skipped)["marlin"]
    with pytest.raises(kernels.KernelUnavailableError, match="'marlin' \\(forced by argument\\) cannot run"):
        kernels.select_kernel(LinearConfig(4096, 4096), kernel="marlin")


def test_float32_activations_are_refused():
    ok, reason = kernels.get_kernel("marlin").can_implement(LinearConfig(256, 256, activation_dtype=jnp.float32))
    assert not ok and "bfloat16/float16" in reason


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(200, 4160), (96, 96), (33, 64)])
def test_dense_path_matches_reference(dtype, n, k, rng):
    """The large-M path (unprepare -> dequantize -> dot) is exact to the reference's math."""
    wp, ws = random_weights(rng, n, k)
    config = LinearConfig(k, n, activation_dtype=DTYPES[dtype])
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, config)
    x = jnp.asarray(rng.standard_normal((5, k)), DTYPES[dtype])
    check_against_reference(jax.jit(kernel.dense_matmul)(x, prepared), x, wp, ws)


def test_abstract_eval_of_the_kernel_call(rng):
    wp, ws = random_weights(rng, 200, 4160)
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, LinearConfig(4160, 200))
    for shape in [(1, 4160), (7, 4160), (3, 43, 4160)]:
        out = jax.eval_shape(kernel.matmul, jax.ShapeDtypeStruct(shape, jnp.bfloat16), prepared)
        assert out.shape == (*shape[:-1], 200) and out.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="prepared for K=4160"):
        jax.eval_shape(kernel.matmul, jax.ShapeDtypeStruct((2, 4096), jnp.bfloat16), prepared)


# ---------------------------------------------------------------------------
# GPU: the CUDA kernel.


def marlin_apply(x, wp, ws, **kwargs):
    prepared = jax_mxfp4.prepare_weights(wp, ws, activation_dtype=x.dtype, kernel="marlin", **kwargs)
    f = jax.jit(jax_mxfp4.mxfp4_linear)
    assert "jax_mxfp4_marlin_gemm" in f.lower(x, prepared).as_text()
    return f(x, prepared)


@pytest.mark.gpu
def test_selected_on_hopper_with_reasons():
    sel = kernels.select_kernel(LinearConfig(4096, 4096))
    assert sel.kernel.name == "marlin", sel.explain()
    reasons = dict(sel.skipped)
    assert "compute capability" in reasons["cutlass_sm100"]
    w4a4 = kernels.select_kernel(LinearConfig(4096, 4096, activation_format="mxfp4"))
    assert w4a4.kernel.name == "marlin" and "compute capability 10.0" in dict(w4a4.skipped)["cutlass_sm100"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", BENCH_SHAPES + ODD_SHAPES)
@pytest.mark.parametrize("m", [1, 7, 33, 129])
def test_cuda_kernel_matches_reference(dtype, k, n, m, rng):
    wp, ws = random_weights(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), DTYPES[dtype])
    check_against_reference(marlin_apply(x, wp, ws), x, wp, ws)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [256, 1024])
def test_cuda_kernel_large_m(m, rng):
    wp, ws = random_weights(rng, 5760, 2880)
    x = jnp.asarray(rng.standard_normal((m, 2880)), jnp.bfloat16)
    check_against_reference(marlin_apply(x, wp, ws), x, wp, ws)


@pytest.mark.gpu
def test_cuda_kernel_repeated_calls_are_identical(rng):
    """Split-K reductions run in a fixed order: the same input gives the same bits (no races)."""
    wp, ws = random_weights(rng, 8192, 8192)
    x = jnp.asarray(rng.standard_normal((4, 8192)), jnp.bfloat16)
    first = np.asarray(marlin_apply(x, wp, ws))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(marlin_apply(x, wp, ws)), first)


@pytest.mark.gpu
def test_cuda_batched_and_vmapped(rng):
    wp, ws = random_weights(rng, 384, 256)
    prepared = jax_mxfp4.prepare_weights(wp, ws, kernel="marlin")
    x = jnp.asarray(rng.standard_normal((3, 5, 256)), jnp.bfloat16)
    y = jax.jit(jax_mxfp4.mxfp4_linear)(x, prepared)
    check_against_reference(y.reshape(15, 384), x.reshape(15, 256), wp, ws)
    yv = jax.jit(jax.vmap(lambda a: jax_mxfp4.mxfp4_linear(a, prepared)))(x)
    np.testing.assert_array_equal(np.asarray(yv), np.asarray(y))


@pytest.mark.gpu
def test_cuda_w4a4_layer_runs_fake_quantized_on_marlin(rng):
    wp, ws = random_weights(rng, 256, 512)
    x = jnp.asarray(rng.standard_normal((9, 512)), jnp.bfloat16)
    for rounding in ["floor", "rceil", "compressed_tensors"]:
        y = jax.jit(lambda a: jax_mxfp4.mxfp4_matmul(a, wp, ws, activation_format="mxfp4",
                                                     activation_rounding=rounding))(x)
        xq = reference.fake_quantize_reference(x, rounding=rounding)
        check_against_reference(y, xq, wp, ws)


@pytest.mark.gpu
def test_cuda_dense_path_matches_kernel(rng):
    wp, ws = random_weights(rng, 1024, 2048)
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, LinearConfig(2048, 1024))
    x = jnp.asarray(rng.standard_normal((64, 2048)), jnp.bfloat16)
    check_against_reference(jax.jit(kernel.dense_matmul)(x, prepared), x, wp, ws)
    check_against_reference(jax.jit(kernel.matmul)(x, prepared), x, wp, ws)


