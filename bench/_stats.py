"""The statistics the benchmarks share: a ratio is the median of per-round ratios (the two runs
of one round are adjacent in time, so the machine's drift cancels out in their ratio), shown
with a 95 % bootstrap interval of that median."""

from __future__ import annotations

import random
import statistics

BOOTSTRAP = 2000  # resamples for the interval of a median


def median_interval(values: list[float]) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of the median of ``values`` (seeded: the same
    values give the same interval). Rough with a dozen rounds, but it shows the spread."""
    rng = random.Random(0)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(BOOTSTRAP))
    return medians[int(0.025 * BOOTSTRAP)], medians[int(0.975 * BOOTSTRAP) - 1]


def summary(samples: dict[str, list[float]], base: str = "plain") -> dict[str, float]:
    """Medians of each variant, and the median of the per-round ratios to ``base`` with its
    95 % interval (``<name>_ratio``, ``_ratio_low``, ``_ratio_high``), so that a ratio near its
    target is read for what it is."""
    out = {name: statistics.median(values) for name, values in samples.items()}
    for name, values in samples.items():
        if name != base:
            ratios = [v / b for v, b in zip(values, samples[base], strict=True)]
            out[f"{name}_ratio"] = statistics.median(ratios)
            out[f"{name}_ratio_low"], out[f"{name}_ratio_high"] = median_interval(ratios)
    return out
