"""The scan policy resource: how the threshold is chosen and when fine-tuning may go ahead."""


from dagster import ConfigurableResource
from pydantic import Field

from gradsentry_dagster.gate import GatePolicy
from gradsentry_dagster.thresholds import ThresholdConfig


class ScanPolicy(ConfigurableResource):
    """Threshold rule and gate limits, set per run in the launchpad under ``resources.policy``."""

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
