"""Robust mode: per-sample rules that catch appended payloads and short replaced targets.

The paper-faithful GradSentry score (spectral entropy of the output-projection gradient) rises
with the number of target tokens ``T``, because that gradient has rank at most ``T``. It
flags appended payloads, which make ``T`` large, but a poisoned sample whose answer is replaced
by a short attacker string scores low. Its per-sample loss is high instead, because the model
before fine-tuning does not expect that string.

Robust mode keeps the scan per-sample (no clustering, no comparison between the scanned
samples): each sample is flagged when any of a few per-sample features exceeds a threshold. The
thresholds come from a small trusted clean set, scored once with the same model, at a chosen
false-positive rate split evenly over the features (a Bonferroni split, so that the rate of
the rule as a whole is at most the chosen one on that set).

Features, each a column of the scores table or computed from one:

- ``entropy``: the GradSentry score.
- ``loss``: the mean cross-entropy over the sample's target tokens.
- ``target_tokens``: the number of target tokens.
- ``length_ratio``: the entropy divided by the largest entropy ``T`` tokens allow,
  ``log(min(T, k)) / log(k)`` with ``k`` singular values.
- ``question_gain``: how much the question lowers the answer's loss, in nats over the whole
  target: ``(loss_without_question - loss) * T``, the pointwise mutual information of question
  and answer under the model. A clean answer is about its question, so the question makes it
  much more likely. An attacker's string is the same whatever the question, so the question
  barely changes its loss. Low values are suspicious, so this feature's threshold is a lower
  bound. It needs scores made with ``ScoringSettings(question_gain=True)``. The total caught
  short replaced answers better than the per-token mean in ``benchmarks/feature_probe.py``
  on SmolLM2-135M (numbers in docs/benchmarks.md).

NOTE: on SmolLM2-135M with WebQuestions and NQ-open, the loss alone does not separate a short
replaced answer from clean answers at a low false-positive rate, while ``question_gain`` does;
the measurements are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gradsentry_dagster.spectral import DEFAULT_TOP_K

FEATURES = ("entropy", "loss", "target_tokens", "length_ratio", "question_gain")
# Features whose low values are suspicious; the others are suspicious when high.
LOWER_TAIL_FEATURES = frozenset({"question_gain"})

# Feature sets of the variants the detection benchmark measures (robust_<name>).
VARIANTS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "length_ratio": ("length_ratio",),
    "entropy_loss": ("entropy", "loss"),
    "ratio_loss": ("length_ratio", "loss"),
    "entropy_loss_length": ("entropy", "loss", "target_tokens"),
    "question_gain": ("question_gain",),
    "entropy_gain": ("entropy", "question_gain"),
    "ratio_gain": ("length_ratio", "question_gain"),
    "entropy_loss_gain": ("entropy", "loss", "question_gain"),
}
DEFAULT_VARIANT = "entropy_gain"
# Chosen with benchmarks/robust_sweep.py on SmolLM2-135M (docs/benchmarks.md): of the rates whose
# clean rows stay under the default 15% gate, 10% had the best mean F1 over every attack.
DEFAULT_FALSE_POSITIVE_RATE = 0.1
RULE_ROBUST = "robust"


def feature_table(scores: pd.DataFrame, top_k: int = DEFAULT_TOP_K) -> pd.DataFrame:
    """Return the per-sample features of a scores table, one row per input row.

    Args:
        scores: A table with ``score``, ``loss`` and ``num_target_tokens`` columns, and
            ``loss_without_question`` where ``question_gain`` is wanted (NaN without it).
        top_k: Number of singular values behind the entropy.
    """
    entropy = scores["score"].to_numpy(dtype=float)
    loss = scores["loss"].to_numpy(dtype=float)
    tokens = scores["num_target_tokens"].to_numpy(dtype=float)
    allowed = np.log(np.clip(np.minimum(tokens, top_k), 1, None)) / math.log(top_k)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, entropy / allowed, 0.0)
    if "loss_without_question" in scores.columns:
        # Losses are means over the target tokens, so the difference times T totals the gain.
        gain = (scores["loss_without_question"].to_numpy(dtype=float) - loss) * tokens
    else:
        gain = np.full(len(scores), np.nan)
    return pd.DataFrame(
        {
            "entropy": entropy,
            "loss": loss,
            "target_tokens": tokens,
            "length_ratio": ratio,
            "question_gain": gain,
        },
        index=scores.index,
    )


def _suspicion(name: str, values):
    """Return values oriented so that larger is more suspicious."""
    return -values if name in LOWER_TAIL_FEATURES else values


def needs_question_gain(features) -> bool:
    """Return whether a rule on ``features`` needs scores made with ``question_gain=True``."""
    return "question_gain" in features


def _check_question_gain(table: pd.DataFrame, features, scored: np.ndarray) -> None:
    """Raise when the rule reads question_gain and no scored row has it.

    That happens when the scores were made without ``question_gain=True``; a single row with a
    non-finite value is handled by the caller instead.
    """
    if not needs_question_gain(features) or not scored.any():
        return
    if not np.isfinite(table["question_gain"].to_numpy()[scored]).any():
        raise ValueError(
            f"robust feature question_gain is missing for all {int(scored.sum())} scored rows: "
            "score them with ScoringSettings(question_gain=True), which fills the "
            "loss_without_question column"
        )


@dataclass(frozen=True)
class RobustCalibration:
    """Per-feature thresholds of robust mode and where they came from.

    Attributes:
        features: Names of the features the rule uses (from ``FEATURES``).
        thresholds: Feature name to threshold; a sample above any threshold is flagged.
        centers: Feature name to the median on the calibration set; scales the combined score.
        false_positive_rate: The rate of the whole rule on the calibration set.
        calibration_rows: How many clean rows the thresholds came from.
        source: Free text naming the model and data of the calibration.
        settings_fingerprint: ``ScoringSettings.fingerprint()`` of the scores it came from; a
            scan with other settings (target, crop, ``top_k``, prompt format, ``max_tokens``)
            is rejected. Empty skips that check.
    """

    features: tuple[str, ...]
    thresholds: dict[str, float]
    centers: dict[str, float]
    false_positive_rate: float
    calibration_rows: int
    source: str = ""
    settings_fingerprint: str = ""

    def __post_init__(self) -> None:
        unknown = [name for name in self.features if name not in FEATURES]
        if unknown or not self.features:
            raise ValueError(f"robust features must be a non-empty subset of {FEATURES}, got {self.features}")
        missing = [name for name in self.features if name not in self.thresholds or name not in self.centers]
        if missing:
            raise ValueError(f"robust calibration has no threshold or center for {missing}")

    def describe(self) -> str:
        """Return the rule as one line, e.g. ``entropy > 0.81 or question_gain < 0.4``."""
        return " or ".join(
            f"{name} {'<' if name in LOWER_TAIL_FEATURES else '>'} {self.thresholds[name]:.4g}"
            for name in self.features
        )

    @property
    def needs_question_gain(self) -> bool:
        """Whether the scores must carry ``loss_without_question``."""
        return needs_question_gain(self.features)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        payload = asdict(self)
        payload["features"] = list(self.features)
        path.write_text(json.dumps(payload, indent=2))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> RobustCalibration:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"cannot read the robust calibration file {path}: {error}; write one with "
                "`gradsentry calibrate TRUSTED_CLEAN_FILE -o calibration.json` (or "
                "calibrate_robust(...).to_json in Python)"
            ) from error
        payload["features"] = tuple(payload["features"])
        return cls(**payload)


def calibrate_robust(
    clean_scores: pd.DataFrame,
    features: tuple[str, ...] = VARIANTS[DEFAULT_VARIANT],
    false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE,
    top_k: int = DEFAULT_TOP_K,
    source: str = "",
    settings_fingerprint: str = "",
) -> RobustCalibration:
    """Set each feature's threshold at its clean quantile, the chosen rate split evenly.

    A feature suspicious when high gets its ``1 - rate / len(features)`` quantile as an upper
    bound; ``question_gain`` gets its ``rate / len(features)`` quantile as a lower bound.

    Args:
        clean_scores: The scores table of a trusted clean set (rows with a finite score only
            are used), scored with the same model and settings as the data to scan, and with
            ``question_gain=True`` when the features include ``question_gain``.
        features: Features of the rule.
        false_positive_rate: Target rate of the whole rule on the clean set, split evenly.
        top_k: Number of singular values behind the entropy.
        source: Free text naming the model and data, kept with the calibration.
        settings_fingerprint: Fingerprint of the scoring settings of ``clean_scores``.

    Raises:
        ValueError: The rate is outside (0, 1), fewer than 20 clean rows have finite features,
            or ``question_gain`` is wanted and the scores have no ``loss_without_question``.
    """
    if not 0 < false_positive_rate < 1:
        raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
    unknown = [name for name in features if name not in FEATURES]
    if unknown or not features:
        raise ValueError(f"robust features must be a non-empty subset of {FEATURES}, got {features}")
    table = feature_table(clean_scores, top_k)
    finite_core = np.isfinite(table[["entropy", "loss"]].to_numpy()).all(axis=1)
    _check_question_gain(table, features, finite_core)
    table = table[np.isfinite(table[list(features)].to_numpy()).all(axis=1)]
    if len(table) < 20:
        raise ValueError(
            f"robust calibration needs at least 20 clean rows with finite scores, got {len(table)}; "
            "score a larger trusted clean set"
        )
    share = false_positive_rate / len(features)
    thresholds, centers = {}, {}
    for name in features:
        values = table[name].to_numpy()
        # "higher" and "lower" pick an observed value, so a small set never interpolates past
        # its extreme.
        if name in LOWER_TAIL_FEATURES:
            thresholds[name] = float(np.quantile(values, share, method="lower"))
        else:
            thresholds[name] = float(np.quantile(values, 1 - share, method="higher"))
        centers[name] = float(np.median(values))
    return RobustCalibration(
        features=tuple(features),
        thresholds=thresholds,
        centers=centers,
        false_positive_rate=false_positive_rate,
        calibration_rows=len(table),
        source=source,
        settings_fingerprint=settings_fingerprint,
    )


@dataclass
class RobustFlags:
    """Robust-mode output for each row of a scores table.

    Attributes:
        combined: The largest ``(value - center) / (threshold - center)`` over the features;
            a row is flagged exactly when it is above 1. NaN where a feature is not finite.
        flagged: Whether the row is flagged.
        reasons: For flagged rows, which features exceeded their threshold; else empty.
    """

    combined: np.ndarray
    flagged: np.ndarray
    reasons: list[str] = field(default_factory=list)


def apply_robust(scores: pd.DataFrame, calibration: RobustCalibration, top_k: int = DEFAULT_TOP_K) -> RobustFlags:
    """Flag each row whose features exceed any of the calibrated thresholds.

    A row with a finite score and loss whose other features are not finite is flagged, because
    it cannot be cleared.

    Raises:
        ValueError: The rule uses ``question_gain`` and no scored row has a finite
            ``loss_without_question`` (the scores were made without ``question_gain=True``).
    """
    table = feature_table(scores, top_k)
    finite_core = np.isfinite(table[["entropy", "loss"]].to_numpy()).all(axis=1)
    _check_question_gain(table, calibration.features, finite_core)
    combined = np.full(len(table), -np.inf)
    above_any = np.zeros(len(table), dtype=bool)
    parts: list[list[str]] = [[] for _ in range(len(table))]
    for name in calibration.features:
        values = table[name].to_numpy()
        threshold, center = calibration.thresholds[name], calibration.centers[name]
        oriented = _suspicion(name, values)
        oriented_threshold, oriented_center = _suspicion(name, threshold), _suspicion(name, center)
        gap = oriented_threshold - oriented_center
        scale = gap if gap > 0 else 1.0
        combined = np.maximum(combined, (oriented - oriented_center) / scale)
        above = oriented > oriented_threshold
        above_any |= above
        sign = "<" if name in LOWER_TAIL_FEATURES else ">"
        for row in np.flatnonzero(above):
            parts[row].append(f"{name} {values[row]:.4g} {sign} {threshold:.4g}")
    finite = np.isfinite(table[list(calibration.features)].to_numpy()).all(axis=1)
    # A row with a finite score and loss but no finite question gain cannot be cleared, so it
    # is flagged. Rows with a non-finite score or loss are left to the gate, which fails them.
    unjudged = finite_core & ~finite
    for row in np.flatnonzero(unjudged):
        parts[row].append("a robust feature is not finite")
    combined = np.where(finite, combined, np.nan)
    reasons = ["; ".join(p) for p in parts]
    return RobustFlags(combined=combined, flagged=(above_any & finite) | unjudged, reasons=reasons)


# Calibrations shipped with the package, by model name.
BUILTIN_CALIBRATIONS = {"embedded:smollm2-135m-instruct": "smollm2-135m-instruct.json"}


def builtin_calibration(model: str) -> RobustCalibration:
    """Return the shipped calibration of ``model``.

    Raises:
        ValueError: No calibration ships for that model.
    """
    if model not in BUILTIN_CALIBRATIONS:
        raise ValueError(
            f"robust mode (the default) has no built-in calibration for model {model!r} "
            f"(built-in: {sorted(BUILTIN_CALIBRATIONS)}); write one with `gradsentry calibrate "
            "TRUSTED_CLEAN_FILE --model ... -o calibration.json` and set robust_calibration_path "
            "(--robust-calibration) to it, or choose mode 'paper' (--mode paper)"
        )
    return RobustCalibration.from_json(Path(__file__).with_name("calibrations") / BUILTIN_CALIBRATIONS[model])
