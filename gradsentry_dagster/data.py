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

import codecs
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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

    def __post_init__(self) -> None:
        clashing = sorted(set(self.extra) & set(CANONICAL_COLUMNS))
        if clashing:
            raise ValueError(
                f"extra columns {clashing} would overwrite canonical columns; map them to "
                "question, answer, row_id, instruction or context instead"
            )

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
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
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


def _is_valid_unicode(text: str) -> bool:
    """Return False for text with lone surrogates, which JSON escapes allow but UTF-8 cannot store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_field(value: Any, field_name: str) -> tuple[str | None, str | None]:
    """Return (text, reject reason) for a field that must be a non-empty string."""
    if _is_missing(value):
        return None, f"{field_name} is missing or null"
    if isinstance(value, bool) or not isinstance(value, str):
        return None, f"{field_name} must be a string, got {type(value).__name__}"
    if not _is_valid_unicode(value):
        return None, f"{field_name} contains invalid Unicode (a lone surrogate code point)"
    if not value.strip():
        return None, f"{field_name} is empty"
    return value.strip(), None


def _answer_item(item: Any) -> tuple[str | None, str | None]:
    """Return (text, reject reason) for one gold answer: a string or a finite number."""
    if isinstance(item, bool) or not isinstance(item, (str, numbers.Real)):
        return None, f"answer list must hold strings or numbers, got {type(item).__name__}"
    if isinstance(item, str):
        if not _is_valid_unicode(item):
            return None, "answer contains invalid Unicode (a lone surrogate code point)"
        return item.strip(), None
    if not math.isfinite(item):
        return None, f"answer list holds a non-finite number ({item})"
    return str(item), None


def normalize_answer(value: Any) -> tuple[str | None, str | None]:
    """Return (answer text, reject reason); a list of gold answers is joined with '; '.

    Finite numbers, Python's or NumPy's, are accepted and written as text. Nested objects,
    booleans, non-finite numbers and lists that contain anything other than strings or finite
    numbers are rejected.
    """
    if _is_missing(value):
        return None, "answer is missing or null"
    if isinstance(value, (bool, np.bool_)):
        return None, "answer must be a string or a list of strings, got bool"
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            return None, "answer is not a finite number"
        return str(value), None
    if isinstance(value, str):
        return _text_field(value, "answer")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        parts = []
        for item in value:
            text, reason = _answer_item(item)
            if reason:
                return None, reason
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
    if not _is_valid_unicode(value):
        return "", f"{field_name} contains invalid Unicode (a lone surrogate code point)"
    return value.strip(), None


def _source_id(value: Any) -> str:
    """Return a source id as text that UTF-8 (and so Parquet) can store; '' if there is none."""
    if _is_missing(value):
        return ""
    text = str(value).strip()
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _extra_value(value: Any) -> Any:
    """Return an extra column's value as a scalar that Parquet can store."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return json.dumps(value, default=str, ensure_ascii=True)


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
            row[name] = _extra_value(record[name])

    _, id_value = _first_present(record, mapping.row_id)
    row["row_id"] = _source_id(id_value) or content_hash(
        row["instruction"], row["context"], row["question"], row["answer"]
    )

    if reasons:
        row["status"] = STATUS_REJECTED
        row["reject_reason"] = "; ".join(reasons)
    return row


def _parse_json_line(text: str, line_number: int) -> tuple[Any, str | None]:
    """Return (record, parse error) for one line of a JSON Lines file."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return None, f"line {line_number} is not valid JSON ({error.msg})"
    except RecursionError:
        return None, f"line {line_number} is nested too deeply to parse as JSON"
    except ValueError as error:
        # Python's json raises a plain ValueError for integers with more than 4300 digits.
        return None, f"line {line_number} is not valid JSON ({str(error).split(':')[0]})"


def _iter_jsonl(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    """Yield (index, record, parse error) for each non-blank line of a JSON Lines file."""
    with path.open("rb") as handle:
        index = 0
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield index, None, f"line {line_number} is not valid UTF-8 ({error.reason})"
                index += 1
                continue
            if not line.strip():
                continue
            record, parse_error = _parse_json_line(line, line_number)
            yield index, record, parse_error
            index += 1


def _read_jsonl(path: Path) -> list[tuple[int, Any, str | None]]:
    records = list(_iter_jsonl(path))
    if records and all(parse_error is not None for _, _, parse_error in records):
        raise DatasetReadError(
            f"no line of {path} is a valid JSON value (first problem: {records[0][2]}); "
            "save the file as UTF-8 JSON Lines with one JSON object per line"
        )
    return records


def _read_json(path: Path) -> list[tuple[int, Any, str | None]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise DatasetReadError(
            f"{path} is not valid UTF-8 (byte {error.start}: {error.reason}); "
            "re-encode it as UTF-8"
        ) from error
    except json.JSONDecodeError as error:
        raise DatasetReadError(
            f"{path} is not valid JSON ({error}); for one object per line use a .jsonl file"
        ) from error
    except (RecursionError, ValueError) as error:
        raise DatasetReadError(
            f"{path} cannot be parsed as JSON ({type(error).__name__}); "
            "for one object per line use a .jsonl file"
        ) from error
    if isinstance(data, Mapping):
        # Accept {"data": [...]} style wrappers with a single list value.
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DatasetReadError(
                f"{path} contains a JSON object; expected an array of records or an object "
                "with exactly one array"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DatasetReadError(
            f"{path} must contain a JSON array of records, got a {type(data).__name__}"
        )
    return [(index, record, None) for index, record in enumerate(data)]


@contextlib.contextmanager
def _csv_field_limit(limit: int):
    """Raise the csv module's field size limit (128 KiB by default) for one read."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_csv(path: Path) -> list[tuple[int, Any, str | None]]:
    """Read a CSV file with a header row; a row with the wrong number of fields is rejected."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetReadError(
            f"{path} is not valid UTF-8 (byte {error.start}: {error.reason}); "
            "re-encode it as UTF-8"
        ) from error

    records: list[tuple[int, Any, str | None]] = []
    # newline="" keeps line breaks inside quoted fields, as the csv module requires.
    reader = csv.reader(io.StringIO(text, newline=""))
    with _csv_field_limit(max(len(text), csv.field_size_limit())):
        try:
            header = next(reader, None)
            if not header or not any(name.strip() for name in header):
                raise DatasetReadError(f"{path} has no header row; add one that names the columns")
            header = [name.strip() for name in header]
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise DatasetReadError(
                    f"{path} repeats the column names {repeated} in its header; "
                    "give each column a unique name"
                )
            for fields in reader:
                if not fields:
                    continue
                index = len(records)
                if len(fields) != len(header):
                    records.append(
                        (
                            index,
                            None,
                            f"line {reader.line_num} has {len(fields)} fields, "
                            f"the header has {len(header)}",
                        )
                    )
                    continue
                records.append((index, dict(zip(header, fields)), None))
        except csv.Error as error:
            raise DatasetReadError(
                f"{path} is not a readable CSV file (line {reader.line_num}: {error}); "
                "check its quoting"
            ) from error
    return records


def _read_parquet(path: Path) -> list[tuple[int, Any, str | None]]:
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise DatasetReadError(
            f"{path} is not a readable Parquet file ({error}); "
            "write it again with pyarrow or pandas.DataFrame.to_parquet"
        ) from error
    return [(index, record, None) for index, record in enumerate(rows)]


def _read_records(path: Path, file_format: str) -> list[tuple[int, Any, str | None]]:
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
    if file_format not in readers:
        raise DatasetReadError(
            f"unsupported format {file_format!r} for {path}; "
            f"use one of {', '.join(SUPPORTED_FORMATS)}"
        )
    return readers[file_format](path)


def _value_kind(value: Any) -> type:
    if isinstance(value, bool):
        return bool
    if isinstance(value, (int, float)):
        return float
    return str


def _uniform_column(values: pd.Series) -> pd.Series:
    """Return an extra column as text when its values mix types, which Parquet cannot store."""
    kinds = {_value_kind(value) for value in values.dropna()}
    if len(kinds) <= 1:
        return values
    return values.map(lambda value: None if _is_missing(value) else str(value))


def records_to_frame(
    records: Iterable[tuple[int, Any, str | None]], mapping: FieldMapping
) -> pd.DataFrame:
    """Build the canonical table from (index, record, parse error) triples."""
    rows = canonical_rows(records, mapping)
    frame = pd.DataFrame(rows, columns=None if rows else CANONICAL_COLUMNS)
    for column in CANONICAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype=object)
    for column in frame.columns.difference(CANONICAL_COLUMNS):
        frame[column] = _uniform_column(frame[column])
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

    A suffixed id that another row already uses gets the next free number. Exact duplicate
    rows are kept and scored: dropping them would change the dataset that fine-tuning sees,
    and a poisoned sample repeated on purpose must stay visible.
    """
    if frame["row_id"].is_unique:
        return frame
    taken = set(frame["row_id"])
    seen: dict[str, int] = {}
    new_ids = []
    renamed = 0
    for row_id in frame["row_id"]:
        copies = seen.get(row_id, 0) + 1
        seen[row_id] = copies
        if copies == 1:
            new_ids.append(row_id)
            continue
        candidate = f"{row_id}#{copies}"
        while candidate in taken:
            copies += 1
            candidate = f"{row_id}#{copies}"
        seen[row_id] = copies
        taken.add(candidate)
        new_ids.append(candidate)
        renamed += 1
    frame = frame.copy()
    frame["row_id"] = new_ids
    logger.info("renamed %d rows whose id repeated an earlier row's id", renamed)
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
        raise DatasetReadError(
            f"dataset file not found: {path}; set the path to an existing .jsonl, .json, "
            ".parquet or .csv file"
        )
    if path.stat().st_size == 0:
        raise DatasetReadError(
            f"dataset file is empty: {path}; point the path at a file with at least one record"
        )
    file_format = (file_format or detect_format(path)).lower()
    field_mapping = resolve_mapping(preset, mapping)

    records = _read_records(path, file_format)
    if limit is not None:
        records = records[:limit]
    frame = records_to_frame(records, field_mapping)
    if frame.empty:
        raise DatasetReadError(
            f"dataset file contains no records: {path}; point the path at a file with at least "
            "one record"
        )
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
