"""Arithmetic intensity of attention: why decode is memory-bound, and when a tiled prefill is compute-bound (ch. 04b).

Intensity is FLOP per byte moved to or from memory. A kernel whose intensity lies below a card's *ridge* (its
FLOP/s over its bytes/s) waits on memory; above it, on arithmetic. Attention over ``n`` keys costs, per query row
and query head, ``2 n d`` FLOP for the logits ``q . k`` and ``2 n d`` for the weighted sum of values (a
multiply-add counts as two). What decides the bytes is how many query rows share each key and value read:

* a **decode** row shares them with the ``group`` query heads of its kv head only;
* **prefill as decode rows** (the engine today) is the same: every prompt token reads its prefix again;
* a **tiled prefill** block shares each key/value tile among ``query_tile x group`` rows.

The counts follow the tile schedule of ``kernels.paged_prefill_reference``, so the diagonal tiles' wasted half is
counted as computed, as a kernel computes it. Bytes are those a kernel asks memory for; a cache (L2) can serve
repeats, which these counts do not credit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from course_lib.kernels.paged_prefill_reference import key_tiles_for, query_tiles


@dataclass(frozen=True)
class AttentionShape:
    """One layer's attention: query heads, kv heads, head size, and bytes an element (2 for bf16)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    item_bytes: int = 2

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Traffic:
    """FLOP computed and bytes moved by one way of running attention over one sequence and one layer."""

    flops: float
    bytes_moved: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes_moved


def _qo_bytes(shape: AttentionShape, rows: int) -> int:
    """Reading the queries and writing the outputs of ``rows`` tokens, every query head."""
    return 2 * rows * shape.num_heads * shape.head_dim * shape.item_bytes


def decode_row(shape: AttentionShape, context_len: int) -> Traffic:
    """One new token over ``context_len`` cached ones: every key and value read once, for ``group`` heads."""
    flops = 4 * shape.num_heads * shape.head_dim * context_len
    kv_bytes = 2 * context_len * shape.num_kv_heads * shape.head_dim * shape.item_bytes
    return Traffic(flops, kv_bytes + _qo_bytes(shape, 1))


def prefill_as_decode_rows(shape: AttentionShape, prompt_len: int, prefix_len: int = 0) -> Traffic:
    """A prompt computed as decode rows: the token at position p reads the p + 1 keys and values up to itself.

    Summed over the prompt's positions, that is ``prompt_len * prefix_len + prompt_len * (prompt_len + 1) / 2`` keys.
    """
    keys = prompt_len * prefix_len + prompt_len * (prompt_len + 1) // 2
    one_key = decode_row(shape, 1)
    kv_bytes = one_key.bytes_moved - _qo_bytes(shape, 1)
    return Traffic(one_key.flops * keys, kv_bytes * keys + _qo_bytes(shape, prompt_len))


def tiled_prefill(shape: AttentionShape, prompt_len: int, prefix_len: int = 0, query_tile: int = 64,
                  key_tile: int = 64) -> Traffic:
    """A prompt computed by the tiled kernel: each (kv head, query tile) block reads its key tiles once.

    A diagonal tile is computed whole (the mask only zeroes weights), so the FLOP include its masked half.
    """
    context_len = prefix_len + prompt_len
    flops = kv_bytes = 0
    for start, stop in query_tiles(prefix_len, context_len, query_tile):
        keys = sum(tile.stop - tile.start for tile in key_tiles_for(start, stop, key_tile))
        flops += 4 * (stop - start) * shape.group * keys * shape.head_dim * shape.num_kv_heads
        kv_bytes += 2 * keys * shape.head_dim * shape.item_bytes * shape.num_kv_heads
    return Traffic(flops, kv_bytes + _qo_bytes(shape, prompt_len))


def useful_prefill(shape: AttentionShape, prompt_len: int) -> Traffic:
    """The least any kernel must do for a prompt with no prefix: the causal half of the logits, every byte once."""
    pairs = prompt_len * (prompt_len + 1) // 2  # (query, key) pairs with key <= query
    kv_bytes = 2 * prompt_len * shape.num_kv_heads * shape.head_dim * shape.item_bytes
    return Traffic(4 * shape.num_heads * shape.head_dim * pairs, kv_bytes + _qo_bytes(shape, prompt_len))


def key_reads_per_key(prompt_len: int) -> float:
    """How many times prefill as decode rows reads a prompt's average key: (L + 1) / 2."""
    return (prompt_len + 1) / 2


def ridge_crossing(intensity_at: Callable[[int], float], ridge: float, step: int = 64,
                   longest: int = 32_768) -> int | None:
    """The shortest prompt, a multiple of ``step`` up to ``longest``, whose intensity passes ``ridge`` (None: none).

    Bisection: intensity grows with the prompt for every way counted here, and a tiled count takes a while.
    """
    if intensity_at(longest) <= ridge:
        return None
    low, high = 0, longest // step  # intensity_at(high * step) > ridge; low * step is below it or 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if intensity_at(middle * step) > ridge else (middle, high)
    return high * step
