"""Chapter 04b's helpers: the intensity counts agree with closed forms, the online-softmax trace with the softmax."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from course_lib.labs import online_softmax, prefill_intensity

matplotlib.use("Agg")

LLAMA_8B = prefill_intensity.AttentionShape(num_heads=32, num_kv_heads=8, head_dim=128)


def test_decode_intensity_is_two_flop_per_byte_per_head_of_a_group():
    # 4 FLOP per key per head over 2 bytes of K and 2 of V per kv head: 2 * group / item_bytes, plus q and out
    traffic = prefill_intensity.decode_row(LLAMA_8B, 100_000)
    assert traffic.intensity == pytest.approx(2 * LLAMA_8B.group / 2, rel=1e-3)


def test_prefill_as_decode_rows_reads_each_key_half_the_prompt_times():
    assert prefill_intensity.key_reads_per_key(512) == 256.5
    rows = prefill_intensity.prefill_as_decode_rows(LLAMA_8B, 512)
    kv_bytes = 2 * 8 * 128 * 2 * 512 * 513 / 2
    assert rows.bytes_moved == pytest.approx(kv_bytes + 2 * 512 * 32 * 128 * 2)


def test_tiled_prefill_counts_match_a_hand_count():
    shape = prefill_intensity.AttentionShape(num_heads=2, num_kv_heads=1, head_dim=4, item_bytes=2)
    # 8 queries in tiles of 4, key tiles of 4: tile 0..3 reads keys 0..3, tile 4..7 reads keys 0..7
    traffic = prefill_intensity.tiled_prefill(shape, 8, query_tile=4, key_tile=4)
    assert traffic.flops == 4 * 4 * 2 * (4 + 8) * 4
    assert traffic.bytes_moved == 2 * (4 + 8) * 4 * 2 + 2 * 8 * 2 * 4 * 2


def test_tiled_prefill_beats_decode_rows_by_the_query_tile():
    tiled, rows = (prefill_intensity.tiled_prefill(LLAMA_8B, 4096), prefill_intensity.prefill_as_decode_rows(
        LLAMA_8B, 4096))
    assert tiled.intensity > 50 * rows.intensity
    assert prefill_intensity.useful_prefill(LLAMA_8B, 4096).flops < tiled.flops  # diagonal tiles are computed whole


def test_trace_ends_at_the_softmax(rng):
    logits, values = rng.normal(0, 3, 70), rng.standard_normal((70, 5))
    steps = online_softmax.trace_row(logits, values, key_tile=16)
    weights = np.exp(logits - logits.max())
    np.testing.assert_allclose(steps[-1].output, weights @ values / weights.sum(), rtol=1e-12)
    assert steps[0].rescale == 0 and steps[-1].running_max == logits.max()
    assert [s.stop for s in steps] == [16, 32, 48, 64, 70]


def test_figure_draws(rng):
    logits = rng.normal(0, 2, 40)
    fig = online_softmax.draw_running_softmax(logits, online_softmax.trace_row(logits, np.ones((40, 2)), 8))
    assert len(fig.axes) == 3
