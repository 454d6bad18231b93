"""Pictures of a ``BlockPool``: one rectangle per KV-cache block, so a lab can watch the bookkeeping.

Each block is drawn in a grid, in block-id order:

- a block in use is filled with the colour of the sequence that holds it; a block shared by several
  sequences is striped with all their colours, and ``ref N`` says how many hold it;
- a free block is pale and numbered with its place in the eviction order (``evict #0`` goes first);
- a free block that still holds a cached prefix is hatched: a new prompt with those tokens can revive it;
- a full block registered in the prefix cache shows the first hex digits of its hash along its bottom.

The pool itself knows nothing of this module, nor of sequences: a picture reads ``BlockPool.snapshot()`` and
the block tables of the sequences it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.patches import Patch, Rectangle

from course_lib.engine.block_pool import BlockPool, BlockView
from course_lib.engine.sequence import Sequence as Request

FREE_COLOR = "0.93"
# tab10 without its grey (free blocks are grey), and three more, so that 12 sequences in a row differ
OWNER_COLORS = [color for index, color in enumerate(plt.get_cmap("tab10").colors) if index != 7]
OWNER_COLORS += ["gold", "teal", "navy"]
HASH_DIGITS = 4  # enough to tell the cached prefixes of a small pool apart


@dataclass(frozen=True)
class PoolPicture:
    """What one picture of the pool shows: its blocks and every sequence's block table, at one moment."""

    title: str
    views: tuple[BlockView, ...]
    tables: Mapping[int, tuple[int, ...]]

    @classmethod
    def of(cls, pool: BlockPool, sequences: Iterable[Request], title: str = "") -> PoolPicture:
        """Take the picture now, of ``pool`` and the tables of ``sequences`` (those holding blocks are drawn);
        later changes to either do not change it."""
        tables = {seq.seq_id: tuple(seq.block_table) for seq in sorted(sequences, key=lambda seq: seq.seq_id)}
        return cls(title, tuple(pool.snapshot()), {seq_id: table for seq_id, table in tables.items() if table})

    def owners(self, block_id: int) -> list[int]:
        """The sequences whose tables hold ``block_id``."""
        return [seq_id for seq_id, table in self.tables.items() if block_id in table]


def owner_color(seq_id: int) -> tuple[float, float, float] | str:
    """The colour of a sequence, the same in every picture (twelve colours, reused in turn)."""
    return OWNER_COLORS[seq_id % len(OWNER_COLORS)]


def draw_pool(ax: plt.Axes, picture: PoolPicture, columns: int = 12, highlight: Iterable[int] = ()) -> None:
    """Draw every block of ``picture`` on ``ax``, ``columns`` blocks a row; ``highlight`` gets a thick red edge."""
    highlight = set(highlight)
    rows = -(-len(picture.views) // columns)
    for view in picture.views:
        x, y = view.block_id % columns, rows - 1 - view.block_id // columns
        _draw_block(ax, view, picture.owners(view.block_id), x, y, outline_red=view.block_id in highlight)
    ax.set_xlim(-0.05, columns + 0.05)
    ax.set_ylim(-0.05, rows + 0.05)
    ax.set_aspect("equal")
    ax.axis("off")
    if picture.title:
        ax.set_title(picture.title, loc="left", fontsize=10)
    ax.legend(handles=_legend_handles(picture), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)


def show_pool(pool: BlockPool, sequences: Iterable[Request], title: str = "", columns: int = 12,
              highlight: Iterable[int] = ()) -> plt.Figure:
    """A new figure with one picture of ``pool`` and ``sequences`` as they are now."""
    picture = PoolPicture.of(pool, sequences, title)
    rows = -(-len(picture.views) // columns)
    fig, ax = plt.subplots(figsize=(0.75 * columns + 3.5, 0.75 * rows + 0.5), layout="constrained")
    draw_pool(ax, picture, columns, highlight)
    return fig


def show_strip(pictures: Sequence[PoolPicture], columns: int = 12) -> plt.Figure:
    """Several pictures stacked top to bottom, to compare the pool at different moments."""
    rows = -(-len(pictures[0].views) // columns)
    fig, axes = plt.subplots(len(pictures), 1, figsize=(0.75 * columns + 3.5, (0.75 * rows + 0.5) * len(pictures)),
                             layout="constrained", squeeze=False)
    for ax, picture in zip(axes[:, 0], pictures, strict=True):
        draw_pool(ax, picture, columns)
    return fig


def _draw_block(ax: plt.Axes, view: BlockView, owners: list[int], x: float, y: float, outline_red: bool) -> None:
    pad, size = 0.04, 0.92  # a small gap between blocks
    if view.is_free:
        ax.add_patch(Rectangle((x + pad, y + pad), size, size, facecolor=FREE_COLOR, edgecolor="0.6",
                               hatch="///" if view.is_cached else None, linewidth=0.8))
        label = f"evict #{view.eviction_rank}"
    else:
        stripe = size / max(len(owners), 1)  # a sequence left out of the picture leaves its blocks unstriped
        for index, seq_id in enumerate(owners):
            ax.add_patch(Rectangle((x + pad + index * stripe, y + pad), stripe, size, facecolor=owner_color(seq_id),
                                   alpha=0.55, linewidth=0))
        ax.add_patch(Rectangle((x + pad, y + pad), size, size, fill=False, edgecolor="0.3", linewidth=0.8))
        label = f"ref {view.ref_count}"
    if outline_red:
        ax.add_patch(Rectangle((x + pad, y + pad), size, size, fill=False, edgecolor="red", linewidth=3))
    ax.text(x + 0.1, y + 0.84, f"b{view.block_id}", fontsize=7, va="top", color="0.25")
    ax.text(x + 0.5, y + 0.47, label, fontsize=8, ha="center", va="center", weight="bold")
    if view.block_hash is not None:
        ax.text(x + 0.5, y + 0.12, view.block_hash[:HASH_DIGITS], fontsize=7, ha="center", va="bottom",
                family="monospace", color="0.2")


def _legend_handles(picture: PoolPicture) -> list[Patch]:
    handles = [Patch(facecolor=owner_color(seq_id), alpha=0.55, label=f"seq {seq_id}: {list(table)}")
               for seq_id, table in picture.tables.items()]
    handles.append(Patch(facecolor=FREE_COLOR, edgecolor="0.6", label="free"))
    handles.append(Patch(facecolor=FREE_COLOR, edgecolor="0.6", hatch="///", label="free, prefix still cached"))
    return handles
