"""One step's batch, as the model runs it: the new tokens of many sequences, where their KV goes, what they read.

The scheduler decides, per sequence, how many new tokens it computes this step. This record says it once, in
the arrays everything downstream reads, built on the host:

* per new token of the flat batch: ``token_ids``, ``positions`` and ``slots`` (where its key and value are
  written: ``kv_blocks.slots_of``);
* per sequence: ``query_lens`` (its new tokens), ``context_lens`` (the tokens in its cache once this step
  has written them) and ``block_tables`` (padded with -1, never read).

An eager step copies it to the device as ``AttentionMetadata``; a CUDA-graph replay copies it into the
graph's input buffers. ``check`` validates every index against the KV cache and the vocabulary, once a step,
here on the host where the numbers already are, so the kernels launched from it need no checks of their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from course_lib.kernels.kv_blocks import blocks_for, slots_of


@dataclass(frozen=True)
class StepBatch:
    """A step's flat batch; build it with :meth:`build` from each sequence's share."""

    query_lens: np.ndarray  # [sequences] int32: new tokens of each sequence, in the order of the flat batch
    context_lens: np.ndarray  # [sequences] int32: tokens in its cache once the step's new ones are written
    block_tables: np.ndarray  # [sequences, longest table] int32, -1 past a sequence's own blocks
    token_ids: np.ndarray | None  # [tokens] int32, or None when the GPU supplies them (a decode run)
    block_size: int

    @classmethod
    def build(cls, sequences: Iterable[tuple[int, int, Sequence[int]]], block_size: int,
              token_ids: Sequence[int] | None = None) -> StepBatch:
        """From ``(num_new_tokens, context_len, block_table)`` per sequence: its newest tokens, the last of its
        context, and the flat batch's ``token_ids`` (if the host knows them)."""
        sequences = list(sequences)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not sequences:
            raise ValueError("a step needs at least one sequence")
        tables = np.full((len(sequences), max(max(len(table) for _, _, table in sequences), 1)), -1, np.int32)
        for row, (_, _, table) in enumerate(sequences):
            tables[row, :len(table)] = table
        return cls(np.array([new for new, _, _ in sequences], np.int32),
                   np.array([context for _, context, _ in sequences], np.int32), tables,
                   None if token_ids is None else np.asarray(token_ids, np.int32), block_size)

    @property
    def num_sequences(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.query_lens.sum())

    @property
    def is_decode(self) -> bool:
        """Every sequence computes one token: the step a CUDA graph can replay."""
        return self.num_tokens == self.num_sequences

    @cached_property
    def num_leading_decodes(self) -> int:
        """How many sequences at the front of the batch compute one token each (the scheduler puts decodes first):
        their rows go to the decode kernel, the rest of a step with prompt tokens to the prefill kernel."""
        single = self.query_lens == 1
        return self.num_sequences if single.all() else int(single.argmin())

    @cached_property
    def positions(self) -> np.ndarray:
        """[tokens] int32: a sequence's new tokens sit at the end of its context."""
        return np.concatenate([np.arange(context - new, context, dtype=np.int32)
                               for new, context in zip(self.query_lens, self.context_lens, strict=True)])

    @cached_property
    def token_rows(self) -> np.ndarray:
        """[tokens]: the sequence (row of ``block_tables``) each new token belongs to."""
        return np.repeat(np.arange(self.num_sequences), self.query_lens)

    @cached_property
    def slots(self) -> np.ndarray:
        """[tokens] int32: the cache slot each new token's key and value go to."""
        return slots_of(self.block_tables[self.token_rows], self.positions, self.block_size).astype(np.int32)

    @property
    def last_rows(self) -> np.ndarray:
        """The row of each sequence's last new token in the flat batch: the logits it samples from."""
        return np.cumsum(self.query_lens) - 1

    def check(self, num_blocks: int, vocab_size: int) -> None:
        """Every count, block id and token id the step's kernels will follow, checked against the cache and the
        vocabulary; a ``ValueError`` names the first sequence at fault. Whole-array NumPy operations, the
        reasons worked out only on failure: this runs every step, for up to ``max_num_seqs`` sequences, while
        the GPU waits."""
        new, context, tables = self.query_lens, self.context_lens, self.block_tables
        if ((new < 1) | (new > context)).any():
            row = int(((new < 1) | (new > context)).argmax())
            raise ValueError(f"sequence {row}: need 1 <= num_new_tokens <= context_len, got num_new_tokens="
                             f"{new[row]}, context_len={context[row]}")
        needed = blocks_for(context, self.block_size)
        read = np.arange(tables.shape[1]) < needed[:, None]  # the entries the kernels will follow
        if needed.max() > tables.shape[1] or (read & ((tables < 0) | (tables >= num_blocks))).any():
            self._raise_for_tables(num_blocks, needed)
        if self.num_tokens > 1 and np.unique(self.slots).size != self.num_tokens:
            raise ValueError(f"two new tokens of the step share a KV-cache slot (which write wins is a race): "
                             f"slots {self.slots.tolist()}")
        ids = self.token_ids
        if ids is not None and (ids.shape != (self.num_tokens,) or ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token_ids must be {self.num_tokens} integers in [0, {vocab_size}), got {ids.size} "
                             f"from {ids.min()} to {ids.max()}")

    def _raise_for_tables(self, num_blocks: int, needed: np.ndarray) -> None:
        """The first sequence whose table is too short or holds a block id outside the cache, and why."""
        for row, (context, table) in enumerate(zip(self.context_lens, self.block_tables, strict=True)):
            read = table[:needed[row]]
            if len(read) < needed[row] or (read < 0).any():
                raise ValueError(f"sequence {row}: context_len={context} needs {needed[row]} blocks of "
                                 f"{self.block_size}, its block table has {int((table >= 0).sum())}")
            if (read >= num_blocks).any():
                raise ValueError(f"sequence {row}: block ids must lie in [0, {num_blocks}), got {read.tolist()}")
