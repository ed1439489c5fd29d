"""Representative corpus files through the real Dagster graph with a tiny local model."""

import pytest

from tests.reliability.corpus import CASES, REJECTED, SCORED
from tests.reliability.pipeline import (
    ever_materialized,
    materialized,
    run_graph,
    step_failure_messages,
    stored_table,
)


@pytest.mark.parametrize(
    "name, finetune",
    [("mixed.jsonl", True), ("bom_quoted.csv", False), ("list_answers.parquet", False), ("long.jsonl", False)],
)
def test_graph_counts_every_row(name, finetune, instance, corpus_dir, tiny_model_dir, tmp_path):
    storage = tmp_path / "storage"
    result = run_graph(instance, corpus_dir / name, tiny_model_dir, storage, finetune=finetune)
    assert result.success, step_failure_messages(result)
    expected = CASES[name].expected
    expected_scored = sum(1 for status, _ in expected if status == SCORED)
    expected_rejected = sum(1 for status, _ in expected if status == REJECTED)

    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    metadata = {key: value.value for key, value in check.metadata.items()}
    assert metadata["rows_in"] == len(expected)
    assert metadata["scored"] == expected_scored
    assert metadata["rejected"] == expected_rejected
    assert metadata["unaccounted"] == 0
    assert metadata["non_finite_scores"] == 0
    assert sum(metadata["reject_reasons"].values()) == expected_rejected

    scores = stored_table(storage, "gradient_entropy_scores")
    assert list(scores["status"]) == [status for status, _ in expected]
    for position, (_, fragment) in enumerate(expected):
        if fragment is not None:
            assert fragment in scores.at[position, "reason"], position
    clean = stored_table(storage, "clean_dataset")
    quarantined = stored_table(storage, "quarantined_samples")
    scored_ids = scores.loc[scores["status"] == SCORED, "row_id"]
    assert sorted(clean["row_id"]) + sorted(quarantined["row_id"]) != []
    assert sorted(list(clean["row_id"]) + list(quarantined["row_id"])) == sorted(scored_ids)
    assert not set(clean["row_id"]) & set(quarantined["row_id"])
    if finetune:
        assert "lora_finetuned_adapter" in materialized(instance, result.run_id)


def test_graph_unreadable_file_fails_run(instance, corpus_dir, tiny_model_dir, tmp_path):
    result = run_graph(instance, corpus_dir / "utf16.jsonl", tiny_model_dir, tmp_path / "storage")
    assert not result.success
    messages = " ".join(step_failure_messages(result))
    assert "utf16.jsonl" in messages
    assert "save the file as UTF-8 JSON Lines" in messages
    assert not ever_materialized(instance, "gradient_entropy_scores")
    assert not ever_materialized(instance, "lora_finetuned_adapter")
