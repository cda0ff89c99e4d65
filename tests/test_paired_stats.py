"""`attnres.paired_stats`, checked against independent computations: McNemar's p by hand and by scipy's binomial
test, the bootstrap interval by plain index resampling and by the normal approximation."""

import math

import numpy as np
import pytest

from attnres.paired_stats import mcnemar_exact_p, paired_bootstrap_ci, paired_statistics


def paired_vectors(both_right: int, right_to_wrong: int, wrong_to_right: int, both_wrong: int):
    """(baseline, attnres) 0/1 scores with exactly the given agreements and flips, shuffled."""
    pairs = [(1, 1)] * both_right + [(1, 0)] * right_to_wrong + [(0, 1)] * wrong_to_right + [(0, 0)] * both_wrong
    order = np.random.default_rng(7).permutation(len(pairs))
    baseline, attnres = zip(*(pairs[i] for i in order))
    return list(baseline), list(attnres)


def test_mcnemar_exact_p_by_hand():
    assert mcnemar_exact_p(5, 0) == 0.0625  # 2 * (1/2)^5, exactly
    assert mcnemar_exact_p(0, 5) == 0.0625
    assert mcnemar_exact_p(3, 3) == 1.0  # capped: both tails together cover everything
    assert mcnemar_exact_p(0, 0) == 1.0  # no discordant pair: no evidence of a difference
    assert mcnemar_exact_p(1, 9) == 2 * (1 + 10) / 2**10


def test_mcnemar_exact_p_equals_scipys_binomial_test():
    stats = pytest.importorskip("scipy.stats")  # installed with lm-eval (through scikit-learn)
    for b, c in [(0, 1), (2, 7), (10, 3), (25, 40), (120, 95), (700, 760)]:
        expected = stats.binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
        assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-9), (b, c)


def test_flips_and_mean_difference_of_known_vectors():
    baseline, attnres = paired_vectors(both_right=90, right_to_wrong=30, wrong_to_right=10, both_wrong=70)
    paired = paired_statistics(baseline, attnres)
    assert (paired.items, paired.right_to_wrong, paired.wrong_to_right) == (200, 30, 10)
    assert paired.mean_difference == pytest.approx((10 - 30) / 200)
    assert paired.mcnemar_p == mcnemar_exact_p(30, 10) == pytest.approx(0.00222, abs=1e-5)


def test_bootstrap_interval_contains_the_difference_and_matches_the_normal_approximation():
    baseline, attnres = paired_vectors(both_right=90, right_to_wrong=30, wrong_to_right=10, both_wrong=70)
    paired = paired_statistics(baseline, attnres)
    difference = np.subtract(attnres, baseline)
    half_width = 1.96 * difference.std() / math.sqrt(len(difference))  # 0.060
    assert paired.ci_low < paired.mean_difference < paired.ci_high
    assert paired.ci_high - paired.ci_low == pytest.approx(2 * half_width, rel=0.1)
    below, above = paired.mean_difference - paired.ci_low, paired.ci_high - paired.mean_difference
    assert below == pytest.approx(above, rel=0.15)  # symmetric-ish: the mean of 200 items is nearly normal


def test_bootstrap_equals_resampling_the_items():
    """The multinomial draw over distinct values is the plain bootstrap (draw n item indices with replacement), up to
    Monte Carlo noise; checked on scores with many distinct values."""
    generator = np.random.default_rng(3)
    differences = generator.normal(0.1, 1.0, size=300).round(2)
    indices = generator.integers(0, len(differences), size=(10_000, len(differences)))
    plain = np.quantile(differences[indices].mean(axis=1), [0.025, 0.975])
    assert paired_bootstrap_ci(differences) == pytest.approx(tuple(plain), abs=0.01)


def test_identical_answers_give_a_zero_interval_and_no_flips():
    baseline, attnres = paired_vectors(both_right=40, right_to_wrong=0, wrong_to_right=0, both_wrong=60)
    paired = paired_statistics(baseline, attnres)
    assert (paired.ci_low, paired.ci_high, paired.mean_difference) == (0.0, 0.0, 0.0)
    assert (paired.right_to_wrong, paired.wrong_to_right, paired.mcnemar_p) == (0, 0, 1.0)


def test_the_interval_is_reproducible_and_flips_need_right_wrong_scores():
    baseline, attnres = [0.2, 0.5, 0.9, 0.4], [0.3, 0.5, 0.7, 0.8]
    first, second = paired_statistics(baseline, attnres), paired_statistics(baseline, attnres)
    assert first == second  # fixed seed
    assert (first.right_to_wrong, first.wrong_to_right, first.mcnemar_p) == (None, None, None)
    with pytest.raises(ValueError, match="same, non-zero number of items"):
        paired_statistics([1, 0], [1])
