"""Helpers that run the Dagster graph on a real instance and read back what it stored."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from dagster import AssetKey, materialize

from gradsentry_dagster.assets import (
    PIPELINE_CHECKS,
    gradient_entropy_scores,
    lora_finetuned_adapter,
    raw_dataset,
    split_by_score,
)
from gradsentry_dagster.resources import GradSentryModelResource, ParquetIOManager, ScanPolicy

SCAN_ASSETS = [raw_dataset, gradient_entropy_scores, split_by_score]


def permissive_policy() -> ScanPolicy:
    """A policy whose gate fails only on broken scores, never on the flagged or rejected share."""
    return ScanPolicy(
        mode="paper",
        threshold_rule="fixed", fixed_threshold=0.5, max_flagged_fraction=1.0, max_rejected_fraction=1.0
    )


def run_graph(
    instance,
    dataset: Path,
    model_dir: Path,
    storage: Path,
    *,
    policy: ScanPolicy | None = None,
    finetune: bool = True,
    model_options: dict | None = None,
    selection=None,
):
    """Materialize the graph (with or without fine-tuning) and return the in-process result.

    ``selection`` lists asset names to materialize; the others are loaded from storage.
    """
    resources = {
        "model": GradSentryModelResource(model=str(model_dir), batch_size=8, **(model_options or {})),
        "policy": policy or permissive_policy(),
        "gradsentry_io_manager": ParquetIOManager(base_dir=str(storage)),
    }
    ops = {"raw_dataset": {"config": {"path": str(dataset)}}}
    assets = SCAN_ASSETS + PIPELINE_CHECKS
    if finetune:
        assets = assets + [lora_finetuned_adapter]
        ops["lora_finetuned_adapter"] = {"config": {"max_steps": 2, "batch_size": 2}}
    if selection is not None:
        ops = {name: config for name, config in ops.items() if name in selection}
    return materialize(
        assets,
        instance=instance,
        resources=resources,
        run_config={"ops": ops},
        selection=selection,
        raise_on_error=False,
    )


def materialized(instance, run_id: str) -> set[str]:
    """Return the asset keys materialized in one run."""
    keys = set()
    for record in instance.get_records_for_run(run_id).records:
        event = record.event_log_entry.dagster_event
        if event is not None and event.event_type_value == "ASSET_MATERIALIZATION":
            keys.add(event.asset_key.to_user_string())
    return keys


def stored_table(storage: Path, name: str):
    """Read the Parquet table the IO manager stored for asset ``name``."""
    return pq.read_table(storage / f"{name}.parquet").to_pandas()


def ever_materialized(instance, name: str) -> bool:
    return instance.get_latest_materialization_event(AssetKey(name)) is not None


def step_failure_messages(result) -> list[str]:
    """Return the error messages of the failed steps of a run."""
    messages = []
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None:
            messages.append(error.message)
            error = error.cause
    return messages
