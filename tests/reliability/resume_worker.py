"""Scan a generated table with a score cache, printing progress, so a test can kill it.

Usage: python -m tests.reliability.resume_worker TOKENIZER_DIR CACHE_DIR ROWS BATCH_SIZE
"""

import sys
import time

from transformers import AutoTokenizer

from gradsentry_dagster.cache import ScoreCache
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from tests.conftest import make_tiny_llama
from tests.reliability.test_resume import MODEL_FINGERPRINT, resume_frame


def report(done: int) -> None:
    print(done, flush=True)
    # Slow enough that the test can kill the scan between batches.
    time.sleep(0.3)


def main() -> None:
    tokenizer_dir, cache_dir, rows, batch_size = sys.argv[1:5]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_llama(len(tokenizer))
    cache = ScoreCache(cache_dir, MODEL_FINGERPRINT, flush_rows=int(batch_size))
    settings = ScoringSettings(batch_size=int(batch_size))
    score_frame(model, tokenizer, resume_frame(int(rows)), settings, progress=report, cache=cache)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
