"""How a paged KV cache addresses tokens: the two formulas every part of an engine shares.

The cache is cut into blocks of ``block_size`` tokens; a sequence's *block table* lists the blocks that hold
its tokens, in order. Token ``position`` of a sequence then lives in block ``table[position // block_size]``,
row ``position % block_size``, and its *slot* (the row of the cache seen as one long array of tokens) is
``table[position // block_size] * block_size + position % block_size``. The block pool, the scheduler, the
attention kernels' checks and the CUDA graphs' inputs all use these two functions, so the formula is written
once.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def blocks_for(num_tokens: Any, block_size: int) -> Any:
    """How many blocks hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)`` (an int, or elementwise)."""
    return -(-num_tokens // block_size)


def slots_of(block_table: Any, positions: Any, block_size: int) -> np.ndarray:
    """The cache slots of token ``positions`` of a sequence whose blocks are ``block_table`` (int64).

    ``block_table`` may also be ``[rows, blocks]`` with one position per row: row ``r``'s position is looked up
    in row ``r``'s table (a decode batch, one new token per sequence).
    """
    table, positions = np.asarray(block_table, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    blocks = (table[positions // block_size] if table.ndim == 1
              else table[np.arange(len(positions)), positions // block_size])
    return blocks * block_size + positions % block_size
