"""A ``dg`` component that adds a GradSentry scan of watched dataset files from a ``defs.yaml``.

Example ``defs.yaml``::

    type: gradsentry_dagster.components.GradSentryScanComponent
    attributes:
      name: support_faq
      dataset: /data/support_faq/*.jsonl
      model: embedded:smollm2-135m-instruct
      policy:
        mode: robust
        max_flagged_fraction: 0.15
      schedule: "0 3 * * *"

This builds the partitioned scan graph under the ``support_faq/`` key prefix, a sensor that
scans each new version of the matching files, a schedule that rescans their current versions,
and two jobs (``support_faq_scan`` and ``support_faq_scan_and_finetune``).
"""

from typing import Optional

import dagster as dg
from pydantic import Field

from gradsentry_dagster.assets.versioned import build_versioned_scan
from gradsentry_dagster.automation import (
    build_dataset_version_sensor,
    build_version_rescan_schedule,
)
from gradsentry_dagster.models import EMBEDDED_MODEL
from gradsentry_dagster.resources import GradSentryModelResource, ParquetIOManager, ScanPolicy


class ScanPolicyModel(dg.Model, dg.Resolvable):
    """Scan mode, threshold rule and gate limits; the fields of the ``ScanPolicy`` resource."""

    mode: str = Field(
        default="robust",
        description="'robust' (per-sample thresholds from a trusted clean set, the default) or 'paper'.",
    )
    robust_calibration_path: str = Field(
        default="",
        description="Calibration JSON of robust mode; empty uses the embedded model's built-in one.",
    )
    threshold_rule: str = Field(default="auto", description="'auto' (density valley) or 'fixed'.")
    fixed_threshold: float = Field(default=0.7, ge=0, le=1, description="Threshold of the 'fixed' rule.")
    fallback_threshold: float = Field(default=0.7, ge=0, le=1, description="Fallback of the 'auto' rule.")
    max_flagged_fraction: float = Field(
        default=0.15, ge=0, le=1, description="Largest flagged fraction before fine-tuning is blocked."
    )
    max_rejected_fraction: float = Field(
        default=0.05, ge=0, le=1, description="Largest fraction of input rows rejected as unusable."
    )


class GradSentryScanComponent(dg.Component, dg.Model, dg.Resolvable):
    """Scan every version of a set of dataset files with GradSentry and gate fine-tuning on it.

    NOTE: the component binds the resource keys ``model``, ``policy`` and
    ``gradsentry_io_manager``; Dagster rejects two components with different settings for
    them in one code location, so give each differently configured scan its own location.
    """

    name: str = Field(
        description="Asset key prefix and name stem of the jobs, sensor and schedule (letters, digits, _)."
    )
    dataset: str = Field(
        description="Dataset file or glob (``**`` recurses): .jsonl, .json, .parquet or .csv files."
    )
    preset: str = Field(default="generic", description="Column mapping: generic, webquestions or nq_open.")
    field_mapping: dict[str, str] = Field(
        default_factory=dict, description="Source column per canonical field, overriding the preset."
    )
    model: str = Field(
        default=EMBEDDED_MODEL, description="Scoring model: embedded name, local folder or hub id."
    )
    device: str = Field(default="auto", description="'auto' or a torch device such as 'cuda:0'.")
    batch_size: int = Field(default=8, ge=1, description="Samples per forward pass when scoring.")
    policy: ScanPolicyModel = Field(
        default_factory=ScanPolicyModel, description="Threshold rule and gate limits."
    )
    schedule: Optional[str] = Field(
        default="@daily",
        description="Cron of the rescan schedule (default daily); null leaves the schedule out.",
    )
    schedule_running: bool = Field(default=False, description="Start the schedule when loaded.")
    sensor_running: bool = Field(default=False, description="Start the new-version sensor when loaded.")
    shards: int = Field(default=1, ge=1, description="Scoring shards per version, each a separate step.")
    storage_dir: Optional[str] = Field(
        default=None,
        description="Folder for Parquet tables and artifacts; default $DAGSTER_HOME/gradsentry.",
    )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        scan = build_versioned_scan(
            dataset_glob=self.dataset,
            key_prefix=self.name,
            preset=self.preset,
            field_mapping=self.field_mapping,
            shards=self.shards,
        )
        scan_job = dg.define_asset_job(
            name=f"{self.name}_scan",
            selection=dg.AssetSelection.groups(scan.group_name)
            - dg.AssetSelection.assets(scan.key("lora_finetuned_adapter")),
            description=f"Ingest, score, gate and split one version of {self.dataset}.",
        )
        finetune_job = dg.define_asset_job(
            name=f"{self.name}_scan_and_finetune",
            selection=dg.AssetSelection.groups(scan.group_name),
            description=f"Scan one version of {self.dataset} and fine-tune on it if its gate passes.",
        )
        sensor = build_dataset_version_sensor(
            name=f"{self.name}_dataset_versions",
            job=scan_job,
            dataset_glob=self.dataset,
            partitions_def=scan.partitions_def,
            running=self.sensor_running,
        )
        schedules = []
        if self.schedule:
            schedules.append(
                build_version_rescan_schedule(
                    name=f"{self.name}_rescan_schedule",
                    job=scan_job,
                    dataset_glob=self.dataset,
                    partitions_def=scan.partitions_def,
                    cron=self.schedule,
                    running=self.schedule_running,
                )
            )
        io_manager = ParquetIOManager(base_dir=self.storage_dir) if self.storage_dir else ParquetIOManager()
        return dg.Definitions(
            assets=scan.assets,
            asset_checks=scan.checks,
            jobs=[scan_job, finetune_job],
            sensors=[sensor],
            schedules=schedules,
            resources={
                "model": GradSentryModelResource(
                    model=self.model, device=self.device, batch_size=self.batch_size
                ),
                "policy": ScanPolicy(**self.policy.model_dump()),
                "gradsentry_io_manager": io_manager,
            },
        )
