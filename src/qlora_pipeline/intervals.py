"""Bootstrap and Wilson intervals: the statistics every report shares, apart from the models they score.

The bootstrap resamples examples by seeded indices drawn once, so every score of a run, and the
tuned - base difference, uses the same resamples (a paired comparison).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def interval(values: np.ndarray, indices: np.ndarray, confidence: float) -> list[float]:
    """Percentile bootstrap interval of the mean."""
    means = values[indices].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return [round(float(np.percentile(means, tail)), 5), round(float(np.percentile(means, 100 - tail)), 5)]


def median_interval(values: np.ndarray, indices: np.ndarray, confidence: float) -> list[float]:
    """Percentile bootstrap interval of the median."""
    medians = np.median(values[indices], axis=1)
    tail = (1 - confidence) / 2 * 100
    return [round(float(np.percentile(medians, tail)), 5), round(float(np.percentile(medians, 100 - tail)), 5)]


def compare(base: np.ndarray, tuned: np.ndarray, indices: np.ndarray, confidence: float) -> dict[str, Any]:
    """Means, intervals and the paired difference for one per-example score."""
    return {
        "base": round(float(base.mean()), 5),
        "base_ci": interval(base, indices, confidence),
        "tuned": round(float(tuned.mean()), 5),
        "tuned_ci": interval(tuned, indices, confidence),
        "delta": round(float((tuned - base).mean()), 5),
        "delta_ci": interval(tuned - base, indices, confidence),
    }


def two_sided_z(confidence: float) -> float:
    """The normal quantile of a two-sided interval at level ``confidence``; ValueError where it has none.

    A level in (0, 1) can still be too near 1: ``1 - (1 - c) / 2`` rounds to 1.0 (c = 0.9999999999999999)
    and the quantile is infinite.
    """
    tail = 1.0 - (1.0 - confidence) / 2.0
    if not (0.0 < confidence < 1.0 and 0.5 <= tail < 1.0):
        raise ValueError(f"confidence {confidence!r} has no finite interval: it must be above 0 and below 1 "
                         "by more than rounding, e.g. 0.95 or 0.999")
    return statistics.NormalDist().inv_cdf(tail)


def wilson_interval(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval for a rate of ``successes`` in ``n`` at level ``confidence``."""
    z = two_sided_z(confidence)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = (z / denom) * math.sqrt(max(p * (1.0 - p) / n + z2 / (4.0 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)
