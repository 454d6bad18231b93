"""Compare the course's Llama with Hugging Face transformers' LlamaForCausalLM on one checkpoint (GQA).

Run as its own process (``python tests/programs/compare_with_transformers.py``): torch must be imported
before anything loads numba.cuda, which a test session has long done. Prints one JSON line with the
relative errors of the course's logits against transformers': the dense reference at every position,
and the paged model (prefill, then decode steps) at the positions it computes.
"""

import json
import sys
import tempfile

import numpy as np
import torch  # before course_lib: see the docstring
import transformers

from course_lib import backend
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel
from course_lib.engine.reference import dense_forward
from course_lib.engine.weights import load_checkpoint

PROMPT, DECODED = 24, 4


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def main() -> int:
    hf_config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    tokens = np.random.default_rng(0).integers(0, hf_config.vocab_size, size=PROMPT + DECODED)
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)[None]).logits[0].float().numpy()
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder, safe_serialization=True)
        config, weights = load_checkpoint(folder)
    dense = dense_forward(config, weights, tokens)
    model, block_size = LlamaModel(config, weights, "float32"), 8
    cache = KVCache.allocate(config, num_blocks=8, block_size=block_size)
    table = [5, 2, 7, 0]  # scattered blocks: 32 slots for 28 tokens
    paged = []
    for start, count in [(0, PROMPT)] + [(PROMPT + i, 1) for i in range(DECODED - 1)]:
        attention = AttentionMetadata.build([(count, start + count, table)], block_size)
        step = backend.xp.asarray(tokens[start:start + count].astype(np.int32))
        paged.append(backend.to_numpy(model.forward(step, attention.positions, cache, attention))[0])
    positions = [PROMPT - 1 + i for i in range(DECODED)]
    print(json.dumps({"dense_vs_transformers": relative_error(dense, expected),
                      "paged_vs_transformers": relative_error(np.array(paged), expected[positions]),
                      "transformers": transformers.__version__, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
