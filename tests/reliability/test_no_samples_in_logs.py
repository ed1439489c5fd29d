"""Logs carry counts and ids, never the text of questions or answers."""

import json
import logging

from gradsentry_dagster.data import read_dataset
from gradsentry_dagster.gate import GatePolicy, run_gate
from gradsentry_dagster.scan import scan_frame
from gradsentry_dagster.scoring import ScoringSettings
from gradsentry_dagster.thresholds import ThresholdConfig
from tests.reliability.pipeline import run_graph, step_failure_messages

SECRET_QUESTION = "Which patient record mentions zebrafish-quartz-7731?"
SECRET_ANSWER = "the confidential ledger of marmalade-obsidian-4412"
SECRETS = ("zebrafish-quartz-7731", "marmalade-obsidian-4412")


def write_private_dataset(path):
    records = [
        {"id": f"p{i}", "question": f"{SECRET_QUESTION} ({i})", "answer": f"{SECRET_ANSWER} {i}"}
        for i in range(8)
    ]
    records.append({"id": "bad", "question": SECRET_QUESTION, "answer": {"text": SECRET_ANSWER}})
    lines = [json.dumps(record) for record in records] + ['{"id": "broken", "question": "' + SECRET_QUESTION]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_library_logs_have_no_sample_text(caplog, tokenizer, tiny_model, tmp_path):
    dataset = write_private_dataset(tmp_path / "private.jsonl")
    with caplog.at_level(logging.DEBUG):
        frame = read_dataset(dataset)
        result = scan_frame(
            tiny_model, tokenizer, frame, ScoringSettings(max_tokens=24), ThresholdConfig(rule="fixed", fixed_threshold=0.0)
        )
        run_gate(result.scores, GatePolicy(), len(frame), expected_row_ids=frame["row_id"])
    assert caplog.records, "expected the reader, scan and gate to log counts"
    for secret in SECRETS:
        assert secret not in caplog.text
    for secret in SECRETS:
        assert not result.scores["reason"].str.contains(secret).any()


def test_dagster_run_logs_have_no_sample_text(instance, tiny_model_dir, tmp_path):
    dataset = write_private_dataset(tmp_path / "private.jsonl")
    result = run_graph(instance, dataset, tiny_model_dir, tmp_path / "storage", finetune=False)
    assert result.success, step_failure_messages(result)
    messages = [
        record.event_log_entry.user_message or ""
        for record in instance.get_records_for_run(result.run_id).records
    ]
    assert len(messages) > 10
    for message in messages:
        for secret in SECRETS:
            assert secret not in message
