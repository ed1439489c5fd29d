"""The loss without the question, and robust mode's question_gain feature built on it."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from gradsentry_dagster.data import FieldMapping, records_to_frame
from gradsentry_dagster.prompts import render_prompt
from gradsentry_dagster.robust import apply_robust, calibrate_robust, feature_table
from gradsentry_dagster.scan import scan_frame
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from gradsentry_dagster.thresholds import ThresholdConfig


def qa_frame(count: int) -> pd.DataFrame:
    records = [
        (i, {"question": f"Which city is the capital of region {i}?", "answer": ["Town"] * (1 + i % 3)}, None)
        for i in range(count)
    ]
    return records_to_frame(records, FieldMapping())


@torch.no_grad()
def direct_loss(model, tokenizer, prompt: str, answer: str) -> float:
    """Mean loss of the answer and end-of-sequence tokens after ``prompt``, by a plain forward pass."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + target_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(target_ids)))


def test_loss_without_question_matches_a_plain_forward_pass(tokenizer, tiny_model):
    frame = qa_frame(5)
    table = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=2, question_gain=True))
    for row, result in zip(frame.itertuples(index=False), table.itertuples(index=False)):
        blank = render_prompt(row.instruction, "", "")
        assert result.loss_without_question == pytest.approx(direct_loss(tiny_model, tokenizer, blank, row.answer), abs=1e-4)
        full = render_prompt(row.instruction, row.context, row.question)
        assert result.loss == pytest.approx(direct_loss(tiny_model, tokenizer, full, row.answer), abs=1e-4)


@pytest.mark.parametrize("batch_size,share_prefix", [(1, False), (3, True), (16, True)])
def test_loss_without_question_does_not_depend_on_batching(tokenizer, tiny_model, batch_size, share_prefix):
    frame = qa_frame(7)
    base = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=1, question_gain=True))
    other = score_frame(
        tiny_model,
        tokenizer,
        frame,
        ScoringSettings(batch_size=batch_size, share_prefix=share_prefix, question_gain=True),
    )
    assert np.allclose(base["loss_without_question"], other["loss_without_question"], atol=1e-5)
    assert np.allclose(base["score"], other["score"], atol=1e-5)


def test_loss_without_question_is_nan_when_off(tokenizer, tiny_model):
    table = score_frame(tiny_model, tokenizer, qa_frame(3), ScoringSettings())
    assert table["loss_without_question"].isna().all()


def test_fingerprint_without_question_gain_is_unchanged():
    assert ScoringSettings().fingerprint() != ScoringSettings(question_gain=True).fingerprint()
    # The value scans made before the setting existed were cached under.
    assert ScoringSettings().fingerprint() == "404aeeea15d2b7b2"


def test_reference_path_also_fills_the_loss_without_question(tokenizer, tiny_model):
    frame = qa_frame(3)
    exact = score_frame(tiny_model, tokenizer, frame, ScoringSettings(question_gain=True))
    reference = score_frame(tiny_model, tokenizer, frame, ScoringSettings(method="reference", question_gain=True))
    assert np.allclose(exact["loss_without_question"], reference["loss_without_question"], atol=1e-5)


def gain_scores(gains, losses=None) -> pd.DataFrame:
    gains = np.asarray(gains, dtype=float)
    losses = np.full(len(gains), 2.0) if losses is None else np.asarray(losses, dtype=float)
    return pd.DataFrame(
        {
            "score": np.full(len(gains), 0.4),
            "loss": losses,
            "num_target_tokens": np.full(len(gains), 3),
            # question_gain totals the per-token gain over the 3 target tokens.
            "loss_without_question": losses + gains / 3,
        }
    )


def test_question_gain_is_a_lower_bound():
    clean = gain_scores(np.linspace(1.0, 5.0, 100))
    calibration = calibrate_robust(clean, ("question_gain",), false_positive_rate=0.02)
    assert calibration.thresholds["question_gain"] == pytest.approx(1.0 + 4.0 / 99, abs=1e-9)
    assert calibration.describe().startswith("question_gain < ")
    flags = apply_robust(gain_scores([0.1, 3.0, 1.0]), calibration)
    assert flags.flagged.tolist() == [True, False, True]
    assert flags.reasons[0].startswith("question_gain 0.1 < ")
    assert ((flags.combined > 1) == flags.flagged).all()


def test_question_gain_needs_the_loss_without_question():
    without = gain_scores(np.linspace(1.0, 5.0, 30)).drop(columns="loss_without_question")
    assert feature_table(without)["question_gain"].isna().all()
    with pytest.raises(ValueError, match="question_gain=True"):
        calibrate_robust(without, ("entropy", "question_gain"))
    calibration = calibrate_robust(gain_scores(np.linspace(1.0, 5.0, 30)), ("entropy", "question_gain"))
    with pytest.raises(ValueError, match="missing for all 30 scored rows"):
        apply_robust(without, calibration)


def test_row_without_question_gain_is_flagged():
    calibration = calibrate_robust(gain_scores(np.linspace(1.0, 5.0, 30)), ("entropy", "question_gain"))
    table = gain_scores([3.0, 3.0])
    table.loc[1, "loss_without_question"] = np.nan

    flags = apply_robust(table, calibration)

    assert flags.flagged.tolist() == [False, True]
    assert flags.reasons[1] == "a robust feature is not finite"


def test_calibration_file_keeps_the_lower_bound(tmp_path):
    calibration = calibrate_robust(gain_scores(np.linspace(1.0, 5.0, 40)), ("entropy", "question_gain"))
    path = calibration.to_json(tmp_path / "calibration.json")
    assert json.loads(path.read_text())["features"] == ["entropy", "question_gain"]
    loaded = type(calibration).from_json(path)
    assert loaded.needs_question_gain
    assert loaded.describe() == calibration.describe()


def test_robust_scan_turns_the_feature_on_by_itself(tokenizer, tiny_model):
    frame = qa_frame(24)
    settings = ScoringSettings(batch_size=8)
    clean = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=8, question_gain=True))
    calibration = calibrate_robust(clean, ("entropy", "question_gain"), false_positive_rate=0.2)
    result = scan_frame(
        tiny_model, tokenizer, frame, settings, ThresholdConfig(), mode="robust", robust_calibration=calibration
    )
    table = result.scores
    assert np.allclose(table["loss_without_question"], clean["loss_without_question"])
    gain = (table["loss_without_question"] - table["loss"]) * table["num_target_tokens"]
    expected = (table["score"] > calibration.thresholds["entropy"]) | (gain < calibration.thresholds["question_gain"])
    assert (table["flagged"] == expected).all()
    assert table["flagged"].any()


def test_cli_robust_mode_with_a_calibration_file(tokenizer, tiny_model, tiny_model_dir, tmp_path):
    frame = qa_frame(24)
    dataset = tmp_path / "data.jsonl"
    dataset.write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(frame["question"], frame["answer"]))
    )
    clean = score_frame(tiny_model, tokenizer, frame, ScoringSettings(question_gain=True))
    calibration_path = calibrate_robust(clean, ("entropy", "question_gain"), false_positive_rate=0.2).to_json(
        tmp_path / "calibration.json"
    )

    output = tmp_path / "scores.parquet"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradsentry_dagster.cli",
            "scan",
            str(dataset),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--mode",
            "robust",
            "--robust-calibration",
            str(calibration_path),
            "--max-flagged-fraction",
            "1",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr
    assert "robust mode" in completed.stderr
    table = pd.read_parquet(output)
    assert (table["threshold_rule"] == "robust").all()
    assert table["loss_without_question"].notna().all()
    assert math.isclose(table["loss_without_question"].iloc[0], clean["loss_without_question"].iloc[0], abs_tol=1e-4)


def test_cli_robust_mode_rejects_an_unreadable_calibration(tiny_model_dir, tmp_path):
    dataset = tmp_path / "data.jsonl"
    dataset.write_text(json.dumps({"question": "Where?", "answer": "Here"}) + "\n")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradsentry_dagster.cli",
            "scan",
            str(dataset),
            "--model",
            str(tiny_model_dir),
            "--mode",
            "robust",
            "--robust-calibration",
            str(tmp_path / "missing.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr
    assert "robust calibration" in completed.stdout + completed.stderr


def test_gate_accepts_rows_flagged_by_other_robust_features():
    from gradsentry_dagster.gate import GatePolicy, run_gate

    table = pd.DataFrame(
        {
            "row_id": ["a", "b", "c", "d"],
            "status": ["scored"] * 4,
            "score": [0.9, 0.3, 0.3, 0.9],
            "loss": [1.0, 2.0, 2.0, 1.0],
            "flagged": [True, True, False, False],
            "threshold": [0.8] * 4,
            "threshold_rule": ["robust"] * 4,
            "reason": ["robust: entropy", "robust: question_gain", "", ""],
        }
    )
    # Row d is above the entropy threshold but not flagged: that is the one disagreement.
    result = run_gate(table, GatePolicy(max_flagged_fraction=1.0), 4)
    assert not result.passed
    assert any("1 flags disagree" in message for message in result.failure_messages())
    table.loc[3, "flagged"] = True
    assert run_gate(table, GatePolicy(max_flagged_fraction=1.0), 4).passed


def test_calibration_rejects_other_scoring_settings():
    from gradsentry_dagster.scan import settings_for_mode

    settings = ScoringSettings(question_gain=True)
    calibration = calibrate_robust(
        gain_scores(np.linspace(1.0, 5.0, 30)), ("entropy", "question_gain"), settings_fingerprint=settings.fingerprint()
    )

    assert settings_for_mode(ScoringSettings(), "robust", calibration) == settings
    assert settings_for_mode(ScoringSettings(top_k=8), "paper", calibration) == ScoringSettings(top_k=8)
    with pytest.raises(ValueError, match="other scoring settings"):
        settings_for_mode(ScoringSettings(top_k=8), "robust", calibration)


def test_top_suspicious_lists_flagged_rows_first():
    from gradsentry_dagster.report import top_suspicious

    scores = pd.DataFrame(
        {
            "row_id": ["high", "short-target", "low"],
            "status": ["scored"] * 3,
            "score": [0.7, 0.2, 0.1],
            "num_target_tokens": [20, 5, 3],
            "flagged": [False, True, False],
        }
    )

    top = top_suspicious(scores, limit=2)

    assert top["row_id"].tolist() == ["short-target", "high"]


def test_summary_counts_rows_flagged_by_question_gain():
    from gradsentry_dagster.cli import format_summary

    scores = pd.DataFrame(
        {
            "row_id": ["a", "b", "c"],
            "status": ["scored"] * 3,
            "score": [0.9, 0.3, 0.2],
            "num_target_tokens": [20, 5, 4],
            "loss": [1.0, 2.0, 2.0],
            "loss_without_question": [3.0, 2.1, 5.0],
            "flagged": [True, True, False],
            "threshold": [0.8] * 3,
            "threshold_rule": ["robust"] * 3,
            "reason": ["robust: entropy 0.9 > 0.8", "robust: question_gain 0.5 < 2.8", ""],
        }
    )

    lines = format_summary(scores, None)

    assert "1 of the flagged rows have a question gain below its threshold" in lines[2]
