"""One scan end to end, without Dagster: score, threshold, flag, and split a dataset."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradsentry_dagster.cache import ScoreCache
from gradsentry_dagster.scoring import STATUS_SCORED, ScoringSettings, score_frame
from gradsentry_dagster.thresholds import ThresholdConfig, ThresholdDecision, decide_threshold

logger = logging.getLogger(__name__)

SCAN_COLUMNS = [
    "row_id",
    "status",
    "score",
    "num_target_tokens",
    "loss",
    "flagged",
    "threshold",
    "threshold_rule",
    "reason",
]


@dataclass
class ScanResult:
    """The scores table of one scan and the threshold decision behind its flags."""

    scores: pd.DataFrame
    decision: ThresholdDecision


def apply_threshold(raw_scores: pd.DataFrame, decision: ThresholdDecision) -> pd.DataFrame:
    """Add ``flagged``, ``threshold``, ``threshold_rule`` and a reason for each flagged row."""
    table = raw_scores.copy()
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


def scan_frame(
    model,
    tokenizer,
    frame: pd.DataFrame,
    settings: ScoringSettings,
    threshold_config: ThresholdConfig,
    progress: Callable[[int], None] | None = None,
    cache: ScoreCache | None = None,
) -> ScanResult:
    """Score every row of a canonical table, decide the threshold and flag rows above it.

    With a ``cache``, rows scored by an earlier scan of the same model and settings are not
    scored again (see :class:`gradsentry_dagster.cache.ScoreCache`).
    """
    raw = score_frame(model, tokenizer, frame, settings, progress=progress, cache=cache)
    return flag_scores(raw, threshold_config)


def flag_scores(raw: pd.DataFrame, threshold_config: ThresholdConfig) -> ScanResult:
    """Decide the threshold on all scored rows of ``raw`` and flag the rows above it.

    Sharded scans call this once on the concatenated shard scores, so the threshold always
    sees the whole dataset.
    """
    scored = raw["status"] == STATUS_SCORED
    decision = decide_threshold(raw.loc[scored, "score"].to_numpy(), threshold_config)
    table = apply_threshold(raw, decision)
    logger.info(
        "scan flagged %d of %d scored rows at threshold %.4f (%s)",
        int(table["flagged"].sum()),
        int(scored.sum()),
        decision.threshold,
        decision.rule,
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
