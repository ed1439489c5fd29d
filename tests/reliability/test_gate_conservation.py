"""Conservation and fail-closed expectations of the gate's Great Expectations suite."""

import math

import numpy as np
import pandas as pd

from gradsentry_dagster.gate import GatePolicy, clean_rows_problem, reject_reason_counts, run_gate
from gradsentry_dagster.scan import apply_threshold, split_dataset
from gradsentry_dagster.thresholds import ThresholdDecision

POLICY = GatePolicy(max_flagged_fraction=1.0, max_rejected_fraction=1.0)


def scan_table(rows=20, rejected=2, threshold=0.7):
    """A consistent scores table as a scan writes it: the last ``rejected`` rows are rejected."""
    rng = np.random.default_rng(1)
    scored = rows - rejected
    table = pd.DataFrame(
        {
            "row_id": [f"r{i}" for i in range(rows)],
            "status": ["scored"] * scored + ["rejected"] * rejected,
            "score": list(rng.uniform(0.2, 0.9, scored)) + [math.nan] * rejected,
            "num_target_tokens": [3] * scored + [0] * rejected,
            "loss": list(rng.uniform(1.0, 5.0, scored)) + [math.nan] * rejected,
            "reason": [""] * scored + [f"line {i} is not valid JSON (Expecting value)" for i in range(rejected)],
        }
    )
    return apply_threshold(table, ThresholdDecision(threshold, "fixed", "test"))


def failed(result):
    return {(e["expectation"], e["column"]) for e in result.expectations if not e["success"]}


def gate(table, ids=None):
    ids = [f"r{i}" for i in range(20)] if ids is None else ids
    return run_gate(table, POLICY, len(ids), expected_row_ids=ids)


def test_consistent_table_passes():
    result = gate(scan_table())
    assert result.passed, failed(result)
    assert result.counts["unaccounted"] == 0


def test_swapped_rows_fail():
    table = scan_table()
    table.loc[[0, 1], "row_id"] = ["r1", "r0"]
    result = gate(table)
    assert not result.passed
    assert failed(result) == {("expect_column_values_to_be_in_set", "matches_input")}


def test_duplicated_row_replacing_missing_fails():
    table = scan_table()
    table.loc[5] = table.loc[4]
    result = gate(table)
    assert not result.passed
    assert ("expect_column_values_to_be_unique", "row_id") in failed(result)
    assert ("expect_column_values_to_be_in_set", "matches_input") in failed(result)


def test_missing_row_counts_unaccounted():
    table = scan_table().iloc[:-3]
    result = gate(table)
    assert not result.passed
    assert result.counts["unaccounted"] == 3
    assert ("expect_table_row_count_to_equal", None) in failed(result)


def test_all_rejected_fails():
    table = scan_table(rejected=20)
    result = gate(table)
    assert not result.passed
    assert ("expect_column_sum_to_be_between", "is_scored") in failed(result)


def test_infinite_score_fails():
    table = scan_table()
    table.loc[3, "score"] = math.inf
    table.loc[3, "flagged"] = True
    result = gate(table)
    assert not result.passed
    assert ("expect_column_values_to_not_be_null", "scored_score") in failed(result)
    assert result.counts["non_finite_scores"] == 1


def test_nan_loss_fails():
    table = scan_table()
    table.loc[2, "loss"] = math.nan
    result = gate(table)
    assert not result.passed
    assert failed(result) == {("expect_column_values_to_not_be_null", "scored_loss")}


def test_flag_inconsistent_with_threshold_fails():
    table = scan_table()
    above = table.index[(table["status"] == "scored") & (table["score"] > 0.7)][0]
    table.loc[above, "flagged"] = False
    result = gate(table)
    assert not result.passed
    assert failed(result) == {("expect_column_values_to_be_in_set", "flag_consistent")}


def test_nan_score_is_flagged_not_clean():
    table = scan_table()
    raw = table.drop(columns=["flagged", "threshold", "threshold_rule"])
    raw.loc[0, "score"] = math.nan
    flagged = apply_threshold(raw, ThresholdDecision(0.7, "fixed", "test"))
    assert bool(flagged.at[0, "flagged"])


def test_split_holds_exactly_scored_rows():
    table = scan_table()
    frame = pd.DataFrame({"row_id": table["row_id"], "question": "q", "answer": "a"})
    clean, quarantined = split_dataset(frame, table)
    scored = set(table.loc[table["status"] == "scored", "row_id"])
    assert len(clean) + len(quarantined) == len(scored)
    assert set(clean["row_id"]) | set(quarantined["row_id"]) == scored
    assert clean_rows_problem(table, clean) is None


def test_clean_rows_problem_names_counts():
    table = scan_table()
    frame = pd.DataFrame({"row_id": table["row_id"], "question": "q", "answer": "a"})
    clean, _ = split_dataset(frame, table)
    problem = clean_rows_problem(table, clean.iloc[1:])
    assert problem is not None
    assert "1 missing" in problem
    assert "rerun the scan" in problem


def test_reject_reasons_sum_to_rejected():
    table = scan_table(rejected=15)
    table.loc[table["status"] == "rejected", "reason"] = [f"reason {i}" for i in range(15)]
    counts = reject_reason_counts(table, limit=10)
    assert len(counts) == 11
    assert counts["other reasons"] == 5
    assert sum(counts.values()) == 15


def test_reject_reasons_group_line_numbers():
    counts = reject_reason_counts(scan_table(rejected=4))
    assert counts == {"line N is not valid JSON (Expecting value)": 4}
