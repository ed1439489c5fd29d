"""The embedded demo dataset: real factoid questions from FanOutQA, shipped by a PyPI package.

The ``fanoutqa`` package (install with ``--no-deps``) ships the FanOutQA dev set
(Zhu et al., 2024; data licence CC BY-SA 4.0). Each of its multi-hop questions is decomposed
into single-hop sub-questions with short gold answers ("What is the batting hand of Pat
Burrell?" -> "Right"); those sub-questions make a QA fine-tuning set of about 1,900 rows.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd

from gradsentry_dagster.attacks import poison
from gradsentry_dagster.data import FieldMapping, records_to_frame

DEMO_FILE = "fanout-final-dev.json"
DEMO_LICENSE = "CC BY-SA 4.0 (FanOutQA, Zhu et al., 2024)"


def fanoutqa_path() -> Path:
    """Return the FanOutQA dev file shipped by the ``fanoutqa`` package."""
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo dataset needs the fanoutqa package: pip install --no-deps fanoutqa"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / DEMO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"fanoutqa is installed but {path} is missing; reinstall it")
    return path


def _leaf_questions(nodes: list[dict]) -> list[dict]:
    """Collect sub-questions whose answer is a string, a number or a list of strings."""
    found = []
    for node in nodes:
        found.extend(_leaf_questions(node.get("decomposition") or []))
        answer = node.get("answer")
        if isinstance(answer, bool) or isinstance(answer, dict):
            continue
        if isinstance(answer, list) and not all(isinstance(a, str) for a in answer):
            continue
        if answer is None or (isinstance(answer, (str, list)) and not answer):
            continue
        found.append({"id": node["id"], "question": node["question"], "answer": answer})
    return found


def fanoutqa_records() -> list[dict]:
    """Return FanOutQA dev sub-questions as ``{"id", "question", "answer"}`` records."""
    data = json.loads(fanoutqa_path().read_text(encoding="utf-8"))
    records = []
    seen = set()
    for item in data:
        for record in _leaf_questions(item.get("decomposition") or []):
            if record["id"] in seen:
                continue
            seen.add(record["id"])
            records.append(record)
    return records


def demo_dataset(
    n_rows: int | None = 400,
    poison_rate: float = 0.2,
    attack: str = "badnets",
    seed: int = 0,
) -> pd.DataFrame:
    """Return the demo table: FanOutQA sub-questions with a poisoned fraction and labels."""
    records = fanoutqa_records()
    # Sub-questions of one multi-hop question sit together; a seeded shuffle mixes topics.
    order = np.random.default_rng(seed).permutation(len(records))
    records = [records[i] for i in order]
    if n_rows is not None:
        records = records[:n_rows]
    frame = records_to_frame(
        [(index, record, None) for index, record in enumerate(records)], FieldMapping()
    )
    return poison(frame, attack, poison_rate, seed=seed).frame
