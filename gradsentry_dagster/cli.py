"""The ``gradsentry`` command: scan a dataset and gate on the result, poison a copy, report.

``gradsentry scan`` exits 0 when the scan policy holds and 1 when it is violated. It exits 2
on invalid input or configuration: a missing or unreadable dataset, an invalid option value,
or a model or target that cannot be loaded. It exits 3 when the scan itself fails, because a
crash must not read as a policy violation. ``poison``, ``calibrate`` and ``report`` exit 0 on
success, 2 on invalid input and 3 when they fail.

The scan runs the same code as the Dagster graph: the model and policy resources turn the
options into settings, :func:`gradsentry_dagster.scan.scan_frame` scores and flags, and
:func:`gradsentry_dagster.gate.run_gate` validates the scores with the same Great Expectations
suite as the ``gradsentry_gate`` asset check.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from gradsentry_dagster.data import PRESETS, STATUS_OK, DatasetReadError, read_dataset, write_parquet
from gradsentry_dagster.robust import DEFAULT_FALSE_POSITIVE_RATE, DEFAULT_VARIANT, VARIANTS

logger = logging.getLogger("gradsentry_dagster.cli")

EXIT_OK = 0
EXIT_POLICY_VIOLATED = 1
EXIT_INVALID = 2
EXIT_FAILED = 3
OUTPUT_FORMATS = ("jsonl", "json", "parquet", "csv")


class InvalidInputError(Exception):
    """Raised for input or configuration the user must fix; the command exits with 2."""


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="generic",
        help="column mapping of the dataset file: 'webquestions', 'nq_open', or 'generic' "
        "(question/answer/id and their common aliases)",
    )
    parser.add_argument(
        "--format",
        dest="file_format",
        choices=OUTPUT_FORMATS,
        help="dataset file format; taken from the file suffix when unset",
    )
    parser.add_argument("--limit", type=_positive_int, help="read only the first N records of the dataset")


def _add_scan_options(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    _add_policy_options(parser)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and scoring")
    model.add_argument(
        "--model",
        default="embedded:smollm2-135m-instruct",
        help="model to score with: 'embedded:smollm2-135m-instruct', a local folder with "
        "config.json and safetensors weights, or a Hugging Face Hub model id",
    )
    model.add_argument("--adapter", help="folder of a peft adapter to attach before scoring")
    model.add_argument(
        "--target",
        default="output_projection",
        help="weight matrices whose per-sample gradient is scored: 'output_projection', "
        "'linear:PATTERN' (linear layers whose module name matches a name or glob), or "
        "'lora_a:PATTERN' / 'lora_b:PATTERN' (LoRA matrices of the attached adapter); append "
        "'@ROWS,COLS' to keep those leading fractions of each matrix's rows and columns",
    )
    model.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu) or a torch device")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    model.add_argument(
        "--method",
        default="exact",
        choices=["exact", "reference"],
        help="'exact' scores a batch per forward pass; 'reference' runs autograd per sample "
        "(slower, same scores within 1e-4)",
    )
    model.add_argument("--batch-size", type=_positive_int, default=8, help="samples per forward pass")
    model.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=512,
        help="maximum sample length in tokens; longer prompts lose tokens from the left",
    )
    model.add_argument(
        "--prompt-format",
        default="qa",
        choices=["qa", "chat"],
        help="'qa' for the GradSentry QA template, 'chat' for the tokenizer's chat template",
    )



def _add_policy_options(parser: argparse.ArgumentParser) -> None:
    policy = parser.add_argument_group("policy")
    policy.add_argument(
        "--mode",
        default="robust",
        choices=["paper", "robust"],
        help="'paper': flag GradSentry entropies above the threshold rule; 'robust': per-sample "
        "thresholds calibrated on trusted clean data, which also catch short replaced answers",
    )
    policy.add_argument(
        "--robust-calibration",
        default="",
        help="JSON calibration of robust mode for --model (written by 'gradsentry calibrate'); "
        "empty uses the built-in one of the embedded model",
    )
    policy.add_argument(
        "--threshold-rule",
        default="auto",
        choices=["auto", "fixed"],
        help="'auto': the density valley between the low and high score peaks, with "
        "--fallback-threshold when there is none; 'fixed': always --fixed-threshold",
    )
    policy.add_argument("--fixed-threshold", type=_fraction, default=0.7, help="threshold of the fixed rule, in score units (0 to 1)")
    policy.add_argument(
        "--fallback-threshold",
        type=_fraction,
        default=0.7,
        help="threshold of the auto rule when the scores show no reliable valley, in score units (0 to 1)",
    )
    policy.add_argument(
        "--max-flagged-fraction",
        type=_fraction,
        default=0.15,
        help="maximum fraction of scored rows that may be flagged before the scan fails (0 to 1)",
    )
    policy.add_argument(
        "--max-rejected-fraction",
        type=_fraction,
        default=0.05,
        help="maximum fraction of input rows that may be unusable before the scan fails (0 to 1)",
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default in its help, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``gradsentry`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="gradsentry",
        description="Find backdoor-poisoned samples in a fine-tuning dataset with GradSentry "
        "gradient spectral entropy.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log model loading and scoring steps to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = _HelpFormatter

    scan = commands.add_parser(
        "scan",
        help="score every row, write the scores as Parquet and check the policy",
        description="Score every row of DATASET, write the scores table as Parquet and check it "
        "against the policy. Exits 0 when the policy holds, 1 when it is violated, 2 on invalid "
        "input or configuration, 3 when the scan fails.",
        formatter_class=formatter,
    )
    scan.add_argument("dataset", metavar="DATASET", help="dataset file (.jsonl, .json, .parquet or .csv)")
    scan.add_argument(
        "-o",
        "--output",
        help="Parquet file for the scores table (default: DATASET_STEM.scores.parquet in the current folder)",
    )
    scan.add_argument("--data-docs", metavar="FOLDER", help="write Great Expectations Data Docs HTML of the check here")
    _add_dataset_options(scan)
    _add_scan_options(scan)

    poison = commands.add_parser(
        "poison",
        help="write a backdoor-poisoned copy of a dataset with ground-truth labels",
        description="Write a copy of DATASET in which a fraction of the usable rows carry a "
        "backdoor trigger and target, with a boolean 'poisoned' column holding the ground truth. "
        "Rows that cannot be used are left out and counted.",
        formatter_class=formatter,
    )
    poison.add_argument("dataset", metavar="DATASET", help="dataset file (.jsonl, .json, .parquet or .csv)")
    poison.add_argument(
        "-o", "--output", required=True, help="file to write; its suffix (.jsonl, .json, .parquet, .csv) sets the format"
    )
    poison.add_argument(
        "--attack",
        default="badnets",
        help="attack to run: addsent, badnets, cba, short_target or style",
    )
    poison.add_argument("--rate", type=_fraction, default=0.1, help="fraction of usable rows to poison (0 to 1)")
    poison.add_argument("--seed", type=int, default=0, help="seed of the row choice and trigger draws")
    _add_dataset_options(poison)

    calibrate = commands.add_parser(
        "calibrate",
        help="calibrate robust mode on a trusted clean dataset and write the calibration JSON",
        description="Score TRUSTED, a dataset known to be clean and drawn like the data you will "
        "scan, and write robust mode's per-sample thresholds for --model as JSON. Pass that file "
        "to 'gradsentry scan --robust-calibration' or set the policy's robust_calibration_path. "
        "Use the same model and scoring options as the scans; a few hundred rows pin the "
        "thresholds far better than a few dozen.",
        formatter_class=formatter,
    )
    calibrate.add_argument("trusted", metavar="TRUSTED", help="trusted clean dataset (.jsonl, .json, .parquet or .csv)")
    calibrate.add_argument("-o", "--output", required=True, help="JSON file to write")
    calibrate.add_argument(
        "--variant",
        default=DEFAULT_VARIANT,
        choices=sorted(VARIANTS),
        help="features of the rule: " + "; ".join(f"{name} = {' or '.join(features)}" for name, features in VARIANTS.items()),
    )
    calibrate.add_argument(
        "--fpr",
        type=_fraction,
        default=DEFAULT_FALSE_POSITIVE_RATE,
        help="fraction of the trusted rows the rule may flag, split evenly over its features (0 to 1)",
    )
    _add_dataset_options(calibrate)
    _add_model_options(calibrate)

    report = commands.add_parser(
        "report",
        help="summarize a scores file and draw its histogram",
        description="Print the summary and the most suspicious rows of a scores file written by "
        "'gradsentry scan', and write the score histogram as a PNG.",
        formatter_class=formatter,
    )
    report.add_argument("scores", metavar="SCORES", help="Parquet scores file written by 'gradsentry scan'")
    report.add_argument("--histogram", help="PNG file for the histogram (default: SCORES with a .png suffix)")
    report.add_argument(
        "--dataset",
        help="the scanned dataset, for question and answer previews and, where it has a "
        "'poisoned' column, ground-truth colours and detection metrics",
    )
    report.add_argument("--top", type=int, default=10, help="how many of the highest-scoring rows to list")
    _add_dataset_options(report)
    return parser


def _read(args: argparse.Namespace, path: str) -> pd.DataFrame:
    try:
        return read_dataset(path, file_format=args.file_format, preset=args.preset, limit=args.limit)
    except DatasetReadError as error:
        raise InvalidInputError(str(error)) from error


def ground_truth(frame: pd.DataFrame) -> np.ndarray | None:
    """Return the ``poisoned`` column as booleans, or None where the dataset has none.

    CSV files hold the labels as text, so 'true', '1' and 'yes' count as poisoned too.
    """
    if "poisoned" not in frame.columns:
        return None
    values = frame["poisoned"]
    if values.dtype == bool:
        return values.to_numpy()
    text = values.astype(str).str.strip().str.lower()
    return text.isin(["true", "1", "1.0", "yes"]).to_numpy()


def format_summary(scores: pd.DataFrame, labels: np.ndarray | None) -> list[str]:
    """Return the summary lines of a scores table, with detection metrics when labels exist."""
    from gradsentry_dagster.metrics import detection_metrics
    from gradsentry_dagster.report import summarize_scores

    summary = summarize_scores(scores)
    lines = [
        f"rows: {summary['rows']} ({summary['scored']} scored, {summary['rejected']} rejected)",
        f"flagged: {summary['flagged']} of {summary['scored']} scored rows "
        f"({summary['flagged_fraction']:.1%}) at threshold {summary['threshold']:.4f} "
        f"({summary['threshold_rule']})",
        f"score median {summary['score_median']:.4f}, mean {summary['score_mean']:.4f}",
    ]
    if summary["threshold_rule"] == "robust":
        # The threshold above is the entropy's; rows below it can be flagged by the question gain.
        low_gain = scores["reason"].astype(str).str.contains("question_gain", regex=False)
        by_gain = int((scores["flagged"].astype(bool) & low_gain).sum())
        lines.insert(
            2,
            f"  (robust: that is the entropy threshold; {by_gain} of the flagged rows have a question "
            "gain below its threshold, see the reason column)",
        )
    scored = (scores["status"] == "scored").to_numpy()
    if labels is not None and labels[scored].any() and not labels[scored].all():
        metrics = detection_metrics(
            labels[scored],
            scores["score"].to_numpy(dtype=float)[scored],
            scores["flagged"].to_numpy(dtype=bool)[scored],
        )
        lines.append(
            f"ground truth: {int(labels[scored].sum())} poisoned; AUROC {metrics['auroc']:.3f}, "
            f"recall {metrics['recall']:.3f}, precision {metrics['precision']:.3f}, "
            f"F1 {metrics['f1']:.3f}, clean rows kept {metrics['clean_accuracy']:.3f}"
        )
    return lines


def _model_resource(args: argparse.Namespace):
    """Return the model resource that the model and scoring options describe."""
    from gradsentry_dagster.resources.model import GradSentryModelResource

    return GradSentryModelResource(
        model=args.model,
        adapter=args.adapter,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        prompt_format=args.prompt_format,
        method=args.method,
        target=args.target,
    )


def _load_model(model_resource, settings, target_option: str):
    """Load the model and check that ``--target`` names modules it has.

    Raises:
        InvalidInputError: The model cannot be loaded or the target matches nothing in it.
    """
    from gradsentry_dagster.models import ModelLoadError
    from gradsentry_dagster.targets import parse_target, resolve_modules

    try:
        loaded = model_resource.load()
        if settings.target != "output_projection":
            resolve_modules(loaded.model, parse_target(settings.target))
    except ModelLoadError as error:
        raise InvalidInputError(f"model could not be loaded: {error}") from error
    except ValueError as error:
        raise InvalidInputError(f"invalid --target {target_option!r}: {error}") from error
    return loaded


def run_scan(args: argparse.Namespace) -> int:
    """Score a dataset, write the scores and check the policy; return the exit code."""
    from pydantic import ValidationError

    from gradsentry_dagster.gate import run_gate
    from gradsentry_dagster.progress import ProgressReporter
    from gradsentry_dagster.resources.policy import ScanPolicy
    from gradsentry_dagster.scan import scan_frame, settings_for_mode

    frame = _read(args, args.dataset)
    output = Path(args.output) if args.output else Path.cwd() / f"{Path(args.dataset).name.split('.')[0]}.scores.parquet"

    # The same resources the Dagster graph uses turn options into settings.
    try:
        model_resource = _model_resource(args)
        policy = ScanPolicy(
            mode=args.mode,
            robust_calibration_path=args.robust_calibration,
            threshold_rule=args.threshold_rule,
            fixed_threshold=args.fixed_threshold,
            fallback_threshold=args.fallback_threshold,
            max_flagged_fraction=args.max_flagged_fraction,
            max_rejected_fraction=args.max_rejected_fraction,
        )
        settings = model_resource.scoring_settings()
        threshold_config = policy.threshold_config()
        gate_policy = policy.gate_policy()
        calibration = policy.robust_calibration(args.model)
        settings_for_mode(settings, policy.mode, calibration)
    except (ValidationError, ValueError) as error:
        raise InvalidInputError(f"invalid configuration: {error}") from error

    loaded = _load_model(model_resource, settings, args.target)

    print(
        f"scanning {len(frame)} rows of {args.dataset} with {args.model} on {loaded.device} "
        f"(target {settings.target}, {settings.method} path, {policy.mode} mode)",
        file=sys.stderr,
    )
    reporter = ProgressReporter(len(frame), lambda message: print(message, file=sys.stderr), label="rows")
    result = scan_frame(
        loaded.model,
        loaded.tokenizer,
        frame,
        settings,
        threshold_config,
        progress=reporter.update,
        mode=policy.mode,
        robust_calibration=calibration,
    )
    write_parquet(result.scores, output)
    gate = run_gate(result.scores, gate_policy, len(frame), data_docs_dir=args.data_docs)

    for line in format_summary(result.scores, ground_truth(frame)):
        print(line)
    print(f"scores: {output}")
    if gate.passed:
        print(f"policy holds: flagged fraction at most {gate_policy.max_flagged_fraction:.1%}")
        return EXIT_OK
    failed = gate.failure_messages()
    print(f"policy violated: {'; '.join(failed)}")
    print(
        f"  (max flagged fraction {gate_policy.max_flagged_fraction:.1%}, "
        f"max rejected fraction {gate_policy.max_rejected_fraction:.1%})"
    )
    return EXIT_POLICY_VIOLATED


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write a table in the format its file suffix names."""
    suffix = path.suffix.lower().lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in ("jsonl", "ndjson"):
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == "json":
        frame.to_json(path, orient="records", force_ascii=False, indent=1)
    elif suffix in ("parquet", "pq"):
        write_parquet(frame, path)
    elif suffix == "csv":
        frame.to_csv(path, index=False)
    else:
        raise InvalidInputError(f"cannot tell the output format of {path}: use a .jsonl, .json, .parquet or .csv suffix")
    return path


def run_poison(args: argparse.Namespace) -> int:
    """Write a poisoned copy of a dataset; return the exit code."""
    from gradsentry_dagster.attacks import ATTACKS, poison

    if args.attack not in ATTACKS:
        raise InvalidInputError(f"unknown attack {args.attack!r}; choose one of {', '.join(sorted(ATTACKS))}")
    output = Path(args.output)
    if output.resolve() == Path(args.dataset).resolve():
        raise InvalidInputError(f"--output {output} would overwrite the input dataset; choose another file")
    frame = _read(args, args.dataset)
    usable = frame["status"] == STATUS_OK
    if not usable.any():
        raise InvalidInputError(f"{args.dataset} contains no usable rows; first reason: {frame['reject_reason'].iloc[0]}")

    result = poison(frame[usable].reset_index(drop=True), args.attack, args.rate, seed=args.seed)
    columns = ["row_id", "instruction", "context", "question", "answer", "poisoned"]
    write_table(result.frame[columns], output)
    skipped = int((~usable).sum())
    if skipped:
        print(
            f"left out {skipped} unusable rows (first reason: {frame.loc[~usable, 'reject_reason'].iloc[0]})",
            file=sys.stderr,
        )
    print(f"poisoned {len(result.poisoned_rows)} of {int(usable.sum())} rows with {args.attack}; wrote {output}")
    return EXIT_OK


def run_report(args: argparse.Namespace) -> int:
    """Print a scores file's summary and write its histogram; return the exit code."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradsentry_dagster.report import markdown_table, plot_histogram, top_suspicious
    from gradsentry_dagster.scan import SCAN_COLUMNS

    path = Path(args.scores)
    if not path.is_file():
        raise InvalidInputError(f"scores file not found: {path}")
    try:
        scores = pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as error:
        raise InvalidInputError(f"{path} is not a readable Parquet file: {error}") from error
    # Scores written before robust mode's question gain existed have no loss_without_question.
    required = [column for column in SCAN_COLUMNS if column != "loss_without_question"]
    missing = [column for column in required if column not in scores.columns]
    if missing:
        raise InvalidInputError(f"{path} is not a gradsentry scores file: columns {', '.join(missing)} are missing")

    frame, labels = None, None
    if args.dataset:
        frame = _read(args, args.dataset)
        if list(frame["row_id"]) != list(scores["row_id"]):
            raise InvalidInputError(
                f"{args.dataset} does not match the scores row by row ({len(frame)} dataset rows, "
                f"{len(scores)} score rows); pass the dataset file that was scanned, with the same --preset and --limit"
            )
        labels = ground_truth(frame)

    for line in format_summary(scores, labels):
        print(line)
    if args.top > 0 and len(scores):
        print(f"\ntop {args.top} rows by score:")
        print(markdown_table(top_suspicious(scores, frame, limit=args.top)))
    histogram = Path(args.histogram) if args.histogram else path.with_suffix(".png")
    plot_histogram(scores, histogram, labels=labels)
    print(f"\nhistogram: {histogram}")
    return EXIT_OK


def run_calibrate(args: argparse.Namespace) -> int:
    """Score a trusted clean dataset and write robust mode's calibration; return the exit code."""
    from dataclasses import replace

    from pydantic import ValidationError

    from gradsentry_dagster.progress import ProgressReporter
    from gradsentry_dagster.robust import calibrate_robust, needs_question_gain
    from gradsentry_dagster.scoring import score_frame

    frame = _read(args, args.trusted)
    features = VARIANTS[args.variant]
    try:
        model_resource = _model_resource(args)
        settings = model_resource.scoring_settings()
    except (ValidationError, ValueError) as error:
        raise InvalidInputError(f"invalid configuration: {error}") from error
    if not 0 < args.fpr < 1:
        raise InvalidInputError(f"--fpr must be between 0 and 1 (exclusive), got {args.fpr}")
    if needs_question_gain(features):
        settings = replace(settings, question_gain=True)
    loaded = _load_model(model_resource, settings, args.target)

    print(f"scoring {len(frame)} trusted rows of {args.trusted} with {args.model} on {loaded.device}", file=sys.stderr)
    reporter = ProgressReporter(len(frame), lambda message: print(message, file=sys.stderr), label="rows")
    scores = score_frame(loaded.model, loaded.tokenizer, frame, settings, progress=reporter.update)
    scored = scores[scores["status"] == "scored"]
    rejected = scores[scores["status"] != "scored"]
    if len(rejected):
        first = zip(rejected["row_id"][:3], rejected["reason"][:3])
        examples = "; ".join(f"{row_id}: {reason}" for row_id, reason in first)
        print(
            f"{len(rejected)} of {len(scores)} trusted rows were rejected and not used ({examples})",
            file=sys.stderr,
        )
    source = (
        f"{args.model}, {settings.method} path, target {settings.target}, top_k {settings.top_k}; "
        f"{len(scored)} trusted rows of {Path(args.trusted).name} (gradsentry calibrate)"
    )
    try:
        calibration = calibrate_robust(
            scored, features, args.fpr, settings.top_k, source=source, settings_fingerprint=settings.fingerprint()
        )
    except ValueError as error:
        raise InvalidInputError(str(error)) from error
    output = calibration.to_json(args.output)
    print(f"rule: {calibration.describe()}")
    print(f"calibrated on {calibration.calibration_rows} trusted rows at a false-positive rate of {args.fpr:g}")
    print(f"calibration: {output}")
    return EXIT_OK


COMMANDS = {"scan": run_scan, "poison": run_poison, "calibrate": run_calibrate, "report": run_report}


def main(argv: list[str] | None = None) -> int:
    """Run the ``gradsentry`` command; return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except InvalidInputError as error:
        print(f"gradsentry {args.command}: error: {error}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as error:  # noqa: BLE001 - exit 1 means "policy violated", so a crash must not use it
        logger.exception("gradsentry %s failed", args.command)
        print(f"gradsentry {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
