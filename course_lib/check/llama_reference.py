"""A Llama in plain float64 NumPy: no cache, no pages, no batching, the ground truth the engine is tested against.

It runs one sequence over its whole length with a causal mask and repeats each kv head for the query
heads that share it, the textbook way. It is slow and memory-hungry on purpose: every shortcut the
engine takes (paged cache, chunked prefill, batched decode, fused norms) must reproduce these logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from course_lib import dtypes
from course_lib.checkpoint.config import ModelConfig
from course_lib.kernels.fused import rope_reference


def dense_forward(config: ModelConfig, weights: dict[str, Any], token_ids: Any) -> np.ndarray:
    """Logits ``[len(token_ids), vocab]`` in float64: row ``t`` predicts the token after position ``t``."""
    w = {name: dtypes.to_float32(array).astype(np.float64) for name, array in weights.items()}
    hidden = w["model.embed_tokens.weight"][np.asarray(token_ids)]
    positions = np.arange(hidden.shape[0])
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        hidden = hidden + _attention(
            config, w, layer, _rms_norm(hidden, w[layer + "input_layernorm.weight"], config), positions
        )
        normed = _rms_norm(hidden, w[layer + "post_attention_layernorm.weight"], config)
        gate, up = normed @ w[layer + "mlp.gate_proj.weight"].T, normed @ w[layer + "mlp.up_proj.weight"].T
        hidden = hidden + (gate / (1 + np.exp(-gate)) * up) @ w[layer + "mlp.down_proj.weight"].T
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return _rms_norm(hidden, w["model.norm.weight"], config) @ lm_head.T


def _rms_norm(x: np.ndarray, weight: np.ndarray, config: ModelConfig) -> np.ndarray:
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + config.rms_norm_eps) * weight


def _attention(
    config: ModelConfig, w: dict[str, np.ndarray], layer: str, x: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """Causal grouped-query self-attention over the whole sequence, kv heads repeated to match the query heads."""
    length, d, frequencies = x.shape[0], config.head_dim, config.inverse_frequencies()
    query = (x @ w[layer + "self_attn.q_proj.weight"].T).reshape(length, config.num_heads, d)
    key = (x @ w[layer + "self_attn.k_proj.weight"].T).reshape(length, config.num_kv_heads, d)
    query, key = rope_reference(query, positions, frequencies), rope_reference(key, positions, frequencies)
    value = (x @ w[layer + "self_attn.v_proj.weight"].T).reshape(length, config.num_kv_heads, d)
    key, value = np.repeat(key, config.queries_per_kv, axis=1), np.repeat(value, config.queries_per_kv, axis=1)
    scores = np.einsum("qhd,khd->hqk", query, key) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((length, length), dtype=bool)), scores, -np.inf)
    probabilities = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probabilities, value).reshape(length, -1) @ w[layer + "self_attn.o_proj.weight"].T
