"""Read fine-tuning datasets from JSONL, JSON, Parquet and CSV into one canonical table.

The canonical table has one row per source record, in source order:

- ``row_id``: the source's id where the mapping names one, else a content hash of the prompt
  parts and the answer.
- ``instruction``, ``context``, ``question``: the prompt parts (``context`` may be empty).
- ``answer``: the gold answer; a list of gold answers is joined with ``"; "``.
- ``status``: ``"ok"`` for a usable row, ``"rejected"`` for one that cannot be scored.
- ``reject_reason``: why a row was rejected, naming the field; empty for usable rows.
- ``source_index``: the record's position in the source file.

A record that cannot be used is kept with ``status == "rejected"`` so that no row disappears
without a count. A file that cannot be read at all raises :class:`DatasetReadError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

CANONICAL_COLUMNS = [
    "row_id",
    "instruction",
    "context",
    "question",
    "answer",
    "status",
    "reject_reason",
    "source_index",
]
STATUS_OK = "ok"
STATUS_REJECTED = "rejected"
ANSWER_SEPARATOR = "; "
SUPPORTED_FORMATS = ("jsonl", "json", "parquet", "csv")


class DatasetReadError(ValueError):
    """Raised when a dataset file cannot be read at all."""


@dataclass(frozen=True)
class FieldMapping:
    """Source column names for each canonical field.

    Each field lists candidate column names, tried in order; the first one present in a
    record is used. ``instruction`` and ``context`` are optional in the source.
    """

    question: tuple[str, ...] = ("question", "qText", "query", "input", "prompt")
    answer: tuple[str, ...] = ("answer", "answers", "output", "response", "target")
    row_id: tuple[str, ...] = ("id", "qId", "row_id", "uid")
    instruction: tuple[str, ...] = ("instruction",)
    context: tuple[str, ...] = ("context", "passage", "document")
    extra: tuple[str, ...] = field(default=("poisoned",))

    @classmethod
    def from_dict(cls, mapping: Mapping[str, str | Iterable[str]]) -> FieldMapping:
        """Build a mapping from ``{"question": "q", "answer": ["a", "answers"]}`` style input."""
        known = {"question", "answer", "row_id", "instruction", "context", "extra"}
        unknown = set(mapping) - known
        if unknown:
            raise ValueError(
                f"unknown field mapping keys {sorted(unknown)}; expected some of {sorted(known)}"
            )
        values = {}
        for key, names in mapping.items():
            values[key] = (names,) if isinstance(names, str) else tuple(names)
        return cls(**values)


PRESETS: dict[str, FieldMapping] = {
    # WebQuestions as organised by brmson/dataset-factoid-webquestions.
    "webquestions": FieldMapping(question=("qText",), answer=("answers",), row_id=("qId",)),
    # NQ-open JSON Lines; the rows carry no id, so a content hash is used.
    "nq_open": FieldMapping(question=("question",), answer=("answer",), row_id=()),
    "generic": FieldMapping(),
}


def detect_format(path: Path) -> str:
    """Return the file format from the file name suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    for suffix in reversed(suffixes):
        name = suffix.lstrip(".")
        if name in ("jsonl", "ndjson"):
            return "jsonl"
        if name in SUPPORTED_FORMATS:
            return name
        if name == "pq":
            return "parquet"
    raise DatasetReadError(
        f"cannot tell the format of {path}: use a .jsonl, .json, .parquet or .csv suffix, "
        "or pass the format explicitly"
    )


def content_hash(*parts: str) -> str:
    """Return a short, stable hash of the given text parts."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f"h{digest[:16]}"


def _first_present(record: Mapping[str, Any], names: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in names:
        if name in record:
            return name, record[name]
    return None, None


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return False


def _text_field(value: Any, field_name: str) -> tuple[str | None, str | None]:
    """Return (text, reject reason) for a field that must be a non-empty string."""
    if _is_missing(value):
        return None, f"{field_name} is missing or null"
    if isinstance(value, bool) or not isinstance(value, str):
        return None, f"{field_name} must be a string, got {type(value).__name__}"
    if not value.strip():
        return None, f"{field_name} is empty"
    return value.strip(), None


def normalize_answer(value: Any) -> tuple[str | None, str | None]:
    """Return (answer text, reject reason); a list of gold answers is joined with '; '.

    Numbers are accepted and written as text. Nested objects, booleans and lists that hold
    anything other than strings or numbers are rejected.
    """
    if _is_missing(value):
        return None, "answer is missing or null"
    if isinstance(value, bool):
        return None, "answer must be a string or a list of strings, got bool"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return None, "answer is not a finite number"
        return str(value), None
    if isinstance(value, str):
        return _text_field(value, "answer")
    if hasattr(value, "tolist") and not isinstance(value, (dict, str)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        parts = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                return None, (
                    "answer list must hold strings or numbers, got "
                    f"{type(item).__name__}"
                )
            text = str(item).strip()
            if text:
                parts.append(text)
        if not parts:
            return None, "answer list is empty"
        return ANSWER_SEPARATOR.join(parts), None
    return None, f"answer must be a string or a list of strings, got {type(value).__name__}"


def _optional_text(value: Any, field_name: str) -> tuple[str, str | None]:
    if _is_missing(value):
        return "", None
    if isinstance(value, bool) or not isinstance(value, str):
        return "", f"{field_name} must be a string, got {type(value).__name__}"
    return value.strip(), None


def canonical_row(
    record: Any, source_index: int, mapping: FieldMapping
) -> dict[str, Any]:
    """Map one source record to a canonical row, rejecting it with a reason if unusable."""
    row: dict[str, Any] = {
        "row_id": "",
        "instruction": "",
        "context": "",
        "question": "",
        "answer": "",
        "status": STATUS_OK,
        "reject_reason": "",
        "source_index": source_index,
    }
    if not isinstance(record, Mapping):
        row["status"] = STATUS_REJECTED
        row["reject_reason"] = f"record must be an object, got {type(record).__name__}"
        row["row_id"] = f"source-{source_index}"
        return row

    reasons = []
    question_name, question_value = _first_present(record, mapping.question)
    if question_name is None:
        reasons.append(f"question is missing (looked for {', '.join(mapping.question)})")
    else:
        question, reason = _text_field(question_value, "question")
        if reason:
            reasons.append(reason)
        row["question"] = question or ""

    answer_name, answer_value = _first_present(record, mapping.answer)
    if answer_name is None:
        reasons.append(f"answer is missing (looked for {', '.join(mapping.answer)})")
    else:
        answer, reason = normalize_answer(answer_value)
        if reason:
            reasons.append(reason)
        row["answer"] = answer or ""

    for name in ("instruction", "context"):
        _, value = _first_present(record, getattr(mapping, name))
        text, reason = _optional_text(value, name)
        if reason:
            reasons.append(reason)
        row[name] = text

    for name in mapping.extra:
        if name in record:
            row[name] = record[name]

    id_name, id_value = _first_present(record, mapping.row_id)
    if id_name is not None and not _is_missing(id_value) and str(id_value).strip():
        row["row_id"] = str(id_value).strip()
    else:
        row["row_id"] = content_hash(
            row["instruction"], row["context"], row["question"], row["answer"]
        )

    if reasons:
        row["status"] = STATUS_REJECTED
        row["reject_reason"] = "; ".join(reasons)
    return row


def _iter_jsonl(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    """Yield (index, record, parse error) for each non-blank line of a JSON Lines file."""
    with path.open("rb") as handle:
        index = 0
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield index, None, f"line {line_number} is not valid UTF-8 ({error.reason})"
                index += 1
                continue
            if not line.strip():
                continue
            try:
                yield index, json.loads(line), None
            except json.JSONDecodeError as error:
                yield index, None, f"line {line_number} is not valid JSON ({error.msg})"
            index += 1


def _read_records(path: Path, file_format: str) -> list[tuple[int, Any, str | None]]:
    if file_format == "jsonl":
        return list(_iter_jsonl(path))
    if file_format == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise DatasetReadError(f"{path} is not valid UTF-8: {error}") from error
        except json.JSONDecodeError as error:
            raise DatasetReadError(
                f"{path} is not valid JSON ({error}); for one object per line use a .jsonl file"
            ) from error
        if isinstance(data, Mapping):
            # Accept {"data": [...]} style wrappers with a single list value.
            lists = [value for value in data.values() if isinstance(value, list)]
            if len(lists) != 1:
                raise DatasetReadError(
                    f"{path} holds a JSON object; expected an array of records or an object "
                    "with exactly one array"
                )
            data = lists[0]
        if not isinstance(data, list):
            raise DatasetReadError(f"{path} must hold a JSON array of records")
        return [(index, record, None) for index, record in enumerate(data)]
    if file_format == "csv":
        try:
            frame = pd.read_csv(
                path, dtype=str, keep_default_na=False, encoding="utf-8-sig"
            )
        except UnicodeDecodeError as error:
            raise DatasetReadError(f"{path} is not valid UTF-8: {error}") from error
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise DatasetReadError(f"{path} is not a readable CSV file: {error}") from error
        records = frame.to_dict(orient="records")
        return [(index, record, None) for index, record in enumerate(records)]
    if file_format == "parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise DatasetReadError(f"{path} is not a readable Parquet file: {error}") from error
        return [(index, record, None) for index, record in enumerate(table.to_pylist())]
    raise DatasetReadError(
        f"unsupported format {file_format!r} for {path}; use one of {', '.join(SUPPORTED_FORMATS)}"
    )


def records_to_frame(
    records: Iterable[tuple[int, Any, str | None]], mapping: FieldMapping
) -> pd.DataFrame:
    """Build the canonical table from (index, record, parse error) triples."""
    rows = canonical_rows(records, mapping)
    frame = pd.DataFrame(rows, columns=None if rows else CANONICAL_COLUMNS)
    for column in CANONICAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype=object)
    frame["source_index"] = frame["source_index"].astype("int64")
    return mark_duplicate_ids(frame)


def canonical_rows(
    records: Iterable[tuple[int, Any, str | None]], mapping: FieldMapping
) -> list[dict[str, Any]]:
    """Map (index, record, parse error) triples to canonical rows; ids may still repeat."""
    rows = []
    for index, record, parse_error in records:
        if parse_error is not None:
            rows.append(
                {
                    "row_id": f"source-{index}",
                    "instruction": "",
                    "context": "",
                    "question": "",
                    "answer": "",
                    "status": STATUS_REJECTED,
                    "reject_reason": parse_error,
                    "source_index": index,
                }
            )
            continue
        rows.append(canonical_row(record, index, mapping))
    return rows


def mark_duplicate_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """Make row ids unique by suffixing repeats with ``#2``, ``#3`` and so on.

    Exact duplicate rows are kept and scored: dropping them would change the dataset that
    fine-tuning sees, and a poisoned sample repeated on purpose must stay visible.
    """
    counts = frame.groupby("row_id").cumcount()
    repeated = counts > 0
    if repeated.any():
        frame = frame.copy()
        frame.loc[repeated, "row_id"] = (
            frame.loc[repeated, "row_id"] + "#" + (counts[repeated] + 1).astype(str)
        )
        logger.info("renamed %d rows whose id repeated an earlier row's id", int(repeated.sum()))
    return frame


def resolve_mapping(
    preset: str, mapping: FieldMapping | Mapping[str, Any] | None = None
) -> FieldMapping:
    """Return the preset's field mapping with any fields that ``mapping`` overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if mapping is None:
        return PRESETS[preset]
    if isinstance(mapping, FieldMapping):
        return mapping
    base = PRESETS[preset]
    overrides = FieldMapping.from_dict(mapping)
    return FieldMapping(
        **{
            name: getattr(overrides, name) if name in mapping else getattr(base, name)
            for name in ("question", "answer", "row_id", "instruction", "context", "extra")
        }
    )


def read_dataset(
    path: str | Path,
    *,
    file_format: str | None = None,
    preset: str = "generic",
    mapping: FieldMapping | Mapping[str, Any] | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """Read a dataset file into the canonical table.

    Args:
        path: The dataset file.
        file_format: One of ``jsonl``, ``json``, ``parquet``, ``csv``; from the suffix if unset.
        preset: A named field mapping (``webquestions``, ``nq_open``, ``generic``).
        mapping: Field names that override the preset.
        limit: Keep only the first ``limit`` records.

    Raises:
        DatasetReadError: The file is missing, empty or cannot be parsed at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetReadError(f"dataset file not found: {path}")
    if path.stat().st_size == 0:
        raise DatasetReadError(f"dataset file is empty: {path}")
    file_format = (file_format or detect_format(path)).lower()
    field_mapping = resolve_mapping(preset, mapping)

    records = _read_records(path, file_format)
    if limit is not None:
        records = records[:limit]
    frame = records_to_frame(records, field_mapping)
    if frame.empty:
        raise DatasetReadError(f"dataset file holds no records: {path}")
    rejected = int((frame["status"] == STATUS_REJECTED).sum())
    logger.info(
        "read %d rows from %s (%s): %d usable, %d rejected",
        len(frame),
        path,
        file_format,
        len(frame) - rejected,
        rejected,
    )
    return frame


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a table to Parquet through pyarrow, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table, path)
    return path
