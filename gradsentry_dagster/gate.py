"""The fine-tuning gate: a Great Expectations suite run against a scores table.

The suite checks, on the scores table of one scan:

- the row count equals the number of input rows, and every row is either scored or rejected
  (so rows in = scored + rejected, and no row went missing);
- every scored row has a score, and every score lies in [0, 1] (NaN or infinite scores fail);
- the fraction of scored rows that are flagged is at most the policy's maximum;
- the fraction of input rows rejected at ingestion is at most the policy's maximum.

The gate fails closed: if validation itself raises, the result is a failure.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from gradsentry_dagster.scoring import STATUS_REJECTED, STATUS_SCORED

logger = logging.getLogger(__name__)

# Great Expectations sends usage statistics unless this variable is off, and a data gate stays offline.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@dataclass(frozen=True)
class GatePolicy:
    """When fine-tuning may go ahead.

    Attributes:
        max_flagged_fraction: Largest fraction of scored rows that may be flagged.
        max_rejected_fraction: Largest fraction of input rows that may be rejected as unusable.
    """

    max_flagged_fraction: float = 0.15
    max_rejected_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name in ("max_flagged_fraction", "max_rejected_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")


@dataclass
class GateResult:
    """Outcome of one gate validation."""

    passed: bool
    counts: dict
    expectations: list[dict] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def validation_frame(scores: pd.DataFrame) -> pd.DataFrame:
    """Add the columns the suite reads: ``flagged_rate`` (1/0 for scored rows, NaN otherwise)
    and ``rejected_rate`` (1/0 for every row)."""
    frame = scores.copy()
    scored = frame["status"] == STATUS_SCORED
    frame["flagged_rate"] = np.where(scored, frame["flagged"].astype(bool).astype(float), np.nan)
    frame["rejected_rate"] = (frame["status"] == STATUS_REJECTED).astype(float)
    frame["scored_score"] = np.where(scored, frame["score"].astype(float), 0.5)
    # A missing score on a scored row must fail, so NaN is kept there as a distinct marker.
    frame.loc[scored & frame["score"].isna(), "scored_score"] = np.nan
    return frame


def gate_counts(scores: pd.DataFrame, expected_rows: int) -> dict:
    """Return the counts the check reports: rows in, scored, rejected, flagged, non-finite."""
    scored = scores["status"] == STATUS_SCORED
    finite = np.isfinite(scores["score"].astype(float))
    flagged = int((scores["flagged"].astype(bool) & scored).sum())
    n_scored = int(scored.sum())
    return {
        "rows_in": int(expected_rows),
        "rows_out": int(len(scores)),
        "scored": n_scored,
        "rejected": int((scores["status"] == STATUS_REJECTED).sum()),
        "flagged": flagged,
        "non_finite_scores": int((scored & ~finite).sum()),
        "flagged_fraction": flagged / n_scored if n_scored else math.nan,
    }


def build_suite(policy: GatePolicy, expected_rows: int):
    """Return the Great Expectations suite of the gate."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="gradsentry_gate")
    suite.add_expectation(gxe.ExpectTableRowCountToEqual(value=int(expected_rows)))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=[STATUS_SCORED, STATUS_REJECTED])
    )
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="scored_score"))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(column="scored_score", min_value=0.0, max_value=1.0)
    )
    suite.add_expectation(
        gxe.ExpectColumnMeanToBeBetween(
            column="flagged_rate", min_value=0.0, max_value=float(policy.max_flagged_fraction)
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnMeanToBeBetween(
            column="rejected_rate", min_value=0.0, max_value=float(policy.max_rejected_fraction)
        )
    )
    return suite


def _plain(value):
    """Return a JSON-friendly version of an observed value."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (float, np.floating, np.integer)):
        return float(value)
    return str(value)


def _summarize(result) -> list[dict]:
    summaries = []
    for item in result.results:
        config = item.expectation_config
        observed = (item.result or {}).get("observed_value")
        unexpected = (item.result or {}).get("unexpected_count")
        summaries.append(
            {
                "expectation": config.type,
                "column": config.kwargs.get("column"),
                "success": bool(item.success),
                "observed_value": _plain(observed),
                "unexpected_count": unexpected,
                "exception": (item.exception_info or {}).get("exception_message"),
            }
        )
    return summaries


def run_gate(
    scores: pd.DataFrame,
    policy: GatePolicy,
    expected_rows: int,
    data_docs_dir: str | None = None,
) -> GateResult:
    """Validate a scores table against the policy with Great Expectations.

    Args:
        scores: The scores table (``status``, ``score`` and ``flagged`` columns).
        policy: The gate policy.
        expected_rows: Rows in the input dataset.
        data_docs_dir: If set, static Data Docs HTML of this validation is written there.

    Returns:
        The result; ``passed`` is False if any expectation fails or validation raises.
    """
    # Placeholder counts for a table too broken to count; replaced below when it can be.
    counts: dict = {
        "rows_in": int(expected_rows),
        "rows_out": int(len(scores)),
        "scored": 0,
        "rejected": 0,
        "flagged": 0,
        "non_finite_scores": 0,
        "flagged_fraction": math.nan,
    }
    try:
        import great_expectations as gx

        counts = gate_counts(scores, expected_rows)
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = {"globally": False}
        source = context.data_sources.add_pandas(name="gradsentry_scores")
        asset = source.add_dataframe_asset(name="scores")
        batch_definition = asset.add_batch_definition_whole_dataframe("scan")
        suite = context.suites.add(build_suite(policy, expected_rows))
        batch = batch_definition.get_batch(batch_parameters={"dataframe": validation_frame(scores)})
        result = batch.validate(suite)
        expectations = _summarize(result)
        failed_to_run = [e for e in expectations if e["exception"]]
        passed = bool(result.success) and not failed_to_run
        if data_docs_dir:
            _write_data_docs(context, suite, batch_definition, scores, data_docs_dir, policy, expected_rows)
        return GateResult(passed=passed, counts=counts, expectations=expectations)
    except Exception as error:  # noqa: BLE001 - the gate must fail closed on any error
        logger.exception("gate validation raised; failing closed")
        return GateResult(passed=False, counts=counts, error=f"{type(error).__name__}: {error}")


def _write_data_docs(context, suite, batch_definition, scores, folder, policy, expected_rows) -> None:
    """Write static Data Docs HTML of one validation into ``folder``."""
    import great_expectations as gx

    context.add_data_docs_site(
        site_name="gradsentry_docs",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="gradsentry_gate", data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="gradsentry_gate_checkpoint",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_docs", site_names=["gradsentry_docs"])],
        )
    )
    checkpoint.run(batch_parameters={"dataframe": validation_frame(scores)})
