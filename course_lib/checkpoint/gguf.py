"""Load a Llama from a GGUF file, llama.cpp's one-file model format, into the engine's Hugging Face layout.

**What GGUF is.** One file holds everything llama.cpp needs to run a model: a header of key/value
metadata (the architecture and its sizes, the tokenizer's vocabulary and merges, the chat template), a
table of tensors (name, shape, element type, offset), then the tensor data, aligned so the file can be
memory-mapped. Shapes are listed fastest dimension first (GGML's ``ne[0]`` is the length of a row), the
reverse of NumPy's order: a ``q_proj`` of NumPy shape ``[out, in]`` is listed as ``[in, out]``.

**Quantized in blocks.** Most tensors of a downloaded GGUF are not floats but blocks of small integer
codes: each run of 32 consecutive weights of a row is stored with its own scale, so one outlier only
costs precision in its own block.

- Q8_0: an fp16 scale ``d`` and 32 int8 codes ``q``; ``w = d * q`` (34 bytes per 32 weights).
- Q4_0: an fp16 scale ``d`` and 32 4-bit codes ``q``; ``w = d * (q - 8)`` (18 bytes per 32 weights).
- Q4_1: an fp16 scale ``d``, an fp16 minimum ``m`` and 32 4-bit codes ``q`` in 0..15; ``w = d * q + m``
  (20 bytes per 32 weights, 5 bits a weight). The quantizer takes ``m`` = the block's minimum and
  ``d = (max - min) / 15``, so the codes span the block's range exactly.

The engine's kernels take float weights, so this loader dequantizes every tensor once, at load time, with
``gguf.quants.dequantize``: the rounding of the blocks is the only loss.

**The classic trap: two layouts of RoPE.** Hugging Face's Llama rotates feature ``i`` of a head together
with feature ``i + d/2`` ("rotate half"); GGML's RoPE rotates adjacent features ``2i`` and ``2i + 1``. So
llama.cpp's ``convert_hf_to_gguf.py`` reorders the rows of ``q_proj`` and ``k_proj`` inside each head
(``LlamaModel.permute``): Hugging Face row ``j * d/2 + i`` (half ``j``, index ``i``) becomes GGUF row
``2i + j``. This engine rotates the Hugging Face way (see ``course_lib.check.llama_reference``), so the loader
puts the rows back: ``unpermute_rope_rows``. Without RoPE the reordering would not matter at all, since q
and k rows move together and a dot product does not care about the order of its terms; RoPE is what
pairs features, and the two conventions pair different ones. Forget the un-permute and the model loads
without complaint, every shape is right, and it writes gibberish.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from course_lib import dtypes
from course_lib.checkpoint import rope
from course_lib.checkpoint.config import ModelConfig
from course_lib.checkpoint.weights import check_shapes, expected_shapes

# llama.cpp's tensor names and their Hugging Face names; "{i}" is the layer number.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# Metadata fields that change the model's math, with the values that leave it a plain Llama.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "llama.rope.scaling.type": ("none",),  # linear / yarn / longrope context extension
    "llama.rope.scaling.factor": (0.0, 1.0),  # llama.cpp divides positions by it even without a type
    "llama.rope.scale_linear": (0.0, 1.0),  # the older name of the same factor
    "llama.rope.scaling.attn_factor": (1.0,),
    "llama.expert_count": (0,),  # mixture of experts (Mixtral)
    "llama.expert_used_count": (0,),
    "llama.logit_scale": (1.0,),
    "llama.residual_scale": (1.0,),
    "llama.embedding_scale": (1.0,),
    "llama.use_parallel_residual": (False,),
    "llama.attention.causal": (True,),
    "llama.attention.sliding_window": (0,),
    "llama.attention.clamp_kqv": (0.0,),
    "llama.attention.max_alibi_bias": (0.0,),
}
# Fields this loader reads, and fields that only describe the file (they do not change the math).
READ_FIELDS = {
    "llama.vocab_size",
    "llama.context_length",
    "llama.embedding_length",
    "llama.block_count",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.attention.value_length",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.dimension_count",
    "llama.rope.freq_base",
}
DESCRIPTIVE_FIELDS = {
    "llama.rope.scaling.original_context_length",  # only used by a scaling type, which must be "none"
    "llama.rope.scaling.finetuned",
    "llama.tensor_data_layout",  # old convert.py: q/k rows are in GGML's RoPE layout either way
}

# What GGUFReader raises on a file that is cut short or is not GGUF at all.
_CORRUPT_FILE_ERRORS = (ValueError, IndexError, KeyError, OverflowError, TypeError)


@dataclass(frozen=True)
class GGUFCheckpoint:
    """A Llama read from a GGUF file: its config, its weights under Hugging Face names, and all its metadata.

    ``weights`` are host NumPy arrays of the shapes ``course_lib.checkpoint.weights.expected_shapes`` gives,
    with q/k rows already back in Hugging Face's RoPE layout. ``metadata`` holds every key/value field of
    the file as plain Python values: the tokenizer reads ``tokenizer.ggml.*`` and ``tokenizer.chat_template``.
    """

    config: ModelConfig
    weights: dict[str, np.ndarray]
    metadata: dict[str, Any]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value field of a GGUF file as str, int, float, bool or lists of them; no tensor data is read.

    float32 fields come back as the shortest decimal that rounds to the same float32 (``1e-05``, not
    ``9.999999747378752e-06``). The reader's own header entries (``GGUF.version``, counts) are left out.
    """
    return _metadata(_open(path))


def load_gguf(path: str | Path, dtype: str | None = None) -> GGUFCheckpoint:
    """Read a Llama-architecture GGUF file into float host arrays under Hugging Face names.

    Everything is checked before any tensor is decoded: the architecture, every metadata field that would
    change the math, every tensor's name, shape and element type. Quantized tensors become float32; F32
    and F16 tensors keep their dtype and BF16 ones become ``course_lib.dtypes.bfloat16``. ``dtype``
    ("float32", "float16" or "bfloat16") converts every tensor to that type instead. ``q_proj`` and
    ``k_proj`` rows are un-permuted (see the module docstring). The arrays are copies that own their
    memory: none of them points into the file.
    """
    target = None if dtype is None else dtypes.host_dtype(dtype)
    reader = _open(path)
    if reader.byte_order != "I":
        raise ValueError(f"{path} was written for the other byte order (big-endian?); convert it to little-endian")
    metadata = _metadata(reader)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    shapes = {name: tuple(int(size) for size in reversed(tensor.shape)) for name, tensor in tensors.items()}
    config = _config(metadata, shapes, source=str(path))
    hf_names = {name: _hf_name(name, path) for name in tensors}
    check_shapes(config, {hf_names[name]: shape for name, shape in shapes.items()}, source=str(path))
    for name, tensor in tensors.items():
        if not _can_dequantize(tensor.tensor_type):
            raise ValueError(
                f"{path}: tensor {name!r} is stored as {tensor.tensor_type.name}, "
                f"a type the installed gguf package cannot dequantize"
            )
    weights = {}
    for name, tensor in tensors.items():
        array = _decode(tensor, shapes[name])
        if name.startswith("blk.") and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if name.endswith("attn_q.weight") else config.num_kv_heads
            array = unpermute_rope_rows(array, heads)
        weights[hf_names[name]] = array if target is None else array.astype(target, copy=False)
    return GGUFCheckpoint(config, {name: weights[name] for name in expected_shapes(config)}, metadata)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` on a q or k projection ``[heads * d, in]``.

    llama.cpp wrote row ``j * d/2 + i`` of each head (half ``j`` of the head, feature ``i``) to row
    ``2i + j``: ``w.reshape(heads, 2, d/2, in).swapaxes(1, 2)``. Reading the rows as ``[heads, d/2, 2]``
    and swapping the last two axes back puts each feature where Hugging Face's "rotate half" RoPE expects
    it. ``num_heads`` is the number of query heads for q, of kv heads for k. Returns a new array.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"a projection of {rows} rows does not split into {num_heads} heads of even width")
    half = rows // num_heads // 2
    return np.ascontiguousarray(weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2)).reshape(
        weight.shape
    )


def _open(path: str | Path) -> gguf.GGUFReader:
    """Parse the header of ``path`` (the tensor data stays on disk, memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(path)
    except _CORRUPT_FILE_ERRORS as error:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {error}") from error


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {key: _plain(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _plain(field: Any) -> Any:
    """A field's value as Python values, float32 ones rounded to their shortest decimal."""
    value = field.contents()
    if field.types[-1] != gguf.GGUFValueType.FLOAT32:
        return value
    if isinstance(value, list):
        return [float(str(np.float32(item))) for item in value]
    return float(str(np.float32(value)))


def _config(metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> ModelConfig:
    """The engine's config from the llama.* fields, refusing by name any field the engine cannot honour."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"{source}: general.architecture is {architecture!r}; only 'llama' is supported by this engine"
        )
    if metadata.get("split.count", 1) > 1:
        raise ValueError(f"{source} is one part of a split GGUF ({metadata['split.count']} files): merge it first")
    for key, value in metadata.items():
        if not key.startswith("llama.") or key in READ_FIELDS or key in DESCRIPTIVE_FIELDS:
            continue
        if key not in NEUTRAL_VALUES:
            raise ValueError(
                f"{source}: metadata field {key}={value!r} is unknown to this loader, and it may change "
                f"the model's math; refusing rather than ignoring it"
            )
        if value not in NEUTRAL_VALUES[key]:
            raise ValueError(
                f"{source}: {key}={value!r} is not supported by this engine "
                f"(it needs {' or '.join(map(repr, NEUTRAL_VALUES[key]))})"
            )
    if "rope_freqs.weight" in shapes:
        raise ValueError(
            f"{source} has a rope_freqs.weight tensor (Llama 3.1's RoPE scaling, stored as frequency factors): "
            f"the engine implements that scaling from its parameters, as a Hugging Face config.json gives them, "
            f"and does not read it in this tensor form; load the model's safetensors checkpoint instead"
        )

    def field(name: str, default: Any = None) -> Any:
        key = f"llama.{name}"
        if key not in metadata:
            if default is None:
                raise ValueError(f"{source} lacks the metadata field {key}")
            return default
        if isinstance(metadata[key], list):
            raise ValueError(f"{source}: {key} is a per-layer list; this engine needs one value for all layers")
        return metadata[key]

    num_heads = field("attention.head_count")
    values = {
        "hidden_size": field("embedding_length"),
        "intermediate_size": field("feed_forward_length"),
        "num_layers": field("block_count"),
        "num_heads": num_heads,
        "num_kv_heads": field("attention.head_count_kv", num_heads),
        "max_position_embeddings": field("context_length"),
        "rope_theta": field("rope.freq_base", rope.DEFAULT_THETA),
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    values["vocab_size"] = _vocab_size(metadata, shapes, source)
    key_length, value_length = field("attention.key_length", 0), field("attention.value_length", 0)
    if key_length != value_length:
        raise ValueError(
            f"{source}: llama.attention.key_length={key_length} and value_length={value_length} "
            f"differ; this engine needs one head_dim for keys and values"
        )
    values["head_dim"] = key_length
    try:
        config = ModelConfig(**values)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error
    rope_dims = field("rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim:
        raise ValueError(
            f"{source}: llama.rope.dimension_count={rope_dims} but head_dim={config.head_dim}; "
            f"this engine rotates every feature of a head (no partial RoPE)"
        )
    return config


def _vocab_size(metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> int:
    """llama.vocab_size, else the tokenizer's token count, else the rows of the embedding table."""
    if "llama.vocab_size" in metadata:
        return metadata["llama.vocab_size"]
    if "tokenizer.ggml.tokens" in metadata:
        return len(metadata["tokenizer.ggml.tokens"])
    if "token_embd.weight" in shapes:
        return shapes["token_embd.weight"][0]
    raise ValueError(f"{source} gives no vocabulary size (no llama.vocab_size, tokens or token_embd.weight)")


def _hf_name(name: str, path: str | Path) -> str:
    """The Hugging Face name of a llama.cpp tensor name, or a ``ValueError`` naming the unknown tensor."""
    layer = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    pattern = f"blk.{{i}}.{layer.group(2)}" if layer else name
    if pattern not in TENSOR_NAMES:
        raise ValueError(f"{path} has a tensor {name!r} that a Llama of this engine does not have")
    return TENSOR_NAMES[pattern].format(i=layer.group(1) if layer else "")


@functools.cache
def _can_dequantize(tensor_type: gguf.GGMLQuantizationType) -> bool:
    """Whether the installed ``gguf`` decodes this type into floats (tried on one all-zero block)."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), tensor_type)
    except NotImplementedError:
        return False
    return True


def _decode(tensor: gguf.ReaderTensor, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor as an owned host array of NumPy ``shape``: float types kept, quantized ones as float32."""
    kind = gguf.GGMLQuantizationType
    if tensor.tensor_type in (kind.F32, kind.F16):
        return np.array(tensor.data, copy=True).reshape(shape)  # the reader gives a float view of the file
    if tensor.tensor_type == kind.BF16:  # the reader gives raw bytes; bf16 is float32's upper 16 bits
        return np.array(tensor.data).view(np.uint16).view(dtypes.bfloat16).reshape(shape)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)  # a new float32 array
