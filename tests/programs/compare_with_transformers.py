"""Compare the course's Llama with Hugging Face transformers' LlamaForCausalLM on checkpoints transformers saves.

Run as its own process: ``python tests/programs/compare_with_transformers.py VARIANT`` (torch must be imported
before anything loads numba.cuda, which a test session has long done). ``VARIANT`` is one of ``VARIANTS``:

* ``gqa``: the plain case, rope theta 10000;
* ``theta-500000``: Llama 3's theta; a loader that misses it (transformers 5 keeps it inside
  ``rope_parameters``) drifts from transformers as positions grow;
* ``llama3``: Llama 3.1's RoPE scaling, with ``original_max_position_embeddings`` 32 so that it changes the
  frequencies that matter at these short positions;
* ``tied``: tied input and output embeddings;
* ``odd-sizes``: an intermediate size that is not a multiple of 64 and an odd vocabulary.

transformers builds the model from its own config class, takes the course's random weights (order-one
activations, so greedy arg-maxes are clear and a tie cannot flip them) and saves the checkpoint with
``save_pretrained``; the course loads that folder. Prints one JSON line: the relative errors of the course's
logits against transformers' (the dense reference at every position; the paged model, prefill then decode,
in the current mode: CPU or GPU) and the greedy tokens of both, 32 of them, with the versions.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch  # before course_lib: see the docstring
import transformers

from course_lib import backend
from course_lib.check.llama_reference import dense_forward
from course_lib.checkpoint.config import ModelConfig
from course_lib.checkpoint.weights import load_checkpoint, random_weights
from course_lib.engine.llm import LLM
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel
from course_lib.engine.sampling import SamplingParams

PROMPT, DECODED, GREEDY = 24, 4, 32
BASE = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
VARIANTS = {
    "gqa": {"rope_theta": 10000.0},
    "theta-500000": {"rope_theta": 500000.0},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": LLAMA3},
    "tied": {"rope_theta": 500000.0, "tie_word_embeddings": True},
    "odd-sizes": {"rope_theta": 500000.0, "intermediate_size": 200, "vocab_size": 1001},
}


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def transformers_model(variant: str) -> transformers.LlamaForCausalLM:
    """transformers' Llama for the variant, holding the course's random weights for the same shapes."""
    fields = {**BASE, **VARIANTS[variant]}
    hf_config = transformers.LlamaConfig(**fields)
    course_config = ModelConfig(vocab_size=fields["vocab_size"], hidden_size=fields["hidden_size"],
                                intermediate_size=fields["intermediate_size"], num_layers=fields["num_hidden_layers"],
                                num_heads=fields["num_attention_heads"], num_kv_heads=fields["num_key_value_heads"],
                                tie_word_embeddings=fields["tie_word_embeddings"])
    model = transformers.LlamaForCausalLM(hf_config).eval()
    weights = {name: torch.from_numpy(array) for name, array in random_weights(course_config, seed=7).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def paged_logits(model: LlamaModel, tokens: np.ndarray) -> np.ndarray:
    """The course's logits at the positions a prefill of PROMPT tokens and DECODED - 1 decode steps compute."""
    block_size = 8
    cache = KVCache.allocate(model.config, num_blocks=8, block_size=block_size)
    table = [5, 2, 7, 0]  # scattered blocks: 32 slots for 28 tokens
    rows = []
    for start, count in [(0, PROMPT)] + [(PROMPT + i, 1) for i in range(DECODED - 1)]:
        attention = AttentionMetadata.build([(count, start + count, table)], block_size)
        step = backend.xp.asarray(tokens[start:start + count].astype(np.int32))
        rows.append(backend.to_numpy(model.forward(step, attention.positions, cache, attention))[0])
    return np.array(rows)


def transformers_greedy(model: transformers.LlamaForCausalLM, prompt: list[int]) -> list[int]:
    """GREEDY arg-max tokens, recomputing the whole sequence each step: nothing but the model decides them."""
    context, tokens = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(GREEDY):
            tokens.append(int(torch.argmax(model(context).logits[0, -1])))
            context = torch.cat([context, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens


def main(variant: str = "gqa") -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    hf_model = transformers_model(variant)
    tokens = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, size=PROMPT + DECODED)
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)[None]).logits[0].float().numpy()
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder, safe_serialization=True)
        config_json = json.loads((Path(folder) / "config.json").read_text())
        config, weights = load_checkpoint(folder)
        engine = LLM.from_checkpoint(folder, dtype="float32")
    prompt = [int(t) for t in tokens[:PROMPT]]
    [output] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=GREEDY, ignore_eos=True))
    positions = [PROMPT - 1 + i for i in range(DECODED)]
    print(json.dumps({
        "variant": variant, "mode": backend.mode_text(),
        "rope_fields_written": {key: config_json[key] for key in ("rope_parameters", "rope_theta", "rope_scaling")
                                if key in config_json},
        "config_read": {"rope_theta": config.rope_theta, "rope_scaling": str(config.rope_scaling),
                        "tie_word_embeddings": config.tie_word_embeddings},
        "dense_vs_transformers": relative_error(dense_forward(config, weights, tokens), expected),
        "paged_vs_transformers": relative_error(paged_logits(LlamaModel(config, weights, "float32"), tokens),
                                                expected[positions]),
        "engine_greedy": list(output.output_token_ids), "transformers_greedy": transformers_greedy(hf_model, prompt),
        "transformers": transformers.__version__, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
