"""Detection benchmark: every attack, every poison ratio, GradSentry, robust mode and baselines.

Run from the repository root:

    python benchmarks/detection.py --data-dir ../shared/data

It writes one record per (dataset, attack, poison rate, method) to
``benchmarks/results/detection.json`` and a plot of score distributions to ``docs/img``.

Every detector here reads per-sample quantities (the GradSentry score, the loss, the target
length, DCT features of the gradient, the mean final hidden state), and a row's quantities do
not depend on the other rows. Each distinct row is therefore scored once and its features are
reused across attacks and poison rates, which gives the same numbers as rescoring every
poisoned table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gradsentry_dagster import robust
from gradsentry_dagster.attacks import ATTACKS, poison
from gradsentry_dagster.baselines import (
    SampleFeatures,
    batch_features,
    graceful,
    projection_weight_of,
    spectral_signatures,
)
from gradsentry_dagster.data import FieldMapping, read_dataset, records_to_frame
from gradsentry_dagster.metrics import detection_metrics
from gradsentry_dagster.scoring import ScoringSettings, UnconditionedLosses, encode_frame, encode_without_question
from gradsentry_dagster.thresholds import ThresholdConfig, decide_threshold

logger = logging.getLogger("benchmarks.detection")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RATES = (0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9)
DEFAULT_DATASETS = ("webquestions", "nq_open", "demo")
RECORD_KEYS = (
    "dataset",
    "attack",
    "poison_rate",
    "method",
    "auroc",
    "recall",
    "precision",
    "f1",
    "clean_accuracy",
    "threshold",
    "threshold_rule",
    "seconds_per_sample",
    "n_samples",
)
FIXED_THRESHOLD = 0.7


@dataclass
class BenchmarkDataset:
    """Rows to attack and a disjoint trusted clean set for calibration."""

    name: str
    rows: pd.DataFrame
    calibration: pd.DataFrame


def _shuffled(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    order = np.random.default_rng(seed).permutation(len(frame))
    frame = frame.iloc[order].reset_index(drop=True)
    return frame[frame["status"] == "ok"].reset_index(drop=True)


def load_datasets(names, data_dir: Path | None, rows: int, calibration_rows: int, seed: int = 0):
    """Read each named dataset: ``rows`` rows to attack and ``calibration_rows`` trusted rows.

    The trusted rows come from a different file of the same data set where there is one
    (WebQuestions ``val.json``, NQ-open's EfficientQA dev file), else from later rows.
    """
    datasets = []
    for name in names:
        if name == "demo":
            from gradsentry_dagster.demo_data import fanoutqa_records

            records = fanoutqa_records()
            frame = _shuffled(
                records_to_frame([(i, r, None) for i, r in enumerate(records)], FieldMapping()), seed
            )
            datasets.append(BenchmarkDataset(name, frame.iloc[:rows], frame.iloc[rows : rows + calibration_rows]))
            continue
        if data_dir is None:
            raise SystemExit(
                f"dataset {name!r} needs the shared QA data folder: pass --data-dir or set "
                "GRADSENTRY_SHARED_DATA"
            )
        if name == "webquestions":
            main = read_dataset(data_dir / "webquestions" / "trainmodel.json", preset="webquestions")
            trusted = read_dataset(data_dir / "webquestions" / "val.json", preset="webquestions")
        elif name == "nq_open":
            main = read_dataset(data_dir / "nq_open" / "NQ-open.dev.jsonl", preset="nq_open")
            trusted = read_dataset(data_dir / "nq_open" / "NQ-open.efficientqa.dev.1.1.jsonl", preset="nq_open")
        else:
            raise SystemExit(f"unknown dataset {name!r}; expected some of {DEFAULT_DATASETS}")
        main, trusted = _shuffled(main, seed), _shuffled(trusted, seed)
        datasets.append(BenchmarkDataset(name, main.iloc[:rows], trusted.iloc[:calibration_rows]))
    return datasets


def _row_key(row) -> tuple:
    return (row.instruction, row.context, row.question, row.answer)


class FeatureCache:
    """Per-sample features keyed by the row's text, computed in batches on first request."""

    def __init__(self, model, tokenizer, settings: ScoringSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.weight = projection_weight_of(model)
        self.unconditioned = UnconditionedLosses(model, tokenizer, settings)
        self.features: dict[tuple, SampleFeatures] = {}
        self.seconds = 0.0
        self.computed = 0

    def seconds_per_sample(self) -> float:
        return self.seconds / self.computed if self.computed else math.nan

    def lookup(self, frame: pd.DataFrame) -> list[SampleFeatures]:
        """Return the features of every row of ``frame``, computing the missing ones."""
        keys = [_row_key(row) for row in frame.itertuples(index=False)]
        missing_positions = []
        seen = set()
        for position, key in enumerate(keys):
            if key not in self.features and key not in seen:
                seen.add(key)
                missing_positions.append(position)
        if missing_positions:
            self._compute(frame.iloc[missing_positions].reset_index(drop=True))
        return [self.features[key] for key in keys]

    def _compute(self, frame: pd.DataFrame) -> None:
        encoded, rejected = encode_frame(self.tokenizer, frame, self.settings)
        if rejected:
            raise ValueError(f"{len(rejected)} benchmark rows cannot be encoded: {sorted(rejected.values())[:3]}")
        order = sorted(encoded, key=lambda position: len(encoded[position].input_ids))
        started = time.perf_counter()
        blank = dict(zip(order, encode_without_question(self.tokenizer, frame.iloc[order], self.settings)))
        for start in range(0, len(order), self.settings.batch_size):
            chunk = order[start : start + self.settings.batch_size]
            results = batch_features(
                self.model, [encoded[p] for p in chunk], self.settings, self.pad_id, self.weight
            )
            losses = self.unconditioned([blank[p] for p in chunk])
            for position, features, loss in zip(chunk, results, losses):
                features.loss_without_question = loss
                self.features[_row_key(frame.iloc[position])] = features
        self.seconds += time.perf_counter() - started
        self.computed += len(order)
        logger.info("scored %d new rows (%.3f s per row so far)", len(order), self.seconds_per_sample())


def scores_table(features: list[SampleFeatures]) -> pd.DataFrame:
    """Build the score columns robust mode reads from a list of sample features."""
    return pd.DataFrame(
        {
            "score": [f.score for f in features],
            "loss": [f.loss for f in features],
            "num_target_tokens": [f.num_target_tokens for f in features],
            "loss_without_question": [f.loss_without_question for f in features],
        }
    )


@dataclass
class MethodOutput:
    scores: np.ndarray
    flagged: np.ndarray
    threshold: float
    rule: str
    seconds: float


def _timed(run: Callable[[], tuple]) -> MethodOutput:
    started = time.perf_counter()
    scores, flagged, threshold, rule = run()
    return MethodOutput(np.asarray(scores, float), np.asarray(flagged, bool), float(threshold), rule, time.perf_counter() - started)


def quantile_threshold(clean_values: np.ndarray, rate: float) -> float:
    """Return the clean ``1 - rate`` quantile (an observed value) as a threshold."""
    return float(np.quantile(clean_values, 1 - rate, method="higher"))


def run_methods(features, calibration_scores: pd.DataFrame, calibrations: dict, fpr: float) -> dict[str, MethodOutput]:
    """Run every detector on one poisoned table's features."""
    table = scores_table(features)
    entropy = table["score"].to_numpy()
    outputs: dict[str, MethodOutput] = {}

    def auto():
        decision = decide_threshold(entropy, ThresholdConfig())
        return entropy, entropy > decision.threshold, decision.threshold, decision.rule

    outputs["gradsentry_auto"] = _timed(auto)
    outputs["gradsentry_fixed"] = _timed(lambda: (entropy, entropy > FIXED_THRESHOLD, FIXED_THRESHOLD, "fixed"))

    for variant, calibration in calibrations.items():

        def run_variant(calibration=calibration):
            result = robust.apply_robust(table, calibration)
            rule = f"robust ({calibration.describe()}; clean FPR {calibration.false_positive_rate:g})"
            return result.combined, result.flagged, 1.0, rule

        outputs[f"robust_{variant}"] = _timed(run_variant)

    for method, column in (("loss", "loss"), ("target_length", "num_target_tokens")):

        def run_single(column=column):
            values = table[column].to_numpy(dtype=float)
            threshold = quantile_threshold(calibration_scores[column].to_numpy(dtype=float), fpr)
            return values, values > threshold, threshold, f"clean {1 - fpr:.1%} quantile"

        outputs[method] = _timed(run_single)

    dct = np.stack([f.dct for f in features])
    representations = np.stack([f.representation for f in features])

    def run_graceful():
        result = graceful(dct)
        return result.scores, result.flagged, result.threshold, result.rule

    def run_signatures():
        result = spectral_signatures(representations)
        return result.scores, result.flagged, result.threshold, result.rule

    outputs["graceful"] = _timed(run_graceful)
    outputs["spectral_signatures"] = _timed(run_signatures)
    return outputs


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def benchmark(
    model,
    tokenizer,
    datasets: list[BenchmarkDataset],
    attacks=tuple(ATTACKS),
    rates=DEFAULT_RATES,
    settings: ScoringSettings | None = None,
    false_positive_rate: float = robust.DEFAULT_FALSE_POSITIVE_RATE,
    seed: int = 0,
    keep_samples: Callable[[str, str, float], bool] | None = None,
    checkpoint: Callable[[list[dict], list[dict]], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Run every method on every dataset, attack and rate.

    Returns:
        ``(records, samples)``: one record per (dataset, attack, rate, method) with the keys of
        ``RECORD_KEYS``, and per-sample rows (features, label, robust score) for the tables
        that ``keep_samples(dataset, attack, rate)`` selects, for plots. ``checkpoint`` is
        called with both lists after each attack, so a long run keeps its partial results.
    """
    settings = settings or ScoringSettings(batch_size=16)
    cache = FeatureCache(model, tokenizer, settings)
    records, samples = [], []
    for dataset in datasets:
        calibration_scores = scores_table(cache.lookup(dataset.calibration))
        if keep_samples and keep_samples(dataset.name, "calibration", 0.0):
            for row in calibration_scores.itertuples(index=False):
                samples.append(
                    {
                        "dataset": dataset.name,
                        "attack": "calibration",
                        "poison_rate": 0.0,
                        "poisoned": False,
                        "score": row.score,
                        "loss": row.loss,
                        "loss_without_question": row.loss_without_question,
                        "num_target_tokens": row.num_target_tokens,
                    }
                )
        calibrations = {
            variant: robust.calibrate_robust(
                calibration_scores, features, false_positive_rate, settings.top_k, source=dataset.name
            )
            for variant, features in robust.VARIANTS.items()
        }
        cache.lookup(dataset.rows)
        for attack in attacks:
            for rate in rates:
                poisoned = poison(dataset.rows, attack, rate, seed=seed)
                features = cache.lookup(poisoned.frame)
                labels = poisoned.labels
                outputs = run_methods(features, calibration_scores, calibrations, false_positive_rate)
                for method, output in outputs.items():
                    metrics = detection_metrics(labels, output.scores, output.flagged)
                    records.append(
                        {
                            "dataset": dataset.name,
                            "attack": attack,
                            "poison_rate": rate,
                            "method": method,
                            "auroc": _number(metrics["auroc"]),
                            "recall": _number(metrics["recall"]),
                            "precision": _number(metrics["precision"]),
                            "f1": _number(metrics["f1"]),
                            "clean_accuracy": _number(metrics["clean_accuracy"]),
                            "threshold": _number(output.threshold),
                            "threshold_rule": output.rule,
                            "seconds_per_sample": cache.seconds_per_sample() + output.seconds / len(labels),
                            "n_samples": int(len(labels)),
                        }
                    )
                if keep_samples and keep_samples(dataset.name, attack, rate):
                    table = scores_table(features)
                    auto = outputs["gradsentry_auto"]
                    for i, label in enumerate(labels):
                        samples.append(
                            {
                                "dataset": dataset.name,
                                "attack": attack,
                                "poison_rate": rate,
                                "poisoned": bool(label),
                                "score": float(table["score"][i]),
                                "loss": float(table["loss"][i]),
                                "loss_without_question": float(table["loss_without_question"][i]),
                                "num_target_tokens": int(table["num_target_tokens"][i]),
                                "auto_threshold": auto.threshold,
                                "robust_combined": float(outputs[f"robust_{robust.DEFAULT_VARIANT}"].scores[i]),
                            }
                        )
                logger.info("%s %s %.0f%%: %d rows", dataset.name, attack, rate * 100, len(labels))
            if checkpoint:
                checkpoint(records, samples)
    return records, samples


def plot_distributions(samples: pd.DataFrame, path: Path, dataset: str, rate: float) -> Path:
    """Plot entropy and robust-score histograms per attack, clean vs poisoned, thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = samples[(samples["dataset"] == dataset) & (samples["poison_rate"] == rate)]
    attacks = list(dict.fromkeys(chosen["attack"]))
    figure, axes = plt.subplots(2, len(attacks), figsize=(3.2 * len(attacks), 5.6), squeeze=False)
    for column, attack in enumerate(attacks):
        part = chosen[chosen["attack"] == attack]
        for row, (field, threshold, label) in enumerate(
            (
                ("score", float(part["auto_threshold"].iloc[0]), "GradSentry entropy"),
                ("robust_combined", 1.0, f"robust_{robust.DEFAULT_VARIANT} score"),
            )
        ):
            axis = axes[row][column]
            values = part[field].to_numpy(dtype=float)
            bins = np.linspace(np.nanmin(values), np.nanmax(values), 30)
            axis.hist(values[~part["poisoned"].to_numpy()], bins=bins, alpha=0.6, label="clean", color="tab:blue")
            axis.hist(values[part["poisoned"].to_numpy()], bins=bins, alpha=0.6, label="poisoned", color="tab:red")
            axis.axvline(threshold, color="black", linestyle="--", label="threshold")
            axis.set_title(f"{attack}", fontsize=9)
            axis.set_xlabel(label, fontsize=8)
            if column == 0:
                axis.legend(fontsize=7)
    figure.suptitle(f"{dataset}, {rate:.0%} poison, SmolLM2-135M-Instruct", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_results(records: list[dict], samples: list[dict], output: Path) -> None:
    """Write the records as JSON and the per-sample rows as ``<output stem>_samples.csv.gz``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(records, indent=1) + "\n")
    if samples:
        pd.DataFrame(samples).to_csv(output.with_name(output.stem + "_samples.csv.gz"), index=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("GRADSENTRY_SHARED_DATA") or (ROOT.parent / "shared" / "data"),
        help="Folder with webquestions/ and nq_open/ (default: $GRADSENTRY_SHARED_DATA or ../shared/data).",
    )
    parser.add_argument("--datasets", default=",".join(DEFAULT_DATASETS), help="Comma-separated dataset names.")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="Comma-separated attack names.")
    parser.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES), help="Comma-separated poison rates.")
    parser.add_argument("--rows", type=int, default=240, help="Rows attacked per dataset.")
    parser.add_argument("--calibration-rows", type=int, default=150, help="Trusted clean rows per dataset.")
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the row shuffles, the poisoned rows and the trigger draws."
    )
    parser.add_argument("--fpr", type=float, default=robust.DEFAULT_FALSE_POSITIVE_RATE, help="Robust mode's clean false-positive rate.")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="Model to score with.")
    parser.add_argument("--batch-size", type=int, default=16, help="Samples per forward pass.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "detection.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "score_distributions.png")
    parser.add_argument("--plot-dataset", default="webquestions", help="Dataset shown in the plot.")
    parser.add_argument("--plot-rate", type=float, default=0.1, help="Poison rate shown in the plot.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from gradsentry_dagster.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(model=args.model, device="cpu"))
    data_dir = Path(args.data_dir) if args.data_dir and Path(args.data_dir).is_dir() else None
    datasets = load_datasets(args.datasets.split(","), data_dir, args.rows, args.calibration_rows, seed=args.seed)
    rates = tuple(float(r) for r in args.rates.split(","))
    started = time.perf_counter()
    records, samples = benchmark(
        loaded.model,
        loaded.tokenizer,
        datasets,
        attacks=tuple(args.attacks.split(",")),
        rates=rates,
        settings=ScoringSettings(batch_size=args.batch_size),
        false_positive_rate=args.fpr,
        seed=args.seed,
        keep_samples=lambda _dataset, _attack, _rate: True,
        checkpoint=lambda records, samples: write_results(records, samples, args.output),
    )
    write_results(records, samples, args.output)
    logger.info("wrote %d records to %s in %.0f s", len(records), args.output, time.perf_counter() - started)
    if samples:
        frame = pd.DataFrame(samples)
        if ((frame["dataset"] == args.plot_dataset) & (frame["poison_rate"] == args.plot_rate)).any():
            plot_distributions(frame, args.plot, args.plot_dataset, args.plot_rate)
        logger.info("wrote the plot to %s", args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
