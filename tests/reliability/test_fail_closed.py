"""The gate fails closed: broken scores block fine-tuning in the real Dagster graph."""

import json
import logging
import math

import pandas as pd
import pytest
import torch

import gradsentry_dagster.assets.scores as scores_asset
import gradsentry_dagster.scoring as scoring
from gradsentry_dagster.data import FieldMapping, records_to_frame
from gradsentry_dagster.resources import ScanPolicy
from gradsentry_dagster.scan import ScanResult
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from tests.conftest import make_tiny_llama
from tests.reliability.pipeline import (
    ever_materialized,
    materialized,
    run_graph,
    step_failure_messages,
    stored_table,
)


def write_dataset(path, rows=12):
    records = [{"id": f"r{i}", "question": f"What is item {i}?", "answer": f"value {i}"} for i in range(rows)]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama whose final norm is NaN, so every forward pass produces NaN."""
    model = make_tiny_llama(len(tokenizer), seed=1)
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)
    folder = tmp_path_factory.mktemp("nan-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def assert_finetuning_blocked(instance, result, storage):
    assert not result.success
    assert "lora_finetuned_adapter" not in materialized(instance, result.run_id)
    assert not ever_materialized(instance, "lora_finetuned_adapter")
    assert not list(storage.rglob("adapter_config.json"))


def test_nan_forward_fails_check(instance, nan_model_dir, tmp_path):
    storage = tmp_path / "storage"
    dataset = write_dataset(tmp_path / "d.jsonl")
    result = run_graph(instance, dataset, nan_model_dir, storage)
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["non_finite_scores"].value == 12
    assert check.metadata["scored"].value == 12
    assert_finetuning_blocked(instance, result, storage)
    scores = stored_table(storage, "gradient_entropy_scores")
    assert scores["score"].isna().all()
    assert scores["flagged"].all()
    assert (scores["reason"].str.contains("not finite")).all()


def test_nan_forward_scores_nan_both_paths(tokenizer, nan_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nan_model_dir).eval()
    frame = records_to_frame(
        [(i, {"question": f"q{i}?", "answer": f"a{i} b"}, None) for i in range(3)], FieldMapping()
    )
    for method in ("exact", "reference"):
        scores = score_frame(model, tokenizer, frame, ScoringSettings(method=method))
        assert (scores["status"] == "scored").all(), method
        assert scores["score"].isna().all(), method


def test_scorer_raising_blocks_finetuning(instance, tiny_model_dir, tmp_path, monkeypatch):
    def broken_scorer(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(scoring, "score_batch_exact", broken_scorer)
    storage = tmp_path / "storage"
    result = run_graph(instance, write_dataset(tmp_path / "d.jsonl"), tiny_model_dir, storage)
    assert "simulated device failure" in " ".join(step_failure_messages(result))
    # The scores asset failed, so its blocking check never ran and nothing downstream ran.
    assert result.get_asset_check_evaluations() == []
    assert not ever_materialized(instance, "gradient_entropy_scores")
    assert not ever_materialized(instance, "clean_dataset")
    assert_finetuning_blocked(instance, result, storage)


def test_unscored_rows_fail_check(instance, tiny_model_dir, tmp_path, monkeypatch):
    real_scan = scores_asset.scan_frame

    def scan_dropping_last_row(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        return ScanResult(result.scores.iloc[:-1].reset_index(drop=True), result.decision)

    monkeypatch.setattr(scores_asset, "scan_frame", scan_dropping_last_row)
    storage = tmp_path / "storage"
    result = run_graph(instance, write_dataset(tmp_path / "d.jsonl"), tiny_model_dir, storage)
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["unaccounted"].value == 1
    failed = {
        (item["expectation"], item["column"])
        for item in check.metadata["great_expectations_result"].value["expectations"]
        if not item["success"]
    }
    assert ("expect_table_row_count_to_equal", None) in failed
    assert ("expect_column_values_to_be_in_set", "matches_input") in failed
    assert_finetuning_blocked(instance, result, storage)


def test_finetune_alone_rejects_tampered_clean_rows(instance, tiny_model_dir, tmp_path):
    storage = tmp_path / "storage"
    dataset = write_dataset(tmp_path / "d.jsonl")
    first = run_graph(instance, dataset, tiny_model_dir, storage, finetune=False)
    assert first.success, step_failure_messages(first)

    # An extra row in the stored clean table, as if it came from another scan.
    clean = stored_table(storage, "clean_dataset")
    tampered = pd.concat([clean, clean.iloc[:1].assign(row_id="injected")], ignore_index=True)
    tampered.to_parquet(storage / "clean_dataset.parquet", index=False)

    second = run_graph(
        instance, dataset, tiny_model_dir, storage, selection=["lora_finetuned_adapter"]
    )
    assert "clean dataset has 13 rows" in " ".join(step_failure_messages(second))
    assert_finetuning_blocked(instance, second, storage)


def test_max_tokens_clamped_to_context(tokenizer, tiny_model, caplog):
    long_answer = "word " * 600
    frame = records_to_frame(
        [(0, {"id": "long", "question": "List words.", "answer": long_answer}, None)], FieldMapping()
    )
    with caplog.at_level(logging.WARNING, logger="gradsentry_dagster.models"):
        scores = score_frame(tiny_model, tokenizer, frame, ScoringSettings(max_tokens=4096))
    assert tiny_model.config.max_position_embeddings == 512
    assert scores.at[0, "status"] == "rejected"
    assert "max_tokens=512" in scores.at[0, "reason"]
    assert "exceeds the model's context length of 512" in caplog.text


def test_strict_policy_blocks_poisoned_share(instance, tiny_model_dir, tmp_path):
    # The same tiny setup with a policy that tolerates nothing: every flag blocks training.
    storage = tmp_path / "storage"
    policy = ScanPolicy(mode="paper", threshold_rule="fixed", fixed_threshold=0.0, max_flagged_fraction=0.0)
    result = run_graph(instance, write_dataset(tmp_path / "d.jsonl"), tiny_model_dir, storage, policy=policy)
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert_finetuning_blocked(instance, result, storage)
