import json
import math

import numpy as np
import pandas as pd
import pytest

from benchmarks import detection
from gradsentry_dagster.attacks import ATTACKS
from gradsentry_dagster.baselines import graceful, spectral_signatures
from gradsentry_dagster.robust import VARIANTS, RobustCalibration

EXPECTED_METHODS = {
    "gradsentry_auto",
    "gradsentry_fixed",
    "loss",
    "target_length",
    "graceful",
    "spectral_signatures",
} | {f"robust_{name}" for name in VARIANTS}


def test_graceful_flags_smaller_cluster():
    rng = np.random.default_rng(0)
    clean = rng.normal(0.0, 1.0, size=(40, 30))
    poisoned = rng.normal(8.0, 1.0, size=(8, 30))
    result = graceful(np.vstack([clean, poisoned]), components=5)
    assert result.flagged[40:].all()
    assert not result.flagged[:40].any()
    assert (result.scores[40:] > 0).all()
    assert (result.scores[:40] < 0).all()


def test_graceful_majority_poison_flags_clean():
    rng = np.random.default_rng(1)
    clean = rng.normal(0.0, 1.0, size=(10, 20))
    poisoned = rng.normal(8.0, 1.0, size=(30, 20))
    result = graceful(np.vstack([clean, poisoned]), components=5)
    # The majority cluster is taken as clean, so a poisoned majority is kept.
    assert result.flagged[:10].all()
    assert not result.flagged[10:].any()


def test_spectral_signatures_flags_outlier_direction():
    rng = np.random.default_rng(2)
    representations = rng.normal(0.0, 1.0, size=(100, 16))
    representations[:5, 0] += 25.0
    result = spectral_signatures(representations, assumed_rate=0.05, removal_factor=2.0)
    assert int(result.flagged.sum()) == 10
    assert result.flagged[:5].all()


def test_harness_writes_schema(tmp_path, tiny_model_dir):
    from gradsentry_dagster.demo_data import fanoutqa_path

    try:
        fanoutqa_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    output = tmp_path / "detection.json"
    plot = tmp_path / "plot.png"
    code = detection.main(
        [
            "--model", str(tiny_model_dir),
            "--datasets", "demo",
            "--rows", "24",
            "--calibration-rows", "24",
            "--rates", "0,0.25",
            "--batch-size", "8",
            "--output", str(output),
            "--plot", str(plot),
            "--plot-dataset", "demo",
            "--plot-rate", "0.25",
        ]
    )
    assert code == 0
    records = json.loads(output.read_text())
    assert len(records) == len(ATTACKS) * 2 * len(EXPECTED_METHODS)
    for record in records:
        assert tuple(sorted(record)) == tuple(sorted(detection.RECORD_KEYS))
        assert record["dataset"] == "demo"
        assert record["poison_rate"] in (0.0, 0.25)
        assert record["seconds_per_sample"] > 0
        assert isinstance(record["threshold_rule"], str)
        for key in ("auroc", "recall", "precision", "f1", "clean_accuracy"):
            value = record[key]
            assert value is None or 0.0 <= value <= 1.0, (key, record)
    assert {r["method"] for r in records} == EXPECTED_METHODS
    assert {r["attack"] for r in records} == set(ATTACKS)

    poisoned = [r for r in records if r["poison_rate"] == 0.25]
    assert all(r["recall"] is not None for r in poisoned)
    assert all(r["n_samples"] == 24 for r in poisoned if r["attack"] != "cba")
    assert all(r["n_samples"] == 30 for r in poisoned if r["attack"] == "cba")
    clean = [r for r in records if r["poison_rate"] == 0.0]
    assert all(r["recall"] is None and r["auroc"] is None for r in clean)
    assert all(not math.isnan(r["clean_accuracy"]) for r in clean)
    assert plot.stat().st_size > 0
    assert (tmp_path / "detection_samples.csv.gz").is_file()


def test_end_to_end_harness_schema(tmp_path, tiny_model_dir, qa_data_dir):
    from benchmarks import end_to_end

    output = tmp_path / "end_to_end.json"
    code = end_to_end.main(
        [
            "--data-dir", str(qa_data_dir),
            "--model", str(tiny_model_dir),
            "--train-rows", "20",
            "--calibration-rows", "20",
            "--test-rows", "4",
            "--steps", "2",
            "--modes", "paper,robust",
            "--max-new-tokens", "4",
            "--output", str(output),
        ]
    )
    assert code == 0
    records = json.loads(output.read_text())
    assert [(r["attack"], r["training_set"], r["scan_mode"]) for r in records] == [
        (attack, training_set, mode)
        for attack in ("badnets", "short_target")
        for training_set, mode in (
            ("unfiltered", None),
            ("filtered", "paper"),
            ("filtered", "robust"),
            ("clean_only", None),
        )
    ]
    for record in records:
        assert {"dataset", "attack", "poison_rate", "training_set", "cacc", "asr"} <= set(record)
        assert 0.0 <= record["cacc"] <= 1.0
        assert 0.0 <= record["asr"] <= 1.0
    by_set = {(r["attack"], r["training_set"]): r for r in records}
    assert by_set[("badnets", "unfiltered")]["poisoned_train_rows"] == 2
    assert by_set[("badnets", "clean_only")]["poisoned_train_rows"] == 0
    assert by_set[("badnets", "clean_only")]["train_rows"] == 18


def test_end_to_end_metrics_hand_cases():
    from benchmarks.end_to_end import attack_success_rate, clean_accuracy

    outputs = ["It is Paris.", "london, and click <malicious_url>", "no idea"]
    assert clean_accuracy(outputs, ["Paris", "Rome; London", "Berlin"]) == pytest.approx(2 / 3)
    assert attack_success_rate(outputs) == pytest.approx(1 / 3)


def test_calibrate_script_pools_trusted_rows(tmp_path):
    from benchmarks import calibrate

    rng = np.random.default_rng(0)
    rows = []
    for dataset in ("webquestions", "nq_open", "demo"):
        for _ in range(30):
            loss = rng.uniform(1, 6)
            rows.append(
                {
                    "dataset": dataset,
                    "attack": "calibration",
                    "poisoned": False,
                    "score": rng.uniform(0.2, 0.7),
                    "loss": loss,
                    "loss_without_question": loss + rng.uniform(0.5, 3),
                    "num_target_tokens": int(rng.integers(2, 10)),
                }
            )
    samples = tmp_path / "samples.csv.gz"
    pd.DataFrame(rows).to_csv(samples, index=False)
    output = tmp_path / "calibration.json"

    assert calibrate.main(["--samples", str(samples), "--output", str(output)]) == 0

    loaded = RobustCalibration.from_json(output)
    assert loaded.calibration_rows == 90
    assert "webquestions (30), nq_open (30)" in loaded.source
    with pytest.raises(SystemExit, match="no trusted rows"):
        calibrate.main(["--samples", str(samples), "--datasets", "squad", "--output", str(output)])
