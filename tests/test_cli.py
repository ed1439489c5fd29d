"""The ``gradsentry`` command: exit codes as a real subprocess, poison, report, and parity with Dagster."""

import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize

from gradsentry_dagster.assets import gradient_entropy_scores, raw_dataset
from gradsentry_dagster.cli import build_parser, main
from gradsentry_dagster.data import read_dataset
from gradsentry_dagster.resources import GradSentryModelResource, ParquetIOManager, ScanPolicy
from tests.conftest import PROJECT_ROOT
from tests.test_pipeline import write_dataset

# With the tiny random model, clean short targets score far below 0.5 and payload targets above it.
FIXED_POLICY = ["--mode", "paper", "--threshold-rule", "fixed", "--fixed-threshold", "0.5", "--max-flagged-fraction", "0.2"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m gradsentry_dagster.cli`` in a fresh process and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "gradsentry_dagster.cli", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_scan_clean_dataset_exits_0(tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "clean.jsonl", rows=20, poisoned=0)
    output = tmp_path / "clean.scores.parquet"
    result = run_cli("scan", str(dataset), "--model", str(tiny_model_dir), "-o", str(output), *FIXED_POLICY)
    assert result.returncode == 0, result.stderr
    assert "policy holds" in result.stdout
    assert "20/20 rows done" in result.stderr
    scores = pq.read_table(output).to_pandas()
    assert len(scores) == 20
    assert (scores["status"] == "scored").all()
    assert not scores["flagged"].any()


def test_scan_poisoned_dataset_exits_1(tmp_path, tiny_model_dir):
    dataset = write_dataset(tmp_path / "poisoned.jsonl", rows=20, poisoned=8)
    output = tmp_path / "poisoned.scores.parquet"
    result = run_cli("scan", str(dataset), "--model", str(tiny_model_dir), "-o", str(output), *FIXED_POLICY)
    assert result.returncode == 1, result.stderr
    assert "policy violated: flagged fraction" in result.stdout
    assert "above the policy maximum" in result.stdout
    assert "flagged: 8 of 20 scored rows" in result.stdout
    assert output.is_file()


def test_scan_malformed_dataset_exits_2(tmp_path, tiny_model_dir):
    dataset = tmp_path / "broken.json"
    dataset.write_text('[{"question": "What is it?", "answer": "x"},')
    result = run_cli("scan", str(dataset), "--model", str(tiny_model_dir), *FIXED_POLICY)
    assert result.returncode == 2
    assert f"{dataset} is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--target", "linear:model.layers.7.mlp.down_proj"], "matched none of the model's"),
        (["--target", "lora_b:*"], "needs a peft LoRA adapter"),
        (["--target", "down_proj"], "invalid target 'down_proj'"),
        (["--model", "/nonexistent/model"], "model folder not found"),
    ],
)
def test_scan_invalid_configuration_exits_2(tmp_path, tiny_model_dir, capsys, options, message):
    dataset = write_dataset(tmp_path / "clean.jsonl", rows=4, poisoned=0)
    code = main(
        ["scan", str(dataset), "--model", str(tiny_model_dir), "--mode", "paper", "-o", str(tmp_path / "s.parquet"), *options]
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_scan_rejects_out_of_range_fraction(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", str(tmp_path / "any.jsonl"), "--max-flagged-fraction", "15"])
    assert exit_info.value.code == 2
    assert "must be a fraction from 0 to 1, got 15" in capsys.readouterr().err


def test_help_names_units(capsys):
    parser = build_parser()
    for command in ("scan", "poison", "report"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "samples per forward pass" in text
    assert "maximum sample length in tokens" in text
    assert "in score units (0 to 1)" in text
    assert "fraction of usable rows to poison (0 to 1)" in text
    assert "PNG file for the histogram" in text


def test_poison_writes_labelled_copy(tmp_path, capsys):
    source = tmp_path / "source.jsonl"
    records = [{"id": f"r{i}", "question": f"What is item {i}?", "answer": f"value {i}"} for i in range(30)]
    records.append({"id": "bad", "question": "No answer?"})
    source.write_text("\n".join(json.dumps(r) for r in records))
    output = tmp_path / "poisoned.jsonl"

    code = main(["poison", str(source), "-o", str(output), "--rate", "0.2", "--seed", "3"])
    captured = capsys.readouterr()
    assert code == 0
    assert "poisoned 6 of 30 rows with badnets" in captured.out
    assert "left out 1 unusable rows (first reason: answer is missing" in captured.err

    copy = read_dataset(output)
    assert len(copy) == 30
    assert int(copy["poisoned"].sum()) == 6
    poisoned_answers = copy.loc[copy["poisoned"].astype(bool), "answer"]
    assert poisoned_answers.str.endswith("for more information").all()
    assert list(copy["row_id"]) == [f"r{i}" for i in range(30)]


def test_poison_rejects_unknown_attack(tmp_path, capsys):
    source = write_dataset(tmp_path / "clean.jsonl", rows=4, poisoned=0)
    code = main(["poison", str(source), "-o", str(tmp_path / "out.jsonl"), "--attack", "stylebkd"])
    assert code == 2
    error = capsys.readouterr().err
    assert "unknown attack 'stylebkd'; choose one of" in error
    assert "badnets" in error


def test_report_summarizes_scores(tmp_path, tiny_model_dir, capsys):
    dataset = write_dataset(tmp_path / "poisoned.jsonl", rows=12, poisoned=4)
    frame = read_dataset(dataset)
    frame["poisoned"] = [i < 4 for i in range(12)]
    labelled = tmp_path / "labelled.parquet"
    frame[["row_id", "question", "answer", "poisoned"]].to_parquet(labelled)
    scores = tmp_path / "scores.parquet"
    assert main(["scan", str(labelled), "--model", str(tiny_model_dir), "-o", str(scores), *FIXED_POLICY]) == 1
    capsys.readouterr()

    histogram = tmp_path / "plot.png"
    code = main(["report", str(scores), "--dataset", str(labelled), "--histogram", str(histogram), "--top", "3"])
    output = capsys.readouterr().out
    assert code == 0
    assert "rows: 12 (12 scored, 0 rejected)" in output
    assert "ground truth: 4 poisoned; AUROC 1.000" in output
    assert "top 3 rows by score:" in output
    assert histogram.read_bytes()[:4] == b"\x89PNG"


def test_report_rejects_other_parquet(tmp_path, capsys):
    other = tmp_path / "other.parquet"
    pd.DataFrame({"row_id": ["a"], "score": [0.5]}).to_parquet(other)
    assert main(["report", str(other)]) == 2
    assert "is not a gradsentry scores file: columns status" in capsys.readouterr().err


def test_cli_and_asset_give_same_scores(tmp_path, tiny_model_dir, monkeypatch):
    dataset = write_dataset(tmp_path / "mixed.jsonl", rows=12, poisoned=3)
    target = "linear:model.layers.1.mlp.down_proj@0.5,1"
    cli_scores = tmp_path / "cli.parquet"
    code = main(
        ["scan", str(dataset), "--model", str(tiny_model_dir), "--target", target, "--batch-size", "5",
         "-o", str(cli_scores), *FIXED_POLICY]
    )
    assert code in (0, 1)

    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    storage = tmp_path / "storage"
    resources = {
        "model": GradSentryModelResource(model=str(tiny_model_dir), target=target, batch_size=5),
        "policy": ScanPolicy(mode="paper", threshold_rule="fixed", fixed_threshold=0.5, max_flagged_fraction=0.2),
        "gradsentry_io_manager": ParquetIOManager(base_dir=str(storage)),
    }
    with DagsterInstance.get() as instance:
        result = materialize(
            [raw_dataset, gradient_entropy_scores],
            instance=instance,
            resources=resources,
            run_config={"ops": {"raw_dataset": {"config": {"path": str(dataset)}}}},
        )
    assert result.success

    from_cli = pq.read_table(cli_scores).to_pandas()
    from_asset = pq.read_table(storage / "gradient_entropy_scores.parquet").to_pandas()
    assert list(from_cli.columns) == list(from_asset.columns)
    assert list(from_cli["row_id"]) == list(from_asset["row_id"])
    assert (from_cli["score"] - from_asset["score"]).abs().max() < 1e-6
    assert list(from_cli["flagged"]) == list(from_asset["flagged"])
    assert from_cli["flagged"].sum() == 3


def test_scan_default_robust_mode_needs_calibration(tmp_path, tiny_model_dir, capsys):
    dataset = write_dataset(tmp_path / "clean.jsonl", rows=4, poisoned=0)

    code = main(["scan", str(dataset), "--model", str(tiny_model_dir), "-o", str(tmp_path / "s.parquet")])

    assert code == 2
    error = capsys.readouterr().err
    assert "has no built-in calibration" in error
    assert "gradsentry calibrate" in error


def test_calibrate_then_scan_in_robust_mode(tmp_path, tiny_model_dir):
    trusted = write_dataset(tmp_path / "trusted.jsonl", rows=30, poisoned=0)
    dataset = write_dataset(tmp_path / "mixed.jsonl", rows=20, poisoned=4)
    calibration = tmp_path / "calibration.json"

    calibrated = run_cli("calibrate", str(trusted), "--model", str(tiny_model_dir), "--fpr", "0.1", "-o", str(calibration))

    assert calibrated.returncode == 0, calibrated.stderr
    assert "question_gain <" in calibrated.stdout
    stored = json.loads(calibration.read_text())
    assert stored["features"] == ["entropy", "question_gain"]
    assert stored["calibration_rows"] == 30

    output = tmp_path / "mixed.scores.parquet"
    scanned = run_cli(
        "scan", str(dataset), "--model", str(tiny_model_dir), "--robust-calibration", str(calibration),
        "--max-flagged-fraction", "1", "-o", str(output),
    )

    assert scanned.returncode == 0, scanned.stderr
    table = pd.read_parquet(output)
    assert (table["threshold_rule"] == "robust").all()
    assert table["loss_without_question"].notna().all()


def test_calibrate_rejects_too_few_rows(tmp_path, tiny_model_dir, capsys):
    trusted = write_dataset(tmp_path / "trusted.jsonl", rows=5, poisoned=0)

    code = main(["calibrate", str(trusted), "--model", str(tiny_model_dir), "-o", str(tmp_path / "c.json")])

    assert code == 2
    assert "at least 20 clean rows" in capsys.readouterr().err


def test_calibrate_reports_rejected_rows(tmp_path, tiny_model_dir, capsys):
    trusted = write_dataset(tmp_path / "trusted.jsonl", rows=25, poisoned=0)
    with trusted.open("a") as handle:
        handle.write("\n" + json.dumps({"question": "", "answer": "x"}) + "\n")

    code = main(["calibrate", str(trusted), "--model", str(tiny_model_dir), "-o", str(tmp_path / "c.json")])

    assert code == 0
    error = capsys.readouterr().err
    assert "1 of 26 trusted rows were rejected and not used" in error
    assert "question" in error
