"""The collectives' cost model and its measured side: algorithm steps, the ring/recursive-doubling crossover, bus
bandwidth as nccl-tests define it, and the alpha-beta fit recovering known alpha and B from synthetic times."""

import math

import numpy as np
import pytest

from course_lib.bench.collective_bandwidth import (
    AlphaBetaFit,
    algorithm_bandwidth,
    bus_bandwidth,
    bus_factor,
    fit_alpha_beta,
)
from course_lib.distributed import run_ranks
from course_lib.distributed.algorithms import recursive_doubling_all_reduce, ring_all_reduce
from course_lib.scaling import collectives


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"random cases from seed {seed}")
    return np.random.default_rng(seed)


# ---- bus bandwidth, as nccl-tests' doc/PERFORMANCE.md defines it ----------------------------------------------


def test_bus_factors_are_nccl_tests():
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    for collective in ("all_gather", "reduce_scatter", "all_to_all"):
        assert bus_factor(collective, 4) == pytest.approx(3 / 4)
    assert bus_factor("broadcast", 4) == 1.0
    assert all(bus_factor(c, 1) == 0 for c in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"))


def test_busbw_is_algbw_times_the_factor():
    assert algorithm_bandwidth(1 << 30, 0.01) == pytest.approx((1 << 30) / 0.01)
    assert bus_bandwidth("all_reduce", 1 << 30, 0.01, 4) == pytest.approx((1 << 30) / 0.01 * 1.5)
    assert bus_bandwidth("all_reduce", 1 << 30, 0.01, 1) == 0


def test_an_ideal_ring_runs_at_the_link_bandwidth_whatever_the_rank_count(rng):
    """busbw undoes the model's byte factor: with no fixed cost, it gives back B on any number of GPUs."""
    link = rng.uniform(1e10, 5e11)
    for gpus in (2, 3, 4, 8, 72):
        size = float(rng.integers(1 << 20, 1 << 30))
        assert bus_bandwidth("all_reduce", size, collectives.ring_all_reduce_s(size, gpus, link, 0), gpus) == \
            pytest.approx(link)
        assert bus_bandwidth("all_to_all", size, collectives.all_to_all_s(size, gpus, link, 0), gpus) == \
            pytest.approx(link)
        assert bus_bandwidth("all_gather", size, collectives.all_gather_s(size, gpus, link, 0), gpus) == \
            pytest.approx(link)


def test_the_all_gather_of_tensor_parallel_logits_by_hand():
    """64 rows of float32 logits over a 128256-token vocabulary, each of 4 GPUs holding a quarter of the columns."""
    gathered = 64 * 128256 * 4
    assert collectives.all_gather_s(gathered, 4, 450e9, 6e-6) == pytest.approx(6e-6 + 3 / 4 * gathered / 450e9)
    assert collectives.all_gather_s(gathered, 1, 450e9, 6e-6) == 0  # one GPU holds the whole vocabulary
    with pytest.raises(ValueError, match=">= 0 bytes"):
        collectives.all_gather_s(-1, 2, 1e9, 0)
    with pytest.raises(ValueError, match="positive whole number of GPUs"):
        collectives.all_gather_s(8, 0, 1e9, 0)


def test_bad_bandwidth_inputs_are_refused():
    with pytest.raises(ValueError, match="collective must be one of"):
        bus_factor("gather", 2)
    with pytest.raises(ValueError, match="whole number of ranks"):
        bus_factor("all_reduce", 0)
    with pytest.raises(ValueError, match="> 0 s"):
        algorithm_bandwidth(8, 0)


# ---- the alpha-beta fit ------------------------------------------------------------------------------------------


def synthetic(rng, alpha, bandwidth, factor, noise):
    sizes = np.array([1 << power for power in range(3, 31)], dtype=float)
    times = (alpha + factor * sizes / bandwidth) * (1 + noise * rng.standard_normal(sizes.size))
    return sizes, times


@pytest.mark.parametrize("factor", [1.0, 2 * 7 / 8, 3 / 4])
def test_the_fit_recovers_alpha_and_bandwidth_from_noisy_times(rng, factor):
    alpha, bandwidth = rng.uniform(2e-6, 50e-6), rng.uniform(5e9, 4e11)
    fit = fit_alpha_beta(*synthetic(rng, alpha, bandwidth, factor, noise=0.02), byte_factor=factor)
    assert fit.alpha_s == pytest.approx(alpha, rel=0.05)
    assert fit.bytes_per_s == pytest.approx(bandwidth, rel=0.05)
    assert fit.byte_factor == factor and 0.005 < fit.residual < 0.05


def test_exact_times_are_fitted_exactly_and_predicted_back(rng):
    alpha, bandwidth = rng.uniform(1e-6, 1e-4), rng.uniform(1e9, 1e12)
    sizes, times = synthetic(rng, alpha, bandwidth, 1.5, noise=0)
    fit = fit_alpha_beta(sizes, times, byte_factor=1.5)
    assert fit.residual < 1e-9
    np.testing.assert_allclose(fit.time_s(sizes), times, rtol=1e-9)
    assert fit.asdict()["bytes_per_s"] == pytest.approx(bandwidth)


def test_a_time_that_does_not_grow_has_no_bandwidth_term():
    """Noise can pull a free fit's slope below 0; the fit keeps it at 0 (an infinite bandwidth, null in JSON)."""
    fit = fit_alpha_beta([8, 1024, 1 << 20], [10e-6, 9.9e-6, 9.8e-6])
    assert fit.seconds_per_byte == 0 and fit.bytes_per_s == math.inf and fit.asdict()["bytes_per_s"] is None
    assert fit.alpha_s == pytest.approx(9.9e-6, rel=0.01)


def test_a_negative_alpha_is_kept_at_zero():
    fit = fit_alpha_beta([1 << 20, 1 << 21, 1 << 22], [0.9e-3, 2.0e-3, 4.1e-3])
    assert fit.alpha_s == 0 and fit.bytes_per_s == pytest.approx(1e9, rel=0.1)
    assert isinstance(fit, AlphaBetaFit)


@pytest.mark.parametrize("sizes, times, message", [
    ([8, 16], [1e-6], "one time per size"),
    ([8, 8], [1e-6, 2e-6], "two different sizes"),
    ([8, 16], [1e-6, 0], "times > 0"),
])
def test_bad_fit_inputs_are_refused(sizes, times, message):
    with pytest.raises(ValueError, match=message):
        fit_alpha_beta(sizes, times)


# ---- ring against recursive doubling -----------------------------------------------------------------------------


@pytest.mark.parametrize("gpus, ring, doubling", [
    (1, (0, 0.0), (0, 0.0)), (2, (2, 1.0), (1, 1.0)), (3, (4, 4 / 3), (3, 3.0)), (4, (6, 1.5), (2, 2.0)),
    (5, (8, 1.6), (4, 4.0)), (8, (14, 1.75), (3, 3.0)),
])
def test_schedules(gpus, ring, doubling):
    assert collectives.all_reduce_schedule("ring", gpus) == pytest.approx(ring)
    assert collectives.all_reduce_schedule("recursive_doubling", gpus) == pytest.approx(doubling)


def counted(comm):
    """Record the size of every message ``comm`` sends or receives (a sendrecv is one step: its larger half)."""
    sizes = []

    def counting(call):
        def count(*args):
            sizes.append(max(arg.nbytes for arg in args if hasattr(arg, "nbytes")))
            return call(*args)
        return count

    for name in ("_send", "_recv", "_sendrecv"):
        setattr(comm, name, counting(getattr(comm, name)))
    return sizes


@pytest.mark.parametrize("gpus", [2, 3, 4, 5, 6, 8])
def test_schedules_match_what_the_hand_written_algorithms_send(gpus):
    """On the busiest rank: as many messages in a row as the schedule says, carrying its bytes factor times S."""
    length = 24 * gpus  # float64: S = 192 p bytes, a whole number of elements in every ring segment

    def messages(comm, algorithm):
        sizes = counted(comm)
        algorithm(comm, np.ones(length))
        return len(sizes), sum(sizes)

    for algorithm, name in ((ring_all_reduce, "ring"), (recursive_doubling_all_reduce, "recursive_doubling")):
        busiest = max(run_ranks(messages, gpus, algorithm))
        steps, factor = collectives.all_reduce_schedule(name, gpus)
        assert busiest == (steps, pytest.approx(factor * 8 * length)), name


def test_the_crossover_is_where_both_take_the_same_time(rng):
    for _ in range(20):
        gpus, link, alpha = int(rng.integers(3, 65)), rng.uniform(1e9, 5e11), rng.uniform(1e-6, 1e-4)
        crossover = collectives.all_reduce_crossover_bytes(gpus, link, alpha)

        def time(algorithm, size, gpus=gpus, link=link, alpha=alpha):
            return collectives.stepwise_all_reduce_s(algorithm, size, gpus, link, alpha)

        assert time("ring", crossover) == pytest.approx(time("recursive_doubling", crossover))
        assert time("recursive_doubling", crossover / 2) < time("ring", crossover / 2)
        assert time("ring", crossover * 2) < time("recursive_doubling", crossover * 2)


def test_the_crossover_on_four_gpus_by_hand():
    # ring 6 alpha + 1.5 S/B, doubling 2 alpha + 2 S/B: equal at S = 8 alpha B
    assert collectives.all_reduce_crossover_bytes(4, 1e11, 5e-6) == pytest.approx(8 * 5e-6 * 1e11)


def test_two_gpus_never_cross_and_one_gpu_has_nothing_to_cross():
    assert collectives.all_reduce_crossover_bytes(2, 1e11, 5e-6) == math.inf
    with pytest.raises(ValueError, match="one GPU sends nothing"):
        collectives.all_reduce_crossover_bytes(1, 1e11, 5e-6)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        collectives.stepwise_all_reduce_s("tree", 8, 4, 1e9, 1e-6)
