"""Tier 1: the resumable sampler of `meshplan finetune` (meshplan.finetune.data.StepSampler).

A run is one sequence of global batches over seeded passes of the data set; each data-parallel
rank takes its share of every global batch, and a run resumed at a step sees exactly the data
the uninterrupted run would have seen from that step on.
"""

from __future__ import annotations

import pytest

from meshplan.finetune.data import StepSampler

SIZE = 10  # no global batch below divides it: batches straddle the passes
GLOBAL_BATCH = 4
STEPS = 7  # 28 samples: two passes and most of a third


def _steps(sampler: StepSampler) -> list[list[int]]:
    """The sampler's indices, one list per step."""
    indices = list(sampler)
    return [indices[start:start + sampler.per_rank] for start in range(0, len(indices), sampler.per_rank)]


def _run(dp_rank: int = 0, dp_size: int = 1, seed: int = 0, start_step: int = 0) -> StepSampler:
    return StepSampler(SIZE, GLOBAL_BATCH, dp_rank, dp_size, STEPS, seed, start_step)


def test_it_yields_its_share_of_every_step_of_the_run() -> None:
    sampler = _run(dp_rank=1, dp_size=2)
    assert len(sampler) == STEPS * GLOBAL_BATCH // 2
    assert len(list(sampler)) == len(sampler)
    assert all(0 <= index < SIZE for index in sampler)


@pytest.mark.parametrize("start_step", [1, 2, 3, 6])
def test_a_resumed_run_continues_mid_pass_exactly_where_the_uninterrupted_run_was(start_step: int) -> None:
    for dp_rank in (0, 1):
        uninterrupted = _steps(_run(dp_rank, 2, seed=3))
        assert _steps(_run(dp_rank, 2, seed=3, start_step=start_step)) == uninterrupted[start_step:]


def test_each_pass_visits_every_example_once_in_an_order_of_its_own() -> None:
    indices = list(_run(seed=5))
    passes = [indices[start:start + SIZE] for start in range(0, 2 * SIZE, SIZE)]
    assert all(sorted(order) == list(range(SIZE)) for order in passes)
    assert passes[0] != passes[1]  # shuffled anew each pass


def test_the_seed_picks_the_order() -> None:
    assert list(_run(seed=0)) == list(_run(seed=0))
    assert list(_run(seed=0)) != list(_run(seed=1))


@pytest.mark.parametrize("dp_size", [2, 4])
def test_the_ranks_split_each_global_batch_into_its_consecutive_shares(dp_size: int) -> None:
    one_process = _steps(_run())
    shares = [_steps(_run(dp_rank, dp_size)) for dp_rank in range(dp_size)]
    for step in range(STEPS):
        # Rank r takes the r-th share of the global batch one process would train on.
        assert [index for rank in range(dp_size) for index in shares[rank][step]] == one_process[step]


def test_the_ranks_never_train_on_the_same_example_in_one_pass() -> None:
    # 12 examples, global batches of 4: no step straddles two passes.
    ranks = [list(StepSampler(12, GLOBAL_BATCH, dp_rank, 2, 6, 0)) for dp_rank in (0, 1)]
    for start in (0, 6):  # each rank's half of pass 0, then of pass 1
        first, second = set(ranks[0][start:start + 6]), set(ranks[1][start:start + 6])
        assert not first & second and first | second == set(range(12))
