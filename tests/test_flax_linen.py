"""MxFp4Dense: nn.Dense's arguments and call with MXFP4 params; prepare-once."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_mxfp4
from jax_mxfp4 import reference
from jax_mxfp4.flax import PREPARED_COLLECTION, MxFp4Dense, canonical_params, prepare
from jax_mxfp4.kernels import base as kernel_base

from flax_helpers import repack_kernel_fixture


repack_kernel = repack_kernel_fixture("test_repack_linen")


def dequantized(params, dtype=jnp.float32):
    return jax_mxfp4.dequantize_mxfp4(params["weight_packed"], params["weight_scale"], dtype=dtype)


def test_params_are_the_quantized_kernel_nn_dense_would_draw(rng):
    x = jnp.asarray(rng.standard_normal((3, 5, 96)), jnp.float32)
    key = jax.random.key(1)
    dense = nn.Dense(200).init(key, x)["params"]
    ours = MxFp4Dense(200).init(key, x)["params"]
    assert set(ours) == {"weight_packed", "weight_scale", "bias"}
    assert ours["weight_packed"].shape == (200, 48) and ours["weight_packed"].dtype == jnp.uint8
    assert ours["weight_scale"].shape == (200, 3) and ours["weight_scale"].dtype == jnp.uint8
    # Same rng stream as nn.Dense: weight_packed is the quantized transpose of its kernel.
    packed, scales = jax_mxfp4.quantize_mxfp4(dense["kernel"].T, rounding="compressed_tensors")
    np.testing.assert_array_equal(ours["weight_packed"], packed)
    np.testing.assert_array_equal(ours["weight_scale"], scales)
    np.testing.assert_array_equal(ours["bias"], dense["bias"])


def test_call_is_x_times_dequantized_weight_plus_bias(rng):
    x = jnp.asarray(rng.standard_normal((2, 7, 64)), jnp.float32)
    layer = MxFp4Dense(40, bias_init=nn.initializers.normal(1.0))
    variables = layer.init(jax.random.key(0), x)
    y = jax.jit(layer.apply)(variables, x)
    p = variables["params"]
    expected = jnp.einsum("btk,nk->btn", x, dequantized(p), precision="highest") + p["bias"]
    assert y.shape == (2, 7, 40) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, param_dtype, x_dtype, out_dtype", [
    (None, jnp.float32, jnp.bfloat16, jnp.float32),  # promoted like nn.Dense
    (None, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16),
    (jnp.float16, jnp.float32, jnp.float32, jnp.float16),
])
def test_dtype_rule_matches_nn_dense(dtype, param_dtype, x_dtype, out_dtype):
    x = jnp.ones((4, 32), x_dtype)
    layer = MxFp4Dense(8, dtype=dtype, param_dtype=param_dtype, precision="highest")  # precision: accepted
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["bias"].dtype == param_dtype
    assert layer.apply(variables, x).dtype == out_dtype
    assert nn.Dense(8, dtype=dtype, param_dtype=param_dtype).apply(
        nn.Dense(8, dtype=dtype, param_dtype=param_dtype).init(jax.random.key(0), x), x).dtype == out_dtype


def test_w4a4_quantizes_activations_with_compressed_tensors_rounding(rng):
    x = jnp.asarray(rng.standard_normal((6, 128)) * 3, jnp.bfloat16)
    layer = MxFp4Dense(48, use_bias=False, activation_format="mxfp4", dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)
    x_fq = reference.fake_quantize_reference(x, rounding="compressed_tensors")
    assert not np.array_equal(x_fq, x)
    expected = jnp.dot(x_fq.astype(jnp.float32), dequantized(variables["params"]).T, precision="highest")
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(expected.astype(jnp.bfloat16), np.float32),
                               rtol=1e-2, atol=1e-2)
    # ... and not the W4A16 product.
    w4a16 = MxFp4Dense(48, use_bias=False, dtype=jnp.bfloat16).apply(variables, x)
    assert not np.array_equal(np.asarray(w4a16), np.asarray(y))


def test_partitioning_names_are_transposed_onto_the_weights():
    x = jnp.ones((2, 64))
    layer = MxFp4Dense(32, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))
    specs = nn.get_partition_spec(layer.init(jax.random.key(0), x))["params"]
    assert specs == {"weight_packed": P("mlp", "embed"), "weight_scale": P("mlp", "embed"), "bias": P("mlp")}

    logical = MxFp4Dense(32, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                      ("embed", "mlp")))
    boxed = logical.init(jax.random.key(0), x)["params"]
    assert isinstance(boxed["weight_packed"], nn.LogicallyPartitioned)
    assert boxed["weight_packed"].names == ("mlp", "embed")

    explicit = MxFp4Dense(32, weight_sharding=("model", None))
    specs = nn.get_partition_spec(explicit.init(jax.random.key(0), x))["params"]
    assert specs == {"weight_packed": P("model", None), "weight_scale": P("model", None), "bias": P("model")}


def test_refuses_a_custom_dot_general():
    with pytest.raises(ValueError, match="dot_general"):
        MxFp4Dense(8, dot_general=lambda *a, **k: None).init(jax.random.key(0), jnp.ones((1, 32)))


def test_k_not_a_multiple_of_32_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 32"):
        MxFp4Dense(8).init(jax.random.key(0), jnp.ones((1, 48)))


def test_float_kernel_params_are_refused_with_the_fix():
    x = jnp.ones((1, 32))
    dense_vars = nn.Dense(8).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="convert the params"):
        MxFp4Dense(8).apply(dense_vars, x)


class TwoLayers(nn.Module):
    kernel_name: str | None = None

    @nn.compact
    def __call__(self, x):
        x = MxFp4Dense(64, kernel_name=self.kernel_name, name="up")(x)
        return MxFp4Dense(32, kernel_name=self.kernel_name, name="down")(nn.relu(x))


def test_prepare_once_then_no_repacking_in_the_forward(repack_kernel, rng):
    x = jnp.asarray(rng.standard_normal((4, 96)), jnp.bfloat16)
    model = TwoLayers(kernel_name=repack_kernel.name)
    variables = model.init(jax.random.key(0), x)
    repack_kernel.prepares = 0
    y_unprepared = jax.jit(model.apply)(variables, x)
    assert repack_kernel.prepares == 2  # inside the call, once per layer per trace

    prepared, report = prepare(model, variables, x)
    assert repack_kernel.prepares == 4
    assert [layer.path for layer in report.layers] == ["up", "down"]
    assert all(layer.kernel == repack_kernel.name for layer in report.layers)
    assert "forced by argument" in report.layers[0].explanation
    assert set(prepared[PREPARED_COLLECTION]) == {"up", "down"}
    assert set(prepared["params"]["up"]) == {"bias"}  # canonical weights dropped

    apply = jax.jit(model.apply)
    for batch in (x, x[:1], x * 2):
        apply(prepared, batch)
    assert repack_kernel.prepares == 4  # the forward never prepares again
    np.testing.assert_array_equal(apply(prepared, x), y_unprepared)

    with pytest.raises(ValueError, match="keep_canonical=True"):  # this layout has no known inverse
        canonical_params(prepared)


def test_prepare_keeps_canonical_params_on_request_and_reports_the_selected_kernel(rng):
    x = jnp.asarray(rng.standard_normal((2, 96)), jnp.float32)
    model = TwoLayers()
    variables = model.init(jax.random.key(0), x)
    prepared, report = prepare(model, variables, x, keep_canonical=True)
    assert set(prepared["params"]["up"]) == {"weight_packed", "weight_scale", "bias"}
    expected_kernel = kernel_base.select_kernel(kernel_base.LinearConfig(96, 64)).kernel.name
    assert report.layers[0].kernel == expected_kernel
    assert "up: [64, 96] W4A16 float32" in str(report)
    np.testing.assert_array_equal(jax.jit(model.apply)(prepared, x), model.apply(variables, x))

    dropped, _ = prepare(model, variables, x)  # cpu/xla layouts are the canonical arrays: recoverable
    restored = canonical_params(dropped)
    for name in ("up", "down"):
        for param in ("weight_packed", "weight_scale"):
            np.testing.assert_array_equal(restored[name][param], variables["params"][name][param])
