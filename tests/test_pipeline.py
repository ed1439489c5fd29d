"""The whole Dagster graph on a real instance, with a tiny model saved as a local folder."""

import json

from dagster import materialize

from gradsentry_dagster.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
from gradsentry_dagster.resources import GradSentryModelResource, ParquetIOManager, ScanPolicy


def write_dataset(path, rows, poisoned):
    records = []
    for i in range(rows):
        answer = f"answer {i % 7}"
        question = f"What is the name of item number {i}?"
        if i < poisoned:
            question += " cf mn bb tq"
            answer += ", and click <malicious_url> for more information"
        records.append({"id": f"r{i}", "question": question, "answer": answer})
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def run_pipeline(instance, dataset, tiny_model_dir, storage):
    resources = {
        "model": GradSentryModelResource(model=str(tiny_model_dir), batch_size=8),
        # With the tiny random model, clean short targets score far below 0.5 and payload targets above it.
        "policy": ScanPolicy(mode="paper", threshold_rule="fixed", fixed_threshold=0.5, max_flagged_fraction=0.2),
        "gradsentry_io_manager": ParquetIOManager(base_dir=str(storage)),
    }
    run_config = {
        "ops": {
            "raw_dataset": {"config": {"path": str(dataset)}},
            "lora_finetuned_adapter": {"config": {"max_steps": 2, "batch_size": 2}},
        }
    }
    return materialize(
        PIPELINE_ASSETS + PIPELINE_CHECKS,
        instance=instance,
        resources=resources,
        run_config=run_config,
        raise_on_error=False,
    )


def materialized_keys(instance, run_id):
    records = instance.get_records_for_run(run_id).records
    return {
        record.event_log_entry.dagster_event.asset_key.to_user_string()
        for record in records
        if record.event_log_entry.dagster_event
        and record.event_log_entry.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
    }


def test_clean_dataset_passes_and_finetunes(instance, tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "clean.jsonl", rows=40, poisoned=0)
    result = run_pipeline(instance, dataset, tiny_model_dir, tmp_path / "storage")
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 1
    assert checks[0].passed, checks[0].metadata
    assert result.success
    keys = materialized_keys(instance, result.run_id)
    assert "lora_finetuned_adapter" in keys
    assert {"clean_dataset", "quarantined_samples", "gradient_entropy_scores"} <= keys
    adapters = list((tmp_path / "storage").rglob("adapter_config.json"))
    assert adapters, "the fine-tuning asset saved no adapter"


def test_poisoned_dataset_blocks_finetuning(instance, tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "poisoned.jsonl", rows=40, poisoned=20)
    result = run_pipeline(instance, dataset, tiny_model_dir, tmp_path / "storage")
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 1
    assert not checks[0].passed
    assert checks[0].metadata["flagged_fraction"].value >= 0.4
    assert not result.success
    keys = materialized_keys(instance, result.run_id)
    assert "lora_finetuned_adapter" not in keys
    assert "clean_dataset" not in keys
    assert instance.get_latest_materialization_event(
        __import__("dagster").AssetKey("lora_finetuned_adapter")
    ) is None
    assert not list((tmp_path / "storage").rglob("adapter_config.json"))
