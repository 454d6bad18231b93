"""Reading real checkpoints: config.json as transformers 4 and 5 write it, RoPE (default and llama3), shards, dtypes.

The model tests compare the paged engine with the float64 dense reference at positions past 4096, where a
wrong RoPE frequency has turned the rotations far from the right ones."""

import json
import math

import numpy as np
import pytest

from course_lib import backend
from course_lib.check.llama_reference import dense_forward
from course_lib.checkpoint import rope
from course_lib.checkpoint.config import ModelConfig
from course_lib.checkpoint.rope import Llama3Scaling, inverse_frequencies
from course_lib.checkpoint.weights import load_checkpoint, random_weights, save_checkpoint
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel

LLAMA31_SCALING = Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
SMALL = ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=200, num_layers=2, num_heads=2, num_kv_heads=1,
                    max_position_embeddings=8192, rope_theta=500000.0)


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


# ---- config.json in both spellings -------------------------------------------------------------------


def hf_fields(config: ModelConfig) -> dict:
    """``config.to_hf()`` without its RoPE fields, for a test to spell them its own way."""
    return {key: value for key, value in config.to_hf().items() if key != "rope_parameters"}


def test_transformers_4_and_5_spellings_read_the_same():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    v4 = {**hf_fields(SMALL), "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    v4_old_key = {**v4, "rope_scaling": {"type": "llama3", **scaling}}
    v5 = {**hf_fields(SMALL), "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    expected = ModelConfig(**{**vars(SMALL), "rope_scaling": LLAMA31_SCALING})
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v4_old_key) == ModelConfig.from_hf(v5) == expected
    assert ModelConfig.from_hf(expected.to_hf()) == expected
    plain = {**hf_fields(SMALL), "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    assert ModelConfig.from_hf(plain) == ModelConfig.from_hf({**hf_fields(SMALL), "rope_theta": 500000.0}) == SMALL


# The fields of SmolLM2-135M-Instruct's config.json on the Hugging Face Hub (written by transformers 4.42).
SMOLLM2_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
    "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152,
}


def test_a_real_models_config_json_loads():
    config = ModelConfig.from_hf(SMOLLM2_CONFIG_JSON)
    assert (config.num_layers, config.num_kv_heads, config.rope_theta, config.tie_word_embeddings) == (30, 3, 1e5, True)
    with pytest.raises(ValueError, match="rope_interleaved=True is not supported"):
        ModelConfig.from_hf({**SMOLLM2_CONFIG_JSON, "rope_interleaved": True})


def test_a_missing_theta_is_the_llama_default():
    assert ModelConfig.from_hf(hf_fields(SMALL)).rope_theta == 10000.0


@pytest.mark.parametrize(("rope_fields", "message"), [
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type 'linear' is not"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "lacks low_freq_factor"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "beta_fast": 32}},
     r"field\(s\) \['beta_fast'\] are not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}}, "'default' takes no other"),
    ({"rope_parameters": {"rope_theta": 1e4}, "rope_theta": 5e5}, "disagree"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                          "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}}, "high_freq_factor >"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config are not understood"),
    ({"pretraining_tp": 2}, "pretraining_tp=2 is not supported"),
])
def test_rope_and_fields_the_engine_cannot_honour_are_refused_by_name(rope_fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**hf_fields(SMALL), **rope_fields})


# ---- the frequencies -----------------------------------------------------------------------------------


def test_llama3_keeps_short_waves_slows_long_ones_and_blends_between():
    """Checked against the rule as Meta's reference code states it, pair by pair."""
    head_dim, theta, s = 128, 500000.0, LLAMA31_SCALING
    plain, scaled = inverse_frequencies(head_dim, theta), inverse_frequencies(head_dim, theta, s)
    wavelengths = 2 * math.pi / plain
    short = wavelengths < s.original_max_position_embeddings / s.high_freq_factor  # < 2048 tokens
    long = wavelengths > s.original_max_position_embeddings / s.low_freq_factor  # > 8192 tokens
    middle = ~short & ~long
    assert short.sum() and long.sum() and middle.sum()  # Llama 3.1's 128-wide heads have all three kinds
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / 8, rtol=1e-15)
    assert np.all((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8))
    assert np.all(np.diff(scaled) < 0)  # still strictly decreasing: the blend is continuous at both ends
    assert plain[0] == 1.0 and plain[1] == pytest.approx(theta ** (-2 / head_dim), rel=1e-15)


# ---- the model at long positions ------------------------------------------------------------------------


def paged_logits(config: ModelConfig, weights: dict, tokens: np.ndarray, chunk: int, last: int) -> np.ndarray:
    """The engine's logits for each of the last ``last`` positions: prefill in chunks, then decode one at a time."""
    block_size = 32
    table = list(np.random.default_rng().permutation(math.ceil(len(tokens) / block_size)))  # scattered blocks
    model, cache = LlamaModel(config, weights, "float32"), KVCache.allocate(config, len(table), block_size)
    prefill, logits = len(tokens) - last, []
    steps = [(start, min(chunk, prefill - start)) for start in range(0, prefill, chunk)]
    for start, count in steps + [(prefill + i, 1) for i in range(last)]:
        attention = AttentionMetadata.build([(count, start + count, table)], block_size)
        step = backend.xp.asarray(tokens[start:start + count].astype(np.int32))
        logits.append(backend.to_numpy(model.forward(step, attention.positions, cache, attention))[0])
    return np.array(logits[-last:])


@pytest.mark.parametrize("scaling", [None, Llama3Scaling(8.0, 1.0, 4.0, 1024)], ids=["theta-500000", "llama3"])
def test_paged_model_matches_float64_reference_past_position_4096(tmp_path, scaling):
    """A checkpoint written and read back through config.json (theta in transformers 5's spelling, llama3 in
    transformers 4's), run to position 4100 in float32.

    Each float32 angle there carries a rounding error near 4100 * 2**-24 radians, yet the logits land within
    about 1e-6 of float64's (seen on CPU): the errors do not add up. A config read without its theta or its
    scaling moves them by 1e-1, which the last assertion checks, so this test can fail.
    """
    config = ModelConfig(**{**vars(SMALL), "rope_scaling": scaling})
    save_checkpoint(tmp_path, config, random_weights(config, seed=3))  # transformers 5's spelling
    if scaling is not None:  # this one as transformers 4 spells it
        hf = hf_fields(config) | {"rope_theta": config.rope_theta, "rope_scaling": scaling.to_hf()}
        (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded_config, weights = load_checkpoint(tmp_path)
    assert loaded_config == config
    tokens = np.random.default_rng().integers(0, config.vocab_size, 4100)
    last = 4
    expected = dense_forward(config, weights, tokens)[-last:]
    got = paged_logits(config, weights, tokens, chunk=1024, last=last)
    assert relative_error(got, expected) < 1e-4
    wrong = ModelConfig(**{**vars(config), "rope_theta": 10000.0} if scaling is None else
                        {**vars(config), "rope_scaling": None})
    assert relative_error(dense_forward(wrong, weights, tokens[-600:])[-last:],
                          dense_forward(config, weights, tokens[-600:])[-last:]) > 1e-2


# ---- shards and stored dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("stored", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("engine", ["float32", "bfloat16"])
def test_sharded_checkpoint_in_any_stored_dtype_loads_into_any_engine_dtype(tmp_path, stored, engine):
    weights = random_weights(SMALL, seed=4, dtype=stored)
    save_checkpoint(tmp_path, SMALL, weights, num_shards=3)
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    config, loaded = load_checkpoint(tmp_path)
    assert config == SMALL and loaded.keys() == weights.keys()
    for name, array in weights.items():
        np.testing.assert_array_equal(loaded[name], array)
    model = LlamaModel(config, loaded, engine)
    assert model.dtype == engine


def test_a_missing_shard_is_named(tmp_path):
    save_checkpoint(tmp_path, SMALL, random_weights(SMALL), num_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names shard\\(s\\) missing from .*: model-00002-of-00002"):
        load_checkpoint(tmp_path)


def test_an_index_that_misplaces_a_tensor_is_refused(tmp_path):
    save_checkpoint(tmp_path, SMALL, random_weights(SMALL), num_shards=2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="holds 'model.norm.weight', which model.safetensors.index.json places"):
        load_checkpoint(tmp_path)


def test_rope_to_hf_round_trips():
    assert rope.from_hf(rope.to_hf(5e5, LLAMA31_SCALING)) == (5e5, LLAMA31_SCALING)
    assert rope.from_hf(rope.to_hf(1e4, None)) == (1e4, None)
