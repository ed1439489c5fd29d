import json

import pandas as pd
import pytest

from gradsentry_dagster.data import (
    STATUS_OK,
    STATUS_REJECTED,
    DatasetReadError,
    content_hash,
    normalize_answer,
    read_dataset,
    write_parquet,
)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_rows_keep_order_and_ids(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"id": "a", "question": "q1?", "answer": "x"}, {"id": "b", "question": "q2?", "answer": ["y", "z"]}],
    )
    frame = read_dataset(path)
    assert list(frame["row_id"]) == ["a", "b"]
    assert list(frame["answer"]) == ["x", "y; z"]
    assert list(frame["status"]) == [STATUS_OK, STATUS_OK]
    assert list(frame["source_index"]) == [0, 1]


def test_content_hash_id_when_source_has_none(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answer": "a"}])
    frame = read_dataset(path)
    assert frame.at[0, "row_id"] == content_hash("", "", "q?", "a")


def test_bad_rows_kept_with_reason(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"question": "ok?", "answer": "yes"}\n'
        "{not json\n"
        '{"question": null, "answer": "x"}\n'
        '{"question": "q?", "answer": {"nested": 1}}\n'
        '{"question": 5, "answer": "x"}\n'
        '{"answer": "x"}\n'
    )
    frame = read_dataset(path)
    assert len(frame) == 6
    assert list(frame["status"]) == [STATUS_OK] + [STATUS_REJECTED] * 5
    reasons = list(frame["reject_reason"])
    assert "not valid JSON" in reasons[1]
    assert "question" in reasons[2]
    assert "answer" in reasons[3]
    assert "question must be a string" in reasons[4]
    assert "question is missing" in reasons[5]


@pytest.mark.parametrize(
    "value, expected",
    [("x", "x"), (["a", "b"], "a; b"), (3, "3"), (2.5, "2.5"), ([], None), (True, None), ({"a": 1}, None)],
)
def test_normalize_answer_cases(value, expected):
    text, reason = normalize_answer(value)
    assert text == expected
    assert (reason is None) == (expected is not None)


def test_csv_and_parquet_match_jsonl(tmp_path):
    records = [{"question": "q1?", "answer": "a1"}, {"question": "q2?", "answer": "a2"}]
    jsonl = read_dataset(write_jsonl(tmp_path / "d.jsonl", records))
    pd.DataFrame(records).to_csv(tmp_path / "d.csv", index=False)
    csv = read_dataset(tmp_path / "d.csv")
    write_parquet(pd.DataFrame(records), tmp_path / "d.parquet")
    parquet = read_dataset(tmp_path / "d.parquet")
    for other in (csv, parquet):
        assert list(other["row_id"]) == list(jsonl["row_id"])
        assert list(other["answer"]) == list(jsonl["answer"])


def test_field_mapping_renames_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt_text": "q?", "gold": "a", "key": "k1"}])
    frame = read_dataset(path, mapping={"question": "prompt_text", "answer": "gold", "row_id": "key"})
    assert frame.at[0, "question"] == "q?"
    assert frame.at[0, "row_id"] == "k1"


def test_duplicate_ids_made_unique(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "question": "q?", "answer": "a"}] * 3)
    frame = read_dataset(path)
    assert list(frame["row_id"]) == ["x", "x#2", "x#3"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "not found"),
        ("empty.jsonl", b"", "empty"),
        ("broken.json", b"[{", "not valid JSON"),
        ("broken.parquet", b"not parquet", "Parquet"),
        ("data.txt", b"x", "cannot tell the format"),
    ],
)
def test_unreadable_file_error_names_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetReadError, match=message) as error:
        read_dataset(path)
    assert name in str(error.value)


def test_webquestions_preset_reads_shared_file(qa_data_dir):
    frame = read_dataset(qa_data_dir / "webquestions" / "devtest.json", preset="webquestions")
    assert len(frame) == 189
    assert frame["row_id"].str.startswith("wq").all()
    assert (frame["status"] == STATUS_OK).all()


def test_nq_open_preset_reads_shared_file(qa_data_dir):
    frame = read_dataset(qa_data_dir / "nq_open" / "NQ-open.dev.jsonl", preset="nq_open")
    assert len(frame) == 3610
    assert (frame["status"] == STATUS_OK).all()
    assert frame["row_id"].is_unique
