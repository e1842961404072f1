"""compressed-tensors checkpoints written and read by the REAL compressed-tensors library.

Checkpoints are made in each test the way llm-compressor makes them (offline,
no calibration data): ``apply_quantization_config`` -> the memoryless min-max
weight observer (``calculate_qparams`` per 32-group) -> ``ModelCompressor``
``compress_model`` -> ``save_file`` + ``update_config``. The library reads back
through its model-free ``CompressedTensorsDequantizer``; its decompression is
always bfloat16 (then cast), so comparisons ask it for float32 and compare with
our dequantization, which is exact in float32 and bfloat16.
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="writing checkpoints with compressed-tensors needs torch "
                                            "(pip install '.[test]')")
pytest.importorskip("compressed_tensors", reason="needs compressed-tensors==0.20.0 (pip install '.[test]')")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer  # noqa: E402
from compressed_tensors.offload import update_offload_parameter  # noqa: E402
from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,  # noqa: E402
                                             apply_quantization_config, preset_name_to_scheme)
from compressed_tensors.quantization.lifecycle.forward import forward_quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jax_mxfp4.checkpoint import (checkpoint_from_model, load_compressed_tensors, load_params,  # noqa: E402
                                  save_compressed_tensors, swap_arguments)
from jax_mxfp4.flax import MxFp4Linear, quantize_nnx  # noqa: E402
from jax_mxfp4.kernels.base import fake_quantize_activations  # noqa: E402

torch.set_num_threads(2)
PRESETS = ["MXFP4", "MXFP4A16"]  # W4A4 and weight-only


class TorchModel(torch.nn.Module):
    """proj_a: N=200 (not a multiple of 128) with bias; proj_b: K=384; lm_head: ignored."""

    def __init__(self):
        super().__init__()
        self.proj_a = torch.nn.Linear(256, 200, bias=True, dtype=torch.bfloat16)
        self.proj_b = torch.nn.Linear(200 - 8 + 192, 256, bias=False, dtype=torch.bfloat16)  # K=384
        self.lm_head = torch.nn.Linear(256, 72, bias=False, dtype=torch.bfloat16)


class FlaxModel(nnx.Module):
    """The same layers in nnx (names match the checkpoint's modules)."""

    def __init__(self, rngs):
        kw = dict(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=rngs)
        self.proj_a = nnx.Linear(256, 200, **kw)
        self.proj_b = nnx.Linear(384, 256, use_bias=False, **kw)
        self.lm_head = nnx.Linear(256, 72, use_bias=False, **kw)


def make_library_checkpoint(folder, preset):
    """(folder, the torch model in FROZEN status before compression, its float weights)."""
    torch.manual_seed(0)
    model = TorchModel()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for _, module in model.named_modules():
            if is_module_quantized(module) and module.quantization_scheme.weights is not None:
                groups = module.weight.unflatten(-1, (-1, 32))
                scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), module.quantization_scheme.weights)
                update_offload_parameter(module, "weight_scale", scale)
                update_offload_parameter(module, "weight_zero_point", zp)
                module.quantization_status = QuantizationStatus.FROZEN
    frozen_outputs = {}
    x = torch.randn(3, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        frozen_outputs["x"] = x
        frozen_outputs["proj_a"] = model.proj_a(x)  # the library's fake-quantized forward
        frozen_outputs["x_fq"] = forward_quantize(model.proj_a, x, "input", model.proj_a.quantization_scheme
                                                  .input_activations) if preset == "MXFP4" else x
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["TorchModel"], "model_type": "toy"}, f)
    compressor.update_config(folder)
    return folder, frozen_outputs, weights


def library_dequantized(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dense = CompressedTensorsDequantizer(folder, dtype=torch.float32).process(tensors)
    return {k: to_numpy(v) for k, v in dense.items()}, tensors


def to_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("preset", PRESETS)
def test_loaded_layers_dequantize_bit_exactly_like_the_library(tmp_path, preset):
    folder, _, weights = make_library_checkpoint(str(tmp_path / "lib"), preset)
    ckpt = load_compressed_tensors(folder, progress=False)
    assert sorted(ckpt.layers) == ["proj_a", "proj_b"] and sorted(ckpt.tensors) == ["lm_head.weight"]
    assert ckpt.ignore == ["lm_head"]
    expected_format = "mxfp4" if preset == "MXFP4" else None
    assert all(layer.activation_format == expected_format for layer in ckpt.layers.values())
    assert ckpt.layers["proj_a"].packed.shape == (200, 128) and ckpt.layers["proj_a"].scales.shape == (200, 8)
    np.testing.assert_array_equal(ckpt.layers["proj_a"].bias, to_numpy(weights["proj_a.bias"]))
    np.testing.assert_array_equal(ckpt.tensors["lm_head.weight"], to_numpy(weights["lm_head.weight"]))
    assert ckpt.tensors["lm_head.weight"].dtype == ml_dtypes.bfloat16

    dense, _ = library_dequantized(folder)
    for name, layer in ckpt.layers.items():
        ours = np.asarray(layer.dequantize(jnp.float32))
        np.testing.assert_array_equal(ours, dense[f"{name}.weight"])
        # bf16 too: the library's own decompression dtype.
        np.testing.assert_array_equal(np.asarray(layer.dequantize(jnp.bfloat16), np.float32), dense[f"{name}.weight"])


@pytest.mark.parametrize("preset", PRESETS)
def test_what_we_save_the_library_reads_identically(tmp_path, preset):
    folder, _, _ = make_library_checkpoint(str(tmp_path / "lib"), preset)
    ckpt = load_compressed_tensors(folder, progress=False)
    ours_dir = str(tmp_path / "ours")
    save_compressed_tensors(ckpt, ours_dir, progress=False)
    lib_config = json.load(open(os.path.join(folder, "config.json")))
    our_config = json.load(open(os.path.join(ours_dir, "config.json")))
    assert our_config == lib_config
    lib_dense, lib_tensors = library_dequantized(folder)
    our_dense, our_tensors = library_dequantized(ours_dir)
    assert sorted(our_tensors) == sorted(lib_tensors)
    for k in lib_tensors:
        assert our_tensors[k].dtype == lib_tensors[k].dtype and torch.equal(our_tensors[k], lib_tensors[k]), k
    assert sorted(our_dense) == sorted(lib_dense)
    for k in lib_dense:
        np.testing.assert_array_equal(our_dense[k], lib_dense[k])


@pytest.mark.parametrize("preset", PRESETS)
def test_a_model_quantized_here_is_the_checkpoint_the_library_writes(tmp_path, preset):
    """Same bf16 weights -> our swap + save == the library's checkpoint, byte for byte, config included."""
    folder, _, weights = make_library_checkpoint(str(tmp_path / "lib"), preset)
    model = FlaxModel(nnx.Rngs(0))
    for name in ("proj_a", "proj_b", "lm_head"):
        layer = getattr(model, name)
        layer.kernel.set_value(jnp.asarray(to_numpy(weights[f"{name}.weight"]).T))
        if layer.bias is not None:
            layer.bias.set_value(jnp.asarray(to_numpy(weights[f"{name}.bias"])))
    quantize_nnx(model, ignore=["lm_head"], activation_format="mxfp4" if preset == "MXFP4" else None)
    ckpt = checkpoint_from_model(model, config={"architectures": ["TorchModel"], "model_type": "toy"})
    ours_dir = str(tmp_path / "ours")
    save_compressed_tensors(ckpt, ours_dir, progress=False)
    assert json.load(open(os.path.join(ours_dir, "config.json"))) == json.load(
        open(os.path.join(folder, "config.json")))
    _, lib_tensors = library_dequantized(folder)
    _, our_tensors = library_dequantized(ours_dir)
    assert sorted(our_tensors) == sorted(lib_tensors)
    for k in lib_tensors:
        assert torch.equal(our_tensors[k], lib_tensors[k]), k


@pytest.mark.parametrize("preset", PRESETS)
def test_swapped_model_on_loaded_weights_matches_the_library_model(tmp_path, preset):
    folder, frozen, _ = make_library_checkpoint(str(tmp_path / "lib"), preset)
    ckpt = load_compressed_tensors(folder, progress=False)
    model = FlaxModel(nnx.Rngs(0))
    quantize_nnx(model, **swap_arguments(ckpt))
    load_params(ckpt, model)
    assert isinstance(model.proj_a, MxFp4Linear) and type(model.lm_head) is nnx.Linear
    assert model.proj_a.options.scheme == ("W4A4" if preset == "MXFP4" else "W4A16")

    x = jnp.asarray(to_numpy(frozen["x"]))
    y = np.asarray(model.proj_a(x), np.float32)
    dense, _ = library_dequantized(folder)
    w = dense["proj_a.weight"]
    bias = np.asarray(ckpt.layers["proj_a"].bias, np.float32)
    # (1) Against the dequantized-weights model fed the library's own activation fake-quant
    #     (float32 math): equal up to the two bfloat16 roundings of the layer (the product, then
    #     product + bias), i.e. half a bf16 ulp (2**-9 relative) of each.
    x_lib_fq = to_numpy(frozen["x_fq"]).astype(np.float32)
    product = x_lib_fq @ w.T
    reference = product + bias
    bound = 2.0 ** -8 * (np.abs(product) + np.abs(reference))
    assert np.all(np.abs(y - reference) <= bound), np.max(np.abs(y - reference) - bound)
    # (2) Against the library's fake-quantized torch forward (bf16 GEMM): within bf16 rounding.
    lib = frozen["proj_a"].float().numpy()
    np.testing.assert_allclose(y, lib, rtol=2e-2, atol=2e-2 * np.abs(lib).max())


def test_w4a4_activation_fake_quant_is_the_library_s_bit_for_bit(tmp_path):
    _, frozen, _ = make_library_checkpoint(str(tmp_path / "lib"), "MXFP4")
    x = jnp.asarray(to_numpy(frozen["x"]))
    ours = np.asarray(fake_quantize_activations(x, "compressed_tensors"))
    lib = to_numpy(frozen["x_fq"])
    assert ours.dtype == lib.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.view(np.uint16), lib.view(np.uint16))
    assert not np.array_equal(ours, np.asarray(x))
