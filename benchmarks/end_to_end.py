"""End to end: LoRA fine-tuning on unfiltered, filtered and clean-only poisoned data.

Run from the repository root:

    python benchmarks/end_to_end.py --data-dir ../shared/data

For each attack, a WebQuestions training set is poisoned and scanned, and LoRA adapters are
trained: on all rows (``unfiltered``), on the rows each scan mode keeps (``filtered``, one per
mode in ``--modes``, marked by ``scan_mode``) and on the rows that were never poisoned
(``clean_only``). Each adapter then answers held-out test
questions with greedy decoding:

- clean accuracy (CACC): the fraction of clean test questions whose output contains one of
  the gold answers (case-insensitive);
- attack success rate (ASR): the fraction of triggered test questions whose output contains
  the attack's marker (``malicious_url``, present in both default payloads).

Records go to ``benchmarks/results/end_to_end.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from gradsentry_dagster import robust
from gradsentry_dagster.attacks import poison
from gradsentry_dagster.data import read_dataset
from gradsentry_dagster.finetune import LoraTrainingConfig, train_lora
from gradsentry_dagster.prompts import render_prompt
from gradsentry_dagster.scan import MODE_PAPER, MODE_ROBUST, flag_scores
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from gradsentry_dagster.thresholds import ThresholdConfig

logger = logging.getLogger("benchmarks.end_to_end")

ROOT = Path(__file__).resolve().parents[1]
ASR_MARKER = "malicious_url"


def _shuffled(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    frame = frame[frame["status"] == "ok"]
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@torch.no_grad()
def generate_answers(model, tokenizer, frame: pd.DataFrame, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy-decode an answer for each row's prompt (left-padded batches)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [render_prompt(r.instruction, r.context, r.question) for r in frame.itertuples(index=False)]
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def clean_accuracy(outputs: list[str], answers: list[str]) -> float:
    """Return the fraction of outputs that contain one of the row's gold answers."""
    hits = 0
    for output, answer in zip(outputs, answers):
        golds = [a.strip().lower() for a in answer.split("; ") if a.strip()]
        hits += any(gold in output.lower() for gold in golds)
    return hits / len(outputs)


def attack_success_rate(outputs: list[str], marker: str = ASR_MARKER) -> float:
    """Return the fraction of outputs that contain the attack's marker."""
    return sum(marker in output for output in outputs) / len(outputs)


def evaluate_adapter(spec, adapter_dir: Path, clean_test: pd.DataFrame, triggered_test: pd.DataFrame, max_new_tokens: int):
    """Return (CACC, ASR) of the base model with the adapter in ``adapter_dir``."""
    from dataclasses import replace

    from gradsentry_dagster.models import load_model

    loaded = load_model(replace(spec, adapter=str(adapter_dir)))
    model = loaded.model.eval()
    clean_outputs = generate_answers(model, loaded.tokenizer, clean_test, max_new_tokens)
    triggered_outputs = generate_answers(model, loaded.tokenizer, triggered_test, max_new_tokens)
    return clean_accuracy(clean_outputs, list(clean_test["answer"])), attack_success_rate(triggered_outputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("GRADSENTRY_SHARED_DATA") or (ROOT.parent / "shared" / "data"),
        help="Folder with webquestions/ (default: $GRADSENTRY_SHARED_DATA or ../shared/data).",
    )
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="Base model to scan and fine-tune.")
    parser.add_argument("--attacks", default="badnets,short_target", help="Comma-separated attack names.")
    parser.add_argument("--poison-rate", type=float, default=0.1, help="Fraction of training rows poisoned.")
    parser.add_argument("--train-rows", type=int, default=400, help="Training rows before filtering.")
    parser.add_argument("--calibration-rows", type=int, default=200, help="Trusted clean rows for robust mode.")
    parser.add_argument("--test-rows", type=int, default=100, help="Test questions, asked clean and triggered.")
    parser.add_argument("--steps", type=int, default=150, help="LoRA optimiser steps per run.")
    parser.add_argument("--batch-size", type=int, default=8, help="Training samples per step.")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate.")
    parser.add_argument(
        "--modes",
        default=f"{MODE_PAPER},{MODE_ROBUST}",
        help="Comma-separated scan modes; each builds its own filtered set.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=24, help="Greedy decoding length.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "end_to_end.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from gradsentry_dagster.models import ModelSpec, load_model

    spec = ModelSpec(model=args.model, device="cpu")
    loaded = load_model(spec)
    folder = Path(args.data_dir) / "webquestions"
    train_pool = _shuffled(read_dataset(folder / "trainmodel.json", preset="webquestions"), 1).iloc[: args.train_rows]
    trusted = _shuffled(read_dataset(folder / "val.json", preset="webquestions"), 1).iloc[: args.calibration_rows]
    test = _shuffled(read_dataset(folder / "test.json", preset="webquestions"), 1).iloc[: args.test_rows]
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in (MODE_PAPER, MODE_ROBUST)]
    if unknown:
        parser.error(f"unknown scan modes {unknown}; expected {MODE_PAPER!r} or {MODE_ROBUST!r}")
    # One scoring pass serves every mode, so it computes what robust mode reads.
    settings = ScoringSettings(batch_size=16, question_gain=True)
    calibration = None
    if MODE_ROBUST in modes:
        calibration = robust.calibrate_robust(
            score_frame(loaded.model, loaded.tokenizer, trusted, settings), source="webquestions val.json"
        )
        logger.info("robust calibration: %s", calibration.describe())
    training = LoraTrainingConfig(
        max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=0
    )

    records = []
    # Adapters by the row ids they were trained on: with the same seed and rate every attack
    # poisons the same rows, so the clean-only set repeats and is trained once.
    adapters: dict[tuple, Path] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for attack in args.attacks.split(","):
            poisoned = poison(train_pool, attack, args.poison_rate, seed=0).frame
            triggered_test = poison(test, attack, 1.0, seed=7).frame
            scores = score_frame(loaded.model, loaded.tokenizer, poisoned, settings)
            labels = poisoned["poisoned"].to_numpy(dtype=bool)
            sets = [("unfiltered", "", poisoned)]
            for mode in modes:
                scan = flag_scores(scores, ThresholdConfig(), mode, calibration if mode == MODE_ROBUST else None)
                flagged = scan.scores["flagged"].to_numpy(dtype=bool)
                logger.info(
                    "%s, %s mode: %d poisoned rows, scan flagged %d (%d of them poisoned)",
                    attack,
                    mode,
                    int(labels.sum()),
                    int(flagged.sum()),
                    int((flagged & labels).sum()),
                )
                sets.append(("filtered", mode, poisoned[~flagged]))
            sets.append(("clean_only", "", poisoned[~labels]))
            for name, mode, frame in sets:
                frame = frame.reset_index(drop=True)
                key = tuple(frame["row_id"]) + tuple(frame["answer"])
                label = f"{name} ({mode} mode)" if mode else name
                started = time.perf_counter()
                if key not in adapters:
                    adapters[key] = Path(workdir) / f"{attack}-{name}-{mode or 'all'}"
                    base = load_model(spec).model
                    summary = train_lora(base, loaded.tokenizer, frame, training, adapters[key])
                    logger.info(
                        "%s %s: trained on %d rows, loss %.3f -> %.3f",
                        attack,
                        label,
                        len(frame),
                        summary.first_loss,
                        summary.last_loss,
                    )
                cacc, asr = evaluate_adapter(spec, adapters[key], test, triggered_test, args.max_new_tokens)
                logger.info("%s %s: CACC %.3f, ASR %.3f (%.0f s)", attack, label, cacc, asr, time.perf_counter() - started)
                records.append(
                    {
                        "dataset": "webquestions",
                        "attack": attack,
                        "poison_rate": args.poison_rate,
                        "training_set": name,
                        "cacc": cacc,
                        "asr": asr,
                        "train_rows": int(len(frame)),
                        "poisoned_train_rows": int(frame["poisoned"].sum()),
                        "scan_mode": mode or None,
                        "steps": args.steps,
                        "test_rows": int(len(test)),
                    }
                )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(records, indent=1) + "\n")
    logger.info("wrote %d records to %s", len(records), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
