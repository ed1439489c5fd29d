"""Score datasets larger than memory: read record batches, write scores as they finish.

The source is read a chunk of records at a time through pyarrow (Parquet and CSV) or line by
line (JSON Lines), each chunk is mapped to canonical rows with the same rules as
:func:`gradsentry_dagster.data.read_dataset`, scored, and appended to a Parquet file. Memory
therefore depends on the chunk size and not on the number of rows. Repeated row ids are renamed
(``#2``, ``#3``) as ``read_dataset`` does. That needs every id seen so far, so the ids are
counted in a SQLite table on disk instead of in memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from gradsentry_dagster.cache import ScoreCache
from gradsentry_dagster.data import (
    CANONICAL_COLUMNS,
    STATUS_REJECTED,
    DatasetReadError,
    FieldMapping,
    _iter_jsonl,
    _read_records,
    canonical_rows,
    detect_format,
    resolve_mapping,
)
from gradsentry_dagster.scoring import SCORE_COLUMNS, ScoringSettings, score_frame

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 4096
SCORES_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("status", pa.string()),
        ("score", pa.float64()),
        ("num_target_tokens", pa.int64()),
        ("loss", pa.float64()),
        ("loss_without_question", pa.float64()),
        ("reason", pa.string()),
    ]
)
assert SCORES_SCHEMA.names == SCORE_COLUMNS

# Words of the generated benchmark rows.
GENERATED_WORDS = ("red", "blue", "paris", "river", "king", "nine", "oak", "salt")

Record = tuple[int, Any, "str | None"]


class DuplicateIds:
    """Renames repeated row ids across chunks, counting each id in a SQLite file on disk."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="gradsentry-ids-")
        self._connection = sqlite3.connect(Path(self._folder.name) / "ids.sqlite")
        self._connection.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, count INTEGER NOT NULL)")
        self.renamed = 0

    def rename(self, ids: list[str]) -> list[str]:
        """Return the ids with the ``k``-th occurrence of an id, counted from the first chunk,
        suffixed ``#k`` for ``k >= 2``."""
        unique = list(dict.fromkeys(ids))
        counts: dict[str, int] = {}
        # SQLite limits the number of bound parameters, so look ids up in blocks.
        for start in range(0, len(unique), 500):
            block = unique[start : start + 500]
            placeholders = ",".join("?" * len(block))
            query = f"SELECT id, count FROM seen WHERE id IN ({placeholders})"
            counts.update(self._connection.execute(query, block).fetchall())

        renamed = []
        for row_id in ids:
            count = counts.get(row_id, 0) + 1
            counts[row_id] = count
            renamed.append(row_id if count == 1 else f"{row_id}#{count}")
            self.renamed += count > 1
        self._connection.executemany(
            "INSERT INTO seen (id, count) VALUES (?, ?) "
            "ON CONFLICT(id) DO UPDATE SET count = excluded.count",
            [(row_id, counts[row_id]) for row_id in unique],
        )
        return renamed

    def close(self) -> None:
        self._connection.close()
        self._folder.cleanup()


def iter_records(path: Path, file_format: str, chunk_rows: int) -> Iterator[list[Record]]:
    """Yield chunks of ``(index, record, parse error)`` triples from a dataset file."""
    if file_format == "jsonl":
        # Line by line, so a malformed line becomes one rejected row instead of failing a block.
        lines = _iter_jsonl(path)
        while chunk := list(itertools.islice(lines, chunk_rows)):
            yield chunk
        return

    if file_format in ("parquet", "csv"):
        batches = _arrow_batches(path, file_format, chunk_rows)
        index = 0
        for batch in batches:
            records = batch.to_pylist()
            yield [(index + offset, record, None) for offset, record in enumerate(records)]
            index += len(records)
        return

    # NOTE: a JSON array has to be parsed whole, so its memory grows with its size; use JSON
    # Lines or Parquet for large files.
    records = _read_records(path, file_format)
    for start in range(0, len(records), chunk_rows):
        yield records[start : start + chunk_rows]


def _arrow_batches(path: Path, file_format: str, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    try:
        if file_format == "parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=chunk_rows)
            return
        # Every CSV column is read as text, as read_dataset does; quoted newlines are allowed.
        header = pa_csv.open_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=True))
        names = header.schema.names
        reader = pa_csv.open_csv(
            path,
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in names}, strings_can_be_null=False
            ),
        )
        for batch in reader:
            for start in range(0, batch.num_rows, chunk_rows):
                yield batch.slice(start, chunk_rows)
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetReadError(f"{path} is not a readable {file_format} file: {error}") from error


def iter_canonical_frames(
    path: str | Path,
    *,
    file_format: str | None = None,
    preset: str = "generic",
    mapping: FieldMapping | Mapping[str, Any] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[pd.DataFrame]:
    """Yield the canonical table of a dataset file chunk by chunk.

    The chunks together equal ``read_dataset(path, ...)``: the same rows, reasons and ids.

    Raises:
        DatasetReadError: The file is missing, empty, contains no records or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetReadError(f"dataset file not found: {path}")
    if path.stat().st_size == 0:
        raise DatasetReadError(f"dataset file is empty: {path}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    file_format = (file_format or detect_format(path)).lower()
    field_mapping = resolve_mapping(preset, mapping)

    ids = DuplicateIds()
    total = 0
    try:
        for records in iter_records(path, file_format, chunk_rows):
            frame = pd.DataFrame(canonical_rows(records, field_mapping))
            frame = frame.reindex(columns=list(dict.fromkeys([*CANONICAL_COLUMNS, *frame.columns])))
            frame["source_index"] = frame["source_index"].astype("int64")
            frame["row_id"] = ids.rename(frame["row_id"].tolist())
            total += len(frame)
            yield frame
    finally:
        if ids.renamed:
            logger.info("renamed %d rows whose id repeated an earlier row's id", ids.renamed)
        ids.close()
    if total == 0:
        raise DatasetReadError(f"dataset file contains no records: {path}")


@dataclass
class StreamSummary:
    """Counts of one streamed scan; ``rows_written`` equals the rows read."""

    output: Path
    rows_written: int
    scored: int
    rejected: int


def score_file(
    model,
    tokenizer,
    source: str | Path,
    output: str | Path,
    settings: ScoringSettings,
    *,
    cache: ScoreCache | None = None,
    file_format: str | None = None,
    preset: str = "generic",
    mapping: FieldMapping | Mapping[str, Any] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> StreamSummary:
    """Score a dataset file chunk by chunk and write one score row per input row to Parquet.

    Args:
        model: A causal language model in eval mode.
        tokenizer: Its tokenizer.
        source: A JSON Lines, Parquet or CSV file (a JSON array is read whole).
        output: The Parquet file of scores (columns ``SCORE_COLUMNS``, in source order). It is
            written under a temporary name and renamed when every row is written.
        settings: Scoring settings.
        cache: Optional score cache; with one, a rescan or a restarted scan scores only the
            rows it has not scored before.
        file_format: ``jsonl``, ``parquet``, ``csv`` or ``json``; from the suffix if unset.
        preset: A named field mapping (``webquestions``, ``nq_open``, ``generic``).
        mapping: Field names that override the preset.
        chunk_rows: Records read, scored and written at a time; memory grows with it.
        progress: Called with the number of rows written so far, after each chunk.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    rows = scored = rejected = 0
    try:
        with pq.ParquetWriter(staging, SCORES_SCHEMA) as writer:
            frames = iter_canonical_frames(
                source, file_format=file_format, preset=preset, mapping=mapping, chunk_rows=chunk_rows
            )
            for frame in frames:
                scores = score_frame(model, tokenizer, frame, settings, cache=cache)
                writer.write_table(pa.Table.from_pandas(scores, schema=SCORES_SCHEMA, preserve_index=False))
                rows += len(scores)
                rejected += int((scores["status"] == STATUS_REJECTED).sum())
                scored = rows - rejected
                if progress:
                    progress(rows)
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    logger.info("wrote %d score rows to %s: %d scored, %d rejected", rows, output, scored, rejected)
    return StreamSummary(output, rows, scored, rejected)


def write_generated_dataset(
    path: str | Path, rows: int, seed: int = 0, chunk_rows: int = 100_000
) -> Path:
    """Write ``rows`` short generated QA rows (``id``, ``question``, ``answer``) to Parquet.

    The rows exist to measure throughput and memory; their text has no meaning.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    words = np.array(GENERATED_WORDS)
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            picks = words[generator.integers(0, len(words), size=(count, 2))]
            indices = range(start, start + count)
            table = pa.table(
                {
                    "id": [f"g{i}" for i in indices],
                    "question": [f"where is {a} {i}?" for a, i in zip(picks[:, 0], indices)],
                    "answer": picks[:, 1].tolist(),
                },
                schema=schema,
            )
            writer.write_table(table)
    return path


