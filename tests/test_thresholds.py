import numpy as np
import pytest

from gradsentry_dagster.thresholds import (
    RULE_FALLBACK,
    RULE_FIXED,
    RULE_KDE_VALLEY,
    ThresholdConfig,
    decide_threshold,
)


def test_bimodal_scores_use_valley():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.35, 0.05, 300), rng.normal(0.8, 0.04, 60)])
    decision = decide_threshold(scores)
    assert decision.rule == RULE_KDE_VALLEY
    assert 0.5 < decision.threshold < 0.7
    assert decision.low_peak < 0.45
    assert decision.high_peak > 0.7


def test_unimodal_scores_fall_back():
    scores = np.random.default_rng(1).normal(0.4, 0.05, 400)
    decision = decide_threshold(scores)
    assert decision.rule == RULE_FALLBACK
    assert decision.threshold == 0.7


def test_tiny_score_set_falls_back():
    decision = decide_threshold([0.1, 0.9, 0.2, 0.85])
    assert decision.rule == RULE_FALLBACK
    assert "fewer than 30" in decision.detail


def test_too_few_above_valley_falls_back():
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.normal(0.3, 0.03, 600), [0.9, 0.91, 0.92]])
    decision = decide_threshold(scores)
    assert decision.rule == RULE_FALLBACK


def test_close_peaks_fall_back():
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.normal(0.40, 0.01, 200), rng.normal(0.48, 0.01, 200)])
    decision = decide_threshold(scores)
    assert decision.rule == RULE_FALLBACK
    assert "closer than" in decision.detail


def test_fixed_rule_ignores_scores():
    decision = decide_threshold([0.1] * 100, ThresholdConfig(rule="fixed", fixed_threshold=0.42))
    assert decision.rule == RULE_FIXED
    assert decision.threshold == 0.42


def test_non_finite_scores_ignored():
    rng = np.random.default_rng(4)
    scores = np.concatenate([rng.normal(0.35, 0.05, 300), rng.normal(0.8, 0.04, 60), [np.nan, np.inf]])
    assert np.isfinite(decide_threshold(scores).threshold)


def test_invalid_rule_rejected():
    with pytest.raises(ValueError, match="'auto' or 'fixed'"):
        ThresholdConfig(rule="median")
