"""SM100 W4A4 path on the host: CUTLASS's own scale layout, weight prep, selection, shapes,
and the GEMM custom call's CPU handler against the reference.

The kernel itself is compiled for sm_100a only and no Blackwell GPU is
reachable; these tests prove what can be proven without one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp4
from jax_mxfp4 import _native, kernels, layout, reference
from jax_mxfp4.kernels import LinearConfig
from jax_mxfp4.kernels.cutlass_sm100 import w4a4_linear
from jax_mxfp4.kernels.sm100_weights import prepare_sm100_weights

ROWS = [1, 127, 128, 129, 200, 1024]
KS = [32, 64, 128, 160, 4096, 4128]

needs_cutlass_layout = pytest.mark.skipif(
    not _native.ext.has_cutlass_layout,
    reason="this build has no CUTLASS host layout code (no CUDA toolkit headers at install time)",
)


@needs_cutlass_layout
@pytest.mark.parametrize("operand", ["a", "b"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", KS)
def test_swizzled_layout_equals_cutlass_layout(operand, rows, k):
    """Element by element: our swizzled_128x4 offsets == CUTLASS Sm1xxBlkScaledConfig's SFA/SFB."""
    cutlass = np.asarray(_native.ext.cutlass_scale_factor_offsets(rows, k, operand), np.int64)
    ours = layout.swizzled_offsets_table(rows, k).reshape(-1)
    assert cutlass.shape == ours.shape
    np.testing.assert_array_equal(cutlass, ours)
    assert _native.ext.cutlass_scale_factor_bytes(rows, k, operand) == np.prod(
        layout.scale_shape(rows, k, "swizzled_128x4"))


@pytest.mark.parametrize("n", [1, 31, 127, 128, 129, 200, 4096 + 32])
@pytest.mark.parametrize("k", [32, 160, 4128])
def test_weight_prep_pads_n_to_128_with_the_padded_shape(n, k, rng):
    """N % 128 != 0: scales padded to 128 rows, permuted with the padded size (the vLLM review bug)."""
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    wp, ws = reference.quantize_reference(w)
    prepared = jax.jit(prepare_sm100_weights)(wp, ws)
    assert prepared["scales"].shape == layout.scale_shape(n, k, "swizzled_128x4")
    assert prepared["scales"].shape[0] == -(-n // 128) * 128
    np.testing.assert_array_equal(np.asarray(prepared["packed"]), np.asarray(wp))
    flat = np.asarray(prepared["scales"]).reshape(-1)
    offsets = layout.swizzled_offsets_table(n, k)
    np.testing.assert_array_equal(flat[offsets], np.asarray(ws))
    if _native.ext.has_cutlass_layout:
        cutlass = np.asarray(_native.ext.cutlass_scale_factor_offsets(n, k, "b"), np.int64).reshape(offsets.shape)
        np.testing.assert_array_equal(flat[cutlass], np.asarray(ws))
    pad = np.ones(flat.size, bool)
    pad[offsets.reshape(-1)] = False
    assert not flat[pad].any()


def test_not_selected_on_cpu_with_reason():
    config = LinearConfig(in_features=256, out_features=256, activation_format="mxfp4")
    sel = kernels.select_kernel(config)
    reasons = dict(sel.skipped)
    assert "cutlass_sm100" in reasons and "compute capability 10.0" in reasons["cutlass_sm100"]
    assert sel.kernel.name != "cutlass_sm100"
    with pytest.raises(kernels.KernelUnavailableError, match="cutlass_sm100"):
        kernels.select_kernel(config, kernel="cutlass_sm100")


def test_w4a16_layers_are_refused():
    ok, reason = kernels.get_kernel("cutlass_sm100").can_implement(LinearConfig(256, 256))
    assert not ok and "W4A4 only" in reason


@pytest.mark.skipif(not _native.ext.has_sm100_gemm, reason="this build has no SM100 kernel (no nvcc >= 12.8)")
def test_can_implement_preconditions():
    ok, _ = _native.ext.sm100_w4a4_can_implement(200, 5760, 2880)
    assert ok
    ok, reason = _native.ext.sm100_w4a4_can_implement(16, 100, 256)  # N % 8 != 0
    assert not ok and reason
    assert _native.ext.sm100_w4a4_workspace_bytes(16, 100, 256) == -1


@pytest.mark.parametrize("m", [1, 127, 200, 300])
def test_w4a4_linear_abstract_eval(m, rng):
    """One jitted quantize-swizzled -> GEMM function; shapes right for M % 128 != 0."""
    n, k = 200, 160
    wp, ws = reference.quantize_reference(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
    prepared = prepare_sm100_weights(wp, ws)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    out = jax.eval_shape(lambda v: w4a4_linear(v, prepared["packed"], prepared["scales"]), x)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    jaxpr = jax.make_jaxpr(lambda v: w4a4_linear(v, prepared["packed"], prepared["scales"]))(x)
    quant = [e for e in jaxpr.eqns if e.primitive.name == "mxfp4_quantize"][0]
    assert quant.outvars[1].aval.shape == layout.scale_shape(m, k, "swizzled_128x4")
    x3 = jax.ShapeDtypeStruct((2, m, k), jnp.bfloat16)  # leading dims fold into M
    assert jax.eval_shape(lambda v: w4a4_linear(v, prepared["packed"], prepared["scales"]), x3).shape == (2, m, n)


def test_w4a4_layer_on_cpu_runs_fake_quantized(rng):
    """Off Blackwell, a W4A4 layer = quantize activations (same rounding) -> W4A16 kernel."""
    wp, ws = reference.quantize_reference(jnp.asarray(rng.standard_normal((64, 128)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)
    y = jax_mxfp4.mxfp4_matmul(x, wp, ws, activation_format="mxfp4", activation_rounding="rceil")
    want = reference.matmul_reference(x, wp, ws, activation_format="mxfp4", activation_rounding="rceil")
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (7, 200, 4160), (300, 512, 256), (129, 8, 32)])
def test_gemm_cpu_handler_matches_reference(m, n, k, rng):
    """The custom call on CPU devices (csrc/ffi_cpu.cc): quantize x with swizzled scales, then
    the W4A4 GEMM; within matmul_tolerance of the reference on the fake-quantized x."""
    wp, ws = reference.quantize_reference(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
    prepared = prepare_sm100_weights(wp, ws)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    f = jax.jit(lambda v: w4a4_linear(v, prepared["packed"], prepared["scales"]))
    assert "jax_mxfp4_sm100_w4a4_gemm" in f.lower(x).as_text()
    y = f(x)
    want = reference.matmul_reference(x, wp, ws, activation_format="mxfp4", out_dtype=jnp.bfloat16)
    tol = reference.matmul_tolerance(reference.fake_quantize_reference(x), wp, ws, jnp.bfloat16)
    err = np.abs(np.asarray(y, np.float64) - np.asarray(want, np.float64))
    assert y.dtype == jnp.bfloat16 and np.all(err <= np.asarray(tol)), float(np.max(err - tol))


def test_bad_operands_raise():
    a = jnp.zeros((200, 80), jnp.uint8)
    b = jnp.zeros((64, 80), jnp.uint8)
    good_a = jnp.zeros(layout.scale_shape(200, 160, "swizzled_128x4"), jnp.uint8)
    good_b = jnp.zeros(layout.scale_shape(64, 160, "swizzled_128x4"), jnp.uint8)
    from jax_mxfp4.primitives.sm100_gemm import sm100_w4a4_gemm
    with pytest.raises(ValueError, match=r"a_scales has shape \(200, 5\) but 200 rows of K=160 need the padded"):
        jax.eval_shape(sm100_w4a4_gemm, a, jnp.zeros((200, 5), jnp.uint8), b, good_b)
    with pytest.raises(ValueError, match="same K"):
        jax.eval_shape(sm100_w4a4_gemm, a, good_a, jnp.zeros((64, 96), jnp.uint8), good_b)
