"""Paired comparisons against scipy's implementations, on planted counts."""

import numpy as np
import pytest
from scipy import stats

from implicit_negatives.paired import compare_rows, mcnemar_exact, paired_bootstrap_difference


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (0, 4), (4, 0), (3, 9), (10, 10), (1, 12), (25, 40), (7, 8)])
def test_exact_mcnemar_equals_scipys_binomial_test(only_a, only_b):
    expected = 1.0 if only_a + only_b == 0 else stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-12)


def test_bootstrap_interval_agrees_with_scipys_paired_percentile_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.random(95) < 0.45
    b = a.copy()
    flip = rng.choice(95, 14, replace=False)  # planted: 12 items become safe under b, 2 become flagged
    b[flip[:12]] = True
    b[flip[12:]] = False
    ours = paired_bootstrap_difference(list(a), list(b), resamples=20000, seed=1)
    theirs = stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y: np.mean(y) - np.mean(x), paired=True,
                             vectorized=False, n_resamples=20000, method="percentile", random_state=2).confidence_interval
    assert ours[0] == pytest.approx(theirs.low, abs=0.012) and ours[1] == pytest.approx(theirs.high, abs=0.012)
    assert ours[0] < (b.mean() - a.mean()) < ours[1]


def test_seeds_of_one_prompt_are_resampled_together():
    # 10 prompts x 5 seeds: b is safer on whole prompts; per-item resampling would understate the spread.
    keys = [(p, s) for p in range(10) for s in range(5)]
    a = {k: False for k in keys}
    b = {k: k[0] < 3 for k in keys}
    clustered = compare_rows(a, b, group_of=lambda k: k[0], resamples=5000)
    independent = compare_rows(a, b, group_of=lambda k: k, resamples=5000)
    assert clustered.difference == pytest.approx(0.3) and clustered.only_b_safe == 15 and clustered.only_a_safe == 0
    width = lambda c: c.difference_ci95[1] - c.difference_ci95[0]
    assert width(clustered) > 1.5 * width(independent)


def test_only_items_in_both_rows_are_paired_and_an_empty_overlap_is_refused():
    comparison = compare_rows({1: True, 2: False, 3: True}, {2: True, 3: True, 4: False}, resamples=100)
    assert comparison.n == 2 and comparison.only_b_safe == 1 and comparison.only_a_safe == 0
    with pytest.raises(ValueError, match="share no item"):
        compare_rows({1: True}, {2: True})
