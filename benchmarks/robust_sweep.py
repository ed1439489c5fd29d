"""Sweep robust mode's calibration false-positive rate over saved per-sample scores.

    python benchmarks/robust_sweep.py [--samples benchmarks/results/detection_samples.csv.gz]
    python benchmarks/robust_sweep.py --calibration gradsentry_dagster/calibrations/smollm2-135m-instruct.json

Reads the per-sample rows that ``benchmarks/detection.py`` saves (the trusted calibration rows
and every attacked table), recalibrates each robust variant at several false-positive rates
and prints, per dataset, the mean F1 over poison rates 1% to 90% for each attack and the
fraction of clean rows flagged at 0% poison. With ``--calibration`` it evaluates one fixed
calibration file the same way instead. No model runs, so it takes seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from gradsentry_dagster import robust
from gradsentry_dagster.metrics import detection_metrics

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RATES = (0.01, 0.02, 0.05, 0.1, 0.2)


def sweep(samples: pd.DataFrame, false_positive_rates=DEFAULT_RATES) -> pd.DataFrame:
    """Return one row per (dataset, variant, rate) with mean F1 per attack and the clean flag rate."""
    rows = []
    for dataset, part in samples.groupby("dataset", sort=False):
        calibration_rows = part[part["attack"] == "calibration"]
        for variant, features in robust.VARIANTS.items():
            for rate in false_positive_rates:
                calibration = robust.calibrate_robust(calibration_rows, features, rate)
                row = calibration_metrics(part, calibration)
                rows.append({"dataset": dataset, "variant": f"robust_{variant}", "fpr": rate, **row})
    return pd.DataFrame(rows)


def calibration_metrics(part: pd.DataFrame, calibration: robust.RobustCalibration) -> dict:
    """Return one dataset's clean flag rate at 0% and mean F1 per attack over the poison rates."""
    tables = part[part["attack"] != "calibration"]
    row = {}
    f1_by_attack = {}
    for (attack, poison_rate), table in tables.groupby(["attack", "poison_rate"], sort=False):
        flags = robust.apply_robust(table.reset_index(drop=True), calibration)
        metrics = detection_metrics(table["poisoned"].to_numpy(dtype=bool), flags.combined, flags.flagged)
        if poison_rate == 0:
            row["flagged at 0%"] = 1 - metrics["clean_accuracy"]
        else:
            f1_by_attack.setdefault(attack, []).append(metrics["f1"])
    for attack, values in f1_by_attack.items():
        row[attack] = float(np.mean(values))
    row["all attacks"] = float(np.mean([np.mean(v) for v in f1_by_attack.values()]))
    return row


def evaluate_calibration(samples: pd.DataFrame, calibration: robust.RobustCalibration) -> pd.DataFrame:
    """Return one row per dataset with a fixed calibration's mean F1 per attack and clean flag rate."""
    rows = [
        {"dataset": dataset, **calibration_metrics(part, calibration)}
        for dataset, part in samples.groupby("dataset", sort=False)
    ]
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=Path, default=ROOT / "benchmarks" / "results" / "detection_samples.csv.gz"
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        help="Evaluate this calibration JSON (for example the shipped one) as it is, instead of the sweep.",
    )
    args = parser.parse_args(argv)
    pd.set_option("display.width", 200)
    if args.calibration:
        calibration = robust.RobustCalibration.from_json(args.calibration)
        print(f"### {args.calibration.name}: {calibration.describe()}\n")
        result = evaluate_calibration(pd.read_csv(args.samples), calibration)
        print(result.to_markdown(index=False, floatfmt=".2f"))
        return 0
    result = sweep(pd.read_csv(args.samples))
    for dataset, part in result.groupby("dataset", sort=False):
        print(f"### {dataset}: mean F1 over 1-90% poison, and clean rows flagged at 0%\n")
        table = part.drop(columns="dataset").sort_values("all attacks", ascending=False)
        print(table.to_markdown(index=False, floatfmt=".2f"))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
