"""The Dagster code location: assets, the blocking gate check, jobs, schedule, sensor and resources.

Two scan graphs live here:

- the unpartitioned graph (``raw_dataset`` ... ``lora_finetuned_adapter``) that the demo and the
  ``scan``/``scan_and_finetune`` jobs run on one configured file, rescanned by
  ``gradsentry_scan_schedule``;
- the same graph under the ``versions/`` prefix, one dynamic partition per version of the files
  matching ``$GRADSENTRY_WATCH_GLOB``, scanned by ``gradsentry_dataset_versions`` as they appear.
"""

import os
from pathlib import Path

from dagster import AssetSelection, Definitions, define_asset_job

from gradsentry_dagster.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
from gradsentry_dagster.assets.versioned import build_versioned_scan
from gradsentry_dagster.automation import build_dataset_version_sensor, build_scan_schedule
from gradsentry_dagster.resources import (
    GradSentryModelResource,
    ParquetIOManager,
    ScanPolicy,
    default_storage_dir,
)

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

scan_schedule = build_scan_schedule(
    name="gradsentry_scan_schedule",
    job=scan_job,
    dataset_path=os.environ.get("GRADSENTRY_SCAN_DATASET", ""),
)

WATCH_GLOB = os.environ.get("GRADSENTRY_WATCH_GLOB") or str(Path(default_storage_dir(), "incoming", "*"))

versions = build_versioned_scan(dataset_glob=WATCH_GLOB, key_prefix="versions")

versions_scan_job = define_asset_job(
    name="versions_scan",
    selection=AssetSelection.groups(versions.group_name)
    - AssetSelection.assets(versions.key("lora_finetuned_adapter")),
    description="Ingest, score, gate and split one dataset version, without fine-tuning.",
)

versions_scan_and_finetune_job = define_asset_job(
    name="versions_scan_and_finetune",
    selection=AssetSelection.groups(versions.group_name),
    description="Scan one dataset version and fine-tune on it; never runs if its gate fails.",
)

dataset_version_sensor = build_dataset_version_sensor(
    name="gradsentry_dataset_versions",
    job=versions_scan_job,
    dataset_glob=WATCH_GLOB,
    partitions_def=versions.partitions_def,
)


def default_resources() -> dict:
    """Return the resources of the code location, with their default configuration."""
    return {
        "model": GradSentryModelResource(),
        "policy": ScanPolicy(),
        "gradsentry_io_manager": ParquetIOManager(),
    }


defs = Definitions(
    assets=PIPELINE_ASSETS + versions.assets,
    asset_checks=PIPELINE_CHECKS + versions.checks,
    jobs=[scan_and_finetune_job, scan_job, versions_scan_job, versions_scan_and_finetune_job],
    schedules=[scan_schedule],
    sensors=[dataset_version_sensor],
    resources=default_resources(),
)
