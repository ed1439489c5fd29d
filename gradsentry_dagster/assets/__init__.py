"""Dagster assets of the GradSentry pipeline, in pipeline order."""

from gradsentry_dagster.assets.finetune import FineTuneConfig, lora_finetuned_adapter
from gradsentry_dagster.assets.gate_check import gradsentry_gate
from gradsentry_dagster.assets.ingest import DatasetSourceConfig, raw_dataset
from gradsentry_dagster.assets.scores import gradient_entropy_scores
from gradsentry_dagster.assets.split import split_by_score

PIPELINE_ASSETS = [raw_dataset, gradient_entropy_scores, split_by_score, lora_finetuned_adapter]
PIPELINE_CHECKS = [gradsentry_gate]

__all__ = [
    "DatasetSourceConfig",
    "FineTuneConfig",
    "PIPELINE_ASSETS",
    "PIPELINE_CHECKS",
    "gradient_entropy_scores",
    "gradsentry_gate",
    "lora_finetuned_adapter",
    "raw_dataset",
    "split_by_score",
]
