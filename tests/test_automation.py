"""The scan schedule and the dataset version sensor: the run requests they make."""

import datetime
import json

import pytest
from dagster import (
    AssetSelection,
    Definitions,
    build_schedule_context,
    build_sensor_context,
    define_asset_job,
    instance_for_test,
)

from gradsentry_dagster.assets.versioned import build_versioned_scan
from gradsentry_dagster.automation import (
    build_dataset_version_sensor,
    build_scan_schedule,
    build_version_rescan_schedule,
)
from gradsentry_dagster.definitions import defs, scan_job
from gradsentry_dagster.resources import GradSentryModelResource, ParquetIOManager, ScanPolicy
from gradsentry_dagster.versions import find_version, version_key


@pytest.fixture
def instance():
    with instance_for_test() as test_instance:
        yield test_instance


def write_rows(path, questions):
    path.write_text("\n".join(json.dumps({"question": q, "answer": "yes"}) for q in questions))
    return path


def watched_scan(folder, pattern="*.jsonl"):
    scan = build_versioned_scan(dataset_glob=str(folder / pattern), key_prefix="watched")
    job = define_asset_job(
        "watched_scan", selection=AssetSelection.groups(scan.group_name)
    )
    sensor = build_dataset_version_sensor(
        name="watched_versions", job=job, dataset_glob=str(folder / pattern), partitions_def=scan.partitions_def
    )
    definitions = Definitions(
        assets=scan.assets,
        asset_checks=scan.checks,
        jobs=[job],
        sensors=[sensor],
        resources={
            "model": GradSentryModelResource(),
            "policy": ScanPolicy(),
            "gradsentry_io_manager": ParquetIOManager(base_dir=str(folder / "storage")),
        },
    )
    return scan, job, sensor, definitions


def test_schedule_requests_scan_of_configured_path():
    schedule = build_scan_schedule(name="nightly", job=scan_job, dataset_path="/data/train.jsonl")
    tick = datetime.datetime(2026, 12, 4, 0, 0, tzinfo=datetime.timezone.utc)
    requests = schedule.evaluate_tick(build_schedule_context(scheduled_execution_time=tick)).run_requests
    assert len(requests) == 1
    assert requests[0].run_config == {"ops": {"raw_dataset": {"config": {"path": "/data/train.jsonl"}}}}
    assert requests[0].run_key == tick.isoformat()
    assert schedule.cron_schedule == "@daily"


def test_schedule_cron_from_argument_and_env(monkeypatch):
    monkeypatch.setenv("GRADSENTRY_SCAN_CRON", "15 2 * * 1")
    from_env = build_scan_schedule(name="weekly", job=scan_job)
    explicit = build_scan_schedule(name="hourly", job=scan_job, cron="0 * * * *")
    assert from_env.cron_schedule == "15 2 * * 1"
    assert explicit.cron_schedule == "0 * * * *"


def test_code_location_has_schedule_and_sensor():
    assert defs.resolve_schedule_def("gradsentry_scan_schedule").job_name == "scan"
    assert defs.resolve_sensor_def("gradsentry_dataset_versions").job_name == "versions_scan"
    assert defs.resolve_job_def("versions_scan").partitions_def is not None


def test_sensor_registers_new_versions(tmp_path, instance):
    folder = tmp_path / "incoming"
    folder.mkdir()
    first = write_rows(folder / "a.jsonl", ["q1", "q2"])
    write_rows(folder / "b.jsonl", ["q3"])
    (folder / "notes.txt").write_text("not a dataset")
    scan, _, sensor, definitions = watched_scan(folder)

    context = build_sensor_context(instance=instance, definitions=definitions)
    result = sensor(context)
    keys = sorted(request.partition_key for request in result.run_requests)
    assert keys == sorted([version_key(first), version_key(folder / "b.jsonl")])
    assert all(request.run_key == request.partition_key for request in result.run_requests)
    assert len(result.dynamic_partitions_requests) == 1
    assert sorted(result.dynamic_partitions_requests[0].partition_keys) == keys

    # The daemon adds the partitions; the next tick with the same files requests nothing.
    instance.add_dynamic_partitions(scan.partitions_def.name, keys)
    again = sensor(build_sensor_context(instance=instance, definitions=definitions, cursor=result.cursor))
    assert not again.run_requests
    assert "no new version" in again.skip_reason.skip_message

    # Editing a file gives a new version with a new partition; the old key keeps its partition.
    write_rows(first, ["q1", "q2", "q2b"])
    changed = sensor(build_sensor_context(instance=instance, definitions=definitions, cursor=again.cursor))
    assert [request.partition_key for request in changed.run_requests] == [version_key(first)]
    assert version_key(first) not in keys


def test_find_version_rejects_changed_content(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", ["q1"])
    old_key = version_key(path)
    assert find_version(str(tmp_path / "*.jsonl"), old_key) == str(path)
    write_rows(path, ["q1", "q2"])
    with pytest.raises(LookupError, match="none has that content"):
        find_version(str(tmp_path / "*.jsonl"), old_key)
    with pytest.raises(LookupError, match="invalid dataset version key"):
        find_version(str(tmp_path / "*.jsonl"), "a.jsonl")


def test_rescan_schedule_requests_registered_versions(tmp_path, instance):
    folder = tmp_path / "incoming"
    folder.mkdir()
    registered = write_rows(folder / "a.jsonl", ["q1"])
    write_rows(folder / "b.jsonl", ["q2"])
    scan, job, _, _ = watched_scan(folder)
    schedule = build_version_rescan_schedule(
        name="rescan", job=job, dataset_glob=str(folder / "*.jsonl"), partitions_def=scan.partitions_def
    )
    tick = datetime.datetime(2026, 12, 4, tzinfo=datetime.timezone.utc)

    empty = schedule(build_schedule_context(instance=instance, scheduled_execution_time=tick))
    assert "no registered version" in empty.skip_message

    instance.add_dynamic_partitions(scan.partitions_def.name, [version_key(registered)])
    requests = schedule(build_schedule_context(instance=instance, scheduled_execution_time=tick))
    assert [request.partition_key for request in requests] == [version_key(registered)]
