"""Detection quality and cost of GradSentry scores against different weight matrices.

Runs SmolLM2-135M-Instruct (the embedded model) on WebQuestions rows poisoned at 10% by two
attacks, and scores every row against each target:

- ``output_projection``: the GradSentry default (top-left V/8 x d/8 block of the head);
- ``lora_b_last_attention``: the B matrices of a new rank-8 LoRA adapter on q_proj and v_proj
  (the fine-tuning defaults of this project), in the last two decoder layers;
- ``mlp_down_proj_middle``: the MLP down projection of decoder layer 15 of 30, uncropped.

Attacks: ``badnets`` (four trigger words from {cf, mn, bb, tq} appended to the question, a
payload appended to the answer) and ``short_target`` (the same trigger, the answer replaced by
the short attacker string ``click <malicious_url>``). Flags use the automatic threshold.

Usage:
    python benchmarks/targets.py --data /path/to/shared/data --rows 400

Writes one record per (attack, target) to benchmarks/results/detection_targets.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gradsentry_dagster import attacks
from gradsentry_dagster.data import read_dataset
from gradsentry_dagster.metrics import detection_metrics
from gradsentry_dagster.models import ModelSpec, load_model
from gradsentry_dagster.scoring import STATUS_SCORED, ScoringSettings, score_frame
from gradsentry_dagster.thresholds import ThresholdConfig, decide_threshold

logger = logging.getLogger("benchmarks.targets")

RESULTS = Path(__file__).resolve().parent / "results" / "detection_targets.json"
SHORT_TARGET = "click <malicious_url>"
TARGETS = {
    "output_projection": "output_projection",
    "lora_b_last_attention": "lora_b:model.layers.2[89].self_attn.*",
    "mlp_down_proj_middle": "linear:model.layers.15.mlp.down_proj",
}


def short_target(frame: pd.DataFrame, rate: float, *, seed: int = 0) -> attacks.PoisonResult:
    """Poison rows with BadNets triggers and replace their answer with a short attacker string.

    Uses ``attacks.short_target`` where the library has it; this local version exists for
    library versions without it.
    """
    if hasattr(attacks, "short_target"):
        return attacks.short_target(frame, rate, seed=seed)
    rng = np.random.default_rng(seed)
    result = frame.reset_index(drop=True).copy()
    result["poisoned"] = False
    for row in attacks.choose_rows(result, rate, rng):
        words = [str(w) for w in rng.choice(list(attacks.BADNETS_TRIGGERS), size=4, replace=True)]
        result.at[row, "question"] = attacks.insert_words(result.at[row, "question"], words, "end", rng)
        result.at[row, "answer"] = SHORT_TARGET
        result.at[row, "poisoned"] = True
    return attacks.PoisonResult(result, [int(i) for i in np.flatnonzero(result["poisoned"])])


def attach_new_lora(model, seed: int):
    """Attach a new rank-8 LoRA adapter on q_proj and v_proj, as fine-tuning would start."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, config).eval()


def evaluate(model, tokenizer, frame, target_text, batch_size):
    """Score ``frame`` against one target and return the metrics record without its names."""
    settings = ScoringSettings(target=target_text, batch_size=batch_size)
    started = time.perf_counter()
    scores = score_frame(model, tokenizer, frame, settings)
    seconds = time.perf_counter() - started

    scored = (scores["status"] == STATUS_SCORED).to_numpy()
    values = scores["score"].to_numpy(dtype=float)[scored]
    labels = frame["poisoned"].to_numpy(dtype=bool)[scored]
    decision = decide_threshold(values, ThresholdConfig())
    metrics = detection_metrics(labels, values, values > decision.threshold)
    return {
        "auroc": metrics["auroc"],
        "recall": metrics["recall"],
        "precision": metrics["precision"],
        "f1": metrics["f1"],
        "clean_accuracy": metrics["clean_accuracy"],
        "threshold": float(decision.threshold),
        "threshold_rule": decision.rule,
        "seconds_per_sample": seconds / int(scored.sum()),
        "n_samples": int(scored.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data",
                        help="folder with webquestions/trainmodel.json")
    parser.add_argument("--rows", type=int, default=400, help="WebQuestions rows per attack")
    parser.add_argument("--rate", type=float, default=0.1, help="fraction of rows poisoned")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS),
                        help="targets to run, by name")
    parser.add_argument("--attacks", nargs="*", default=["badnets", "short_target"],
                        choices=["badnets", "short_target"], help="attacks to run")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON file for the records")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    frame = read_dataset(args.data / "webquestions" / "trainmodel.json", preset="webquestions", limit=args.rows)
    poisoned = {
        "badnets": attacks.badnets(frame, args.rate, seed=0).frame,
        "short_target": short_target(frame, args.rate, seed=0).frame,
    }
    loaded = load_model(ModelSpec(device="cpu"))
    model = attach_new_lora(loaded.model, seed=0)

    records = []
    for attack in args.attacks:
        table = poisoned[attack]
        for name in args.targets:
            record = {
                "dataset": "webquestions",
                "attack": attack,
                "poison_rate": args.rate,
                "method": f"gradsentry_target_{name}",
                "target": TARGETS[name],
                "model": "SmolLM2-135M-Instruct",
                **evaluate(model, loaded.tokenizer, table, TARGETS[name], args.batch_size),
            }
            logger.info("%s", json.dumps(record))
            records.append(record)
            # Written after every record, so that an interrupted run keeps what it measured.
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(records, indent=1) + "\n")

    print(f"wrote {len(records)} records to {args.output} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
