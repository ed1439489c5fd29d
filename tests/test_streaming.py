import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradsentry_dagster.cache import ScoreCache
from gradsentry_dagster.data import DatasetReadError, read_dataset
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from gradsentry_dagster.streaming import (
    DuplicateIds,
    iter_canonical_frames,
    score_file,
    write_generated_dataset,
)

# Good rows, bad rows and repeated ids, spread so that repeats cross chunk boundaries.
MIXED_RECORDS = [
    {"id": "a", "question": "Who wrote it?", "answer": "Someone"},
    {"id": "a", "question": "Who sang it?", "answer": ["One", "Two"]},
    {"question": "No id here?", "answer": 42},
    {"id": "b", "question": None, "answer": "x"},
    {"id": "c", "question": "Nested answer?", "answer": {"text": "no"}},
    {"id": "a", "question": "Third a?", "answer": "yes"},
    {"question": "No id here?", "answer": 42},
    {"id": "d", "question": "", "answer": "empty question"},
    {"id": "e", "question": "Fine?", "answer": "fine"},
]


def write_jsonl(path, records, bad_lines=()):
    lines = [json.dumps(record) for record in records]
    for position, text in bad_lines:
        lines.insert(position, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def concat(frames):
    return pd.concat(list(frames), ignore_index=True)


@pytest.mark.parametrize("chunk_rows", [1, 2, 4, 100])
def test_jsonl_chunks_equal_whole_read(tmp_path, chunk_rows):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED_RECORDS, bad_lines=[(3, "{not json"), (6, "[1, 2")])
    whole = read_dataset(path)
    streamed = concat(iter_canonical_frames(path, chunk_rows=chunk_rows))
    assert len(streamed) == len(MIXED_RECORDS) + 2
    pd.testing.assert_frame_equal(streamed[whole.columns], whole)


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_parquet_chunks_equal_whole_read(tmp_path, chunk_rows):
    records = [dict(record, answer=json.dumps(record["answer"])) for record in MIXED_RECORDS]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    whole = read_dataset(path)
    streamed = concat(iter_canonical_frames(path, chunk_rows=chunk_rows))
    pd.testing.assert_frame_equal(streamed[whole.columns], whole)


def test_csv_with_bom_and_quoted_newline(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(
        "\ufeffid,question,answer\n1,\"Two\nlines?\",yes\n1,Again?,no\n2,,empty\n".encode("utf-8")
    )
    whole = read_dataset(path)
    streamed = concat(iter_canonical_frames(path, chunk_rows=1))
    pd.testing.assert_frame_equal(streamed[whole.columns], whole)
    assert list(streamed["row_id"]) == ["1", "1#2", "2"]


def test_duplicate_ids_across_chunks():
    ids = DuplicateIds()
    assert ids.rename(["a", "b", "a"]) == ["a", "b", "a#2"]
    assert ids.rename(["a", "c", "b"]) == ["a#3", "c", "b#2"]
    assert ids.renamed == 3
    ids.close()


def test_missing_and_empty_files_fail(tmp_path):
    with pytest.raises(DatasetReadError, match="not found"):
        list(iter_canonical_frames(tmp_path / "absent.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetReadError, match="empty"):
        list(iter_canonical_frames(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DatasetReadError, match="no records"):
        list(iter_canonical_frames(blank))


def test_score_file_keeps_every_row(tmp_path, tokenizer, tiny_model):
    path = write_jsonl(tmp_path / "mixed.jsonl", MIXED_RECORDS, bad_lines=[(2, "{oops")])
    output = tmp_path / "out" / "scores.parquet"
    settings = ScoringSettings(batch_size=4)
    summary = score_file(tiny_model, tokenizer, path, output, settings, chunk_rows=3)

    written = pq.read_table(output).to_pandas()
    whole = score_frame(tiny_model, tokenizer, read_dataset(path), settings)
    assert summary.rows_written == len(MIXED_RECORDS) + 1 == len(written)
    assert summary.scored + summary.rejected == summary.rows_written
    assert list(written["row_id"]) == list(whole["row_id"])
    assert list(written["status"]) == list(whole["status"])
    assert list(written["reason"]) == list(whole["reason"])
    assert (written["score"] - whole["score"]).abs().max() < 1e-6
    assert not list(output.parent.glob(".*.tmp"))


def test_score_file_with_cache_rescans_nothing(tmp_path, tokenizer, tiny_model):
    source = write_generated_dataset(tmp_path / "rows.parquet", 30)
    settings = ScoringSettings(batch_size=8)
    first = score_file(
        tiny_model, tokenizer, source, tmp_path / "first.parquet", settings,
        cache=ScoreCache(tmp_path / "cache", "m"), chunk_rows=10,
    )
    cache = ScoreCache(tmp_path / "cache", "m")
    score_file(tiny_model, tokenizer, source, tmp_path / "second.parquet", settings, cache=cache, chunk_rows=7)
    assert first.rows_written == 30
    assert cache.hits == 30
    assert cache.misses == 0
    pd.testing.assert_frame_equal(
        pq.read_table(tmp_path / "first.parquet").to_pandas(),
        pq.read_table(tmp_path / "second.parquet").to_pandas(),
    )


def test_generated_dataset_rows(tmp_path):
    path = write_generated_dataset(tmp_path / "rows.parquet", 2500, chunk_rows=1000)
    table = pq.read_table(path)
    assert table.num_rows == 2500
    assert table.column("id").to_pylist()[-1] == "g2499"
