"""A Llama's weights under their Hugging Face names: random ones for tests, and checkpoints on disk.

A checkpoint is a folder holding ``config.json`` (a ``LlamaConfig``) and ``model.safetensors``, the layout
``transformers`` writes, so checkpoints move between the course and the Hub. Weights here are host
NumPy arrays; the model moves them to the device. Linear weights keep PyTorch's ``[out_features,
in_features]`` shape, so a layer computes ``x @ weight.T``.

bfloat16 on disk: ``safetensors.numpy`` writes ml_dtypes' bfloat16 arrays as ``BF16`` (it names the dtype
by its NumPy name), and ``safe_open(..., framework="np")`` reads ``BF16`` back as that same dtype once
ml_dtypes is imported (``course_lib.dtypes`` imports it). No PyTorch is needed on either side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from course_lib import dtypes
from course_lib.engine.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama of ``config`` has, by Hugging Face name, with its shape."""
    hidden = config.hidden_size
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.self_attn.q_proj.weight": (q_size, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_size, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_size, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_size),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.mlp.gate_proj.weight": (config.intermediate_size, hidden),
            f"{layer}.mlp.up_proj.weight": (config.intermediate_size, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, config.intermediate_size),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:  # tied: the output projection is the embedding table, stored once
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str = "weights") -> None:
    """Raise a ``ValueError`` naming the first tensor that is missing, unexpected or misshapen.

    ``shapes`` maps each tensor's name to its shape: a checkpoint is checked before its data is read.
    """
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"{source} has no tensor {name!r} (expected shape {shape})")
        if tuple(shapes[name]) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} should have shape {shape} for this config, got {tuple(shapes[name])}"
            )
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ValueError(f"{source} has tensors a Llama of this config does not: {', '.join(unexpected[:5])}")


def check_weights(config: ModelConfig, weights: dict[str, Any]) -> None:
    """``check_shapes`` for a dict of arrays."""
    check_shapes(config, {name: tuple(array.shape) for name, array in weights.items()})


def random_weights(config: ModelConfig, seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Random weights that keep activations of order one, so a random model's logits are a fair test.

    Linear weights are normal with std ``1 / sqrt(fan_in)``, embeddings standard normal (the first
    RMSNorm rescales them anyway), norm weights near one: close to how a trained model behaves.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        values = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * values
        elif name != "model.embed_tokens.weight":
            values /= math.sqrt(shape[1])
        weights[name] = values.astype(dtypes.host_dtype(dtype))
    return weights


def save_checkpoint(directory: str | Path, config: ModelConfig, weights: dict[str, np.ndarray]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed); return it."""
    check_weights(config, weights)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    save_file(
        {name: np.ascontiguousarray(array) for name, array in weights.items()},
        directory / WEIGHTS_FILE,
        metadata={"format": "pt"},
    )  # "pt": transformers then loads the file as its own
    return directory


def load_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a checkpoint folder: its config and its weights as host arrays, in the dtype they were stored in.

    Every tensor's name and shape is checked against the config before any data is read.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_FILE} in {directory}: a checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    config = ModelConfig.from_hf(json.loads(config_path.read_text()))
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS_FILE} in {directory} (checkpoints split into several files are not supported)"
        )
    with safe_open(weights_path, framework="np") as file:
        shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}  # noqa: SIM118 - not a dict
        check_shapes(config, shapes, source=str(weights_path))
        return config, {name: file.get_tensor(name) for name in shapes}
