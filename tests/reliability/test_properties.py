"""Property-based tests of ingestion and of the threshold rule and gate."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradsentry_dagster.data import (
    STATUS_OK,
    STATUS_REJECTED,
    DatasetReadError,
    read_dataset,
    write_parquet,
)
from gradsentry_dagster.gate import GatePolicy, run_gate
from gradsentry_dagster.scan import apply_threshold
from gradsentry_dagster.thresholds import ThresholdConfig, ThresholdDecision, decide_threshold

# Text that includes lone surrogates, which JSON escapes (\ud800) can carry.
CHARACTERS = st.one_of(
    st.characters(),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
)
TEXT = st.text(alphabet=CHARACTERS, max_size=12)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)
FIELDS = ("question", "answer", "id", "context", "instruction", "poisoned", "answers", "qText")
RECORDS = st.one_of(
    st.fixed_dictionaries({}, optional={name: JSON_VALUES for name in FIELDS}),
    st.fixed_dictionaries({"question": TEXT, "answer": st.one_of(TEXT, st.lists(TEXT, max_size=3))}),
    JSON_VALUES,
)
RECORD_LISTS = st.lists(RECORDS, max_size=8)
FILE_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def write_records(path, records, file_format):
    if file_format == "jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="ascii")
    else:
        path.write_text(json.dumps(records), encoding="ascii")
    return path


@pytest.mark.parametrize("file_format", ["jsonl", "json"])
@FILE_SETTINGS
@given(records=RECORD_LISTS)
def test_one_row_per_record(file_format, records, tmp_path_factory):
    folder = tmp_path_factory.mktemp("property")
    path = write_records(folder / f"data.{file_format}", records, file_format)
    try:
        frame = read_dataset(path)
    except DatasetReadError:
        assert not records
        return

    assert len(frame) == len(records)
    assert list(frame["source_index"]) == list(range(len(records)))
    assert frame["row_id"].is_unique
    assert set(frame["status"]) <= {STATUS_OK, STATUS_REJECTED}
    usable = frame[frame["status"] == STATUS_OK]
    assert (usable["question"].str.strip() != "").all()
    assert (usable["answer"].str.strip() != "").all()
    assert (frame.loc[frame["status"] == STATUS_REJECTED, "reject_reason"] != "").all()
    # The IO manager must be able to store whatever the reader returns.
    write_parquet(frame, folder / "raw.parquet")


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=300))
def test_finite_scores_give_finite_threshold(scores):
    decision = decide_threshold(np.array(scores, dtype=float), ThresholdConfig())
    assert math.isfinite(decision.threshold)


def test_huge_scores_fall_back():
    # Found by the property above: the covariance of these scores overflows.
    decision = decide_threshold(np.array([0.0] * 29 + [7.3e154]), ThresholdConfig())
    assert decision.rule == "fallback"
    assert decision.threshold == 0.7


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=30, max_size=300),
    cluster=st.floats(min_value=0.0, max_value=1.0),
)
def test_unit_scores_threshold_in_unit_interval(scores, cluster):
    values = np.array(scores + [cluster] * 10, dtype=float)
    decision = decide_threshold(values, ThresholdConfig())
    assert 0.0 <= decision.threshold <= 1.0


def scores_with_broken_rows(values, broken_positions, broken_value):
    table = pd.DataFrame(
        {
            "row_id": [f"r{i}" for i in range(len(values))],
            "status": "scored",
            "score": values,
            "num_target_tokens": 3,
            "loss": 1.0,
            "reason": "",
        }
    )
    for position in broken_positions:
        table.loc[position % len(values), "score"] = broken_value
    decision = decide_threshold(table["score"].to_numpy(), ThresholdConfig())
    return apply_threshold(table, decision)


@settings(max_examples=12, deadline=None)
@given(
    values=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=40),
    broken_positions=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=5),
    broken_value=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_non_finite_score_never_passes_gate(values, broken_positions, broken_value):
    table = scores_with_broken_rows(values, broken_positions, broken_value)
    broken = ~np.isfinite(table["score"].to_numpy(dtype=float))
    assert table.loc[broken, "flagged"].all()

    permissive = GatePolicy(max_flagged_fraction=1.0, max_rejected_fraction=1.0)
    result = run_gate(table, permissive, len(table), expected_row_ids=table["row_id"])
    assert not result.passed
    assert result.counts["non_finite_scores"] == int(broken.sum())
