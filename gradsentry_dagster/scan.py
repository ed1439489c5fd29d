"""One scan end to end, without Dagster: score, threshold, flag, and split a dataset."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from gradsentry_dagster.cache import ScoreCache
from gradsentry_dagster.robust import RULE_ROBUST, RobustCalibration, apply_robust
from gradsentry_dagster.scoring import STATUS_SCORED, ScoringSettings, score_frame
from gradsentry_dagster.thresholds import ThresholdConfig, ThresholdDecision, decide_threshold

logger = logging.getLogger(__name__)

SCAN_COLUMNS = [
    "row_id",
    "status",
    "score",
    "num_target_tokens",
    "loss",
    "loss_without_question",
    "flagged",
    "threshold",
    "threshold_rule",
    "reason",
]
MODE_PAPER = "paper"
MODE_ROBUST = "robust"
SCAN_MODES = (MODE_PAPER, MODE_ROBUST)


@dataclass
class ScanResult:
    """The scores table of one scan and the threshold decision behind its flags."""

    scores: pd.DataFrame
    decision: ThresholdDecision


def _copy_raw(raw_scores: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of a raw scores table with every column the scan table needs.

    Tables scored without ``question_gain`` (or by code older than that setting) get a NaN
    ``loss_without_question``.
    """
    table = raw_scores.copy()
    if "loss_without_question" not in table.columns:
        table["loss_without_question"] = np.nan
    return table


def apply_threshold(raw_scores: pd.DataFrame, decision: ThresholdDecision) -> pd.DataFrame:
    """Add ``flagged``, ``threshold``, ``threshold_rule`` and a reason for each flagged row."""
    table = _copy_raw(raw_scores)
    scored = table["status"] == STATUS_SCORED
    score = table["score"].to_numpy(dtype=float)
    # A scored row without a finite score fails closed: it is flagged, never clean.
    suspicious = ~np.isfinite(score) | (score > decision.threshold)
    table["flagged"] = scored.to_numpy() & suspicious
    table["threshold"] = float(decision.threshold)
    table["threshold_rule"] = decision.rule
    flagged_reason = table["score"].map(
        lambda s: f"score {s:.4f} above threshold {decision.threshold:.4f} ({decision.rule})"
    )
    table["reason"] = np.where(
        table["flagged"],
        np.where(table["reason"] != "", flagged_reason + "; " + table["reason"], flagged_reason),
        table["reason"],
    )
    return table[SCAN_COLUMNS]


def apply_robust_flags(
    raw_scores: pd.DataFrame, calibration: RobustCalibration, top_k: int
) -> tuple[pd.DataFrame, ThresholdDecision]:
    """Flag scored rows by robust mode's per-sample rule; ``threshold`` holds the entropy one.

    The ``score`` column stays the GradSentry entropy, so the table reads the same in both
    modes; the reason of a flagged row names the features that exceeded their thresholds.
    """
    table = _copy_raw(raw_scores)
    scored = (table["status"] == STATUS_SCORED).to_numpy()
    result = apply_robust(table, calibration, top_k)
    table["flagged"] = scored & result.flagged
    entropy_threshold = calibration.thresholds.get("entropy", float("nan"))
    table["threshold"] = float(entropy_threshold)
    table["threshold_rule"] = RULE_ROBUST
    reasons = []
    for flag, robust_reason, earlier_reason in zip(table["flagged"], result.reasons, table["reason"]):
        if not flag:
            reasons.append(earlier_reason)
        elif earlier_reason:
            reasons.append(f"robust: {robust_reason}; {earlier_reason}")
        else:
            reasons.append(f"robust: {robust_reason}")
    table["reason"] = reasons
    decision = ThresholdDecision(
        threshold=float(entropy_threshold),
        rule=RULE_ROBUST,
        detail=(
            f"per-sample rule {calibration.describe()}, calibrated on {calibration.calibration_rows} "
            f"trusted clean rows at a false-positive rate of {calibration.false_positive_rate:g}"
        ),
    )
    return table[SCAN_COLUMNS], decision


def scan_frame(
    model,
    tokenizer,
    frame: pd.DataFrame,
    settings: ScoringSettings,
    threshold_config: ThresholdConfig,
    progress: Callable[[int], None] | None = None,
    cache: ScoreCache | None = None,
    mode: str = MODE_PAPER,
    robust_calibration: RobustCalibration | None = None,
) -> ScanResult:
    """Score every row of a canonical table, then flag rows by the chosen mode.

    Args:
        model: A causal language model.
        tokenizer: Its tokenizer.
        frame: The canonical table.
        settings: Scoring settings.
        threshold_config: Threshold rule of the ``"paper"`` mode.
        progress: Called with the number of rows finished so far.
        cache: Rows scored by an earlier scan of the same model and settings are not scored
            again (see :class:`gradsentry_dagster.cache.ScoreCache`).
        mode: ``"paper"`` flags entropies above the automatic or fixed threshold, as GradSentry
            does; ``"robust"`` flags rows whose entropy or loss exceeds thresholds calibrated on
            a trusted clean set (see :mod:`gradsentry_dagster.robust`).
        robust_calibration: The calibration of ``"robust"`` mode; required there.
    """
    check_mode(mode, robust_calibration)
    settings = settings_for_mode(settings, mode, robust_calibration)
    raw = score_frame(model, tokenizer, frame, settings, progress=progress, cache=cache)
    return flag_scores(raw, threshold_config, mode, robust_calibration, settings.top_k)


def settings_for_mode(
    settings: ScoringSettings, mode: str, robust_calibration: RobustCalibration | None
) -> ScoringSettings:
    """Return ``settings`` with ``question_gain`` on where the robust rule reads that feature.

    Raises:
        ValueError: The calibration records scoring settings other than these, so its
            thresholds do not apply to these scores.
    """
    if mode != MODE_ROBUST or robust_calibration is None:
        return settings
    if robust_calibration.needs_question_gain:
        settings = replace(settings, question_gain=True)
    expected = robust_calibration.settings_fingerprint
    if expected and expected != settings.fingerprint():
        raise ValueError(
            f"the robust calibration was made with other scoring settings (fingerprint {expected}, "
            f"this scan {settings.fingerprint()}: target {settings.target}, top_k {settings.top_k}, "
            f"crop {settings.row_crop}x{settings.col_crop}, prompt format {settings.prompt_format}, "
            f"max_tokens {settings.max_tokens}); write a calibration with these settings "
            "(gradsentry calibrate) or use mode 'paper'"
        )
    return settings


def check_mode(mode: str, robust_calibration: RobustCalibration | None) -> None:
    """Raise ValueError for an unknown mode, or for robust mode without a calibration."""
    if mode not in SCAN_MODES:
        raise ValueError(f"scan mode must be one of {SCAN_MODES}, got {mode!r}")
    if mode == MODE_ROBUST and robust_calibration is None:
        raise ValueError(
            "robust mode needs a calibration: score a trusted clean set and pass "
            "calibrate_robust(its scores) as robust_calibration"
        )


def flag_scores(
    raw: pd.DataFrame,
    threshold_config: ThresholdConfig,
    mode: str = MODE_PAPER,
    robust_calibration: RobustCalibration | None = None,
    top_k: int = 16,
) -> ScanResult:
    """Flag the scored rows of ``raw`` by the chosen mode.

    The paper mode decides the threshold on all scored rows. Sharded scans call this once on
    the concatenated shard scores, so the threshold always sees the whole dataset.
    """
    check_mode(mode, robust_calibration)
    scored = raw["status"] == STATUS_SCORED
    if mode == MODE_ROBUST:
        table, decision = apply_robust_flags(raw, robust_calibration, top_k)
    else:
        decision = decide_threshold(raw.loc[scored, "score"].to_numpy(), threshold_config)
        table = apply_threshold(raw, decision)
    logger.info(
        "scan (%s mode) flagged %d of %d scored rows: %s",
        mode,
        int(table["flagged"].sum()),
        int(scored.sum()),
        decision.detail,
    )
    return ScanResult(table, decision)


def split_dataset(frame: pd.DataFrame, scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the canonical table into clean rows and quarantined (flagged) rows.

    Only scored rows land in either table; rejected rows stay visible in the scores table.
    Raises if the two tables do not line up, so that no row can be lost silently.
    """
    if len(frame) != len(scores) or not (
        frame["row_id"].to_numpy() == scores["row_id"].to_numpy()
    ).all():
        raise ValueError(
            "the dataset and its scores do not line up row by row; rescan the dataset "
            f"({len(frame)} dataset rows, {len(scores)} score rows)"
        )
    scored = (scores["status"] == STATUS_SCORED).to_numpy()
    flagged = scores["flagged"].to_numpy(dtype=bool)
    annotations = scores[["score", "flagged", "reason"]].reset_index(drop=True)
    annotated = pd.concat([frame.reset_index(drop=True), annotations.add_prefix("gradsentry_")], axis=1)
    clean = annotated[scored & ~flagged].reset_index(drop=True)
    quarantined = annotated[scored & flagged].reset_index(drop=True)
    return clean, quarantined
