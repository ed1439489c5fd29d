"""The Dagster code location: assets, the blocking gate check, jobs and resources."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job

from gradsentry_dagster.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
from gradsentry_dagster.resources import GradSentryModelResource, ParquetIOManager, ScanPolicy

scan_and_finetune_job = define_asset_job(
    name="scan_and_finetune",
    selection=AssetSelection.groups("gradsentry"),
    description="Ingest, score, gate, split and fine-tune; fine-tuning never runs if the gate fails.",
)

scan_job = define_asset_job(
    name="scan",
    selection=AssetSelection.groups("gradsentry") - AssetSelection.assets("lora_finetuned_adapter"),
    description="Ingest, score, gate and split, without fine-tuning.",
)


def default_resources() -> dict:
    """Return the resources of the code location, with their default configuration."""
    return {
        "model": GradSentryModelResource(),
        "policy": ScanPolicy(),
        "gradsentry_io_manager": ParquetIOManager(),
    }


defs = Definitions(
    assets=PIPELINE_ASSETS,
    asset_checks=PIPELINE_CHECKS,
    jobs=[scan_and_finetune_job, scan_job],
    resources=default_resources(),
)
