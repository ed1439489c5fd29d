"""The ``lora_finetuned_adapter`` asset: peft LoRA fine-tuning on the clean dataset."""


from dataclasses import asdict

import pandas as pd
from dagster import AssetExecutionContext, Config, Failure, MaterializeResult, MetadataValue, asset
from pydantic import Field

from gradsentry_dagster.assets.scores import artifacts_dir
from gradsentry_dagster.finetune import LoraTrainingConfig, train_lora
from gradsentry_dagster.gate import clean_rows_problem, run_gate
from gradsentry_dagster.progress import ProgressReporter
from gradsentry_dagster.resources.model import GradSentryModelResource
from gradsentry_dagster.resources.policy import ScanPolicy


class FineTuneConfig(Config):
    """LoRA fine-tuning settings, set per run in the launchpad."""

    max_steps: int = Field(default=20, ge=1, description="Optimiser steps.")
    batch_size: int = Field(default=4, ge=1, description="Samples per step.")
    learning_rate: float = Field(default=2e-4, gt=0, description="AdamW learning rate.")
    rank: int = Field(default=8, ge=1, description="LoRA rank r.")
    alpha: int = Field(default=16, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="Module names that get LoRA matrices."
    )
    seed: int = Field(default=0, description="Seed for data order and LoRA initialisation.")
    output_dir: str = Field(
        default="", description="Where the adapter is saved; empty: the run's artifacts folder."
    )


@asset(
    group_name="gradsentry",
    deps=["quarantined_samples"],
    kinds={"pytorch", "peft"},
    description=(
        "A LoRA adapter fine-tuned on the clean dataset. Never runs when the gradsentry_gate "
        "check fails; it also re-runs the gate on the scores it is given and refuses to train "
        "if they violate the policy."
    ),
)
def lora_finetuned_adapter(
    context: AssetExecutionContext,
    config: FineTuneConfig,
    clean_dataset: pd.DataFrame,
    gradient_entropy_scores: pd.DataFrame,
    raw_dataset: pd.DataFrame,
    model: GradSentryModelResource,
    policy: ScanPolicy,
) -> MaterializeResult:
    return finetune_adapter(
        context, config, clean_dataset, gradient_entropy_scores, raw_dataset, model, policy
    )


def finetune_adapter(
    context: AssetExecutionContext,
    config: FineTuneConfig,
    clean_dataset: pd.DataFrame,
    gradient_entropy_scores: pd.DataFrame,
    raw_dataset: pd.DataFrame,
    model: GradSentryModelResource,
    policy: ScanPolicy,
) -> MaterializeResult:
    """Re-run the gate on the given scores, then train and save a LoRA adapter on the clean rows."""
    # A blocking check only stops steps of the same run; this re-check keeps a run that
    # materializes this asset on its own from training on data whose scan failed.
    verdict = run_gate(
        gradient_entropy_scores,
        policy.gate_policy(),
        len(raw_dataset),
        expected_row_ids=raw_dataset["row_id"],
    )
    if not verdict.passed:
        raise Failure(
            description=(
                "refusing to fine-tune: the stored scores fail the gradsentry gate "
                f"({verdict.counts['flagged']} of {verdict.counts['scored']} rows flagged, "
                f"max {policy.max_flagged_fraction:.0%}; {'; '.join(verdict.failure_messages())})"
            ),
            metadata={"gate_counts": MetadataValue.json(verdict.counts)},
        )

    problem = clean_rows_problem(gradient_entropy_scores, clean_dataset)
    if problem:
        raise Failure(description=f"refusing to fine-tune: {problem}")

    training = LoraTrainingConfig(
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        target_modules=tuple(config.target_modules),
        max_tokens=model.max_tokens,
        prompt_format=model.prompt_format,
        seed=config.seed,
    )
    output_dir = config.output_dir or str(artifacts_dir(context) / "lora_adapter")
    context.log.info(
        f"fine-tuning LoRA (r={training.rank}) on {len(clean_dataset)} clean rows "
        f"for {training.max_steps} steps"
    )
    loaded = model.load_fresh()
    reporter = ProgressReporter(training.max_steps, context.log.info, label="steps")
    summary = train_lora(
        loaded.model, loaded.tokenizer, clean_dataset, training, output_dir, progress=reporter.update
    )
    return MaterializeResult(
        metadata={
            "adapter_dir": MetadataValue.path(summary.adapter_dir),
            "steps": summary.steps,
            "training_rows": summary.samples,
            "skipped_rows": summary.skipped_samples,
            "first_loss": summary.first_loss,
            "last_loss": summary.last_loss,
            "config": MetadataValue.json(asdict(training)),
        }
    )
