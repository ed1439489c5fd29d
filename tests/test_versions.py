"""Two versions of one dataset file, scanned and gated independently in a real Dagster instance."""

import pandas as pd
import pytest
from dagster import AssetKey, materialize

from gradsentry_dagster.assets.versioned import build_versioned_scan, gather_shards, shard_positions
from gradsentry_dagster.resources import GradSentryModelResource, ParquetIOManager, ScanPolicy
from gradsentry_dagster.versions import version_key
from tests.test_pipeline import materialized_keys, write_dataset


def versioned_resources(tiny_model_dir, storage):
    return {
        "model": GradSentryModelResource(model=str(tiny_model_dir), batch_size=8),
        # With the tiny random model, clean short targets score far below 0.5 and payload targets above it.
        "policy": ScanPolicy(mode="paper", threshold_rule="fixed", fixed_threshold=0.5, max_flagged_fraction=0.2),
        "gradsentry_io_manager": ParquetIOManager(base_dir=str(storage)),
    }


def run_version(scan, instance, key, resources, selection=None):
    return materialize(
        scan.assets + scan.checks,
        selection=selection,
        instance=instance,
        resources=resources,
        partition_key=key,
        run_config={
            "ops": {"versions__lora_finetuned_adapter": {"config": {"max_steps": 2, "batch_size": 2}}}
        },
        raise_on_error=False,
    )


def test_shard_positions_cover_rows_once():
    pieces = shard_positions(7, 3)
    assert [list(p) for p in pieces] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(p) for p in shard_positions(2, 5)] == [[0], [1]]
    assert [len(p) for p in shard_positions(0, 4)] == [0]
    with pytest.raises(ValueError, match="at least 1"):
        shard_positions(3, 0)


def test_gather_shards_rejects_missing_rows():
    first = pd.DataFrame({"score": [0.1, 0.2]}, index=[0, 1])
    last = pd.DataFrame({"score": [0.3]}, index=[2])
    assert gather_shards([last, first], 3)["score"].tolist() == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="cover 2 rows but the dataset has 3"):
        gather_shards([first], 3)


def test_two_versions_gated_independently(instance, tmp_path, tiny_model_dir):
    folder = tmp_path / "incoming"
    folder.mkdir()
    dataset = write_dataset(folder / "train.jsonl", rows=40, poisoned=0)
    scan = build_versioned_scan(dataset_glob=str(folder / "*.jsonl"))
    resources = versioned_resources(tiny_model_dir, tmp_path / "storage")

    clean_key = version_key(dataset)
    instance.add_dynamic_partitions(scan.partitions_def.name, [clean_key])
    clean_run = run_version(scan, instance, clean_key, resources)
    assert clean_run.success
    assert clean_run.get_asset_check_evaluations()[0].passed

    # The same file, now heavily poisoned, is a new version with its own partition.
    write_dataset(dataset, rows=40, poisoned=20)
    poisoned_key = version_key(dataset)
    assert poisoned_key != clean_key
    instance.add_dynamic_partitions(scan.partitions_def.name, [poisoned_key])
    poisoned_run = run_version(scan, instance, poisoned_key, resources)
    assert not poisoned_run.success
    check = poisoned_run.get_asset_check_evaluations()[0]
    assert not check.passed
    assert check.metadata["flagged_fraction"].value >= 0.4
    assert "versions/lora_finetuned_adapter" not in materialized_keys(instance, poisoned_run.run_id)

    # The scores show the top suspicious rows as a table with truncated previews.
    scores_event = next(
        event
        for event in poisoned_run.get_asset_materialization_events()
        if event.asset_key == scan.key("gradient_entropy_scores")
    )
    top = scores_event.materialization.metadata["top_suspicious"].value
    assert len(top.records) == 10
    assert all(record.data["flagged"] for record in top.records)
    assert all(len(record.data["answer"]) <= 60 for record in top.records)
    assert scores_event.materialization.metadata["shards"].value == 1

    # Each version's tables sit in their own partition file.
    scores_dir = tmp_path / "storage" / "versions" / "gradient_entropy_scores"
    assert sorted(p.stem for p in scores_dir.glob("*.parquet")) == sorted([clean_key, poisoned_key])

    # Fine-tuning the poisoned version alone re-checks that version's scores and refuses.
    finetune_only = [scan.key("lora_finetuned_adapter")]
    refused = run_version(scan, instance, poisoned_key, resources, selection=finetune_only)
    assert not refused.success
    assert "versions/lora_finetuned_adapter" not in materialized_keys(instance, refused.run_id)

    # The clean version's verdict still stands: its fine-tuning reads only its own partition,
    # even though its file content is gone.
    again = run_version(scan, instance, clean_key, resources, selection=finetune_only)
    assert again.success
    latest = instance.get_latest_materialization_event(AssetKey(["versions", "lora_finetuned_adapter"]))
    assert latest.dagster_event.partition == clean_key


def test_removed_version_fails_with_reason(instance, tmp_path, tiny_model_dir):
    folder = tmp_path / "incoming"
    folder.mkdir()
    dataset = write_dataset(folder / "train.jsonl", rows=4, poisoned=0)
    scan = build_versioned_scan(dataset_glob=str(folder / "*.jsonl"))
    key = version_key(dataset)
    dataset.unlink()
    instance.add_dynamic_partitions(scan.partitions_def.name, [key])
    result = run_version(scan, instance, key, versioned_resources(tiny_model_dir, tmp_path / "storage"))
    assert not result.success
    failure = result.failure_data_for_node("versions__raw_dataset")
    assert "not found" in failure.error.cause.message or "not found" in failure.error.message
