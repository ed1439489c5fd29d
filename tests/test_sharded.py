"""Sharded scoring with Dagster's multiprocess executor: two shard steps, same scores as one."""

import os

import numpy as np
import pytest
import pyarrow.parquet as pq
from dagster import (
    AssetSelection,
    Definitions,
    define_asset_job,
    execute_job,
    materialize,
    multiprocess_executor,
    reconstructable,
)

from gradsentry_dagster.assets.versioned import build_versioned_scan
from gradsentry_dagster.resources import GradSentryModelResource, ParquetIOManager, ScanPolicy
from gradsentry_dagster.versions import version_key
from tests.test_pipeline import write_dataset

# The job is rebuilt in each step's process, so the test passes its settings through these.
GLOB_ENV = "GRADSENTRY_TEST_SHARD_GLOB"
MODEL_ENV = "GRADSENTRY_TEST_SHARD_MODEL"


def sharded_definitions() -> Definitions:
    scan = build_versioned_scan(dataset_glob=os.environ[GLOB_ENV], key_prefix="sharded")
    job = define_asset_job(
        "sharded_scan",
        selection=AssetSelection.assets(scan.key("raw_dataset"), scan.key("gradient_entropy_scores")).without_checks(),
        executor_def=multiprocess_executor.configured({"max_concurrent": 2}),
    )
    return Definitions(
        assets=scan.assets,
        asset_checks=scan.checks,
        jobs=[job],
        resources={
            "model": GradSentryModelResource(model=os.environ[MODEL_ENV], batch_size=4),
            "policy": ScanPolicy(mode="paper"),
            "gradsentry_io_manager": ParquetIOManager(),
        },
    )


def sharded_scan_job():
    return sharded_definitions().resolve_job_def("sharded_scan")


def step_pids(instance, run_id, step_fragment):
    return {
        record.event_log_entry.dagster_event.pid
        for record in instance.get_records_for_run(run_id).records
        if record.event_log_entry.dagster_event
        and record.event_log_entry.dagster_event.event_type_value == "STEP_START"
        and step_fragment in (record.event_log_entry.step_key or "")
    }


# Each multiprocess step starts a fresh Python with torch: about two minutes on a 2-core CPU.
@pytest.mark.slow
def test_two_shards_match_one_shard(instance, tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / "incoming"
    folder.mkdir()
    dataset = write_dataset(folder / "train.jsonl", rows=36, poisoned=6)
    monkeypatch.setenv(GLOB_ENV, str(folder / "*.jsonl"))
    monkeypatch.setenv(MODEL_ENV, str(tiny_model_dir))
    definitions = sharded_definitions()
    key = version_key(dataset)
    instance.add_dynamic_partitions("sharded_versions", [key])
    scores_path = tmp_path / "storage" / "sharded" / "gradient_entropy_scores" / f"{key}.parquet"

    def shards_config(shards):
        return {"ops": {"sharded__gradient_entropy_scores": {"config": {"shards": shards}}}}

    one = materialize(
        definitions.assets,
        selection=["sharded/raw_dataset", "sharded/gradient_entropy_scores"],
        instance=instance,
        resources=definitions.resources,
        partition_key=key,
        run_config=shards_config(1),
    )
    assert one.success
    single = pq.read_table(scores_path).to_pandas()

    with execute_job(
        reconstructable(sharded_scan_job),
        instance=instance,
        run_config=shards_config(2),
        tags={"dagster/partition": key},
    ) as result:
        assert result.success
        run_id = result.run_id
    sharded = pq.read_table(scores_path).to_pandas()

    shard_pids = step_pids(instance, run_id, "score_shard[")
    assert len(shard_pids) == 2, "the two shards did not run as separate processes"
    assert sharded["row_id"].tolist() == single["row_id"].tolist()
    assert sharded["status"].tolist() == single["status"].tolist()
    np.testing.assert_allclose(sharded["score"], single["score"], atol=1e-5)
    # The threshold is decided once, on all rows, so both runs flag the same rows at the same value.
    assert sharded["threshold"].nunique() == 1
    assert sharded["threshold"].iloc[0] == single["threshold"].iloc[0]
    assert sharded["threshold_rule"].iloc[0] == single["threshold_rule"].iloc[0]
    assert sharded["flagged"].tolist() == single["flagged"].tolist()
