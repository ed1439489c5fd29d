"""The fine-tuning gate: a Great Expectations suite run against a scores table.

The suite checks, on the scores table of one scan:

- conservation: the row count equals the number of input rows, every row is either scored or
  rejected, row ids are unique, and, when the input's row ids are given, each score row
  carries the id of the input row at the same position (so rows in = scored + rejected, and
  no row was lost, duplicated or swapped);
- at least one row is scored;
- every scored row has a finite score in [0, 1] and, where the table has a ``loss`` column, a
  finite, non-negative loss;
- where the table has a ``threshold`` column, every scored row is flagged exactly when its
  score is above the threshold or not finite;
- the fraction of scored rows that are flagged is at most the policy's maximum;
- the fraction of input rows rejected at ingestion or tokenization is at most the policy's
  maximum.

The gate fails closed: if validation itself raises, the result is a failure.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from gradsentry_dagster.robust import RULE_ROBUST
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

    def failure_messages(self) -> list[str]:
        """Return one plain sentence per failed expectation, or the validation error."""
        if self.error:
            return [f"validation failed: {self.error}"]
        messages = []
        for item in self.expectations:
            if item["success"]:
                continue
            template = FAILURE_MESSAGES.get((item["expectation"], item["column"]))
            if template is None:
                messages.append(f"{item['expectation']} failed on {item['column'] or 'the table'}")
                continue
            try:
                text = template.format(observed=item["observed_value"], unexpected=item["unexpected_count"])
            except (TypeError, ValueError):
                text = f"{item['expectation']} failed on {item['column'] or 'the table'}"
            messages.append(text)
        return messages


# Plain descriptions of the suite's expectations, keyed by (expectation type, column).
FAILURE_MESSAGES = {
    ("expect_table_row_count_to_equal", None): "the scores table has {observed} rows, not one per input row",
    ("expect_column_values_to_be_in_set", "status"): "{unexpected} rows are neither scored nor rejected",
    ("expect_column_values_to_be_unique", "row_id"): "{unexpected} row ids repeat",
    ("expect_column_values_to_be_in_set", "matches_input"): "{unexpected} rows do not match the input row ids in order",
    ("expect_column_sum_to_be_between", "is_scored"): "no row was scored",
    ("expect_column_values_to_not_be_null", "scored_score"): "{unexpected} scored rows have no finite score",
    ("expect_column_values_to_be_between", "scored_score"): "{unexpected} scores lie outside [0, 1]",
    ("expect_column_values_to_not_be_null", "scored_loss"): "{unexpected} scored rows have no finite loss",
    ("expect_column_values_to_be_between", "scored_loss"): "{unexpected} losses are negative",
    ("expect_column_values_to_be_in_set", "flag_consistent"): "{unexpected} flags disagree with the threshold",
    ("expect_column_mean_to_be_between", "flagged_rate"): "flagged fraction {observed:.1%} is above the policy maximum",
    ("expect_column_mean_to_be_between", "rejected_rate"): (
        "rejected fraction {observed:.1%} of input rows is above the policy maximum "
        "(max_rejected_fraction); see the reject reasons in the scores table"
    ),
}


def validation_frame(
    scores: pd.DataFrame, expected_row_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """Add the columns the suite reads.

    - ``flagged_rate``: 1/0 for scored rows, NaN otherwise; its mean is the flagged fraction.
    - ``rejected_rate``: 1/0 for every row; its mean is the rejected fraction.
    - ``is_scored``: 1/0 for every row; its sum is the number of scored rows.
    - ``scored_score`` and ``scored_loss``: the score and loss of scored rows, NaN where they
      are not finite, and a neutral placeholder on rejected rows.
    - ``flag_consistent``: whether ``flagged`` follows from the score and the threshold; in
      robust mode, whether a row above the entropy threshold is flagged.
    - ``matches_input``: whether the row id equals the input row id at the same position.
    """
    frame = scores.copy()
    scored = frame["status"] == STATUS_SCORED
    score = frame["score"].astype(float)
    finite_score = np.isfinite(score)
    flagged = frame["flagged"].astype(bool)
    frame["flagged_rate"] = np.where(scored, flagged.astype(float), np.nan)
    frame["rejected_rate"] = (frame["status"] == STATUS_REJECTED).astype(float)
    frame["is_scored"] = scored.astype(float)

    # NaN marks a non-finite value on a scored row, which the not-null expectations then fail.
    frame["scored_score"] = np.where(scored, score.where(finite_score), 0.5)
    if "loss" in frame.columns:
        loss = frame["loss"].astype(float)
        frame["scored_loss"] = np.where(scored, loss.where(np.isfinite(loss)), 0.0)
    else:
        frame["scored_loss"] = 0.0

    if "threshold" in frame.columns:
        threshold = frame["threshold"].astype(float)
        should_flag = ~finite_score | (score > threshold)
        consistent = flagged == should_flag
        if "threshold_rule" in frame.columns:
            # Robust mode's threshold is the entropy one, and its other features flag more rows:
            # a row above it must be flagged, and a row below it may be.
            robust_rows = frame["threshold_rule"] == RULE_ROBUST
            consistent = np.where(robust_rows, flagged | ~should_flag, consistent)
        frame["flag_consistent"] = ~scored | consistent
    else:
        frame["flag_consistent"] = True

    if expected_row_ids is None:
        frame["matches_input"] = True
    else:
        expected = pd.Series(list(expected_row_ids), dtype=object)
        if len(expected) == len(frame):
            frame["matches_input"] = frame["row_id"].astype(str).to_numpy() == expected.astype(str).to_numpy()
        else:
            frame["matches_input"] = False
    return frame


def gate_counts(scores: pd.DataFrame, expected_rows: int) -> dict:
    """Return the counts the check reports.

    ``unaccounted`` is ``rows_in - scored - rejected``: input rows that the scores table
    neither scored nor rejected, which must be 0.
    """
    scored = scores["status"] == STATUS_SCORED
    finite = np.isfinite(scores["score"].astype(float))
    flagged = int((scores["flagged"].astype(bool) & scored).sum())
    n_scored = int(scored.sum())
    n_rejected = int((scores["status"] == STATUS_REJECTED).sum())
    return {
        "rows_in": int(expected_rows),
        "rows_out": int(len(scores)),
        "scored": n_scored,
        "rejected": n_rejected,
        "unaccounted": int(expected_rows) - n_scored - n_rejected,
        "flagged": flagged,
        "non_finite_scores": int((scored & ~finite).sum()),
        "flagged_fraction": flagged / n_scored if n_scored else math.nan,
    }


def reject_reason_counts(scores: pd.DataFrame, limit: int = 10) -> dict[str, int]:
    """Return the most common reasons of rejected rows with their counts.

    Line numbers in parse errors are replaced by ``N`` so that one kind of error counts once.
    Reasons beyond the ``limit`` most common are summed under ``"other reasons"``, so the
    counts always add up to the number of rejected rows.
    """
    rejected = scores.loc[scores["status"] == STATUS_REJECTED, "reason"].fillna("").astype(str)
    kinds = rejected.str.replace(r"\bline \d+", "line N", regex=True).value_counts()
    counts = {str(reason): int(count) for reason, count in kinds.head(limit).items()}
    if len(kinds) > limit:
        counts["other reasons"] = int(kinds.iloc[limit:].sum())
    return counts


def clean_rows_problem(scores: pd.DataFrame, clean: pd.DataFrame) -> str | None:
    """Return why ``clean`` is not exactly the scored, unflagged rows of ``scores``, or None.

    Fine-tuning calls this on the stored tables so that a clean table from another scan, or
    one with rows added or removed, is never trained on.
    """
    scored = scores["status"] == STATUS_SCORED
    expected = scores.loc[scored & ~scores["flagged"].astype(bool), "row_id"].astype(str)
    actual = clean["row_id"].astype(str) if "row_id" in clean.columns else pd.Series(dtype=str)
    if list(actual) == list(expected):
        return None
    missing = len(set(expected) - set(actual))
    extra = len(set(actual) - set(expected))
    return (
        f"the clean dataset has {len(actual)} rows but the scores table has {len(expected)} "
        f"scored, unflagged rows ({missing} missing, {extra} not in the scores); "
        "rerun the scan and the split"
    )


def build_suite(policy: GatePolicy, expected_rows: int):
    """Return the Great Expectations suite of the gate."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="gradsentry_gate")

    # Conservation: rows in = scored + rejected, row by row.
    suite.add_expectation(gxe.ExpectTableRowCountToEqual(value=int(expected_rows)))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=[STATUS_SCORED, STATUS_REJECTED])
    )
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="row_id"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="matches_input", value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnSumToBeBetween(column="is_scored", min_value=1))

    # Every scored row has a finite score in [0, 1], a finite loss, and a consistent flag.
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="scored_score"))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(column="scored_score", min_value=0.0, max_value=1.0)
    )
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="scored_loss"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="scored_loss", min_value=0.0))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeInSet(column="flag_consistent", value_set=[True])
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
    expected_row_ids: Sequence[str] | None = None,
) -> GateResult:
    """Validate a scores table against the policy with Great Expectations.

    Args:
        scores: The scores table: ``row_id``, ``status``, ``score`` and ``flagged`` columns,
            and the ``loss`` and ``threshold`` columns of a scan, which are checked when present.
        policy: The gate policy.
        expected_rows: Rows in the input dataset.
        data_docs_dir: If set, static Data Docs HTML of this validation is written there.
        expected_row_ids: The input dataset's row ids in order. When given, each score row
            must carry the id of the input row at the same position.

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
        "unaccounted": int(expected_rows) - int(len(scores)),
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
        frame = validation_frame(scores, expected_row_ids)
        batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite)
        expectations = _summarize(result)
        failed_to_run = [e for e in expectations if e["exception"]]
        passed = bool(result.success) and not failed_to_run
        if data_docs_dir:
            _write_data_docs(context, suite, batch_definition, frame, data_docs_dir)
        return GateResult(passed=passed, counts=counts, expectations=expectations)
    except Exception as error:  # noqa: BLE001 - the gate must fail closed on any error
        logger.exception("gate validation raised; failing closed")
        return GateResult(passed=False, counts=counts, error=f"{type(error).__name__}: {error}")


def _write_data_docs(context, suite, batch_definition, frame, folder) -> None:
    """Write static Data Docs HTML of the validation of ``frame`` into ``folder``."""
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
    checkpoint.run(batch_parameters={"dataframe": frame})
