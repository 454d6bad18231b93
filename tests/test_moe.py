"""The expert-parallel MoE layer on the threads backend against the dense float64 reference: 1 to 4 ranks,
uneven token counts (a rank with none), experts no token chose; the router's ties; layouts that must fail."""

import dataclasses

import numpy as np
import pytest

from course_lib.check.tolerance import relative_error
from course_lib.distributed import run_ranks
from course_lib.distributed.moe import (
    expert_range,
    moe_forward,
    moe_reference,
    random_moe_weights,
    route,
)

HIDDEN, INNER = 16, 24
LAYOUTS = ((1, 8), (2, 8), (4, 8), (3, 6))  # (ranks, experts)
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def token_counts(rng, size):
    """Uneven tokens per rank, 1 to 9; one random rank has none when there are several."""
    counts = rng.integers(1, 10, size)
    if size > 1:
        counts[rng.integers(size)] = 0
    return counts.tolist()


def on_grid(rng, shape):
    """Random multiples of 1/8 from -2 to 2, never 0: the router's products and sums over HIDDEN of them are
    exact in float32, so a float32 layer routes exactly as the float64 reference does, ties included."""
    return rng.integers(1, 17, shape) * rng.choice([-1, 1], shape) / 8


def run_layer(rng, size, weights, tokens, top_k=2, dtype="float64"):
    """Each rank's tokens, and the layer's outputs and traffic on ``size`` ranks, in rank order."""
    xs = [on_grid(rng, (count, HIDDEN)).astype(dtype) for count in tokens]
    results = run_ranks(lambda comm: moe_forward(comm, xs[comm.rank], weights.shard(comm.rank, comm.size), top_k),
                        size)
    return xs, [out for out, _ in results], [traffic for _, traffic in results]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("size, num_experts", LAYOUTS)
def test_moe_forward_equals_the_dense_reference(rng, size, num_experts, dtype):
    weights = random_moe_weights(rng, num_experts, HIDDEN, INNER, dtype)
    weights = dataclasses.replace(weights, router=on_grid(rng, (HIDDEN, num_experts)).astype(dtype))
    for top_k in (1, 2, num_experts):
        tokens = token_counts(rng, size)
        xs, outs, _ = run_layer(rng, size, weights, tokens, top_k, dtype)
        for rank, (x, out) in enumerate(zip(xs, outs, strict=True)):
            assert out.shape == x.shape and out.dtype == x.dtype, f"rank {rank}"
        expected = moe_reference(np.concatenate(xs), weights, top_k)
        assert relative_error(np.concatenate(outs), expected) < TOLERANCE[dtype], (top_k, tokens)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_experts_no_token_chose_and_ranks_with_no_tokens(rng, size):
    """Every token picks experts 0 and 1 (rank 0's): the other ranks' experts get nothing and send nothing back."""
    weights = random_moe_weights(rng, 8, HIDDEN, INNER)
    router = weights.router.copy()
    router[0] = [40.0, 40.0] + [-40.0] * 6
    weights = dataclasses.replace(weights, router=router)
    tokens = token_counts(rng, size)
    xs = [rng.standard_normal((count, HIDDEN)) for count in tokens]
    for x in xs:
        x[:, 0] = rng.uniform(1, 2, len(x))  # the feature that makes experts 0 and 1 win

    def rank_main(comm):
        return moe_forward(comm, xs[comm.rank], weights.shard(comm.rank, comm.size))

    results = run_ranks(rank_main, size)
    got = np.concatenate([out for out, _ in results])
    assert relative_error(got, moe_reference(np.concatenate(xs), weights)) < 1e-12
    for rank, (_, traffic) in enumerate(results):
        assert traffic.dispatch_rows == (2 * tokens[rank],) + (0,) * (size - 1)
        assert traffic.combine_rows == (tuple(2 * count for count in tokens) if rank == 0 else (0,) * size)



@pytest.mark.parametrize("size", [1, 3])
def test_a_batch_with_no_tokens_at_all(rng, size):
    weights = random_moe_weights(rng, 6, HIDDEN, INNER)
    _, outs, traffic = run_layer(rng, size, weights, [0] * size)
    assert all(out.shape == (0, HIDDEN) for out in outs)
    assert all(t.dispatch_rows == t.combine_rows == (0,) * size for t in traffic)


@pytest.mark.parametrize("size, num_experts", LAYOUTS)
def test_traffic_counts_the_rows_each_rank_sends(rng, size, num_experts):
    weights = random_moe_weights(rng, num_experts, HIDDEN, INNER)
    tokens = token_counts(rng, size)
    xs, _, traffic = run_layer(rng, size, weights, tokens)
    owner = [expert // (num_experts // size) for expert in range(num_experts)]
    for rank, x in enumerate(xs):
        experts, _ = route(x, weights.router, 2)
        expected_rows = np.bincount([owner[e] for e in experts.ravel()], minlength=size)
        assert traffic[rank].dispatch_rows == tuple(expected_rows.tolist())
        assert traffic[rank].combine_rows == tuple(traffic[source].dispatch_rows[rank] for source in range(size))
        assert traffic[rank].row_bytes == HIDDEN * 8
        assert traffic[rank].dispatch_bytes == (2 * tokens[rank] - expected_rows[rank]) * HIDDEN * 8
    assert sum(t.dispatch_bytes for t in traffic) == sum(t.combine_bytes for t in traffic)


def test_router_ties_go_to_the_lower_expert_id():
    logits = np.array([[0.5, 1.0, 3.0, 1.0, 2.0, 0.1, 2.0, -1.0],  # 2 wins; 4 and 6 tie for second
                       [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tie
                       [-1.0, 0.0, 0.0, 5.0, -2.0, 0.0, -3.0, 5.0]])  # 3 and 7 tie for first
    experts, weights = route(np.eye(3), logits, 3)  # identity tokens: the logits are the router's rows
    np.testing.assert_array_equal(experts, [[2, 4, 6], [0, 1, 2], [3, 7, 1]])
    chosen = np.take_along_axis(logits, experts, 1)
    np.testing.assert_allclose(weights, np.exp(chosen) / np.exp(chosen).sum(1, keepdims=True), rtol=1e-15)
    for token in range(3):  # alone or in a batch, the same choice
        alone, _ = route(np.eye(3)[token:token + 1], logits, 3)
        np.testing.assert_array_equal(alone[0], experts[token])
    assert experts.dtype == np.int64


def test_expert_range_splits_experts_into_whole_consecutive_shares():
    assert [expert_range(12, rank, 3) for rank in range(3)] == [range(0, 4), range(4, 8), range(8, 12)]
    assert expert_range(8, 0, 1) == range(8)


def test_bad_layouts_raise_clear_errors(rng):
    weights = random_moe_weights(rng, 8, HIDDEN, INNER)
    with pytest.raises(ValueError, match="8 experts do not split evenly over 3 ranks"):
        weights.shard(0, 3)
    with pytest.raises(ValueError, match="8 experts do not split evenly over 3 ranks"):
        run_ranks(lambda comm: moe_forward(comm, np.ones((2, HIDDEN)), weights), 3)
    x = rng.standard_normal((4, HIDDEN))
    for top_k in (0, 9, 2.0):
        with pytest.raises(ValueError, match=r"top_k must be a whole number from 1 to the number of experts \(8\)"):
            moe_reference(x, weights, top_k)
        with pytest.raises(ValueError, match="top_k must be"):
            run_ranks(lambda comm, k=top_k: moe_forward(comm, x, weights, k), 1)
    with pytest.raises(ValueError, match="rank 1 of 2 holds experts 4 to 7, but its weights are experts 0 to 3"):
        run_ranks(lambda comm: moe_forward(comm, x, weights.shard(0, 2)), 2)
    with pytest.raises(ValueError, match="shard splits a whole layer"):
        weights.shard(0, 2).shard(0, 2)
    with pytest.raises(ValueError, match="needs a whole layer"):
        moe_reference(x, weights.shard(1, 2))
    with pytest.raises(ValueError, match=r"tokens must be \[tokens, hidden = 16\]"):
        moe_reference(x[:, :3], weights)
    with pytest.raises(TypeError, match="tokens are float32 but the weights are float64"):
        run_ranks(lambda comm: moe_forward(comm, x.astype("float32"), weights), 1)


def test_weights_check_their_shapes_and_dtypes(rng):
    weights = random_moe_weights(rng, 4, HIDDEN, INNER)
    with pytest.raises(ValueError, match="down \\[held, inner, hidden\\]"):
        dataclasses.replace(weights, down=weights.down[:, :, :3])
    with pytest.raises(ValueError, match="experts 2 to 5 are not among the router's 4"):
        dataclasses.replace(weights, first_expert=2)
    with pytest.raises(TypeError, match="one dtype"):
        dataclasses.replace(weights, up=weights.up.astype("float32"))
    moved = weights.shard(1, 2).to(np)
    assert moved.held == range(2, 4) and moved.dtype == "float64"
    np.testing.assert_array_equal(moved.gate, weights.gate[2:])
