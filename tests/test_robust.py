import json
import math

import numpy as np
import pandas as pd
import pytest

from gradsentry_dagster.data import FieldMapping, records_to_frame
from gradsentry_dagster.metrics import auroc, detection_metrics
from gradsentry_dagster.resources import ScanPolicy
from gradsentry_dagster.robust import (
    DEFAULT_FALSE_POSITIVE_RATE,
    DEFAULT_VARIANT,
    RULE_ROBUST,
    VARIANTS,
    RobustCalibration,
    apply_robust,
    builtin_calibration,
    calibrate_robust,
    feature_table,
)
from gradsentry_dagster.scan import scan_frame
from gradsentry_dagster.scoring import ScoringSettings
from gradsentry_dagster.thresholds import ThresholdConfig


def scores(entropy, loss, tokens) -> pd.DataFrame:
    return pd.DataFrame({"score": entropy, "loss": loss, "num_target_tokens": tokens})


def clean_scores(count: int = 100, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return scores(rng.uniform(0.2, 0.6, count), rng.uniform(1.0, 5.0, count), rng.integers(2, 12, count))


def test_auroc_hand_cases():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    assert auroc([0, 0, 1], [0.1, 0.3, 0.2]) == 0.5
    assert math.isnan(auroc([1, 1], [0.1, 0.2]))


def test_detection_metrics_hand_case():
    labels = [True, True, True, False, False, False, False, False]
    flagged = [True, True, False, True, False, False, False, False]
    metrics = detection_metrics(labels, np.arange(8), flagged)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["clean_accuracy"] == pytest.approx(4 / 5)
    assert metrics["accuracy"] == pytest.approx(6 / 8)


def test_detection_metrics_without_poison():
    metrics = detection_metrics([False] * 4, [0.1, 0.2, 0.3, 0.4], [False, False, False, True])
    assert math.isnan(metrics["recall"])
    assert math.isnan(metrics["f1"])
    assert metrics["clean_accuracy"] == pytest.approx(0.75)


def test_length_ratio_divides_by_allowed_entropy():
    table = feature_table(scores([0.5, 0.5, 0.5, 0.0], [1, 1, 1, 1], [4, 16, 40, 1]))
    assert table["length_ratio"].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0])


def test_calibration_thresholds_are_clean_quantiles():
    clean = clean_scores(200)
    calibration = calibrate_robust(clean, ("entropy", "loss"), false_positive_rate=0.02)
    assert calibration.thresholds["entropy"] == pytest.approx(np.quantile(clean["score"], 0.99, method="higher"))
    assert calibration.thresholds["loss"] == pytest.approx(np.quantile(clean["loss"], 0.99, method="higher"))
    flags = apply_robust(clean, calibration)
    assert flags.flagged.mean() <= 0.02


def test_robust_flags_either_feature():
    calibration = calibrate_robust(clean_scores(), ("entropy", "loss"), false_positive_rate=0.02)
    # Row 0: long appended payload (high entropy); row 1: short replaced target (high loss).
    table = scores([0.9, 0.3, 0.3], [3.0, 9.0, 3.0], [40, 4, 4])
    flags = apply_robust(table, calibration)
    assert flags.flagged.tolist() == [True, True, False]
    assert flags.reasons[0].startswith("entropy 0.9 >")
    assert flags.reasons[1].startswith("loss 9 >")
    assert flags.reasons[2] == ""
    assert ((flags.combined > 1) == flags.flagged).all()


def test_robust_does_not_flag_non_finite():
    calibration = calibrate_robust(clean_scores(), ("entropy", "loss"))
    flags = apply_robust(scores([math.nan, 0.3], [3.0, math.inf], [4, 4]), calibration)
    assert flags.flagged.tolist() == [False, False]
    assert np.isnan(flags.combined).all()


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 20"):
        calibrate_robust(clean_scores(10), ("entropy", "loss"))
    with pytest.raises(ValueError, match="false_positive_rate"):
        calibrate_robust(clean_scores(), false_positive_rate=1.5)
    with pytest.raises(ValueError, match="subset"):
        calibrate_robust(clean_scores(), ("perplexity",))


def test_calibration_json_round_trip(tmp_path):
    calibration = calibrate_robust(clean_scores(), ("entropy", "loss", "target_tokens"), source="unit test")
    path = calibration.to_json(tmp_path / "calibration.json")
    assert RobustCalibration.from_json(path) == calibration
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        RobustCalibration.from_json(tmp_path / "broken.json")


def test_builtin_calibration_for_embedded_model():
    calibration = builtin_calibration("embedded:smollm2-135m-instruct")
    assert set(calibration.features) <= set(calibration.thresholds)
    assert calibration.features == VARIANTS[DEFAULT_VARIANT]
    assert calibration.false_positive_rate == DEFAULT_FALSE_POSITIVE_RATE
    with pytest.raises(ValueError, match="has no built-in calibration"):
        builtin_calibration("my/other-model")


def test_policy_defaults_to_robust_mode():
    policy = ScanPolicy()
    assert policy.mode == "robust"
    assert policy.robust_calibration("embedded:smollm2-135m-instruct").needs_question_gain
    with pytest.raises(ValueError, match="mode 'paper'"):
        policy.robust_calibration("my/other-model")


def test_policy_mode_selects_calibration(tmp_path):
    assert ScanPolicy(mode="paper").robust_calibration("my/other-model") is None
    path = calibrate_robust(clean_scores(), ("entropy", "loss")).to_json(tmp_path / "c.json")
    from_file = ScanPolicy(mode="robust", robust_calibration_path=str(path)).robust_calibration("my/other-model")
    assert from_file == RobustCalibration.from_json(path)
    with pytest.raises(ValueError, match="policy mode"):
        ScanPolicy(mode="strict").robust_calibration("my/other-model")


def qa_frame(count: int) -> pd.DataFrame:
    records = [
        (i, {"question": f"What is the capital of country {i}?", "answer": ["City"] * (1 + i % 4)}, None)
        for i in range(count)
    ]
    return records_to_frame(records, FieldMapping())


def test_scan_robust_mode_on_tiny_model(tiny_model, tokenizer):
    settings = ScoringSettings(batch_size=8)
    frame = qa_frame(24)
    paper = scan_frame(tiny_model, tokenizer, frame, settings, ThresholdConfig())
    calibration = calibrate_robust(paper.scores, ("entropy", "loss"), false_positive_rate=0.2)
    robust = scan_frame(
        tiny_model, tokenizer, frame, settings, ThresholdConfig(), mode="robust", robust_calibration=calibration
    )
    table = robust.scores
    assert (table["score"] == paper.scores["score"]).all()
    assert (table["threshold_rule"] == RULE_ROBUST).all()
    expected = (table["score"] > calibration.thresholds["entropy"]) | (table["loss"] > calibration.thresholds["loss"])
    assert (table["flagged"] == expected).all()
    assert table["flagged"].any()
    assert table.loc[table["flagged"], "reason"].str.startswith("robust: ").all()
    assert "calibrated on 24 trusted clean rows" in robust.decision.detail


def test_scan_mode_errors(tiny_model, tokenizer):
    frame = qa_frame(3)
    with pytest.raises(ValueError, match="scan mode"):
        scan_frame(tiny_model, tokenizer, frame, ScoringSettings(), ThresholdConfig(), mode="strict")
    with pytest.raises(ValueError, match="needs a calibration"):
        scan_frame(tiny_model, tokenizer, frame, ScoringSettings(), ThresholdConfig(), mode="robust")


def test_builtin_calibration_file_is_valid_json():
    from pathlib import Path

    import gradsentry_dagster

    folder = Path(gradsentry_dagster.__file__).with_name("calibrations")
    for path in folder.glob("*.json"):
        payload = json.loads(path.read_text())
        assert payload["calibration_rows"] >= 20
