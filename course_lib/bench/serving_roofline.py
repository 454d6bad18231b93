"""The least time a serving workload could take: each engine step's roofline, summed over the steps it needs.

A step streams bytes (every weight once, the keys and values it reads and writes) and multiplies (two FLOPs per
weight per token, and attention's products). Neither can beat the device's ceiling, so a step takes at least

    max(bytes / copy bandwidth, FLOPs / matmul rate)

with both ceilings measured in the same run (a device-to-device copy, a large bf16 cuBLAS product). A decode step
of 64 sequences is bound by bytes (the weights, read once for 64 tokens, and 64 contexts of keys and values); a
prefill step of thousands of tokens by FLOPs. The workload's roofline is the sum over its steps: the prompts in
steps of at most ``token_budget`` tokens, then one decode step per output token after the first (which the last
prefill step samples). It ignores everything a real step adds: launches, the host's scheduling and sampling,
kernels below their ceilings. The measured time over this sum says how much of the hardware the engine uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from course_lib.checkpoint.config import ModelConfig


@dataclass(frozen=True)
class StepCost:
    """What one engine step must move and compute."""

    bytes: float
    flops: float

    def seconds(self, copy_gbps: float, matmul_tflops: float) -> float:
        """The step's roofline: the slower of streaming its bytes and computing its FLOPs."""
        return max(self.bytes / (copy_gbps * 1e9), self.flops / (matmul_tflops * 1e12))


def layer_parameters(config: ModelConfig) -> int:
    """Weights of the decoder layers' projections that every token is multiplied by (norm weights are vectors)."""
    q_and_o = 2 * config.hidden_size * config.num_heads * config.head_dim
    k_and_v = 2 * config.hidden_size * config.num_kv_heads * config.head_dim
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_layers * (q_and_o + k_and_v + mlp)


def streamed_weight_bytes(config: ModelConfig, item_bytes: int) -> int:
    """Weight bytes a step reads: the layers and the output projection (a step reads one embedding row per token)."""
    return (layer_parameters(config) + config.vocab_size * config.hidden_size) * item_bytes


def kv_bytes_per_token(config: ModelConfig, item_bytes: int) -> int:
    """One token's key and value in every layer."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * item_bytes


def attention_flops(config: ModelConfig, visible_pairs: float) -> float:
    """Q Kᵀ and P V over ``visible_pairs`` (query, key) pairs, in every layer and query head."""
    return 4.0 * config.num_layers * config.num_heads * config.head_dim * visible_pairs


def step_cost(config: ModelConfig, item_bytes: int, sequences: list[tuple[int, int]]) -> StepCost:
    """One step of ``(new_tokens, context_len)`` per sequence, each sampling one token (its last row's logits)."""
    new_tokens = sum(new for new, _ in sequences)
    # The i-th of a sequence's `new` tokens sees context - new + i + 1 keys.
    pairs = sum(new * (context - new) + new * (new + 1) / 2 for new, context in sequences)
    flops = (2.0 * layer_parameters(config) * new_tokens + 2.0 * config.vocab_size * config.hidden_size * len(sequences)
             + attention_flops(config, pairs))
    kv_read = sum(context for _, context in sequences) * kv_bytes_per_token(config, item_bytes)
    return StepCost(streamed_weight_bytes(config, item_bytes) + kv_read, flops)


def workload_steps(config: ModelConfig, item_bytes: int, requests: int, prompt: int, output: int,
                   token_budget: int) -> list[StepCost]:
    """``requests`` prompts of ``prompt`` tokens prefilled ``token_budget`` tokens a step, then ``output - 1`` decode
    steps of all of them (the last prefill step samples each request's first token)."""
    if min(requests, prompt, output, token_budget) < 1:
        raise ValueError(f"requests, prompt, output and token_budget must be >= 1, got {requests}, {prompt}, "
                         f"{output}, {token_budget}")
    steps, chunks = [], []
    room = token_budget
    for _ in range(requests):
        done = 0
        while done < prompt:
            if room == 0:
                steps.append(step_cost(config, item_bytes, chunks))
                chunks, room = [], token_budget
            take = min(prompt - done, room)
            done += take
            chunks.append((take, done))
            room -= take
    steps.append(step_cost(config, item_bytes, chunks))
    steps += [step_cost(config, item_bytes, [(1, prompt + j)] * requests) for j in range(1, output)]
    return steps


def roofline_seconds(steps: list[StepCost], copy_gbps: float, matmul_tflops: float) -> float:
    """The workload's least time: its steps' rooflines, summed."""
    return sum(step.seconds(copy_gbps, matmul_tflops) for step in steps)
