"""Bootstrap confidence intervals of a mean over questions (resampled with replacement, seeded)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def mean_interval(
    values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> dict[str, float | int]:
    """The mean of ``values`` with its percentile bootstrap interval at ``level``: ``{"mean", "low", "high", "n"}``.
    The same ``seed`` and values give the same interval. Paired comparisons pass the per-question differences."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("no values to average")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"mean": float(data.mean()), "low": float(low), "high": float(high), "n": int(data.size)}
