"""Record what Hugging Face transformers computes for SmolLM2's GGUF: the fixture the course's engine is checked on.

Run where transformers, torch, accelerate and gguf are installed (CI has none of them); the fixture was recorded
in a throwaway CPU environment (pip install torch transformers accelerate gguf):

    python tests/programs/record_smollm2_reference.py GGUF_FILE tests/fixtures/smollm2_transformers

transformers reads the same GGUF file as the course (``gguf_file=``), dequantizes it with the gguf package and
un-permutes q and k itself: an implementation independent of ``course_lib.checkpoint.gguf``. For each
prompt it records the prompt's token ids (its own tokenizer, built from the file's metadata), the float32
logits of the last prompt token, and 40 greedy tokens in float32 on the CPU, end-of-sequence ignored: a loop of
arg-maxes, so no generation setting can change them. Writes ``NAME.json`` (prompts, ids, tokens, versions)
and ``NAME.npz`` (the logits).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

NEW_TOKENS = 40
TEXT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT_PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
                [{"role": "user", "content": "Write a haiku about the sea."}]]


def main(gguf_file: str, output: str) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(8)
    path = Path(gguf_file).resolve()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    prompts = [{"text": text, "chat": False} for text in TEXT_PROMPTS]
    prompts += [{"text": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 "messages": messages, "chat": True} for messages in CHAT_PROMPTS]
    logits = {}
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt["text"], add_special_tokens=not prompt["chat"])["input_ids"]
        tokens, context = [], torch.tensor([ids])
        with torch.no_grad():
            for step in range(NEW_TOKENS):
                row = model(context).logits[0, -1].float()
                if step == 0:
                    logits[f"prompt{index}"] = row.numpy().astype(np.float32)
                tokens.append(int(torch.argmax(row)))
                context = torch.cat([context, torch.tensor([[tokens[-1]]])], dim=1)
        prompt |= {"prompt_token_ids": ids, "greedy_token_ids": tokens,
                   "greedy_text": tokenizer.decode(tokens, skip_special_tokens=False)}
        print(index, repr(prompt["greedy_text"][:80]), flush=True)
    record = {"gguf_file": path.name, "transformers": transformers.__version__, "torch": torch.__version__,
              "dtype": "float32", "device": "cpu", "new_tokens": NEW_TOKENS, "prompts": prompts}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output + ".json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    np.savez_compressed(output + ".npz", **logits)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
