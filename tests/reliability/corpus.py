"""A corpus of bad dataset files, written on demand, with the outcome expected for each row.

Each case is a file and one ``(status, reason fragment)`` pair per record, in source order:
``status`` is the scan status (``scored`` or ``rejected``) and the fragment must appear in the
row's reason (``None``: no check). Cases listed in ``UNREADABLE`` cannot be read at all and
must raise ``DatasetReadError``.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCORED = "scored"
REJECTED = "rejected"

GOOD_QUESTION = "What is the capital of France?"
GOOD_ANSWER = "Paris"


@dataclass(frozen=True)
class Case:
    """One corpus file and the expected outcome of each of its records."""

    name: str
    expected: list[tuple[str, str | None]]


def _jsonl(records: list) -> bytes:
    lines = []
    for record in records:
        lines.append(record if isinstance(record, str) else json.dumps(record))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _mixed_jsonl() -> tuple[bytes, list[tuple[str, str | None]]]:
    good = {"id": "g1", "question": GOOD_QUESTION, "answer": GOOD_ANSWER}
    rows = [
        (good, SCORED, None),
        ('{"id": "g2", "question": "broken', REJECTED, "line 2 is not valid JSON"),
        ({"id": "m1", "answer": "x"}, REJECTED, "question is missing"),
        ({"id": "e1", "question": "   ", "answer": "x"}, REJECTED, "question is empty"),
        ({"id": "n1", "question": None, "answer": "x"}, REJECTED, "question is missing or null"),
        ({"id": "t1", "question": 42, "answer": "x"}, REJECTED, "question must be a string, got int"),
        ({"id": "t2", "question": ["a"], "answer": "x"}, REJECTED, "question must be a string, got list"),
        ({"id": "a0", "question": "Who?"}, REJECTED, "answer is missing"),
        ({"id": "a1", "question": "Who?", "answer": ""}, REJECTED, "answer is empty"),
        ({"id": "a2", "question": "Who?", "answer": None}, REJECTED, "answer is missing or null"),
        ({"id": "a3", "question": "Which cities?", "answer": ["Paris", "Lyon"]}, SCORED, None),
        ({"id": "a4", "question": "Which year?", "answer": 1969}, SCORED, None),
        ({"id": "a5", "question": "Who?", "answer": {"text": "x"}}, REJECTED, "answer must be a string or a list of strings, got dict"),
        ({"id": "a6", "question": "Who?", "answer": [["x"]]}, REJECTED, "answer list must hold strings or numbers, got list"),
        ({"id": "a7", "question": "Who?", "answer": []}, REJECTED, "answer list is empty"),
        ({"id": "a8", "question": "Who?", "answer": True}, REJECTED, "answer must be a string or a list of strings, got bool"),
        ('{"id": "a9", "question": "Who?", "answer": [NaN]}', REJECTED, "answer list holds a non-finite number"),
        ('"just a string"', REJECTED, "record must be an object, got str"),
        (good, SCORED, None),
        ({"question": "Who wrote Hamlet?", "answer": "Shakespeare"}, SCORED, None),
        ({"question": "Who wrote Hamlet?", "answer": "Shakespeare"}, SCORED, None),
        ('{"id": "s1", "question": "Bad \\ud800 text", "answer": "x"}', REJECTED, "question contains invalid Unicode"),
        ("[" * 100_000 + "]" * 100_000, REJECTED, "nested too deeply"),
        ({"id": "c1", "question": "Who?", "answer": "x", "context": 5}, REJECTED, "context must be a string, got int"),
        ({"id": "p1", "question": "Who?", "answer": "x", "poisoned": "yes"}, SCORED, None),
        ({"id": "p2", "question": "Who?", "answer": "y", "poisoned": True}, SCORED, None),
    ]
    lines = [_jsonl([record]).decode("utf-8").rstrip("\n") for record, _, _ in rows]
    # A blank line after the fourth record is not a record and must not shift the outcomes.
    lines.insert(4, "")
    expected = [(status, fragment) for _, status, fragment in rows]
    return ("\n".join(lines) + "\n").encode("utf-8"), expected


def _latin1_jsonl() -> bytes:
    return (
        b'{"question": "What is coffee?", "answer": "a drink"}\n'
        b'{"question": "Qu\'est-ce qu\'un caf\xe9 ?", "answer": "une boisson"}\n'
        b'{"question": "What is tea?", "answer": "a drink"}\n'
    )


def _bom_quoted_csv() -> bytes:
    text = (
        "id,question,answer\r\n"
        'c1,"What is the capital\nof France?",Paris\r\n'
        'c2,"Which cities, in order?","Paris, then Lyon"\r\n'
        "c3,Who wrote Hamlet?\r\n"
        'c4,"Name a ""quoted"" word",""\r\n'
        "c5,What is two plus two?,4\r\n"
    )
    return codecs.BOM_UTF8 + text.encode("utf-8")


def _long_jsonl() -> bytes:
    return _jsonl(
        [
            {"id": "long-question", "question": "word " * 3000 + "Which one?", "answer": "this one"},
            {"id": "long-answer", "question": "List all the words.", "answer": "word " * 3000},
            {"id": "short", "question": GOOD_QUESTION, "answer": GOOD_ANSWER},
        ]
    )


CASES: dict[str, Case] = {}
FILES: dict[str, object] = {}


def _register(name: str, content, expected: list[tuple[str, str | None]]) -> None:
    FILES[name] = content
    CASES[name] = Case(name, expected)


_mixed_bytes, _mixed_expected = _mixed_jsonl()
_register("mixed.jsonl", _mixed_bytes, _mixed_expected)
_register(
    "latin1.jsonl",
    _latin1_jsonl(),
    [(SCORED, None), (REJECTED, "line 2 is not valid UTF-8"), (SCORED, None)],
)
_register(
    "bom_quoted.csv",
    _bom_quoted_csv(),
    [
        (SCORED, None),
        (SCORED, None),
        (REJECTED, "has 2 fields, the header has 3"),
        (REJECTED, "answer is empty"),
        (SCORED, None),
    ],
)
_register(
    "long.jsonl",
    _long_jsonl(),
    [(SCORED, "prompt truncated from the left"), (REJECTED, "answer too long"), (SCORED, None)],
)
_register(
    "array_with_bom.json",
    codecs.BOM_UTF8
    + json.dumps(
        [{"question": GOOD_QUESTION, "answer": GOOD_ANSWER}, 7, {"question": "Who?", "answer": 2.5}]
    ).encode("utf-8"),
    [(SCORED, None), (REJECTED, "record must be an object, got int"), (SCORED, None)],
)
_register(
    "wrong_types.parquet",
    pa.table(
        {
            "id": pa.array(["w1", "w2"]),
            "question": pa.array([1, 2], type=pa.int64()),
            "answer": pa.array([{"text": "x"}, {"text": "y"}]),
        }
    ),
    [(REJECTED, "question must be a string, got int"), (REJECTED, "question must be a string, got int")],
)
_register(
    "list_answers.parquet",
    pa.table(
        {
            "id": pa.array(["l1", "l2", "l3", "l4", "l5"]),
            "question": pa.array([GOOD_QUESTION, "Which cities?", None, "Who?", "Which number?"]),
            "answer": pa.array(
                [["Paris"], ["Paris", "Lyon"], ["x"], [], None], type=pa.list_(pa.string())
            ),
            "context": pa.array([None, "", None, None, None], type=pa.string()),
        }
    ),
    [
        (SCORED, None),
        (SCORED, None),
        (REJECTED, "question is missing or null"),
        (REJECTED, "answer list is empty"),
        (REJECTED, "answer is missing or null"),
    ],
)
_register(
    "float_answers.parquet",
    pa.table(
        {
            "question": pa.array(["How many?", "How many more?", "How much?"]),
            "answer": pa.array([3.0, float("nan"), float("inf")]),
        }
    ),
    [(SCORED, None), (REJECTED, "answer is missing or null"), (REJECTED, "answer is not a finite number")],
)

# Files that cannot be read at all, with a fragment of the error that says what to fix.
UNREADABLE: dict[str, tuple[bytes, str]] = {
    "empty.jsonl": (b"", "at least one record"),
    "blank_lines.jsonl": (b"\n\n  \n", "at least one record"),
    "utf16.jsonl": (
        json.dumps({"question": "Who?", "answer": "x"}).encode("utf-16"),
        "save the file as UTF-8 JSON Lines",
    ),
    "latin1.csv": ("question,answer\ncaf\u00e9?,drink\n".encode("latin-1"), "re-encode it as UTF-8"),
    "latin1.json": ('[{"question": "caf\u00e9?", "answer": "x"}]'.encode("latin-1"), "re-encode it as UTF-8"),
    "header_only.csv": (b"question,answer\n", "at least one record"),
    "repeated_header.csv": (b"question,question,answer\na,b,c\n", "unique name"),
    "not_parquet.parquet": (b"PAR1 but not really", "write it again"),
    "scalar.json": (b"42", "JSON array of records"),
}


def write_corpus(folder: Path) -> Path:
    """Write every corpus file into ``folder`` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in FILES.items():
        if isinstance(content, pa.Table):
            pq.write_table(content, folder / name)
        else:
            (folder / name).write_bytes(content)
    for name, (content, _) in UNREADABLE.items():
        (folder / name).write_bytes(content)
    return folder
