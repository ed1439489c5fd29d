"""Write robust mode's shipped calibration from the trusted rows the detection benchmark saved.

    python benchmarks/calibrate.py [--datasets webquestions,nq_open,demo] [--output PATH]

``benchmarks/detection.py`` scores each data set's trusted clean rows (WebQuestions ``val.json``,
NQ-open's EfficientQA file) and keeps their features in ``detection_samples.csv.gz``. This
script pools the trusted rows of the chosen data sets, calibrates the default robust variant
and writes the JSON file that ``ScanPolicy(mode="robust")`` reads for the embedded model. No
model runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from gradsentry_dagster import robust
from gradsentry_dagster.scoring import ScoringSettings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "benchmarks" / "results" / "detection_samples.csv.gz"
OUTPUT = ROOT / "gradsentry_dagster" / "calibrations" / robust.BUILTIN_CALIBRATIONS["embedded:smollm2-135m-instruct"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=SAMPLES, help="Per-sample rows of the detection benchmark.")
    parser.add_argument(
        "--datasets", default="webquestions,nq_open,demo", help="Data sets whose trusted rows are pooled."
    )
    parser.add_argument("--variant", default=robust.DEFAULT_VARIANT, choices=sorted(robust.VARIANTS))
    parser.add_argument("--fpr", type=float, default=robust.DEFAULT_FALSE_POSITIVE_RATE, help="False-positive rate of the rule.")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    samples = pd.read_csv(args.samples)
    names = args.datasets.split(",")
    trusted = samples[(samples["attack"] == "calibration") & samples["dataset"].isin(names)]
    counts = trusted.groupby("dataset").size().to_dict()
    missing = [name for name in names if name not in counts]
    if missing:
        raise SystemExit(f"{args.samples} has no trusted rows for {missing}; run benchmarks/detection.py on them")
    source = (
        "embedded:smollm2-135m-instruct, exact path, top_k 16, crop 1/8; trusted rows of "
        + ", ".join(f"{name} ({counts[name]})" for name in names)
        + " scored by benchmarks/detection.py (seed 0), pooled by benchmarks/calibrate.py"
    )
    # detection.py scores with the default settings; the question gain comes from the same pass.
    features = robust.VARIANTS[args.variant]
    settings = ScoringSettings(question_gain=robust.needs_question_gain(features))
    calibration = robust.calibrate_robust(
        trusted.reset_index(drop=True),
        features,
        args.fpr,
        source=source,
        settings_fingerprint=settings.fingerprint(),
    )
    calibration.to_json(args.output)
    print(f"{args.output}: {calibration.describe()} ({calibration.calibration_rows} rows, FPR {args.fpr:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
