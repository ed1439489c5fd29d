"""The ``gradient_entropy_scores`` asset: one GradSentry score per input row."""


import base64
from pathlib import Path

import pandas as pd
from dagster import (
    AssetExecutionContext,
    MetadataValue,
    Output,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from gradsentry_dagster.progress import ProgressReporter
from gradsentry_dagster.report import plot_histogram, summarize_scores, top_suspicious
from gradsentry_dagster.resources.io import default_storage_dir
from gradsentry_dagster.resources.model import GradSentryModelResource
from gradsentry_dagster.resources.policy import ScanPolicy
from gradsentry_dagster.scan import scan_frame, settings_for_mode


def artifacts_dir(context: AssetExecutionContext) -> Path:
    """Return this run's folder for plots, Data Docs and adapters."""
    return Path(default_storage_dir(), "artifacts", context.run.run_id)


def start_scoring(context, model: GradSentryModelResource, policy: ScanPolicy, rows: int):
    """Load the model, log what will be scored, and return (loaded model, settings, progress).

    Shared by the scores asset and the sharded scoring op, so both log and report alike. The
    settings compute what the policy's scan mode reads.
    """
    # The calibration is read first, so a missing one fails before the model loads.
    settings = settings_for_mode(model.scoring_settings(), policy.mode, policy.robust_calibration(model.model))
    loaded = model.load()
    context.log.info(
        f"scoring {rows} rows with {model.model} on {loaded.device} "
        f"({settings.method} path, batch size {settings.batch_size})"
    )
    reporter = ProgressReporter(rows, context.log.info, label="rows")
    return loaded, settings, reporter


def image_markdown(path: Path, alt: str) -> MetadataValue:
    """Return a markdown metadata value that shows a PNG inline in the Dagster UI."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def table_metadata(frame: pd.DataFrame) -> MetadataValue:
    """Return a small DataFrame as a table metadata value, which the Dagster UI shows inline."""
    kinds = {"f": "float", "i": "int", "u": "int", "b": "bool"}
    schema = TableSchema(
        columns=[TableColumn(name, kinds.get(frame[name].dtype.kind, "string")) for name in frame.columns]
    )
    records = [
        TableRecord({name: value.item() if hasattr(value, "item") else value for name, value in row.items()})
        for row in frame.to_dict(orient="records")
    ]
    return MetadataValue.table(records, schema=schema)


def scores_metadata(
    scores: pd.DataFrame, frame: pd.DataFrame, plot_path: Path, extra: dict | None = None
) -> dict:
    """Build the metadata shown on the scores asset: counts, threshold, plot, top rows."""
    summary = summarize_scores(scores)
    labels = None
    if "poisoned" in frame.columns:
        # Only True or 1 marks a poisoned row; text labels such as "False" must not count.
        labels = frame["poisoned"].map(lambda value: value is True or value == 1).to_numpy(dtype=bool)
    plot_histogram(scores, plot_path, labels=labels)
    metadata = {
        "rows": summary["rows"],
        "scored": summary["scored"],
        "rejected": summary["rejected"],
        "flagged": summary["flagged"],
        "flagged_fraction": float(summary["flagged_fraction"]),
        "threshold": float(summary["threshold"]),
        "threshold_rule": summary["threshold_rule"],
        "score_histogram": image_markdown(plot_path, "score histogram"),
        "score_histogram_path": MetadataValue.path(str(plot_path)),
        "top_suspicious": table_metadata(top_suspicious(scores, frame, limit=10)),
    }
    if labels is not None and labels.any() and not labels.all():
        from gradsentry_dagster.metrics import detection_metrics

        scored = (scores["status"] == "scored").to_numpy()
        metrics = detection_metrics(
            labels[scored], scores["score"].to_numpy(dtype=float)[scored], scores["flagged"].to_numpy(dtype=bool)[scored]
        )
        metadata["ground_truth_metrics"] = MetadataValue.json(metrics)
    metadata.update(extra or {})
    return metadata


@asset(
    group_name="gradsentry",
    io_manager_key="gradsentry_io_manager",
    kinds={"pytorch", "parquet"},
    description=(
        "GradSentry gradient spectral entropy of every row: id, status, score, target tokens, "
        "loss, flagged, threshold, threshold rule and reason."
    ),
)
def gradient_entropy_scores(
    context: AssetExecutionContext,
    raw_dataset: pd.DataFrame,
    model: GradSentryModelResource,
    policy: ScanPolicy,
) -> Output[pd.DataFrame]:
    loaded, settings, reporter = start_scoring(context, model, policy, len(raw_dataset))
    result = scan_frame(
        loaded.model,
        loaded.tokenizer,
        raw_dataset,
        settings,
        policy.threshold_config(),
        progress=reporter.update,
        mode=policy.mode,
        robust_calibration=policy.robust_calibration(model.model),
    )
    context.log.info(
        f"threshold {result.decision.threshold:.4f} set by rule '{result.decision.rule}': "
        f"{result.decision.detail}"
    )
    plot_path = artifacts_dir(context) / "score_histogram.png"
    metadata = scores_metadata(
        result.scores,
        raw_dataset,
        plot_path,
        extra={
            "threshold_detail": result.decision.detail,
            "model": model.model,
            "model_fingerprint": loaded.fingerprint,
            "scoring_settings": MetadataValue.json(
                {"fingerprint": settings.fingerprint(), **settings.__dict__}
            ),
        },
    )
    return Output(result.scores, metadata=metadata)
