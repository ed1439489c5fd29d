"""Print the markdown tables of docs/benchmarks.md from the benchmark result files.

    python benchmarks/tables.py [--detection benchmarks/results/detection.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from gradsentry_dagster import robust

ROOT = Path(__file__).resolve().parents[1]
POISONED_RATES = (0.01, 0.05, 0.1, 0.3, 0.5, 0.9)


def _markdown(frame: pd.DataFrame, digits: int = 2) -> str:
    return frame.to_markdown(floatfmt=f".{digits}f")


def _rate_columns(frame: pd.DataFrame) -> pd.DataFrame:
    frame.columns = [f"{c:.0%}" for c in frame.columns]
    return frame


def detection_tables(records: pd.DataFrame, robust_method: str) -> str:
    # The weight-matrix target records (benchmarks/targets.py) have tables of their own.
    records = records[~records["method"].str.startswith("gradsentry_target_")]
    parts = []
    for dataset, part in records.groupby("dataset", sort=False):
        n_clean = int(part[part["poison_rate"] == 0]["n_samples"].iloc[0])
        parts.append(f"### {dataset} ({n_clean} rows per table before CBA negatives)\n")

        paper = part[(part["method"] == "gradsentry_auto") & (part["poison_rate"] > 0)]
        recall = _rate_columns(paper.pivot_table(index="attack", columns="poison_rate", values="recall"))
        recall.index.name = "recall, gradsentry_auto"
        parts.append(_markdown(recall) + "\n")

        robust = part[(part["method"] == robust_method) & (part["poison_rate"] > 0)]
        f1 = _rate_columns(robust.pivot_table(index="attack", columns="poison_rate", values="f1"))
        f1.index.name = f"F1, {robust_method}"
        parts.append(_markdown(f1) + "\n")

        poisoned = part[part["poison_rate"] > 0]
        mean_f1 = poisoned.pivot_table(index="method", columns="attack", values="f1", aggfunc="mean")
        mean_f1["all attacks"] = poisoned.groupby("method")["f1"].mean()
        mean_f1 = mean_f1.sort_values("all attacks", ascending=False)
        mean_f1.index.name = "mean F1 over 1-90%"
        parts.append(_markdown(mean_f1) + "\n")

        mean_auroc = poisoned.pivot_table(index="method", columns="attack", values="auroc", aggfunc="mean")
        mean_auroc.index.name = "mean AUROC over 1-90%"
        parts.append(_markdown(mean_auroc.loc[mean_f1.index]) + "\n")

        clean = part[(part["poison_rate"] == 0) & (part["attack"] == part["attack"].iloc[0])]
        clean = clean.set_index("method")[["clean_accuracy", "threshold", "threshold_rule", "seconds_per_sample"]]
        clean.insert(0, "flagged at 0%", 1 - clean["clean_accuracy"])
        clean = clean.drop(columns="clean_accuracy").loc[mean_f1.index]
        clean.index.name = "clean data (0% poison)"
        parts.append(_markdown(clean, digits=3) + "\n")
    return "\n".join(parts)


def end_to_end_table(records: pd.DataFrame) -> str:
    modes = records["scan_mode"] if "scan_mode" in records.columns else pd.Series([None] * len(records))
    labels = [
        f"{attack} / {training_set}" + (f" ({mode} mode)" if isinstance(mode, str) and mode else "")
        for attack, training_set, mode in zip(records["attack"], records["training_set"], modes)
    ]
    table = records[["train_rows", "poisoned_train_rows", "cacc", "asr"]].set_axis(labels)
    table.index.name = "attack / training set"
    return _markdown(table, digits=3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detection", type=Path, default=ROOT / "benchmarks" / "results" / "detection.json")
    parser.add_argument("--end-to-end", type=Path, default=ROOT / "benchmarks" / "results" / "end_to_end.json")
    parser.add_argument(
        "--robust-method",
        default=f"robust_{robust.DEFAULT_VARIANT}",
        help="Method of the robust F1 table (default: the shipped robust variant).",
    )
    args = parser.parse_args(argv)
    if args.detection.is_file():
        print(detection_tables(pd.DataFrame(json.loads(args.detection.read_text())), args.robust_method))
    if args.end_to_end.is_file():
        print(end_to_end_table(pd.DataFrame(json.loads(args.end_to_end.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
