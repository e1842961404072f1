"""Module swap: converting existing linen and nnx models to MXFP4 without editing their code."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_mxfp4
from jax_mxfp4.flax import (MxFp4Linear, match_layer, match_name, prepare, quantize_linen, quantize_model,
                            quantize_nnx, swap_linen)


def deq(packed, scales):
    return jax_mxfp4.dequantize_mxfp4(packed, scales, dtype=jnp.float32)


# ---------------------------------------------------------------------------
# Matching: compressed-tensors' targets / ignore semantics (utils/match.py, 0.20).


def test_name_matching_is_compressed_tensors_match_name():
    assert match_name("model.layers.0.mlp.up_proj", "re:.*mlp.*")
    assert match_name("model.layers.0.mlp.up_proj", "re:model\\.layers\\.0")  # re.match: prefix is enough
    assert not match_name("model.layers.0.mlp.up_proj", "re:mlp")  # anchored at the start
    assert match_name("lm_head", "lm_head")
    assert not match_name("model.lm_head", "lm_head")  # plain names are exact: no suffix matching
    assert not match_name("lm_head_2", "lm_head")


def test_class_names_match_and_linear_means_every_dense():
    dense, linear = nn.Dense(4), nnx.Linear(32, 4, rngs=nnx.Rngs(0))
    assert match_layer("a.b", dense, ["Linear"]) == ("Linear", None)
    assert match_layer("a.b", dense, ["Dense"]) == ("Dense", None)
    assert match_layer("a.b", linear, ["Linear"], ["re:a\\."]) == ("Linear", "re:a\\.")
    assert match_layer("a.b", linear, ["Embed"]) == (None, None)


# ---------------------------------------------------------------------------
# nnx: graph surgery.


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.up_proj = nnx.Linear(64, 96, rngs=rngs)
        self.down_proj = nnx.Linear(96, 64, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.gelu(self.up_proj(x)))


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(50, 64, rngs=rngs)
        self.layers = nnx.List([NnxBlock(rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(64, rngs=rngs)
        self.lm_head = nnx.Linear(64, 50, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(self.norm(x))


def dequantized_nnx_copy(model):
    """The same model with each MxFp4Linear replaced by an nnx.Linear holding the dequantized weight."""
    ref = nnx.clone(model)
    for path, node in list(nnx.iter_graph(ref)):
        if isinstance(node, MxFp4Linear):
            packed, scales = node.canonical_weights()
            linear = nnx.Linear(node.in_features, node.out_features, use_bias=node.bias is not None,
                                precision="highest", rngs=nnx.Rngs(0))
            linear.kernel.set_value(deq(packed, scales).T)
            if node.bias is not None:
                linear.bias.set_value(node.bias[...])
            parent = ref
            for key in path[:-1]:
                parent = getattr(parent, key) if isinstance(key, str) else parent[key]
            if isinstance(path[-1], str):
                setattr(parent, path[-1], linear)
            else:
                parent[path[-1]] = linear
    return ref


def test_nnx_swap_by_pattern_with_ignore_list_and_report():
    model = NnxModel(nnx.Rngs(0))
    ids = jnp.arange(12).reshape(2, 6) % 50
    before = model(ids)
    report = quantize_model(model, targets=["re:layers\\.\\d+\\.(up|down)_proj", "re:unused.*"],
                            ignore=["layers.1.down_proj", "nothing"])
    assert report.converted == ["layers.0.down_proj", "layers.0.up_proj", "layers.1.up_proj"]
    assert report.ignored == ["layers.1.down_proj"]
    assert report.untargeted == ["lm_head"]
    assert report.unmatched_targets == ["re:unused.*"] and report.unmatched_ignores == ["nothing"]
    assert "layers.1.down_proj [64, 96]: kept (ignore 'layers.1.down_proj')" in str(report)
    assert isinstance(model.layers[0].up_proj, MxFp4Linear)
    assert type(model.layers[1].down_proj) is nnx.Linear and type(model.lm_head) is nnx.Linear
    after = model(ids)
    assert after.shape == before.shape
    # Numerics: exactly the model with dequantized weights, up to float32 accumulation order.
    np.testing.assert_allclose(after, dequantized_nnx_copy(model)(ids), rtol=2e-5, atol=2e-5)
    # And MXFP4 is close to the original float model (relative error of the logits).
    rel = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert 1e-4 < rel < 0.15


def test_nnx_swap_default_targets_every_linear_and_shared_layers_stay_shared():
    class Shared(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(32, 32, rngs=rngs)
            self.b = self.a
            self.blocks = nnx.data([nnx.Linear(32, 32, rngs=rngs)])  # a plain list works too

        def __call__(self, x):
            return self.blocks[0](self.b(self.a(x)))

    model = Shared(nnx.Rngs(0))
    report = quantize_nnx(model, activation_format="mxfp4")
    assert report.converted == ["a", "blocks.0"]
    assert model.a is model.b and isinstance(model.a, MxFp4Linear)
    assert model.a.options.scheme == "W4A4" and isinstance(model.blocks[0], MxFp4Linear)
    assert model(jnp.ones((1, 32))).shape == (1, 32)


def test_nnx_swap_refuses_k_not_a_multiple_of_32_with_the_fix():
    model = nnx.Dict(a=nnx.Linear(40, 8, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="ignore"):
        quantize_nnx(model)


def test_nnx_swap_keeps_the_mesh_layout():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with jax.set_mesh(mesh):
        model = nnx.Dict(proj=nnx.Linear(64, 32, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("data", "model")), rngs=nnx.Rngs(0)))
    quantize_nnx(model)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))["proj"]
    assert specs["weight_packed"].get_value() == P("model", "data")
    assert specs["weight_scale"].get_value() == P("model", "data")
    assert specs["bias"].get_value() == P("model")
    sharding = model["proj"].weight_packed[...].sharding
    assert isinstance(sharding, jax.sharding.NamedSharding) and sharding.spec == P("model", "data")


# ---------------------------------------------------------------------------
# linen: nn.intercept_methods.


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(96, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     name="up_proj")(x)
        return nn.Dense(64, use_bias=False, name="down_proj")(nn.gelu(h))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, 64)(ids)
        for i in range(2):
            x = x + LinenBlock(name=f"layers_{i}")(x)
        return nn.Dense(50, name="lm_head")(nn.LayerNorm()(x))


def test_linen_swap_converts_params_and_runs_as_the_dequantized_model():
    model = LinenModel()
    ids = jnp.arange(12).reshape(2, 6) % 50
    variables = model.init(jax.random.key(0), ids)
    before = model.apply(variables, ids)
    swapped, qvars, report = quantize_linen(model, variables, ids, ignore=["lm_head"])
    assert report.converted == ["layers_0.up_proj", "layers_0.down_proj", "layers_1.up_proj",
                                "layers_1.down_proj"]
    assert report.ignored == ["lm_head"]
    params = nn.unbox(qvars)["params"]
    assert set(params["layers_0"]["up_proj"]) == {"weight_packed", "weight_scale", "bias"}
    assert set(params["layers_0"]["down_proj"]) == {"weight_packed", "weight_scale"}
    assert set(params["lm_head"]) == {"kernel", "bias"}
    kernel = nn.unbox(variables)["params"]["layers_0"]["up_proj"]["kernel"]
    packed, _ = jax_mxfp4.quantize_mxfp4(kernel.T, rounding="compressed_tensors")
    np.testing.assert_array_equal(params["layers_0"]["up_proj"]["weight_packed"], packed)

    after = jax.jit(swapped.apply)(qvars, ids)
    # The dequantized float model: the original model with each kernel = dequantize(weights).T.
    ref_params = jax.tree.map(lambda a: a, nn.unbox(variables)["params"])
    for i in range(2):
        for name in ("up_proj", "down_proj"):
            q = params[f"layers_{i}"][name]
            ref_params[f"layers_{i}"][name]["kernel"] = deq(q["weight_packed"], q["weight_scale"]).T
    with jax.default_matmul_precision("highest"):
        ref = model.apply({"params": ref_params}, ids)
    np.testing.assert_allclose(after, ref, rtol=2e-5, atol=2e-5)
    rel = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert 1e-4 < rel < 0.15

    # Partitioning names carried over, transposed to [N, K]; the bias gets the N name.
    specs = nn.get_partition_spec(qvars)["params"]["layers_0"]["up_proj"]
    assert specs == {"weight_packed": P("mlp", "embed"), "weight_scale": P("mlp", "embed"), "bias": P("mlp")}

    # Prepare once on top of the swap.
    prepared, prep_report = prepare(swapped, qvars, ids)
    assert len(prep_report.layers) == 4
    np.testing.assert_array_equal(jax.jit(swapped.apply)(prepared, ids), after)


def test_linen_swapped_init_draws_mxfp4_params_directly_and_w4a4_option():
    swapped = swap_linen(LinenModel(), targets=["re:layers_0\\..*"], activation_format="mxfp4")
    ids = jnp.zeros((1, 4), jnp.int32)
    variables = swapped.init(jax.random.key(0), ids)
    params = nn.unbox(variables)["params"]
    assert "weight_packed" in params["layers_0"]["up_proj"] and "kernel" in params["layers_1"]["up_proj"]
    assert swapped.options.scheme == "W4A4"
    assert swapped.apply(variables, ids).shape == (1, 4, 50)


def test_linen_swap_refuses_float_params_it_was_not_given_converted():
    swapped = swap_linen(LinenModel())
    ids = jnp.zeros((1, 4), jnp.int32)
    variables = LinenModel().init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="convert the params"):
        swapped.apply(variables, ids)


def test_linen_swap_under_nn_scan():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(64, name="proj")(x), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(Layer, variable_axes={"params": 0, "mxfp4_prepared": 0},
                              split_rngs={"params": True}, length=3)
            return scanned(name="layers")(x, None)[0]

    model = Stack()
    x = jnp.ones((2, 64))
    variables = model.init(jax.random.key(0), x)
    swapped, qvars, report = quantize_linen(model, variables, x)
    assert report.converted == ["layers.proj"]
    assert nn.unbox(qvars)["params"]["layers"]["proj"]["weight_packed"].shape == (3, 64, 32)
    y = swapped.apply(qvars, x)
    prepared, _ = prepare(swapped, qvars, x)
    np.testing.assert_array_equal(swapped.apply(prepared, x), y)
