"""Pictures of the block pool: each block is drawn with what the lab says it shows."""

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

from course_lib.engine.block_pool import BlockPool
from course_lib.engine.sequence import Sequence
from course_lib.labs.pool_view import (
    FREE_COLOR,
    PoolPicture,
    draw_pool,
    owner_color,
    show_pool,
    show_strip,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def computed(pool: BlockPool, seq_id: int, prompt) -> Sequence:
    """A sequence with blocks for its prompt, whose KV the model has written (so its full blocks are cached)."""
    sequence = Sequence(seq_id, tuple(prompt))
    pool.allocate(sequence)
    sequence.num_computed_tokens = sequence.num_tokens
    pool.cache_full_blocks(sequence)
    return sequence


def small_pool() -> tuple[BlockPool, list[Sequence]]:
    """Seq 1 and its fork 2 share two blocks; seq 3 was freed, leaving one cached and one partial block free."""
    pool = BlockPool(num_blocks=8, block_size=4, watermark=0.0)
    first, second = computed(pool, 1, range(6)), Sequence(2, tuple(range(6)))  # blocks 0 (full), 1 (partial)
    pool.fork(first, second)
    third = computed(pool, 3, range(100, 106))  # blocks 2 (full) and 3 (partial)
    pool.free(third)
    return pool, [first, second, third]


def texts(ax: plt.Axes) -> list[str]:
    return [text.get_text() for text in ax.texts]


def test_a_picture_holds_the_tables_and_does_not_follow_the_pool():
    pool, sequences = small_pool()
    picture = PoolPicture.of(pool, sequences, "before")
    assert picture.tables == {1: (0, 1), 2: (0, 1)}  # seq 3 holds no block: left out
    pool.free(sequences[0])
    assert picture.owners(0) == [1, 2] and picture.views[0].ref_count == 2
    assert PoolPicture.of(pool, sequences).tables == {2: (0, 1)}


def test_each_block_shows_its_ref_count_or_eviction_rank_and_its_hash():
    pool, sequences = small_pool()
    fig, ax = plt.subplots()
    draw_pool(ax, PoolPicture.of(pool, sequences), columns=4)
    labels = texts(ax)
    assert labels.count("ref 2") == 2  # the fork shares both blocks
    assert [f"b{block}" for block in range(8)] == [label for label in labels if label.startswith("b")]
    ranks = {view.eviction_rank for view in pool.snapshot() if view.is_free}
    assert {f"evict #{rank}" for rank in ranks} <= set(labels)
    hashes = [view.block_hash[:4] for view in pool.snapshot() if view.block_hash]
    assert len(hashes) == 2 and set(hashes) <= set(labels)  # the full blocks 0 and 2


def test_shared_blocks_are_striped_and_cached_free_blocks_hatched():
    pool, sequences = small_pool()
    fig, ax = plt.subplots()
    draw_pool(ax, PoolPicture.of(pool, sequences), columns=4, highlight=[3])
    rectangles = [patch for patch in ax.patches if isinstance(patch, Rectangle)]
    stripes = [patch for patch in rectangles if patch.get_facecolor()[:3] == to_rgba(owner_color(2))[:3]]
    assert len(stripes) == 2  # seq 2's half of blocks 0 and 1
    hatched = [patch for patch in rectangles if patch.get_hatch()]
    assert [patch.get_xy()[0] for patch in hatched] == pytest.approx([2.04])  # only block 2: free and cached
    red = [patch for patch in rectangles if patch.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    assert [patch.get_xy()[0] for patch in red] == pytest.approx([3.04])
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend[:2] == ["seq 1: [0, 1]", "seq 2: [0, 1]"]


def test_show_pool_and_show_strip_make_one_picture_each():
    pool, sequences = small_pool()
    assert show_pool(pool, sequences, "now").axes[0].get_title(loc="left") == "now"
    pictures = [PoolPicture.of(pool, sequences, title) for title in "abc"]
    assert [ax.get_title(loc="left") for ax in show_strip(pictures, columns=4).axes] == ["a", "b", "c"]


def test_twelve_sequences_in_a_row_get_twelve_colours_none_of_them_grey():
    colours = {to_rgba(owner_color(seq_id)) for seq_id in range(100, 112)}
    assert len(colours) == 12
    assert to_rgba(FREE_COLOR) not in colours
    assert to_rgba("tab:gray") not in colours
