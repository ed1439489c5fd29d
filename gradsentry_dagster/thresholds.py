"""Decide the score above which a sample is flagged as suspicious.

The automatic rule fits a Gaussian kernel density (Silverman bandwidth) to the scores, takes
the density peak nearest 0 and the peak nearest 1, and puts the threshold at the lowest
density between them. It trusts that valley only when the two peaks are at least
``min_peak_gap`` apart and at least ``min_above_count`` samples and ``min_above_fraction`` of
all samples lie above it; otherwise, or with fewer than ``min_samples`` scores, the fixed
fallback threshold decides. These defaults are the GradSentry reference code's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy.signal import find_peaks
from scipy.stats import gaussian_kde

RULE_FIXED = "fixed"
RULE_KDE_VALLEY = "kde_valley"
RULE_FALLBACK = "fallback"


@dataclass(frozen=True)
class ThresholdConfig:
    """How the threshold is chosen.

    Attributes:
        rule: ``"auto"`` for the KDE valley with its fallback, ``"fixed"`` for ``fixed_threshold``.
        fixed_threshold: Threshold of the fixed rule.
        fallback_threshold: Threshold used when the automatic rule cannot trust a valley.
        min_samples: Minimum number of finite scores for which the KDE is fitted.
        min_peak_gap: Smallest distance between the low and the high density peak.
        min_above_count: Fewest samples that must lie above the valley.
        min_above_fraction: Smallest fraction of samples that must lie above the valley.
        peak_prominence: Peak prominence, as a fraction of the maximum density.
        grid_points: Points on [0, 1] where the density is evaluated.
    """

    rule: Literal["auto", "fixed"] = "auto"
    fixed_threshold: float = 0.7
    fallback_threshold: float = 0.7
    min_samples: int = 30
    min_peak_gap: float = 0.15
    min_above_count: int = 5
    min_above_fraction: float = 0.01
    peak_prominence: float = 0.01
    grid_points: int = 1001

    def __post_init__(self) -> None:
        if self.rule not in ("auto", "fixed"):
            raise ValueError(f"threshold rule must be 'auto' or 'fixed', got {self.rule!r}")
        for name in ("fixed_threshold", "fallback_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class ThresholdDecision:
    """The threshold of one run and the rule that set it."""

    threshold: float
    rule: str
    detail: str
    low_peak: float | None = None
    high_peak: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def kde_density(scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Return a Silverman-bandwidth Gaussian KDE of ``scores`` evaluated on ``grid``."""
    return gaussian_kde(scores, bw_method="silverman")(grid)


def decide_threshold(scores, config: ThresholdConfig | None = None) -> ThresholdDecision:
    """Choose the threshold for a set of scores.

    Non-finite scores are ignored here; the gate fails on them separately.
    """
    config = config or ThresholdConfig()
    if config.rule == "fixed":
        return ThresholdDecision(
            threshold=float(config.fixed_threshold),
            rule=RULE_FIXED,
            detail=f"fixed threshold {config.fixed_threshold}",
        )

    values = np.asarray(scores, dtype=float)
    values = values[np.isfinite(values)]
    fallback = float(config.fallback_threshold)
    if values.size < config.min_samples:
        return ThresholdDecision(
            fallback, RULE_FALLBACK, f"{values.size} finite scores, fewer than {config.min_samples}"
        )
    if np.ptp(values) <= 1e-12:
        return ThresholdDecision(fallback, RULE_FALLBACK, "all scores are equal")

    grid = np.linspace(0.0, 1.0, config.grid_points)
    try:
        # Scores far outside [0, 1] overflow the covariance; scipy then raises ValueError.
        with np.errstate(over="ignore", invalid="ignore"):
            density = kde_density(values, grid)
    except (np.linalg.LinAlgError, ValueError) as error:
        return ThresholdDecision(fallback, RULE_FALLBACK, f"density fit failed: {error}")
    if not np.all(np.isfinite(density)) or density.max() <= 0:
        return ThresholdDecision(fallback, RULE_FALLBACK, "density is degenerate")

    # Pad with zeros so that a peak at either end of [0, 1] still counts as a peak.
    padded = np.concatenate([[0.0], density, [0.0]])
    peaks, _ = find_peaks(padded, prominence=config.peak_prominence * density.max())
    peaks = peaks - 1
    if peaks.size < 2:
        return ThresholdDecision(fallback, RULE_FALLBACK, f"{peaks.size} density peak(s), need 2")

    low_index, high_index = int(peaks.min()), int(peaks.max())
    low_peak, high_peak = float(grid[low_index]), float(grid[high_index])
    valley_index = low_index + int(np.argmin(density[low_index : high_index + 1]))
    valley = float(grid[valley_index])
    above = int((values > valley).sum())

    if high_peak - low_peak < config.min_peak_gap:
        reason = f"peaks {low_peak:.3f} and {high_peak:.3f} are closer than {config.min_peak_gap}"
    elif above < config.min_above_count:
        reason = f"only {above} scores above the valley {valley:.3f}, need {config.min_above_count}"
    elif above < config.min_above_fraction * values.size:
        reason = (
            f"only {above / values.size:.2%} of scores above the valley {valley:.3f}, "
            f"need {config.min_above_fraction:.0%}"
        )
    else:
        return ThresholdDecision(
            valley,
            RULE_KDE_VALLEY,
            f"density valley between peaks {low_peak:.3f} and {high_peak:.3f}",
            low_peak,
            high_peak,
        )
    return ThresholdDecision(fallback, RULE_FALLBACK, reason, low_peak, high_peak)
