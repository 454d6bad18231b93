"""Tensor parallelism: every layer of one model split over ``p`` ranks, each rank computing a slice of it.

This is Megatron-LM's layout, the one vLLM uses. A matrix product can be split two ways:

* **column-parallel**: each rank holds some of the weight's output rows and computes those outputs. The
  q/k/v projection is split by attention heads, so each rank attends with its own heads, on its own slice of
  the KV cache: attention needs no communication at all. The gate/up projection is split the same way.
* **row-parallel**: each rank holds the weight's columns that read its slice of the input, and computes a
  partial sum of every output. The output projection (after attention) and the down projection (after the
  MLP) are row-parallel: one **all-reduce** adds the partial sums, twice a layer.

The vocabulary is split too: each rank holds ``vocab / p`` rows of the embedding and of the LM head. A token's
embedding comes from the one rank that holds its row (the others contribute zeros to an all-reduce), and the
logits are gathered from every rank's slice (an all-gather). Everything else (norms, RoPE, the residual
stream) is replicated. When a model has fewer KV heads than ranks, each KV head is replicated on ``p / kv``
ranks, as vLLM does; a head count that does not split evenly is refused with a message saying why.

Rank 0 runs the scheduler, as vLLM and nano-vllm do, and sends each step's record to the other ranks
(``ModelRunner``); every rank runs the same kernels on its slices.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import numpy as np

from course_lib.checkpoint.config import ModelConfig
from course_lib.distributed import Communicator


def check_layout(config: ModelConfig, size: int) -> None:
    """Refuse a model that ``size`` ranks cannot split evenly, saying which dimension and what would do."""
    if size < 1:
        raise ValueError(f"the tensor-parallel size must be >= 1, got {size}")
    if problems := _uneven(config, size):
        fitting = [ranks for ranks in range(2, 9) if not _uneven(config, ranks)]
        raise ValueError(f"this model cannot be split over {size} ranks: {'; '.join(problems)}. Sizes that fit: "
                         f"{fitting or 'none up to 8'} (vLLM would refuse too; padding the heads is not done here)")


def _uneven(config: ModelConfig, size: int) -> list[str]:
    """What ``size`` ranks cannot split evenly (nothing: the layout works)."""
    kv = config.num_kv_heads
    problems = [f"{what} ({count}) is not a multiple of {size}" for what, count in
                (("the number of attention heads", config.num_heads), ("the MLP's intermediate size",
                 config.intermediate_size), ("the vocabulary", config.vocab_size)) if count % size]
    if kv % size and size % kv:
        problems.append(f"the {kv} KV heads can neither be split over {size} ranks nor replicated on them "
                        f"({size} is not a multiple of {kv})")
    return problems


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """The shape of one rank's slice: its heads, KV heads, MLP columns and vocabulary rows."""
    check_layout(config, size)
    return dataclasses.replace(config, num_heads=config.num_heads // size,
                               num_kv_heads=max(config.num_kv_heads // size, 1),
                               intermediate_size=config.intermediate_size // size,
                               vocab_size=config.vocab_size // size, head_dim=config.head_dim)


def shard_weights(config: ModelConfig, weights: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
    """Rank ``rank``'s slice of every weight (Hugging Face names and layout: ``[out_features, in_features]``)."""
    local = shard_config(config, size)
    head_dim = config.head_dim
    q_rows = _block(rank, local.num_heads * head_dim)
    kv_head = rank * config.num_kv_heads // size  # the first KV head of this rank (its only one if replicated)
    kv_rows = slice(kv_head * head_dim, (kv_head + local.num_kv_heads) * head_dim)
    mlp_rows = _block(rank, local.intermediate_size)
    sliced = {}
    for name, weight in weights.items():
        if name.endswith("q_proj.weight"):
            sliced[name] = weight[q_rows]
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            sliced[name] = weight[kv_rows]
        elif name.endswith("o_proj.weight"):
            sliced[name] = weight[:, q_rows]
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            sliced[name] = weight[mlp_rows]
        elif name.endswith("down_proj.weight"):
            sliced[name] = weight[:, mlp_rows]
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            sliced[name] = weight[_block(rank, local.vocab_size)]
        else:  # the norms: every rank holds them whole
            sliced[name] = weight
    return sliced


def _block(rank: int, length: int) -> slice:
    return slice(rank * length, (rank + 1) * length)


def broadcast_message(comm: Communicator, message: Any = None) -> Any:
    """Rank 0's ``message`` (any picklable object) on every rank: its length, then its bytes.

    A step's record is small (tens of integers per sequence), so pickling it costs far less than the step.
    """
    xp = comm.xp
    payload = np.frombuffer(bytearray(pickle.dumps(message)), dtype=np.uint8) if comm.rank == 0 else None
    length = comm.broadcast(xp.asarray([0 if payload is None else payload.size], dtype=xp.int64))
    data = xp.asarray(payload) if payload is not None else xp.empty(int(length[0]), dtype=xp.uint8)
    comm.broadcast(data)
    if comm.rank == 0:
        return message
    host = data.get() if hasattr(data, "get") else data
    return pickle.loads(host.tobytes())  # noqa: S301 - bytes rank 0 of this very program just pickled
