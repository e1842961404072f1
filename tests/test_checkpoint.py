"""compressed-tensors checkpoints: our save/load round trip, mapping onto Flax models, bad input.

The same format, written and read by the real compressed-tensors library, is
tested in test_checkpoint_library.py.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import jax_mxfp4
from jax_mxfp4.checkpoint import (CheckpointError, CompressedTensorsCheckpoint, Mxfp4Layer, checkpoint_from_model,
                                  load_compressed_tensors, load_params, quantization_config,
                                  save_compressed_tensors, swap_arguments)
from jax_mxfp4.flax import prepare, quantize_linen, quantize_nnx

BF16 = ml_dtypes.bfloat16


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up_proj = nnx.Linear(64, 200, param_dtype=jnp.bfloat16, rngs=rngs)  # N=200: not a multiple of 128
        self.down_proj = nnx.Linear(200 - 8, 64, use_bias=False, param_dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.relu(self.up_proj(x))[..., :192])


class Model(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(40, 64, param_dtype=jnp.bfloat16, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(64, param_dtype=jnp.bfloat16, rngs=rngs)
        self.lm_head = nnx.Linear(64, 40, use_bias=False, param_dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(self.norm(x))


@pytest.fixture
def quantized_model():
    model = Model(nnx.Rngs(0))
    quantize_nnx(model, ignore=["lm_head"], activation_format="mxfp4")
    return model


def test_quantization_config_is_what_the_library_writes():
    qc = quantization_config({"a": None, "b": None}, ["lm_head"])
    group = qc["config_groups"]["group_0"]
    assert group == {"format": "mxfp4-pack-quantized", "input_activations": None, "output_activations": None,
                     "targets": ["Linear"], "weights": {"dynamic": False, "group_size": 32, "num_bits": 4,
                                                        "scale_dtype": "torch.uint8", "strategy": "group",
                                                        "symmetric": True, "type": "float"}}
    assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"
    w4a4 = quantization_config({"a": "mxfp4"})["config_groups"]["group_0"]["input_activations"]
    assert w4a4["dynamic"] is True and w4a4["group_size"] == 32
    mixed = quantization_config({"a": "mxfp4", "b": None})["config_groups"]
    assert mixed["group_0"]["targets"] == ["b"] and mixed["group_1"]["targets"] == ["a"]


@pytest.mark.parametrize("max_shard_size", [None, 20_000])
def test_nnx_model_round_trip_through_a_checkpoint(quantized_model, tmp_path, max_shard_size):
    ids = (jnp.arange(10).reshape(2, 5) * 7) % 40
    expected = quantized_model(ids)
    ckpt = checkpoint_from_model(quantized_model, config={"model_type": "toy"})
    assert sorted(ckpt.layers) == ["layers.0.down_proj", "layers.0.up_proj", "layers.1.down_proj",
                                   "layers.1.up_proj"]
    assert ckpt.ignore == ["lm_head"]
    assert sorted(ckpt.tensors) == ["embed_tokens.weight", "lm_head.weight", "norm.bias", "norm.weight"]
    assert ckpt.tensors["lm_head.weight"].shape == (40, 64)  # HF [out, in]
    assert ckpt.tensors["lm_head.weight"].dtype == BF16
    up = ckpt.layers["layers.0.up_proj"]
    assert up.packed.shape == (200, 32) and up.scales.shape == (200, 2) and up.bias.shape == (200,)
    assert up.activation_format == "mxfp4"

    save_compressed_tensors(ckpt, tmp_path, max_shard_size=max_shard_size, progress=False)
    files = sorted(os.listdir(tmp_path))
    if max_shard_size:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    else:
        assert files == ["config.json", "model.safetensors"]
    loaded = load_compressed_tensors(tmp_path, progress=False)
    assert loaded.config["model_type"] == "toy"
    assert loaded.quantization_config == ckpt.quantization_config
    for name, layer in ckpt.layers.items():
        got = loaded.layers[name]
        np.testing.assert_array_equal(got.packed, layer.packed)
        np.testing.assert_array_equal(got.scales, layer.scales)
        assert got.activation_format == "mxfp4"
        np.testing.assert_array_equal(got.dequantize(jnp.float32),
                                      jax_mxfp4.dequantize_mxfp4(layer.packed, layer.scales, dtype=jnp.float32))
    for name, value in ckpt.tensors.items():
        assert loaded.tensors[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded.tensors[name], value)

    fresh = Model(nnx.Rngs(1))
    kwargs = swap_arguments(loaded)
    assert kwargs == {"targets": ["Linear"], "ignore": ["lm_head"], "activation_format": "mxfp4",
                      "activation_rounding": "compressed_tensors"}
    quantize_nnx(fresh, **kwargs)
    report = load_params(loaded, fresh)
    assert report.mapping["layers.0.up_proj"] == "layers.0.up_proj"
    np.testing.assert_array_equal(fresh(ids), expected)


def test_a_w4a16_swap_takes_the_w4a4_scheme_from_the_checkpoint(quantized_model, tmp_path):
    save_compressed_tensors(checkpoint_from_model(quantized_model), tmp_path, progress=False)
    fresh = Model(nnx.Rngs(1))
    quantize_nnx(fresh, ignore=["lm_head"])  # W4A16 swap...
    load_params(load_compressed_tensors(tmp_path, progress=False), fresh)
    assert fresh.layers[0].up_proj.options.scheme == "W4A4"  # ...made W4A4 by the checkpoint
    ids = jnp.arange(5)[None] % 40
    np.testing.assert_array_equal(fresh(ids), quantized_model(ids))


def test_a_prepared_model_exports_its_canonical_weights(quantized_model):
    reference = checkpoint_from_model(quantized_model)
    prepare(quantized_model, jnp.bfloat16)
    assert quantized_model.layers[0].up_proj.weight_packed is None
    exported = checkpoint_from_model(quantized_model)
    for name, layer in reference.layers.items():
        np.testing.assert_array_equal(exported.layers[name].packed, layer.packed)
        np.testing.assert_array_equal(exported.layers[name].scales, layer.scales)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(64, name="o_proj")(nn.relu(nn.Dense(96, name="q_proj")(x)))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = LinenBlock(name=f"layers_{i}")(x)
        return nn.Dense(10, name="lm_head")(x)


def test_linen_round_trip_and_hf_style_names(tmp_path):
    model = LinenModel()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    swapped, qvars, _ = quantize_linen(model, variables, x, ignore=["lm_head"])
    expected = swapped.apply(qvars, x)
    to_hf = lambda path: "model." + path.replace("layers_", "layers.")  # noqa: E731
    ckpt = checkpoint_from_model(swapped, qvars, name_map=to_hf, dtype=jnp.bfloat16)
    assert sorted(ckpt.layers)[0] == "model.layers.0.o_proj"
    assert ckpt.ignore == ["model.lm_head"]
    assert ckpt.tensors["model.lm_head.weight"].shape == (10, 64)
    assert ckpt.layers["model.layers.0.o_proj"].bias.dtype == BF16
    save_compressed_tensors(ckpt, tmp_path, progress=False)
    loaded = load_compressed_tensors(tmp_path, progress=False)

    # Names are inferred: model.layers.0.q_proj -> layers_0.q_proj.
    abstract = jax.eval_shape(swapped.init, jax.random.key(1), x)
    abstract = jax.tree.map(lambda a: a, nn.unbox(abstract))
    tree, report = load_params(loaded, abstract)
    assert report.mapping["model.layers.1.q_proj"] == "layers_1.q_proj"
    got = swapped.apply(tree, x)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)  # biases went through bfloat16

    # An explicit name_map works too, and a wrong one is a clear error.
    from_hf = lambda name: name.removeprefix("model.").replace("layers.", "layers_")  # noqa: E731
    tree2, _ = load_params(loaded, abstract, name_map=from_hf)
    np.testing.assert_array_equal(swapped.apply(tree2, x), got)
    with pytest.raises(CheckpointError, match="name_map sends"):
        load_params(loaded, abstract, name_map=lambda name: "nowhere")


def test_load_params_reports_what_does_not_fit(quantized_model, tmp_path):
    save_compressed_tensors(checkpoint_from_model(quantized_model), tmp_path, progress=False)
    ckpt = load_compressed_tensors(tmp_path, progress=False)
    plain = Model(nnx.Rngs(0))  # not swapped
    with pytest.raises(CheckpointError, match="swap that layer"):
        load_params(ckpt, plain)
    everything = Model(nnx.Rngs(0))
    quantize_nnx(everything)  # lm_head swapped too, but the checkpoint keeps it in bf16
    with pytest.raises(CheckpointError, match="ignore"):
        load_params(ckpt, everything)
    ckpt.tensors["extra.weight"] = np.zeros((2, 2), np.float32)
    fresh = Model(nnx.Rngs(0))
    quantize_nnx(fresh, ignore=["lm_head"])
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_params(ckpt, fresh)
    report = load_params(ckpt, fresh, skip=["re:extra\\."])
    assert report.skipped == ["extra.weight"]


# ---------------------------------------------------------------------------
# Bad input: every case is a CheckpointError naming the problem and the fix.


def write_checkpoint(folder, tensors, qc_overrides=None, group_overrides=None, config=None):
    os.makedirs(folder, exist_ok=True)
    qc = quantization_config({"proj": None}, [])
    qc.update(qc_overrides or {})
    for key, value in (group_overrides or {}).items():
        qc["config_groups"]["group_0"][key] = value
    cfg = {"model_type": "toy", "quantization_config": qc} if config is None else config
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def good_tensors(n=40, k=64):
    packed, scales = jax_mxfp4.quantize_mxfp4(jnp.ones((n, k), jnp.float32))
    return {"proj.weight_packed": np.asarray(packed), "proj.weight_scale": np.asarray(scales),
            "proj.bias": np.zeros((n,), BF16), "head.weight": np.ones((3, k), BF16)}


def test_the_well_formed_fixture_loads(tmp_path):
    ckpt = load_compressed_tensors(write_checkpoint(tmp_path, good_tensors()), progress=False)
    assert list(ckpt.layers) == ["proj"] and list(ckpt.tensors) == ["head.weight"]
    assert ckpt.layers["proj"].activation_format is None
    assert isinstance(ckpt, CompressedTensorsCheckpoint) and isinstance(ckpt.layers["proj"], Mxfp4Layer)


def without(d, key):
    return {k: v for k, v in d.items() if k != key}


BAD_CASES = {
    "nvfp4 format": (dict(group_overrides={"format": "nvfp4-pack-quantized"}), "nvfp4-pack-quantized"),
    "group size 16": (dict(group_overrides={"weights": {**quantization_config({})["config_groups"]["group_0"][
        "weights"], "group_size": 16}}), "group_size=16"),
    "int4 weights": (dict(group_overrides={"weights": {**quantization_config({})["config_groups"]["group_0"][
        "weights"], "type": "int"}}), "type='int'"),
    "static fp8 activations": (dict(group_overrides={"input_activations": {
        "dynamic": False, "num_bits": 8, "type": "float", "strategy": "tensor"}}), "input_activations"),
    "not compressed": (dict(qc_overrides={"quantization_status": "frozen"}), "quantization_status"),
    "no quantization_config": (dict(config={"model_type": "toy"}), "no 'quantization_config'"),
    "other quant method": (dict(qc_overrides={"quant_method": "mxfp4"}), "quant_method='mxfp4'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_is_refused(tmp_path, case):
    kwargs, message = BAD_CASES[case]
    folder = write_checkpoint(tmp_path, good_tensors(), **kwargs)
    with pytest.raises(CheckpointError, match=message.replace("(", "\\(").replace("[", "\\[")) as info:
        load_compressed_tensors(folder, progress=False)
    assert "config.json" in str(info.value)


def bad_tensor_cases():
    t = good_tensors()
    yield "missing weight_scale", without(t, "proj.weight_scale"), "'proj.weight_scale'"
    yield "missing weight_packed", without(t, "proj.weight_packed"), "'proj.weight_packed'"
    yield "scale shape", {**t, "proj.weight_scale": np.zeros((40, 3), np.uint8)}, "needs \\[40, 2\\]"
    yield "scale dtype", {**t, "proj.weight_scale": np.zeros((40, 2), np.float32)}, "float32\\[40, 2\\]"
    yield "packed dtype", {**t, "proj.weight_packed": np.zeros((40, 32), np.int8)}, "int8\\[40, 32\\]"
    yield "packed rank", {**t, "proj.weight_packed": np.zeros((40, 32, 1), np.uint8)}, "uint8\\[N, K/2\\]"
    yield "K not whole blocks", {**t, "proj.weight_packed": np.zeros((40, 24), np.uint8)}, "K=48"
    yield "bias shape", {**t, "proj.bias": np.zeros((41,), BF16)}, "N=40"
    yield "NaN scale byte", {**t, "proj.weight_scale": np.full((40, 2), 255, np.uint8)}, "0xFF"
    yield "nvfp4 global scale", {**t, "proj.weight_global_scale": np.ones((1,), np.float32)}, "global scale"
    yield "dense and packed", {**t, "proj.weight": np.ones((40, 64), BF16)}, "both a dense"


@pytest.mark.parametrize("case", [c[0] for c in bad_tensor_cases()])
def test_bad_tensors_are_refused_naming_tensor_and_file(tmp_path, case):
    _, tensors, message = next(c for c in bad_tensor_cases() if c[0] == case)
    folder = write_checkpoint(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=message) as info:
        load_compressed_tensors(folder, progress=False)
    assert "model.safetensors" in str(info.value)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "t", good_tensors())
    file = os.path.join(folder, "model.safetensors")
    data = open(file, "rb").read()
    with open(file, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_compressed_tensors(folder, progress=False)
    assert file in str(info.value)
    with open(file, "wb") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00" + b"{garbage" * 20)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_compressed_tensors(folder, progress=False)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_compressed_tensors(folder, progress=False)


def test_missing_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_compressed_tensors(tmp_path / "nope")
    folder = write_checkpoint(tmp_path / "a", good_tensors())
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_compressed_tensors(folder, progress=False)
    folder = write_checkpoint(tmp_path / "b", good_tensors())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"proj.weight_packed": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_compressed_tensors(folder, progress=False)


def test_ignored_layer_stored_packed_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path, good_tensors(), qc_overrides={"ignore": ["proj"]})
    with pytest.raises(CheckpointError, match="ignore"):
        load_compressed_tensors(folder, progress=False)
