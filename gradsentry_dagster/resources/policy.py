"""The scan policy resource: how the threshold is chosen and when fine-tuning may go ahead."""


from dagster import ConfigurableResource
from pydantic import Field

from gradsentry_dagster.gate import GatePolicy
from gradsentry_dagster.robust import RobustCalibration, builtin_calibration
from gradsentry_dagster.scan import MODE_PAPER, MODE_ROBUST, SCAN_MODES
from gradsentry_dagster.thresholds import ThresholdConfig


class ScanPolicy(ConfigurableResource):
    """Scan mode, threshold rule and gate limits, set in the launchpad under ``resources.policy``."""

    mode: str = Field(
        default=MODE_ROBUST,
        description=(
            "'paper': flag GradSentry entropies above the threshold rule's threshold; 'robust': "
            "flag rows by per-sample thresholds calibrated on a trusted clean set (by default "
            "the entropy, and how much the question lowers the answer's loss), which also "
            "catches short replaced answers. 'robust' is the default because it measured best "
            "over all attacks (docs/benchmarks.md); models other than the embedded one need "
            "robust_calibration_path or mode 'paper'."
        ),
    )
    robust_calibration_path: str = Field(
        default="",
        description=(
            "JSON file written by 'gradsentry calibrate' for the scanning model; empty uses "
            "the built-in calibration, which exists for embedded:smollm2-135m-instruct only."
        ),
    )
    threshold_rule: str = Field(
        default="auto",
        description=(
            "'auto': the KDE density valley between the low and high score peaks, with a fixed "
            "fallback when no reliable valley exists; 'fixed': always fixed_threshold."
        ),
    )
    fixed_threshold: float = Field(
        default=0.7, ge=0, le=1, description="Threshold of the 'fixed' rule (score units, 0 to 1)."
    )
    fallback_threshold: float = Field(
        default=0.7, ge=0, le=1, description="Threshold the 'auto' rule falls back to."
    )
    max_flagged_fraction: float = Field(
        default=0.15,
        ge=0,
        le=1,
        description=(
            "Largest fraction of scored rows that may be flagged before fine-tuning is blocked. "
            "Clean QA data has a false-positive floor of roughly 8 to 15% at the automatic "
            "threshold on SmolLM2-135M, so values below 0.1 block clean data too."
        ),
    )
    max_rejected_fraction: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Largest fraction of input rows that may be rejected as unusable.",
    )

    def robust_calibration(self, model: str) -> RobustCalibration | None:
        """Return the calibration of robust mode for ``model``; None in paper mode."""
        if self.mode not in SCAN_MODES:
            raise ValueError(f"policy mode must be one of {SCAN_MODES}, got {self.mode!r}")
        if self.mode != MODE_ROBUST:
            return None
        if self.robust_calibration_path:
            return RobustCalibration.from_json(self.robust_calibration_path)
        return builtin_calibration(model)

    def threshold_config(self) -> ThresholdConfig:
        return ThresholdConfig(
            rule=self.threshold_rule,
            fixed_threshold=self.fixed_threshold,
            fallback_threshold=self.fallback_threshold,
        )

    def gate_policy(self) -> GatePolicy:
        return GatePolicy(
            max_flagged_fraction=self.max_flagged_fraction,
            max_rejected_fraction=self.max_rejected_fraction,
        )
