"""A scan killed with SIGKILL and started again loses no rows and repeats no finished batch."""

import signal
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq

from gradsentry_dagster.cache import ScoreCache
from gradsentry_dagster.data import FieldMapping, records_to_frame
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from tests.conftest import PROJECT_ROOT

MODEL_FINGERPRINT = "tiny-llama-seed-0"
ROWS = 40
BATCH_SIZE = 4


def resume_frame(rows: int) -> pd.DataFrame:
    records = [
        (i, {"id": f"r{i}", "question": f"Where was person {i} born?", "answer": ["town"] * (1 + i % 3) + [f"t{i}"]}, None)
        for i in range(rows)
    ]
    return records_to_frame(records, FieldMapping())


def cached_rows(cache_dir, settings) -> int:
    folder = ScoreCache(cache_dir, MODEL_FINGERPRINT).partition(settings.fingerprint())
    return sum(pq.read_metadata(part).num_rows for part in folder.glob("part-*.parquet"))


def test_killed_scan_resumes(tmp_path, tokenizer, tiny_model, embedded_model_path):
    cache_dir = tmp_path / "cache"
    settings = ScoringSettings(batch_size=BATCH_SIZE)
    command = [
        sys.executable, "-m", "tests.reliability.resume_worker",
        str(embedded_model_path), str(cache_dir), str(ROWS), str(BATCH_SIZE),
    ]
    worker = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        # Kill the worker once three batches have been reported done (and so written).
        for line in worker.stdout:
            assert line.strip() != "finished", "the worker finished before it could be killed"
            if int(line) >= 3 * BATCH_SIZE:
                worker.send_signal(signal.SIGKILL)
                break
    finally:
        worker.kill()
        worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL

    finished = cached_rows(cache_dir, settings)
    assert finished % BATCH_SIZE == 0
    assert 3 * BATCH_SIZE <= finished < ROWS

    frame = resume_frame(ROWS)
    cache = ScoreCache(cache_dir, MODEL_FINGERPRINT, flush_rows=BATCH_SIZE)
    resumed = score_frame(tiny_model, tokenizer, frame, settings, cache=cache)
    uninterrupted = score_frame(tiny_model, tokenizer, frame, settings)

    assert cache.hits == finished
    assert cache.misses == ROWS - finished
    assert len(resumed) == ROWS
    assert (resumed["status"] == "scored").all()
    assert list(resumed["row_id"]) == list(uninterrupted["row_id"])
    # The same batches are formed again, so the scores are bit-identical.
    assert resumed["score"].tolist() == uninterrupted["score"].tolist()
    assert resumed["loss"].tolist() == uninterrupted["loss"].tolist()
    assert cached_rows(cache_dir, settings) == ROWS
