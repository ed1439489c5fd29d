"""Recurring scans and new-version scans: a schedule and a sensor that request scan runs."""

import json
import os
from typing import Any, Optional

from dagster import (
    DefaultScheduleStatus,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    schedule,
    sensor,
)

from gradsentry_dagster.versions import DatasetVersion, current_versions

DEFAULT_SCAN_CRON = "@daily"
SCAN_CRON_ENV = "GRADSENTRY_SCAN_CRON"
VERSION_TAG = "gradsentry/dataset_version"
PATH_TAG = "gradsentry/dataset_path"

# A job definition, or the unresolved job that define_asset_job returns.
Job = Any


def scan_cron(configured: Optional[str] = None) -> str:
    """Return the scan schedule's cron: ``configured``, else ``$GRADSENTRY_SCAN_CRON``, else daily."""
    return configured or os.environ.get(SCAN_CRON_ENV) or DEFAULT_SCAN_CRON


def build_scan_schedule(
    *,
    name: str,
    job: Job,
    dataset_path: str = "",
    cron: Optional[str] = None,
    running: bool = False,
) -> ScheduleDefinition:
    """Build a schedule that rescans one dataset file with an unpartitioned scan job.

    Each tick requests one run; its materializations and gate check evaluation record the result.

    Args:
        name: Schedule name.
        job: The scan job; its ``raw_dataset`` op receives ``dataset_path``.
        dataset_path: Dataset file to rescan; empty scans the embedded demo set.
        cron: Cron expression; default ``$GRADSENTRY_SCAN_CRON``, else ``@daily``.
        running: Start the schedule as soon as the code location loads.
    """

    @schedule(
        name=name,
        job=job,
        cron_schedule=scan_cron(cron),
        default_status=DefaultScheduleStatus.RUNNING if running else DefaultScheduleStatus.STOPPED,
        description=f"Rescan {dataset_path or 'the embedded demo set'} and gate it.",
    )
    def _scan_schedule(context: ScheduleEvaluationContext) -> RunRequest:
        tick = context.scheduled_execution_time
        return RunRequest(
            run_key=tick.isoformat() if tick else None,
            run_config={"ops": {"raw_dataset": {"config": {"path": dataset_path}}}},
            tags={PATH_TAG: dataset_path or "embedded demo set", "gradsentry/trigger": "schedule"},
        )

    return _scan_schedule


def build_version_rescan_schedule(
    *,
    name: str,
    job: Job,
    dataset_glob: str,
    partitions_def: DynamicPartitionsDefinition,
    cron: Optional[str] = None,
    running: bool = False,
) -> ScheduleDefinition:
    """Build a schedule that rescans the current version of every watched file already registered.

    Versions not registered yet are left to the dataset version sensor, which adds their
    partition; a schedule cannot add partitions.
    """

    @schedule(
        name=name,
        job=job,
        cron_schedule=scan_cron(cron),
        default_status=DefaultScheduleStatus.RUNNING if running else DefaultScheduleStatus.STOPPED,
        description=f"Rescan the current version of every file matching {dataset_glob}.",
    )
    def _rescan_schedule(context: ScheduleEvaluationContext):
        registered = set(context.instance.get_dynamic_partitions(partitions_def.name))
        versions = current_versions(dataset_glob)
        keys = sorted({version.key for version in versions if version.key in registered})
        if not keys:
            return SkipReason(
                f"no registered version among {len(versions)} file(s) matching {dataset_glob}; "
                "the dataset version sensor registers new versions"
            )
        tick = context.scheduled_execution_time
        return [
            RunRequest(
                run_key=f"{key}:{tick.isoformat() if tick else ''}",
                partition_key=key,
                tags={VERSION_TAG: key, "gradsentry/trigger": "schedule"},
            )
            for key in keys
        ]

    return _rescan_schedule


def build_dataset_version_sensor(
    *,
    name: str,
    job: Job,
    dataset_glob: str,
    partitions_def: DynamicPartitionsDefinition,
    minimum_interval_seconds: int = 60,
    running: bool = False,
) -> SensorDefinition:
    """Build a sensor that adds a partition for each new file version and requests its scan.

    A version is new when its key (file name and content hash) is not yet a partition, so a
    file edited back to an earlier content is not scanned again. The cursor keeps each file's
    modification time, size and key, so unchanged files are not hashed again on every tick.
    """

    @sensor(
        name=name,
        job=job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING if running else DefaultSensorStatus.STOPPED,
        description=f"Scan each new version of the files matching {dataset_glob}.",
    )
    def _version_sensor(context: SensorEvaluationContext):
        known = {
            path: DatasetVersion(path, *stamp)
            for path, stamp in (json.loads(context.cursor) if context.cursor else {}).items()
        }
        versions = current_versions(dataset_glob, known)
        cursor = json.dumps({v.path: [v.key, v.mtime_ns, v.size] for v in versions}, sort_keys=True)
        registered = set(context.instance.get_dynamic_partitions(partitions_def.name))
        new_paths: dict[str, str] = {}
        for version in versions:
            if version.key not in registered:
                new_paths.setdefault(version.key, version.path)
        if not new_paths:
            return SensorResult(
                skip_reason=SkipReason(
                    f"no new version among {len(versions)} file(s) matching {dataset_glob}"
                ),
                cursor=cursor,
            )
        context.log.info(f"found {len(new_paths)} new dataset version(s): {', '.join(sorted(new_paths))}")
        return SensorResult(
            run_requests=[
                RunRequest(
                    run_key=key,
                    partition_key=key,
                    tags={VERSION_TAG: key, PATH_TAG: path, "gradsentry/trigger": "sensor"},
                )
                for key, path in sorted(new_paths.items())
            ],
            dynamic_partitions_requests=[partitions_def.build_add_request(sorted(new_paths))],
            cursor=cursor,
        )

    return _version_sensor
