# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Paired statistics for two models scored on the same items.

lm-eval's standard errors treat each model's score on its own. Both models of `attnres eval` answer the same
documents, so most of the noise cancels in the per-document difference: its bootstrap interval is much narrower than
the two standard errors suggest, and for right/wrong metrics the documents where the models disagree are what a test
of the difference rests on (McNemar's test). Items are resampled as wholes, so the interval needs no assumption about
how the scores are distributed.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
_DRAWS_PER_CHUNK = 4_000_000  # multinomial draws held at once: bounds memory for metrics with many distinct values


@dataclass(frozen=True)
class PairedStatistics:
    """The per-item difference (AttnRes - baseline) of one metric over the items both models were scored on."""

    items: int
    mean_difference: float  # equals the difference of the two scores when the score is the mean over the items
    ci_low: float  # percentile bootstrap interval of the mean difference, CONFIDENCE level
    ci_high: float
    right_to_wrong: int | None  # right/wrong metrics only: items the baseline got right and AttnRes wrong
    wrong_to_right: int | None  # ... and those AttnRes got right and the baseline wrong
    mcnemar_p: float | None  # exact two-sided McNemar test on those discordant items


def paired_statistics(baseline: Sequence[float], attnres: Sequence[float]) -> PairedStatistics:
    """Statistics of `attnres[i] - baseline[i]`; the flips and McNemar's test only if every score is 0 or 1."""
    if len(baseline) != len(attnres) or not baseline:
        raise ValueError(f"need the same, non-zero number of items from both models ({len(baseline)}, {len(attnres)})")
    differences = np.asarray(attnres, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    ci_low, ci_high = paired_bootstrap_ci(differences)
    right_to_wrong = wrong_to_right = mcnemar_p = None
    if all(score in (0, 1) for score in (*baseline, *attnres)):
        right_to_wrong = sum(1 for ours, theirs in zip(attnres, baseline) if theirs == 1 and ours == 0)
        wrong_to_right = sum(1 for ours, theirs in zip(attnres, baseline) if theirs == 0 and ours == 1)
        mcnemar_p = mcnemar_exact_p(right_to_wrong, wrong_to_right)
    return PairedStatistics(
        len(differences), float(differences.mean()), ci_low, ci_high, right_to_wrong, wrong_to_right, mcnemar_p
    )


def paired_bootstrap_ci(
    differences: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of the mean of `differences` over `resamples` resamplings of the items with replacement.

    Drawing n items with replacement is drawing how often each distinct value is picked from a multinomial with the
    values' frequencies, which gives the same distribution of means with a draw per distinct value instead of per
    item (a right/wrong metric has three distinct differences, however many items)."""
    values, counts = np.unique(np.asarray(differences, dtype=np.float64), return_counts=True)
    items = int(counts.sum())
    generator = np.random.default_rng(seed)
    chunk = max(1, _DRAWS_PER_CHUNK // len(values))
    means = np.concatenate(
        [
            generator.multinomial(items, counts / items, size=min(chunk, resamples - start)) @ values / items
            for start in range(0, resamples, chunk)
        ]
    )
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mcnemar_exact_p(right_to_wrong: int, wrong_to_right: int) -> float:
    """McNemar's exact two-sided p-value: under "no difference" each discordant item is equally likely to flip either
    way, so the smaller count is Binomial(b + c, 1/2); the p-value doubles its lower tail (capped at 1)."""
    discordant = right_to_wrong + wrong_to_right
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, i) for i in range(min(right_to_wrong, wrong_to_right) + 1))
    return min(1.0, 2 * tail / 2**discordant)
