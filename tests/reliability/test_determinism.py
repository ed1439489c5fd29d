"""The same input, model and settings give bit-identical scores in separate CPU processes."""

import json
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT


def score_in_subprocess(model_dir, dataset):
    completed = subprocess.run(
        [sys.executable, "-m", "tests.reliability.score_once", str(model_dir), str(dataset)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_scores_bit_identical_across_processes(tiny_model_dir, tmp_path):
    dataset = tmp_path / "d.jsonl"
    records = [
        {"question": f"What is item {i}?", "answer": ["value"] * (1 + i % 4) + [f"x{i}" * (i + 1)]}
        for i in range(10)
    ]
    dataset.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    first = score_in_subprocess(tiny_model_dir, dataset)
    second = score_in_subprocess(tiny_model_dir, dataset)
    assert set(first) == {"exact", "exact_loss", "reference_randomized", "reference_randomized_loss"}
    for name in first:
        assert len(first[name]) == 10
        assert first[name] == second[name], name
