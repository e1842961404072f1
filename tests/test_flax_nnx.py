"""MxFp4Linear: nnx.Linear's constructor and call with MXFP4 params; prepare-once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_mxfp4
from jax_mxfp4 import reference
from jax_mxfp4.flax import MxFp4Linear, MxFp4Prepared, prepare

from flax_helpers import repack_kernel_fixture


repack_kernel = repack_kernel_fixture("test_repack_nnx")


def dequantized(layer, dtype=jnp.float32):
    packed, scales = layer.canonical_weights()
    return jax_mxfp4.dequantize_mxfp4(packed, scales, dtype=dtype)


def test_params_are_the_quantized_kernel_nnx_linear_would_draw():
    linear = nnx.Linear(96, 200, rngs=nnx.Rngs(3))
    ours = MxFp4Linear(96, 200, rngs=nnx.Rngs(3))
    assert ours.weight_packed.shape == (200, 48) and ours.weight_packed.dtype == jnp.uint8
    assert ours.weight_scale.shape == (200, 3) and ours.weight_scale.dtype == jnp.uint8
    packed, scales = jax_mxfp4.quantize_mxfp4(linear.kernel[...].T, rounding="compressed_tensors")
    np.testing.assert_array_equal(ours.weight_packed[...], packed)
    np.testing.assert_array_equal(ours.weight_scale[...], scales)
    np.testing.assert_array_equal(ours.bias[...], linear.bias[...])
    assert set(nnx.state(ours, nnx.Param)) == {"weight_packed", "weight_scale", "bias"}
    assert MxFp4Linear(96, 8, use_bias=False, rngs=nnx.Rngs(0)).bias is None


def test_call_is_x_times_dequantized_weight_plus_bias(rng):
    layer = MxFp4Linear(64, 40, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 7, 64)), jnp.float32)
    y = nnx.jit(lambda m, v: m(v))(layer, x)
    expected = jnp.einsum("btk,nk->btn", x, dequantized(layer), precision="highest") + layer.bias[...]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, param_dtype, x_dtype, out_dtype", [
    (None, jnp.float32, jnp.bfloat16, jnp.float32),
    (None, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16),
])
def test_dtype_rule_matches_nnx_linear(dtype, param_dtype, x_dtype, out_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 32), x_dtype)
    assert MxFp4Linear(32, 8, precision="highest", **kw)(x).dtype == out_dtype
    assert nnx.Linear(32, 8, **kw)(x).dtype == out_dtype


def test_w4a4_quantizes_activations_with_compressed_tensors_rounding(rng):
    layer = MxFp4Linear(128, 48, use_bias=False, dtype=jnp.bfloat16, activation_format="mxfp4",
                        rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((6, 128)) * 3, jnp.bfloat16)
    x_fq = reference.fake_quantize_reference(x, rounding="compressed_tensors")
    expected = jnp.dot(x_fq.astype(jnp.float32), dequantized(layer).T, precision="highest").astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(layer(x), np.float32), np.asarray(expected, np.float32),
                               rtol=1e-2, atol=1e-2)


def test_unsupported_arguments_are_refused():
    with pytest.raises(ValueError, match="dot_general"):
        MxFp4Linear(32, 8, dot_general=lambda *a, **k: None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="preferred_element_type"):
        MxFp4Linear(32, 8, preferred_element_type=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of 32"):
        MxFp4Linear(48, 8, rngs=nnx.Rngs(0))


def test_sharding_names_are_transposed_onto_the_weights():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with jax.set_mesh(mesh):
        layer = MxFp4Linear(64, 32, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                                      ("data", "model")), rngs=nnx.Rngs(0))
        explicit = MxFp4Linear(64, 32, weight_sharding=("model", None), rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    assert specs["weight_packed"].get_value() == P("model", "data")
    assert specs["weight_scale"].get_value() == P("model", "data")
    assert specs["bias"].get_value() == P("model")
    specs = nnx.get_partition_spec(nnx.state(explicit, nnx.Param))
    assert specs["weight_packed"].get_value() == P("model", None)
    assert specs["bias"].get_value() == P("model")


def test_from_linear_keeps_bias_dtype_and_sharding_names():
    with nnx.use_eager_sharding(False):
        linear = nnx.Linear(64, 48, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                            kernel_metadata={"out_sharding": ("embed", "mlp")}, rngs=nnx.Rngs(0))
    layer = MxFp4Linear.from_linear(linear, activation_format="mxfp4")
    assert layer.param_dtype == jnp.bfloat16 and layer.dtype == jnp.bfloat16
    assert layer.options.scheme == "W4A4"
    assert layer.weight_packed.get_metadata()["out_sharding"] == ("mlp", "embed")
    assert layer.bias.get_metadata()["out_sharding"] == ("mlp",)
    np.testing.assert_array_equal(layer.bias[...], linear.bias[...])
    packed, _ = jax_mxfp4.quantize_mxfp4(linear.kernel[...].T, rounding="compressed_tensors")
    np.testing.assert_array_equal(layer.weight_packed[...], packed)


class TwoLayers(nnx.Module):
    def __init__(self, kernel_name=None):
        self.up = MxFp4Linear(96, 64, kernel_name=kernel_name, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        self.down = MxFp4Linear(64, 32, kernel_name=kernel_name, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def test_prepare_once_then_no_repacking_in_the_forward(repack_kernel, rng):
    model = TwoLayers(kernel_name=repack_kernel.name)
    x = jnp.asarray(rng.standard_normal((4, 96)), jnp.bfloat16)
    repack_kernel.prepares = 0
    y_unprepared = nnx.jit(lambda m, v: m(v))(model, x)
    assert repack_kernel.prepares == 2

    report = prepare(model)  # both layers have dtype=bfloat16: input_dtype not needed
    assert repack_kernel.prepares == 4
    assert sorted(layer.path for layer in report.layers) == ["down", "up"]
    assert isinstance(model.up.prepared, MxFp4Prepared) and model.up.weight_packed is None
    assert "prepared" in nnx.state(model, MxFp4Prepared)["up"]

    forward = nnx.jit(lambda m, v: m(v))
    for batch in (x, x[:1], x * 2):
        forward(model, batch)
    graphdef, state = nnx.split(model)
    jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x)
    assert repack_kernel.prepares == 4  # the forward never prepares again
    np.testing.assert_array_equal(forward(model, x), y_unprepared)
    with pytest.raises(ValueError, match="keep_canonical=True"):
        model.up.canonical_weights()


def test_prepare_needs_input_dtype_when_the_layer_has_none_and_recovers_canonical_weights(rng):
    layer = MxFp4Linear(64, 16, rngs=nnx.Rngs(0))
    packed, scales = layer.weight_packed[...], layer.weight_scale[...]
    with pytest.raises(ValueError, match="input_dtype"):
        layer.prepare()
    record = layer.prepare(jnp.bfloat16)  # float32 params: computes in float32
    assert record.activation_dtype == "float32"
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    assert layer(x).dtype == jnp.float32
    got_packed, got_scales = layer.canonical_weights()  # cpu/xla layout: the canonical arrays
    np.testing.assert_array_equal(got_packed, packed)
    np.testing.assert_array_equal(got_scales, scales)
