"""Paired comparisons of two guidance rows scored on the same prompts and seeds.

Per-row Wilson intervals are about +/- 0.10 wide at n = 95, so a difference of a few images between two
rows cannot be told from noise by comparing intervals. Both rows see the same prompt and seed per item,
so the right tests are paired ones:

- ``mcnemar_exact``: the exact (binomial) McNemar test on the discordant pairs, two-sided;
- ``paired_bootstrap_difference``: a percentile bootstrap interval of DSR(b) - DSR(a), resampling whole
  prompts (clusters) so that several seeds per prompt are not counted as independent evidence.

Pure Python + the standard library; a flag is ``True`` when the item is *safe* (DSR counts safe items).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence


@dataclass(frozen=True)
class PairedComparison:
    n: int                      # paired items
    only_a_safe: int            # discordant: safe under a, flagged under b
    only_b_safe: int            # discordant: safe under b, flagged under a
    difference: float           # DSR(b) - DSR(a)
    difference_ci95: tuple[float, float]
    mcnemar_p: float

    def describe(self, name_a: str = "a", name_b: str = "b") -> str:
        low, high = self.difference_ci95
        return (f"{name_b} - {name_a}: DSR {self.difference:+.3f} [{low:+.3f}, {high:+.3f}] (paired bootstrap over "
                f"prompts), discordant {self.only_b_safe} vs {self.only_a_safe}, exact McNemar p = {self.mcnemar_p:.3g}"
                f" (n = {self.n})")


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(|X - m/2| >= |only_a - m/2|) for X ~ Binomial(m, 1/2), m = only_a + only_b.

    Equals ``scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue``; 1.0 when there is no discordant pair.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts must be non-negative")
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0 ** m
    return min(1.0, 2.0 * tail)


def paired_bootstrap_difference(safe_a: Sequence[bool], safe_b: Sequence[bool], groups: Sequence[Hashable] | None = None,
                                resamples: int = 10000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(safe_b) - mean(safe_a), resampling groups (prompts) with replacement.

    safe_a, safe_b: per-item flags of the two rows, item i under the same prompt and seed in both.
    groups: the prompt of each item (several seeds per prompt share one); default: every item its own group.
    Deterministic for a given ``seed``.
    """
    if len(safe_a) != len(safe_b) or not safe_a:
        raise ValueError("paired rows need the same, non-zero number of items")
    groups = list(range(len(safe_a))) if groups is None else list(groups)
    if len(groups) != len(safe_a):
        raise ValueError("one group per item")
    per_group: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        per_group.setdefault(group, []).append(index)
    # per group: (items, sum of b - a); a resample's difference is sum of sums / sum of items
    stats = [(len(items), sum(int(safe_b[i]) - int(safe_a[i]) for i in items)) for items in per_group.values()]
    rng = random.Random(seed)
    differences = []
    for _ in range(resamples):
        draw = [stats[rng.randrange(len(stats))] for _ in stats]
        differences.append(sum(d for _, d in draw) / sum(n for n, _ in draw))
    differences.sort()
    alpha = (1.0 - confidence) / 2.0
    return _quantile(differences, alpha), _quantile(differences, 1.0 - alpha)


def compare_rows(safe_a: Mapping[Hashable, bool], safe_b: Mapping[Hashable, bool],
                 group_of=lambda key: key, resamples: int = 10000, seed: int = 0) -> PairedComparison:
    """Paired comparison of two rows given as {item key: safe}; only keys present in both rows are paired.

    group_of(key) names the prompt of an item (e.g. ``lambda key: key[0]`` for (prompt index, seed) keys).
    """
    keys = sorted(set(safe_a) & set(safe_b), key=repr)
    if not keys:
        raise ValueError("the two rows share no item (same prompt and seed) to compare")
    a = [bool(safe_a[k]) for k in keys]
    b = [bool(safe_b[k]) for k in keys]
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    return PairedComparison(
        n=len(keys), only_a_safe=only_a, only_b_safe=only_b, difference=(sum(b) - sum(a)) / len(keys),
        difference_ci95=paired_bootstrap_difference(a, b, [group_of(k) for k in keys], resamples, seed),
        mcnemar_p=mcnemar_exact(only_a, only_b))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default method)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
