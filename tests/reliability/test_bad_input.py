"""Every corpus file through ``read_dataset`` and ``scan_frame`` with a tiny random Llama."""

import math

import pytest

from gradsentry_dagster.data import DatasetReadError, read_dataset, write_parquet
from gradsentry_dagster.scan import scan_frame
from gradsentry_dagster.scoring import ScoringSettings
from gradsentry_dagster.thresholds import ThresholdConfig
from tests.reliability.corpus import CASES, REJECTED, SCORED, UNREADABLE

FIELD_NAMES = ("question", "answer", "context", "instruction", "record", "line")


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_file_scans_every_row(name, corpus_dir, tokenizer, tiny_model, tmp_path):
    case = CASES[name]
    frame = read_dataset(corpus_dir / name)
    assert len(frame) == len(case.expected)
    assert frame["row_id"].is_unique
    # The canonical table must be storable, as the Dagster IO manager stores it.
    write_parquet(frame, tmp_path / "raw.parquet")

    result = scan_frame(
        tiny_model, tokenizer, frame, ScoringSettings(batch_size=4), ThresholdConfig()
    )
    scores = result.scores
    assert list(scores["row_id"]) == list(frame["row_id"])
    assert list(scores["status"]) == [status for status, _ in case.expected]
    for position, (status, fragment) in enumerate(case.expected):
        row = scores.iloc[position]
        if status == SCORED:
            assert math.isfinite(row["score"]), (position, row["reason"])
            assert 0.0 <= row["score"] <= 1.0
        else:
            assert row["reason"], position
            assert any(field in row["reason"] for field in FIELD_NAMES), row["reason"]
        if fragment is not None:
            assert fragment in row["reason"], (position, row["reason"])


def test_mixed_jsonl_duplicates_kept_with_unique_ids(corpus_dir):
    frame = read_dataset(corpus_dir / "mixed.jsonl")
    assert "g1" in set(frame["row_id"])
    assert "g1#2" in set(frame["row_id"])
    hashed = frame.loc[frame["question"] == "Who wrote Hamlet?", "row_id"].tolist()
    assert len(hashed) == 2
    assert hashed[1] == hashed[0] + "#2"


def test_mixed_extra_column_types_stored_as_text(corpus_dir):
    frame = read_dataset(corpus_dir / "mixed.jsonl")
    poisoned = frame.loc[frame["row_id"].isin(["p1", "p2"]), "poisoned"].tolist()
    assert poisoned == ["yes", "True"]


def test_csv_quoted_newline_and_bom(corpus_dir):
    frame = read_dataset(corpus_dir / "bom_quoted.csv")
    assert list(frame.columns[:1]) == ["row_id"]
    assert frame.at[0, "row_id"] == "c1"
    assert frame.at[0, "question"] == "What is the capital\nof France?"
    assert frame.at[1, "answer"] == "Paris, then Lyon"
    assert frame.at[3, "question"] == 'Name a "quoted" word'


def test_long_question_keeps_answer_tokens(corpus_dir, tokenizer, tiny_model):
    frame = read_dataset(corpus_dir / "long.jsonl")
    settings = ScoringSettings(max_tokens=64)
    scores = scan_frame(tiny_model, tokenizer, frame, settings, ThresholdConfig()).scores
    answer_tokens = len(tokenizer("this one", add_special_tokens=False)["input_ids"]) + 1
    assert scores.at[0, "num_target_tokens"] == answer_tokens
    assert "answer too long" in scores.at[1, "reason"]
    assert "max_tokens=64" in scores.at[1, "reason"]


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_file_names_file_and_fix(name, corpus_dir):
    _, fix = UNREADABLE[name]
    with pytest.raises(DatasetReadError) as error:
        read_dataset(corpus_dir / name)
    message = str(error.value)
    assert name in message
    assert fix in message


def test_duplicate_suffix_never_collides(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text(
        '{"id": "x", "question": "a?", "answer": "1"}\n'
        '{"id": "x", "question": "b?", "answer": "2"}\n'
        '{"id": "x#2", "question": "c?", "answer": "3"}\n'
    )
    frame = read_dataset(path)
    assert frame["row_id"].is_unique
    assert list(frame["row_id"]) == ["x", "x#3", "x#2"]


def test_huge_integer_line_rejected(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"question": "a?", "answer": "1"}\n{"question": "b?", "answer": ' + "9" * 5000 + "}\n")
    frame = read_dataset(path)
    assert list(frame["status"]) == ["ok", REJECTED]
    assert "line 2 is not valid JSON" in frame.at[1, "reject_reason"]


def test_extra_column_cannot_overwrite_status(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a?", "answer": "1", "status": "ok"}\n')
    with pytest.raises(ValueError, match="overwrite canonical columns"):
        read_dataset(path, mapping={"extra": ["status"]})
