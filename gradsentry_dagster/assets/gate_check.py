"""The blocking Great Expectations check on the scores, which gates fine-tuning."""


import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetIn,
    MetadataValue,
    asset_check,
)

from gradsentry_dagster.assets.scores import gradient_entropy_scores
from gradsentry_dagster.gate import reject_reason_counts, run_gate
from gradsentry_dagster.resources.io import default_storage_dir
from gradsentry_dagster.resources.policy import ScanPolicy


@asset_check(
    asset=gradient_entropy_scores,
    name="gradsentry_gate",
    blocking=True,
    additional_ins={"raw_dataset": AssetIn("raw_dataset")},
    description=(
        "Great Expectations suite on the scores: fraction flagged at most the policy maximum, "
        "every scored row has a finite score in [0, 1], and every input row is scored or "
        "rejected. Blocking: when it fails, nothing downstream of the scores runs."
    ),
)
def gradsentry_gate(
    context: AssetCheckExecutionContext,
    gradient_entropy_scores: pd.DataFrame,
    raw_dataset: pd.DataFrame,
    policy: ScanPolicy,
) -> AssetCheckResult:
    return evaluate_gate(context, gradient_entropy_scores, raw_dataset, policy)


def evaluate_gate(
    context: AssetCheckExecutionContext,
    gradient_entropy_scores: pd.DataFrame,
    raw_dataset: pd.DataFrame,
    policy: ScanPolicy,
) -> AssetCheckResult:
    """Run the Great Expectations gate and report it as a check result with its Data Docs."""
    docs_dir = f"{default_storage_dir()}/artifacts/{context.run.run_id}/data_docs"
    result = run_gate(
        gradient_entropy_scores,
        policy.gate_policy(),
        len(raw_dataset),
        data_docs_dir=docs_dir,
        expected_row_ids=raw_dataset["row_id"],
    )
    counts = result.counts
    if result.passed:
        context.log.info(
            f"gate passed: {counts['flagged']} of {counts['scored']} scored rows flagged "
            f"(max {policy.max_flagged_fraction:.0%})"
        )
    else:
        failed = result.failure_messages()
        context.log.error(
            f"gate failed: {'; '.join(failed)}; "
            f"{counts['flagged']} of {counts['scored']} scored rows flagged "
            f"(max {policy.max_flagged_fraction:.0%}), {counts['rejected']} rejected"
        )
    metadata = {
        "rows_in": counts["rows_in"],
        "scored": counts["scored"],
        "rejected": counts["rejected"],
        "unaccounted": counts["unaccounted"],
        "flagged": counts["flagged"],
        "non_finite_scores": counts["non_finite_scores"],
        "flagged_fraction": float(counts["flagged_fraction"]),
        "max_flagged_fraction": float(policy.max_flagged_fraction),
        "max_rejected_fraction": float(policy.max_rejected_fraction),
        "great_expectations_result": MetadataValue.json(
            {"success": result.passed, "expectations": result.expectations, "error": result.error}
        ),
        "data_docs": MetadataValue.path(f"{docs_dir}/index.html"),
    }
    if counts["rejected"]:
        metadata["reject_reasons"] = MetadataValue.json(reject_reason_counts(gradient_entropy_scores))
    return AssetCheckResult(
        passed=result.passed,
        severity=AssetCheckSeverity.ERROR,
        metadata=metadata,
        description=None if result.passed else (result.error or "the scores violate the scan policy"),
    )
