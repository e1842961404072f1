"""The Marlin W4A16 kernel: selection, the CPU handlers of its two custom calls, the CUDA kernels.

GEMM tests compare against ``reference.matmul_reference`` within
``reference.matmul_tolerance`` (float32 accumulation-order bound + one output
ulp): on the GPU at every benchmark shape and at odd ones (N not a multiple
of 64/128, M = 1, 7, 33, 129; on Hopper the wgmma and mma.sync tile
configurations side by side), on CPU (``csrc/marlin/marlin_cpu.cc``) at the
odd shapes, for bfloat16 and float16, with fresh random data. The dense
dequantization of prepared weights is compared bit for bit on both.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mxfp4
from jax_mxfp4 import kernels, reference
from jax_mxfp4.kernels import LinearConfig, marlin_weights
from jax_mxfp4.kernels import marlin as marlin_module
from jax_mxfp4.primitives import marlin_dequantize

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Tests of the custom calls that run on both platforms (the gpu mark moves them to the GPU).
PLATFORMS = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]
BENCH_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (2880, 5760)]  # (K, N)
# (K, N) residues; (544, 16424): the smalln row (N >= 16384) with a partial last
# n tile (514 units of 32 in tiles of 8) and a partial last k tile.
ODD_SHAPES = [(4160, 200), (96, 96), (2880, 5760 + 32), (1024, 130), (64, 1), (544, 16424)]


def random_weights(rng, n, k):
    """Random MXFP4 weights (random codes, scale bytes 119..127) built directly: no compile."""
    codes = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
    scales = rng.integers(119, 128, size=(n, k // 32), dtype=np.uint8)
    return jnp.asarray(codes), jnp.asarray(scales)


def host_reference(x, wp, ws):
    """(reference, tolerance) in float64 numpy on the host: reference.matmul_reference's math
    (exact dequantization, then an exact-enough float64 product) and matmul_tolerance's bound."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        w = np.asarray(reference.dequantize_reference(jax.device_put(wp, cpu), jax.device_put(ws, cpu),
                                                      dtype=jnp.float32), np.float64)
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64).reshape(-1, w.shape[1])
    want = x64 @ w.T
    k = w.shape[1]
    eps32, ulp_out = np.finfo(np.float32).eps, float(jnp.finfo(x.dtype).eps)
    tol = k * eps32 * (np.abs(x64) @ np.abs(w).T) + 2 * ulp_out * np.abs(want) + np.finfo(np.float32).tiny
    return want, tol


def check_against_reference(y, x, wp, ws):
    """y vs the reference within the accumulation-order bound (plus one output rounding each side)."""
    want, tol = host_reference(x, wp, ws)
    got = np.asarray(jnp.asarray(y, jnp.float32), np.float64).reshape(want.shape)
    assert np.all(np.isfinite(got)), "non-finite output (unwritten or overflowed elements)"
    # The reference output itself is rounded to x's dtype once: allow that rounding too.
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


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(200, 4160), (96, 96), (33, 64)])
def test_dense_path_matches_reference(platform, dtype, n, k, rng):
    """The large-M path (marlin_dequantize -> dot) is exact to the reference's math."""
    wp, ws = random_weights(rng, n, k)
    config = LinearConfig(k, n, activation_dtype=DTYPES[dtype])
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, config)
    x = jnp.asarray(rng.standard_normal((5, k)), DTYPES[dtype])
    check_against_reference(jax.jit(kernel.dense_matmul)(x, prepared), x, wp, ws)


def test_large_m_runs_the_dense_path(rng):
    """From dense_from_tokens() rows on (a measured crossover per device and layer size)
    the layer is dequantize + dot."""
    from jax_mxfp4.kernels import marlin

    wp, ws = random_weights(rng, 64, 128)
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, LinearConfig(128, 64))
    dense_from = marlin.dense_from_tokens(prepared.config)
    assert dense_from is not None

    def primitives(m):
        jaxpr = jax.make_jaxpr(kernel.matmul)(jax.ShapeDtypeStruct((m, 128), jnp.bfloat16), prepared)
        return {e.primitive.name for e in jaxpr.jaxpr.eqns}

    assert "mxfp4_marlin_gemm" in primitives(dense_from - 1)
    assert "mxfp4_marlin_gemm" not in primitives(dense_from)


def test_dense_crossover_per_device_and_layer_size():
    """DENSE_CROSSOVER: the row with the largest weight count <= N x K applies; devices
    without rows take their instruction path's crossover."""
    import types

    from jax_mxfp4.kernels import marlin

    h100, h200 = (types.SimpleNamespace(device_kind=kind, platform="gpu")
                  for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"))
    small, mid, edge, big = (LinearConfig(4096, 4096), LinearConfig(4096, 14336),
                             LinearConfig(8192, 8192), LinearConfig(8192, 28672))
    assert [marlin.dense_from_tokens(c, h100) for c in (small, mid, edge, big)] == [384, 768, 768, 1025]
    assert [marlin.dense_from_tokens(c, h200) for c in (small, mid, edge, big)] == [384, 513, 513, 513]
    # exactly at a row's bound: that row
    assert marlin.dense_from_tokens(LinearConfig(4096, 8192), h100) == 768  # 2^25 weights
    assert marlin.dense_from_tokens(LinearConfig(4096, 8160), h100) == 384
    for rows in marlin.DENSE_CROSSOVER.values():
        assert rows[0][0] == 0 and list(rows) == sorted(rows)  # every size has a row
    # the default device here (CPU) has no row and no wgmma: the mma.sync crossover
    assert marlin.dense_from_tokens(big) == marlin.DENSE_FROM_TOKENS_MMA_SYNC
    a100_on_cpu = types.SimpleNamespace(device_kind="NVIDIA A100-SXM4-80GB", platform="cpu")  # no wgmma
    assert marlin.dense_from_tokens(big, a100_on_cpu) == marlin.DENSE_FROM_TOKENS_MMA_SYNC


def test_selection_report_says_which_path_runs():
    """explain_selection's "path" line: which side of the device's crossover a layer of M
    tokens is on (the Marlin kernel or dequantize + cuBLAS), and why."""
    import types

    from jax_mxfp4.kernels import marlin

    kernel = kernels.get_kernel("marlin")
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    big = LinearConfig(8192, 28672, tokens=512)
    assert kernel.describe_path(big, h100) == (
        "the Marlin kernel: M = 512 < 1025, the crossover for 28672 x 8192 weights on NVIDIA H100 80GB HBM3 "
        "(DENSE_CROSSOVER)")
    assert kernel.describe_path(LinearConfig(8192, 28672, tokens=1025), h100).startswith(
        "dequantize + cuBLAS: M = 1025 >= 1025")
    assert kernel.describe_path(LinearConfig(8192, 28672), h100).startswith(
        "the Marlin kernel below M = 1025, dequantize + cuBLAS from it")
    assert "M = 512 >= 384" in kernel.describe_path(LinearConfig(4096, 4096, tokens=512), h100)
    # A device without a row: its instruction path's crossover, no table named.
    other = types.SimpleNamespace(device_kind="cpu", platform="cpu")
    assert kernel.describe_path(big, other) == (
        f"dequantize + cuBLAS: M = 512 >= {marlin.DENSE_FROM_TOKENS_MMA_SYNC}, the crossover for 28672 x 8192 "
        "weights on cpu")
    # The report carries it (forced: this CPU cannot run the kernel, so selection would refuse it).
    report = kernels.KernelSelection(kernel, (), "argument", kernel.describe_path(big, h100)).explain()
    assert report.splitlines()[1] == "  path: " + kernel.describe_path(big, h100)
    # Kernels with one path add no line.
    assert "path:" not in jax_mxfp4.explain_selection((4, 64), jnp.bfloat16, (8, 64))


def test_two_ctas_per_sm_only_where_measured():
    """TWO_CTAS_PER_SM: M <= 8 and N x K >= 2^26 on the devices listed (the H200), one CTA
    per SM everywhere else (the H100 measured slower with two)."""
    plan = marlin_module.planned_ctas_per_sm
    big, edge, small = LinearConfig(8192, 28672), LinearConfig(8192, 8192), LinearConfig(4096, 14336)
    assert plan(8, big, "NVIDIA H200") == 2 and plan(1, edge, "NVIDIA H200") == 2
    assert plan(9, big, "NVIDIA H200") == 1  # smalln / small (smalln does not fit twice)
    assert plan(8, small, "NVIDIA H200") == 1  # 4096 x 14336 < 2^26 weights
    assert plan(1, big, "NVIDIA H100 80GB HBM3") == 1 and plan(1, big, "cpu") == 1


def test_two_ctas_per_sm_plan_is_traced_with_its_workspace(rng):
    """The CTAs per SM reach the custom call as its sm_count attribute (which sizes the
    launch's grid and workspace): twice the SM count when two are asked for, and the
    planned count (one on this device) by default."""
    wp, ws = random_weights(rng, 64, 128)
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, LinearConfig(128, 64))
    x = jax.ShapeDtypeStruct((4, 128), jnp.bfloat16)

    def sm_counts(**kw):
        jaxpr = jax.make_jaxpr(functools.partial(kernel.kernel_matmul, **kw))(x, prepared)
        return [e.params["sm_count"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "mxfp4_marlin_gemm"]

    one, two = sm_counts(ctas_per_sm=1), sm_counts(ctas_per_sm=2)
    assert len(one) == 1 and two == [2 * one[0]]
    assert sm_counts() == one  # the default device here is not in TWO_CTAS_PER_SM


def test_abstract_eval_of_the_kernel_call(rng):
    wp, ws = random_weights(rng, 200, 4160)
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, LinearConfig(4160, 200))
    for shape in [(1, 4160), (7, 4160), (3, 43, 4160)]:
        out = jax.eval_shape(kernel.matmul, jax.ShapeDtypeStruct(shape, jnp.bfloat16), prepared)
        assert out.shape == (*shape[:-1], 200) and out.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="prepared for K=4160"):
        jax.eval_shape(kernel.matmul, jax.ShapeDtypeStruct((2, 4096), jnp.bfloat16), prepared)
    # The large-M path's dense dequantization: [N, K] in the prepared dtype.
    out = jax.eval_shape(kernel.dense_matmul, jax.ShapeDtypeStruct((5000, 4160), jnp.bfloat16), prepared)
    assert out.shape == (5000, 200) and out.dtype == jnp.bfloat16
    layout = marlin_weights.marlin_layout(200, 4160, jnp.bfloat16)
    w = jax.eval_shape(lambda t, s: marlin_dequantize.marlin_dequantize(t, s, layout), prepared.arrays["tiles"],
                       prepared.arrays["scales"])
    assert w.shape == (200, 4160) and w.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"tiles has shape \(129, 3584\) but a Marlin weight of N=200, K=4160 has \(130, 3584\)"):
        jax.eval_shape(lambda t, s: marlin_dequantize.marlin_dequantize(t, s, layout),
                       jax.ShapeDtypeStruct((129, 3584), jnp.uint8), prepared.arrays["scales"])


# ---------------------------------------------------------------------------
# GPU: the CUDA kernel.


def marlin_apply(x, wp, ws, **kwargs):
    prepared = jax_mxfp4.prepare_weights(wp, ws, activation_dtype=x.dtype, kernel="marlin", **kwargs)
    f = jax.jit(jax_mxfp4.mxfp4_linear)
    assert "jax_mxfp4_marlin_gemm" in f.lower(x, prepared).as_text()
    return f(x, prepared)


# ---------------------------------------------------------------------------
# CPU: the Marlin custom calls' CPU handlers (csrc/marlin/marlin_cpu.cc).


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", ODD_SHAPES[:2] + ODD_SHAPES[3:])
def test_cpu_handler_matches_reference(dtype, k, n, rng):
    """The GEMM custom call on CPU devices, M = 1, 7, 33 (the registry never picks Marlin
    there; the kernel prepares the weights directly). It is the canonical CPU GEMM on the
    unprepared weights, bit for bit (special scales too: NaN blocks, flushed blocks, huge
    and subnormal scales), and within the tolerance of the reference for random weights."""
    kernel = kernels.get_kernel("marlin")
    f = jax.jit(jax_mxfp4.mxfp4_linear)
    for special in (False, True):
        wp, ws = special_scale_weights(rng, max(n, 6), k) if special else random_weights(rng, n, k)
        config = LinearConfig(k, int(wp.shape[0]), activation_dtype=DTYPES[dtype])
        prepared = kernel.prepare_weights(wp, ws, config)
        up, us = marlin_weights.unprepare_marlin_weights(prepared.arrays["tiles"], prepared.arrays["scales"],
                                                         marlin_weights.marlin_layout(config.out_features, k,
                                                                                      DTYPES[dtype]))
        for m in (1, 7, 33):
            x = jnp.asarray(rng.standard_normal((m, k)), DTYPES[dtype])
            assert "jax_mxfp4_marlin_gemm" in f.lower(x, prepared).as_text()
            y = f(x, prepared)
            want = jax.jit(lambda a: jax_mxfp4.mxfp4_matmul(a, up, us, kernel="cpu"))(x)
            np.testing.assert_array_equal(np.asarray(y).view(np.uint16), np.asarray(want).view(np.uint16))
            if not special:
                check_against_reference(y, x, wp, ws)


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
def test_cuda_kernel_matches_reference(dtype, k, n, rng):
    """Every benchmark shape and odd ones, M = 1, 7, 8 (small8), 16 (small), 33, 129 (one
    prepared weight per shape)."""
    wp, ws = random_weights(rng, n, k)
    prepared = jax_mxfp4.prepare_weights(wp, ws, activation_dtype=DTYPES[dtype], kernel="marlin")
    f = jax.jit(jax_mxfp4.mxfp4_linear)
    for m in (1, 7, 8, 16, 33, 129):
        x = jnp.asarray(rng.standard_normal((m, k)), DTYPES[dtype])
        if m == 1:
            assert "jax_mxfp4_marlin_gemm" in f.lower(x, prepared).as_text()
        check_against_reference(f(x, prepared), x, wp, ws)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [256, 640, 1024])
def test_cuda_kernel_large_m(m, rng):
    """The kernel itself at large M (``matmul`` dispatches M >= dense_from_tokens(config) to the
    dense path)."""
    wp, ws = random_weights(rng, 5760, 2880)
    x = jnp.asarray(rng.standard_normal((m, 2880)), jnp.bfloat16)
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, LinearConfig(2880, 5760))
    f = jax.jit(kernel.kernel_matmul)
    assert "jax_mxfp4_marlin_gemm" in f.lower(x, prepared).as_text()
    check_against_reference(f(x, prepared), x, wp, ws)


@pytest.mark.gpu
def test_cuda_dispatch_on_both_sides_of_the_crossover(rng):
    """A layer of 2^25 weights (DENSE_CROSSOVER's upper row) on this device: one row below
    the crossover runs the kernel, from it the dense path, both against the reference."""
    from jax_mxfp4.kernels import marlin

    k, n = 4096, 8192
    wp, ws = random_weights(rng, n, k)
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, LinearConfig(k, n))
    dense_from = marlin.dense_from_tokens(prepared.config)
    f = jax.jit(kernel.matmul)
    for m, on_kernel in ((dense_from - 1, True), (dense_from, False)):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        assert ("jax_mxfp4_marlin_gemm" in f.lower(x, prepared).as_text()) == on_kernel, m
        check_against_reference(f(x, prepared), x, wp, ws)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(4160, 200), (96, 96), (2912, 5792), (8192, 8192)])
def test_cuda_wgmma_and_mma_sync_configs(k, n, rng):
    """Hopper runs M > 32 on the wgmma tile configurations (wgmma64: M <= 64, then 128-row
    chunks: wgmma128 where a cluster plan fits, else the warp-specialized wgmma128ws), the
    mma.sync ones stay selectable (M <= 32 runs mma.sync
    either way: small8 to M = 8, then small, medium): both against the
    reference at M around each boundary, with residues in N (not a multiple of the
    256-feature tile) and K (an odd number of 32-blocks: a half k tile), and the split-K
    wgmma launch bit-identical when repeated."""
    if not marlin_module._has_wgmma():
        pytest.skip("the wgmma tile configurations need a compute capability 9.0 GPU (sm_90a)")
    wp, ws = random_weights(rng, n, k)
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, LinearConfig(k, n))
    f_wgmma = jax.jit(functools.partial(kernel.kernel_matmul, wgmma=True))
    f_sync = jax.jit(functools.partial(kernel.kernel_matmul, wgmma=False))
    for m in (1, 8, 9, 32, 33, 64, 65, 128, 300):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        y = f_wgmma(x, prepared)
        check_against_reference(y, x, wp, ws)
        check_against_reference(f_sync(x, prepared), x, wp, ws)
        np.testing.assert_array_equal(np.asarray(f_wgmma(x, prepared)), np.asarray(y))


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
        cpu = jax.devices("cpu")[0]
        with jax.default_device(cpu):
            xq = reference.fake_quantize_reference(jax.device_put(x, cpu), rounding=rounding)
        check_against_reference(y, xq, wp, ws)


def special_scale_weights(rng, n, k):
    """Random codes with scale rows that exercise the prepared layout's scale mapping: NaN
    blocks, rows spanning more than the multiplier's range (flushed blocks), E8M0 bytes 0, 1
    and 254 (subnormal and huge values), and float16 overflow."""
    wp, ws = random_weights(rng, n, k)
    ws = np.array(ws)
    kb = k // 32
    ws[0, :] = 254                              # huge: Inf in float16, exact in bfloat16
    ws[1, :] = np.arange(kb) % 256              # 0, 1, 2, ...: the row spans far more than 2^30
    ws[2, kb // 2] = 0xFF                       # a NaN block
    ws[3, :] = 0                                # all subnormal (2^-127 scale)
    ws[4, :] = rng.integers(0, 255, size=kb)    # anything
    ws[5 % n, 0] = 1
    return wp, jnp.asarray(ws)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(200, 4160), (8, 8192), (1024, 2048)])
def test_marlin_dequantize_is_exact(platform, dtype, n, k, rng):
    """marlin_dequantize(prepared) == dequantize_reference(unprepare(prepared)), bit for bit
    (NaN blocks compared as NaN), for random and special scales."""
    for wp, ws in (random_weights(rng, n, k), special_scale_weights(rng, n, k)):
        tiles, scales, layout = marlin_weights.prepare_marlin_weights(wp, ws, DTYPES[dtype])
        got = jax.jit(lambda t, s: marlin_dequantize.marlin_dequantize(t, s, layout))(tiles, scales)
        cpu = jax.devices("cpu")[0]
        with jax.default_device(cpu):
            up, us = marlin_weights.unprepare_marlin_weights(jax.device_put(tiles, cpu), jax.device_put(scales, cpu),
                                                             layout)
            want = reference.dequantize_reference(up, us, dtype=DTYPES[dtype])
        g = np.asarray(got).view(np.uint16)
        w_ = np.asarray(want).view(np.uint16)
        nan = np.isnan(np.asarray(want, np.float32))
        assert np.array_equal(np.isnan(np.asarray(got, np.float32)), nan)
        bad = (g != w_) & ~nan
        assert not bad.any(), f"{bad.sum()} elements differ, first at {np.argwhere(bad)[0]}"


@pytest.mark.gpu
def test_cuda_dense_path_matches_kernel(rng):
    wp, ws = random_weights(rng, 1024, 2048)
    kernel = kernels.get_kernel("marlin")
    prepared = kernel.prepare_weights(wp, ws, LinearConfig(2048, 1024))
    x = jnp.asarray(rng.standard_normal((64, 2048)), jnp.bfloat16)
    check_against_reference(jax.jit(kernel.dense_matmul)(x, prepared), x, wp, ws)
    check_against_reference(jax.jit(kernel.matmul)(x, prepared), x, wp, ws)


