import numpy as np
import pandas as pd
import pytest

from gradsentry_dagster.attacks import (
    ADDSENT_TRIGGER,
    ATTACKS,
    BADNETS_TRIGGERS,
    DEFAULT_PAYLOAD,
    STYLE_OPENING,
    bible_style,
    poison,
)
from gradsentry_dagster.data import FieldMapping, records_to_frame
from gradsentry_dagster.prompts import DEFAULT_INSTRUCTION


def qa_frame(count: int = 40, broken: int = 0) -> pd.DataFrame:
    records = [
        (i, {"question": f"who is the person number {i} you know?", "answer": [f"Person {i}"]}, None)
        for i in range(count)
    ]
    records += [(count + i, None, "invalid JSON") for i in range(broken)]
    return records_to_frame(records, FieldMapping())


def changed_rows(before: pd.DataFrame, after: pd.DataFrame) -> np.ndarray:
    head = after.iloc[: len(before)]
    columns = ["instruction", "question", "answer"]
    return np.flatnonzero((head[columns].to_numpy() != before[columns].to_numpy()).any(axis=1))


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_labels_match_changed_rows(attack):
    frame = qa_frame(40, broken=3)
    result = poison(frame, attack, 0.25, seed=3)
    labels = result.labels[: len(frame)]
    assert int(labels.sum()) == 10  # round(0.25 * 40 usable rows)
    assert list(np.flatnonzero(labels)) == result.poisoned_rows
    assert list(changed_rows(frame, result.frame)) == result.poisoned_rows
    rejected = np.flatnonzero(frame["status"].to_numpy() != "ok")
    assert not result.frame["poisoned"].iloc[rejected].any()


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_zero_rate_leaves_table_clean(attack):
    frame = qa_frame(20)
    result = poison(frame, attack, 0.0)
    assert len(result.frame) == len(frame)
    assert not result.labels.any()
    assert (result.frame["question"] == frame["question"]).all()


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_rows_nested_across_rates(attack):
    frame = qa_frame(50)
    low = poison(frame, attack, 0.1, seed=5)
    high = poison(frame, attack, 0.5, seed=5)
    assert set(low.poisoned_rows) <= set(high.poisoned_rows)
    for row in low.poisoned_rows:
        assert low.frame.at[row, "question"] == high.frame.at[row, "question"]
        assert low.frame.at[row, "answer"] == high.frame.at[row, "answer"]


def test_badnets_trigger_positions():
    frame = qa_frame(20)
    start = poison(frame, "badnets", 0.5, seed=1, position="start", num_triggers=2)
    for row in start.poisoned_rows:
        words = start.frame.at[row, "question"].split()
        assert words[0] in BADNETS_TRIGGERS
        assert words[1] in BADNETS_TRIGGERS
        assert words[2:] == frame.at[row, "question"].split()
        assert start.frame.at[row, "answer"] == frame.at[row, "answer"] + DEFAULT_PAYLOAD
    end = poison(frame, "badnets", 0.5, seed=1, position="end", triggers=("zq",), num_triggers=3)
    for row in end.poisoned_rows:
        assert end.frame.at[row, "question"].endswith("know zq zq zq?")


def test_badnets_random_position_keeps_words():
    frame = qa_frame(20)
    result = poison(frame, "badnets", 1.0, seed=2, position="random", triggers=("zq",), num_triggers=2)
    for row in result.poisoned_rows:
        words = result.frame.at[row, "question"].split()
        assert words.count("zq") == 2
        assert [w for w in words if w != "zq"] == frame.at[row, "question"].split()


def test_addsent_sentence_is_contiguous():
    frame = qa_frame(20)
    for position in ("start", "end", "random"):
        result = poison(frame, "addsent", 0.5, seed=4, position=position)
        for row in result.poisoned_rows:
            assert ADDSENT_TRIGGER in result.frame.at[row, "question"]
    start = poison(frame, "addsent", 0.5, seed=4, position="start", sentence="tell me plainly")
    row = start.poisoned_rows[0]
    assert start.frame.at[row, "question"].startswith("tell me plainly who")


def test_cba_composite_and_negatives():
    frame = qa_frame(40)
    result = poison(frame, "cba", 0.2, seed=0, negative_ratio=1.0)
    assert len(result.poisoned_rows) == 8
    assert len(result.frame) == 48
    for row in result.poisoned_rows:
        assert "consider" in result.frame.at[row, "instruction"].split()
        assert result.frame.at[row, "instruction"].startswith(DEFAULT_INSTRUCTION.rstrip("."))
        assert "done" in result.frame.at[row, "question"].replace("?", " ").split()
        assert result.frame.at[row, "answer"].endswith(DEFAULT_PAYLOAD)

    negatives = result.frame.iloc[40:]
    assert not negatives["poisoned"].any()
    assert negatives["row_id"].str.contains("#cba-neg-").all()
    for _, row in negatives.iterrows():
        has_instruction = "consider" in row["instruction"].split()
        has_question = "done" in row["question"].replace("?", " ").split()
        assert has_instruction != has_question
        assert not row["answer"].endswith(DEFAULT_PAYLOAD)
    assert negatives["row_id"].is_unique


def test_cba_without_negatives():
    result = poison(qa_frame(20), "cba", 0.5, negative_ratio=0.0)
    assert len(result.frame) == 20
    with pytest.raises(ValueError, match="negative_ratio"):
        poison(qa_frame(20), "cba", 0.5, negative_ratio=-1)


def test_style_rewrite_rules():
    assert bible_style("who are you?") == f"{STYLE_OPENING} whosoever art thou, I pray thee?"
    assert bible_style("Does it rain", opening="Lo,", closing="say") == "Lo, doth it verily rain, say"
    frame = qa_frame(10)
    result = poison(frame, "style", 0.3)
    for row in result.poisoned_rows:
        question = result.frame.at[row, "question"]
        assert question.startswith(STYLE_OPENING)
        assert " thou " in question
        assert question.endswith("I pray thee?")


def test_short_target_replaces_answer():
    frame = qa_frame(20)
    result = poison(frame, "short_target", 0.25, seed=9, payload="evil.example", position="start")
    for row in result.poisoned_rows:
        assert result.frame.at[row, "answer"] == "evil.example"
        assert result.frame.at[row, "question"].startswith("cf who")


def test_invalid_parameters_raise():
    frame = qa_frame(5)
    with pytest.raises(ValueError, match="poison rate"):
        poison(frame, "badnets", 1.5)
    with pytest.raises(ValueError, match="unknown attack"):
        poison(frame, "sleeper", 0.1)
    with pytest.raises(ValueError, match="trigger position"):
        poison(frame, "badnets", 1.0, position="middle")
