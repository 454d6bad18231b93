"""A Llama's weights under their Hugging Face names: random ones for tests, and checkpoints on disk.

A checkpoint is a folder holding ``config.json`` (a ``LlamaConfig``) and ``model.safetensors``, the layout
``transformers`` writes, so checkpoints move between the course and the Hub. A large model is split into
shards, ``model-00001-of-00004.safetensors`` and so on, with ``model.safetensors.index.json`` mapping each
tensor name to the shard that holds it (its ``weight_map``); both layouts load. Weights keep the dtype they
were stored in (fp32, fp16 or bf16); the model converts them to the engine's dtype when it moves them.
(GGUF files, llama.cpp's single-file format, load through ``course_lib.checkpoint.gguf``.) Weights here are host
NumPy arrays; the model moves them to the device. Linear weights keep PyTorch's ``[out_features,
in_features]`` shape, so a layer computes ``x @ weight.T``.

bfloat16 on disk: ``safetensors.numpy`` writes ml_dtypes' bfloat16 arrays as ``BF16`` (it names the dtype
by its NumPy name), and ``safe_open(..., framework="np")`` reads ``BF16`` back as that same dtype once
ml_dtypes is imported (``course_lib.dtypes`` imports it). No PyTorch is needed on either side.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from course_lib import dtypes
from course_lib.checkpoint.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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


def save_checkpoint(directory: str | Path, config: ModelConfig, weights: dict[str, np.ndarray],
                    num_shards: int = 1) -> Path:
    """Write ``config.json`` and the weights into ``directory`` (created if needed); return it.

    ``num_shards`` > 1 splits the tensors over that many files with an index, as transformers does for large models.
    """
    check_weights(config, weights)
    if not 1 <= num_shards <= len(weights):
        raise ValueError(f"num_shards must be between 1 and the number of tensors ({len(weights)}), got {num_shards}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    names = list(weights)
    if num_shards == 1:
        _save_shard(directory / WEIGHTS_FILE, weights, names)
        return directory
    weight_map = {}
    for index, part in enumerate(np.array_split(np.arange(len(names)), num_shards)):
        shard = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        _save_shard(directory / shard, weights, [names[i] for i in part])
        weight_map |= {names[i]: shard for i in part}
    total = sum(array.nbytes for array in weights.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
    return directory


def _save_shard(path: Path, weights: dict[str, np.ndarray], names: list[str]) -> None:
    # metadata "pt": transformers then loads the file as its own
    save_file({name: np.ascontiguousarray(weights[name]) for name in names}, path, metadata={"format": "pt"})


def load_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a checkpoint folder: its config and its weights as host arrays, in the dtype they were stored in.

    Every tensor's name and shape, in every shard, is checked against the config before any data is read.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_FILE} in {directory}: a checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
            f"(or shards listed in {INDEX_FILE})"
        )
    config = ModelConfig.from_hf(json.loads(config_path.read_text()))
    shard_of = _shard_map(directory)
    with ExitStack() as stack:
        files = {shard: stack.enter_context(safe_open(directory / shard, framework="np"))
                 for shard in sorted(set(shard_of.values())) or [WEIGHTS_FILE]}
        shapes = {}
        for shard, file in files.items():
            for name in file.keys():  # noqa: SIM118 - not a dict
                if shard_of.setdefault(name, shard) != shard:
                    raise ValueError(f"{directory / shard} holds {name!r}, which {INDEX_FILE} places in "
                                     f"{shard_of[name]}")
                shapes[name] = tuple(file.get_slice(name).get_shape())
        absent = sorted(set(shard_of) - set(shapes))
        if absent:
            raise ValueError(f"{INDEX_FILE} lists {absent[0]!r} in {shard_of[absent[0]]}, which does not hold it")
        check_shapes(config, shapes, source=str(directory))
        return config, {name: files[shard_of[name]].get_tensor(name) for name in shapes}


def _shard_map(directory: Path) -> dict[str, str]:
    """Tensor name -> file, from the index of a sharded checkpoint; ``{}`` (one file, read it all) otherwise."""
    if (directory / WEIGHTS_FILE).is_file():
        return {}
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} and no {INDEX_FILE} in {directory}: found no weights")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path} is not a safetensors index (a JSON object with a 'weight_map')") from error
    missing = sorted({shard for shard in weight_map.values() if not (directory / shard).is_file()})
    if missing:
        raise FileNotFoundError(f"{index_path} names shard(s) missing from {directory}: {', '.join(missing)}")
    return dict(weight_map)
