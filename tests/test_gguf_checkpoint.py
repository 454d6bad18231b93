"""Tests of the GGUF loader: round trips per element type, the q/k RoPE permutation, config fields, refusals.

The files are written here with ``gguf.GGUFWriter`` the way llama.cpp's ``convert_hf_to_gguf.py`` writes a
Llama: llama.cpp tensor names, q/k rows permuted by its ``LlamaModel.permute`` (copied below, independent
of the loader), 2-D tensors in the type under test and norms in F32.
"""

from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from course_lib import dtypes
from course_lib.check.llama_reference import dense_forward
from course_lib.checkpoint.config import ModelConfig
from course_lib.checkpoint.gguf import GGUFCheckpoint, load_gguf, read_metadata, unpermute_rope_rows
from course_lib.checkpoint.weights import random_weights

Q = gguf.GGMLQuantizationType
CONFIG = ModelConfig(
    vocab_size=97,  # odd: rows and columns cannot be swapped unnoticed
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
TIED = dataclasses.replace(CONFIG, tie_word_embeddings=True)
TOKENS = [3, 96, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84]
LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py: HF "rotate half" rows to GGML's pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_PARTS[rest.removesuffix('.weight')]}.weight"


def to_gguf_tensors(config: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights as llama.cpp would store them: its names, q and k rows permuted."""
    tensors = {}
    for name, array in weights.items():
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, config.num_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, config.num_kv_heads)
        tensors[gguf_name(name)] = array
    return tensors


def write_gguf(
    path: Path,
    config: ModelConfig = CONFIG,
    weights: dict[str, np.ndarray] | None = None,
    qtype: gguf.GGMLQuantizationType = Q.F32,
    arch: str = "llama",
    fields: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    leave_out: tuple[str, ...] = (),
) -> Path:
    """A Llama GGUF file of ``config``: ``fields`` override or add llama.* metadata (None removes one),
    ``tensors`` replace or add llama.cpp-named float32 tensors, ``leave_out`` drops fields or tensors."""
    weights = random_weights(config) if weights is None else weights
    writer = gguf.GGUFWriter(str(path), arch)
    metadata = {
        "block_count": config.num_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_heads,
        "attention.head_count_kv": config.num_kv_heads,
        "rope.freq_base": config.rope_theta,
        "attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "rope.dimension_count": config.head_dim,
        "vocab_size": config.vocab_size,
        **(fields or {}),
    }
    for key, value in metadata.items():
        if value is None or key in leave_out:
            continue
        if isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        elif isinstance(value, bool):
            writer.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_array(f"{arch}.{key}", value)
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_chat_template("{{ messages[0]['content'] }}")
    for name, array in {**to_gguf_tensors(config, weights), **(tensors or {})}.items():
        if name in leave_out:
            continue
        if array.ndim == 1 or qtype == Q.F32 or array.dtype != np.float32:  # norms stay F32, as llama.cpp has them
            writer.add_tensor(name, array)
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:  # BF16 and the block types: the bytes gguf's quantizer makes, with their type
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def owns_its_memory(array: np.ndarray) -> bool:
    """True when no array in ``array``'s chain of bases is a memory map of the file."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return False
        array = getattr(array, "base", None)
    return True


def test_the_writer_reverses_shapes_as_llama_cpp_does(tmp_path):
    reader = gguf.GGUFReader(write_gguf(tmp_path / "m.gguf", qtype=Q.Q4_1))
    q = next(tensor for tensor in reader.tensors if tensor.name == "blk.0.attn_k.weight")
    assert list(q.shape) == [CONFIG.hidden_size, CONFIG.num_kv_heads * CONFIG.head_dim]  # ne[0] first: [in, out]
    assert q.tensor_type == Q.Q4_1 and q.data.dtype == np.uint8


def test_unpermute_inverts_llama_cpps_permute():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (8, 4, 1):
        assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(weight, heads), heads), weight)
    head = llama_cpp_permute(np.arange(16.0)[:, None], 1)[:, 0]
    assert list(head[:4]) == [0, 8, 1, 9]  # GGML pairs feature i with i + d/2 as rows 2i, 2i+1


def test_unpermute_refuses_rows_that_do_not_split_into_heads():
    with pytest.raises(ValueError, match="does not split into 3 heads"):
        unpermute_rope_rows(np.zeros((16, 4)), 3)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda qtype: qtype.name)
def test_float_types_round_trip_to_their_rounding(tmp_path, qtype):
    original = random_weights(CONFIG)
    stored = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: dtypes.bfloat16}[qtype]
    path = write_gguf(tmp_path / "m.gguf", weights=original, qtype=qtype)  # BF16 goes in as raw bytes
    checkpoint = load_gguf(path)
    assert isinstance(checkpoint, GGUFCheckpoint)
    assert list(checkpoint.weights) == list(original)
    for name, w in checkpoint.weights.items():
        expected_dtype = np.float32 if w.ndim == 1 else stored
        assert w.dtype == expected_dtype, name
        assert np.array_equal(w.astype(np.float32), original[name].astype(expected_dtype).astype(np.float32)), name
        assert owns_its_memory(w) and w.flags.c_contiguous and w.flags.writeable, name


@pytest.mark.parametrize(
    ("qtype", "bound"), [(Q.Q8_0, 0.01), (Q.Q4_0, 0.15), (Q.Q4_1, 0.15)], ids=["Q8_0", "Q4_0", "Q4_1"]
)
def test_quantized_types_lose_only_their_rounding(tmp_path, qtype, bound):
    original = random_weights(CONFIG)
    checkpoint = load_gguf(write_gguf(tmp_path / "m.gguf", weights=original, qtype=qtype))
    for name, w in checkpoint.weights.items():
        assert w.dtype == np.float32 and owns_its_memory(w), name
        if w.ndim == 1:
            assert np.array_equal(w, original[name]), name
            continue
        # Blocks run along a row and the permutation moves whole rows, so quantizing before or after it agrees.
        assert np.array_equal(w, gguf.quants.dequantize(gguf.quants.quantize(original[name], qtype), qtype)), name
        assert relative_error(w, original[name]) < bound, name


@pytest.mark.parametrize(
    ("dtype", "qtype"),
    [("bfloat16", Q.F32), ("float16", Q.Q4_1), ("float32", Q.F16)],
    ids=["F32-bf16", "Q4_1-fp16", "F16-fp32"],
)
def test_dtype_converts_every_tensor(tmp_path, dtype, qtype):
    original = random_weights(CONFIG)
    checkpoint = load_gguf(write_gguf(tmp_path / "m.gguf", weights=original, qtype=qtype), dtype=dtype)
    assert {w.dtype for w in checkpoint.weights.values()} == {dtypes.host_dtype(dtype)}
    bound = 0.15 if qtype == Q.Q4_1 else 1e-2
    for name, w in checkpoint.weights.items():
        assert relative_error(w.astype(np.float32), original[name]) < bound, name


def test_a_bad_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_gguf(write_gguf(tmp_path / "m.gguf"), dtype="int8")


def test_q_and_k_rows_are_back_in_hugging_face_rope_layout(tmp_path):
    original = random_weights(CONFIG)
    loaded = load_gguf(write_gguf(tmp_path / "m.gguf", weights=original)).weights
    reference = dense_forward(CONFIG, original, TOKENS)
    assert relative_error(dense_forward(CONFIG, loaded, TOKENS), reference) < 1e-5
    # The same load without the un-permute (the rows as the file stores them) is a different model:
    as_stored = dict(loaded)
    for name in as_stored:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = CONFIG.num_heads if "q_proj" in name else CONFIG.num_kv_heads
            as_stored[name] = llama_cpp_permute(as_stored[name], heads)
    assert relative_error(dense_forward(CONFIG, as_stored, TOKENS), reference) > 0.05


def test_config_fields_are_read(tmp_path):
    checkpoint = load_gguf(write_gguf(tmp_path / "m.gguf"))
    assert checkpoint.config == CONFIG  # theta 500000, eps 1e-5, 4/2 heads, context 128, vocab 97, untied
    assert "lm_head.weight" in checkpoint.weights
    assert checkpoint.metadata["llama.rope.freq_base"] == 500000.0
    assert checkpoint.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-5  # not 9.99999974e-06


def test_no_output_tensor_means_tied_embeddings(tmp_path):
    original = random_weights(TIED)
    checkpoint = load_gguf(write_gguf(tmp_path / "m.gguf", config=TIED, weights=original))
    assert checkpoint.config == TIED and checkpoint.config.tie_word_embeddings
    assert "lm_head.weight" not in checkpoint.weights
    assert relative_error(dense_forward(TIED, checkpoint.weights, TOKENS), dense_forward(TIED, original, TOKENS)) < 1e-5


def test_defaults_and_fallbacks(tmp_path):
    multi_head = dataclasses.replace(CONFIG, num_kv_heads=4, rope_theta=10000.0)
    path = write_gguf(
        tmp_path / "m.gguf",
        config=multi_head,
        leave_out=("attention.head_count_kv", "rope.freq_base", "rope.dimension_count", "vocab_size"),
    )
    assert load_gguf(path).config == multi_head  # kv heads = heads, theta 10000, vocab = number of tokens


def test_head_dim_from_key_length(tmp_path):
    wide = dataclasses.replace(CONFIG, head_dim=32)  # 4 heads of 32 on a width of 64
    fields = {"attention.key_length": 32, "attention.value_length": 32}
    assert load_gguf(write_gguf(tmp_path / "m.gguf", config=wide, fields=fields)).config == wide


def test_read_metadata_gives_plain_python_values(tmp_path):
    metadata = read_metadata(write_gguf(tmp_path / "m.gguf"))
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 2 and type(metadata["llama.block_count"]) is int
    assert metadata["tokenizer.ggml.tokens"][:3] == ["t0", "t1", "t2"]
    assert len(metadata["tokenizer.ggml.tokens"]) == 97
    assert metadata["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    assert not any(key.startswith("GGUF.") for key in metadata)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        load_gguf(tmp_path / "nowhere.gguf")


def test_another_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'gpt2'.*only 'llama'"):
        load_gguf(write_gguf(tmp_path / "m.gguf", arch="gpt2"))


@pytest.mark.parametrize("keep", [0.5, 0.2, 0.01, 0.0])
def test_a_truncated_file_is_refused(tmp_path, keep):
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="is not a readable GGUF file \\(truncated or corrupt\\?\\)") as caught:
        load_gguf(path)
    assert caught.value.__cause__ is not None


def test_a_big_endian_file_is_refused(tmp_path):
    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_block_count(2)
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32).byteswap(), tensor_endianess=gguf.GGUFEndian.BIG)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_metadata(path)["llama.block_count"] == 2  # the metadata reads either way
    with pytest.raises(ValueError, match="other byte order"):
        load_gguf(path)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="noise.gguf is not a readable GGUF file"):
        read_metadata(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"leave_out": ("blk.1.ffn_down.weight",)}, "has no tensor 'model.layers.1.mlp.down_proj.weight'"),
        ({"tensors": {"blk.0.ffn_up.weight": np.zeros((96, 32), np.float32)}}, "up_proj.weight' should have shape"),
        ({"tensors": {"blk.0.attn_q.bias": np.zeros(64, np.float32)}}, "tensor 'blk.0.attn_q.bias'"),
        ({"tensors": {"rope_freqs.weight": np.ones(8, np.float32)}}, "rope_freqs.weight.*frequency factors"),
        ({"tensors": {"blk.0.attn_norm.weight": np.ones(64, np.int8)}}, "'blk.0.attn_norm.weight' is stored as I8"),
        ({"fields": {"rope.scaling.type": "linear"}}, "llama.rope.scaling.type='linear' is not supported"),
        ({"fields": {"rope.scaling.factor": 4.0}}, "llama.rope.scaling.factor=4.0 is not supported"),
        ({"fields": {"rope.dimension_count": 8}}, "dimension_count=8 but head_dim=16"),
        ({"fields": {"expert_count": 8}}, "llama.expert_count=8 is not supported"),
        ({"fields": {"final_logit_softcapping": 30.0}}, "final_logit_softcapping=30.0 is unknown to this loader"),
        ({"fields": {"attention.key_length": 16, "attention.value_length": 32}}, "key_length=16 and value_length"),
        ({"fields": {"attention.head_count": [4, 4]}}, "head_count is a per-layer list"),
        ({"leave_out": ("block_count",)}, "lacks the metadata field llama.block_count"),
        ({"fields": {"embedding_length": 62}}, "hidden_size=62 must split evenly"),
    ],
)
def test_what_the_engine_cannot_honour_is_refused_by_name(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_gguf(write_gguf(tmp_path / "m.gguf", **change))


def test_smollm2(smollm2_gguf):
    """The course's real model, as llama.cpp converted and quantized it (Q4_1 and Q8_0 blocks)."""
    checkpoint = load_gguf(smollm2_gguf)
    assert checkpoint.config == ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    assert all(np.isfinite(w).all() for w in checkpoint.weights.values())
    assert checkpoint.metadata["tokenizer.ggml.model"] == "gpt2" and "tokenizer.chat_template" in checkpoint.metadata
    # The un-permute checked on llama.cpp's own output: text the model knows gets a low perplexity (about 5;
    # with q/k rows left as the file stores them, about 20). Every word here is one token of the vocabulary.
    text = "The capital of France is Paris , and the capital of Germany is Berlin . The capital of Italy is Rome"
    words = text.split(" ")
    vocabulary = {token: i for i, token in enumerate(checkpoint.metadata["tokenizer.ggml.tokens"])}
    ids = np.array([vocabulary[words[0]]] + [vocabulary["Ġ" + word] for word in words[1:]])
    logits = dense_forward(checkpoint.config, checkpoint.weights, ids)
    log_probs = logits - logits.max(axis=-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=-1, keepdims=True))
    perplexity = np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())
    assert perplexity < 9, perplexity
