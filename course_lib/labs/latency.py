"""What a user of a server feels, measured on the course's engine: time to first token, time per output token
and throughput, for one batch of requests served together (lab 20, ``examples/latency_bench.py``).

* **TTFT** (time to first token): from submitting the batch to a request's first token, averaged over the
  requests. It pays for the prompt's prefill, and for waiting behind the other prompts of the batch.
* **TPOT** (time per output token): the mean gap between a request's later tokens, one decode step each.
* **throughput**: output tokens of the whole batch over the wall time.
"""

from __future__ import annotations

import time

import numpy as np

from course_lib import backend
from course_lib.engine.llm import LLM
from course_lib.engine.sampling import SamplingParams


def measure_latency(llm: LLM, batch: int, prompt_length: int, output_length: int,
                    rng: np.random.Generator) -> dict[str, float]:
    """Serve ``batch`` random prompts of ``prompt_length`` tokens, ``output_length`` tokens each (greedy, no early
    stop), timing every token as the stream hands it out."""
    prompts = [list(rng.integers(0, llm.config.vocab_size, size=prompt_length)) for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=output_length, ignore_eos=True)
    arrivals: list[list[float]] = [[] for _ in range(batch)]
    start = time.perf_counter()
    for event in llm.stream(prompts, params):
        backend.synchronize()
        arrivals[event.request_id].append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    ttft = float(np.mean([times[0] for times in arrivals]))
    gaps = [np.diff(times) for times in arrivals if len(times) > 1]
    tpot = float(np.mean(np.concatenate(gaps))) if gaps else float("nan")
    return {"batch": batch, "prompt_length": prompt_length, "output_length": output_length, "wall_s": wall,
            "ttft_s": ttft, "tpot_s": tpot, "tokens_per_s": batch * output_length / wall}
