import numpy as np
import pandas as pd

from gradsentry_dagster.gate import GatePolicy, run_gate


def scores_table(n=100, flagged=5, rejected=0, nan_scores=0):
    rng = np.random.default_rng(0)
    status = ["scored"] * (n - rejected) + ["rejected"] * rejected
    score = list(rng.uniform(0.1, 0.6, n - rejected)) + [np.nan] * rejected
    table = pd.DataFrame({"row_id": [str(i) for i in range(n)], "status": status, "score": score})
    table["flagged"] = False
    table.loc[: flagged - 1, "flagged"] = True
    table.loc[: nan_scores - 1, "score"] = np.nan
    return table


def failed(result):
    return {(e["expectation"], e["column"]) for e in result.expectations if not e["success"]}


def test_gate_passes_within_policy():
    result = run_gate(scores_table(flagged=5), GatePolicy(max_flagged_fraction=0.1), 100)
    assert result.passed, result.expectations
    assert result.counts["flagged"] == 5


def test_gate_fails_on_too_many_flagged():
    result = run_gate(scores_table(flagged=30), GatePolicy(max_flagged_fraction=0.1), 100)
    assert not result.passed
    assert failed(result) == {("expect_column_mean_to_be_between", "flagged_rate")}


def test_gate_fails_on_nan_score():
    result = run_gate(scores_table(flagged=0, nan_scores=0) .assign(score=lambda t: t.score.where(t.index != 3)), GatePolicy(), 100)
    assert not result.passed
    assert ("expect_column_values_to_not_be_null", "scored_score") in failed(result)


def test_gate_fails_on_missing_rows():
    result = run_gate(scores_table(n=90, flagged=0), GatePolicy(), 100)
    assert not result.passed
    assert ("expect_table_row_count_to_equal", None) in failed(result)


def test_gate_fails_on_too_many_rejected():
    result = run_gate(scores_table(flagged=0, rejected=20), GatePolicy(max_rejected_fraction=0.05), 100)
    assert not result.passed
    assert ("expect_column_mean_to_be_between", "rejected_rate") in failed(result)


def test_gate_fails_on_unknown_status():
    table = scores_table(flagged=0)
    table.loc[5, "status"] = "pending"
    result = run_gate(table, GatePolicy(), 100)
    assert not result.passed
    assert ("expect_column_values_to_be_in_set", "status") in failed(result)


def test_gate_fails_closed_on_broken_table():
    result = run_gate(pd.DataFrame({"status": ["scored"], "score": [0.5], "flagged": [False]}).drop(columns="score"), GatePolicy(), 1)
    assert not result.passed
    assert result.error


def test_failure_messages_in_plain_words():
    result = run_gate(scores_table(flagged=30), GatePolicy(max_flagged_fraction=0.1), 100)
    messages = result.failure_messages()
    assert messages == ["flagged fraction 30.0% is above the policy maximum"]


def test_failure_messages_report_error():
    table = pd.DataFrame({"status": ["scored"], "flagged": [False]})
    result = run_gate(table, GatePolicy(), 1)
    assert result.failure_messages()[0].startswith("validation failed:")
