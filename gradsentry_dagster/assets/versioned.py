"""A factory for the scan graph of watched dataset files, one dynamic partition per version.

``build_versioned_scan`` returns the same five assets and the blocking ``gradsentry_gate``
check as the unpartitioned demo graph, under a key prefix and partitioned by dataset version
(see ``gradsentry_dagster.versions``). Every asset of a version reads and writes only that
version's partition, so fine-tuning a version only ever sees its own scores and verdict.

Scoring fans out: ``gradient_entropy_scores`` is a graph of one op that splits the table into
shards, one scoring op per shard (separate steps, so the multiprocess executor or dagster-k8s
runs them in parallel), and one op that gathers all shard scores and only then decides the
threshold, so the threshold always sees every row of the version.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetOut,
    AssetsDefinition,
    AssetChecksDefinition,
    ConfigMapping,
    DynamicOut,
    DynamicOutput,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    asset,
    asset_check,
    graph_asset,
    multi_asset,
    op,
)
from dagster import Field as ConfigField

from gradsentry_dagster.assets.finetune import FineTuneConfig, finetune_adapter
from gradsentry_dagster.assets.gate_check import evaluate_gate
from gradsentry_dagster.assets.ingest import dataset_output
from gradsentry_dagster.assets.scores import artifacts_dir, scores_metadata, start_scoring
from gradsentry_dagster.assets.split import split_outputs
from gradsentry_dagster.data import read_dataset
from gradsentry_dagster.resources.model import GradSentryModelResource
from gradsentry_dagster.resources.policy import ScanPolicy
from gradsentry_dagster.scan import flag_scores, settings_for_mode
from gradsentry_dagster.scoring import score_frame
from gradsentry_dagster.versions import find_version


@dataclass
class VersionedScan:
    """The definitions one ``build_versioned_scan`` call returns."""

    partitions_def: DynamicPartitionsDefinition
    assets: list[AssetsDefinition]
    checks: list[AssetChecksDefinition]
    group_name: str
    key_prefix: list[str] = field(default_factory=list)

    def key(self, name: str) -> AssetKey:
        """Return the asset key of a pipeline asset (``raw_dataset``, ...) in this scan."""
        return AssetKey([*self.key_prefix, name])


def shard_positions(rows: int, shards: int) -> list[np.ndarray]:
    """Split row positions ``0..rows-1`` into at most ``shards`` contiguous, non-empty pieces.

    An empty table still gives one (empty) piece, so the scan produces a scores table.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    pieces = [piece for piece in np.array_split(np.arange(rows), min(shards, max(rows, 1))) if len(piece)]
    return pieces or [np.arange(0)]


def gather_shards(shard_scores: list[pd.DataFrame], rows: int) -> pd.DataFrame:
    """Concatenate shard score tables back into input row order, checking no row is missing.

    Each shard table's index holds the input row positions it scored.
    """
    combined = pd.concat(shard_scores).sort_index() if shard_scores else pd.DataFrame()
    if len(combined) != rows or not (combined.index.to_numpy() == np.arange(rows)).all():
        raise ValueError(
            f"the shard scores cover {len(combined)} rows but the dataset has {rows}; "
            "a shard was lost or scored twice, so rerun the scan"
        )
    return combined.reset_index(drop=True)


def build_versioned_scan(
    *,
    dataset_glob: str,
    key_prefix: str = "versions",
    partitions_name: Optional[str] = None,
    group_name: Optional[str] = None,
    preset: str = "generic",
    file_format: Optional[str] = None,
    field_mapping: Optional[dict[str, str]] = None,
    shards: int = 1,
    scoring_op_tags: Optional[dict[str, Any]] = None,
    scoring_pool: Optional[str] = None,
) -> VersionedScan:
    """Build the partitioned scan graph for the dataset files that ``dataset_glob`` matches.

    Args:
        dataset_glob: Files whose versions are scanned, such as ``/data/incoming/*.jsonl``.
        key_prefix: Prefix of every asset key, and of op names, so several scans can share a
            code location.
        partitions_name: Name of the dynamic partitions definition; default ``<key_prefix>_versions``.
        group_name: Asset group; default ``gradsentry_<key_prefix>``.
        preset: Named column mapping of the files (``generic``, ``webquestions``, ``nq_open``).
        file_format: File format; from each file's suffix when unset.
        field_mapping: Source column for each canonical field, overriding the preset.
        shards: Default number of scoring shards; a run can set ``shards`` in the config of
            ``gradient_entropy_scores``.
        scoring_op_tags: Tags of the per-shard scoring op, such as a ``dagster-k8s/config`` that
            requests a GPU.
        scoring_pool: Concurrency pool of the per-shard scoring op, such as ``"gpu"``, to cap how
            many shards run at once across the instance.
    """
    prefix = [key_prefix]
    partitions_def = DynamicPartitionsDefinition(name=partitions_name or f"{key_prefix}_versions")
    group = group_name or f"gradsentry_{key_prefix}"

    def key(name: str) -> AssetKey:
        return AssetKey([*prefix, name])

    @asset(
        name="raw_dataset",
        key_prefix=prefix,
        group_name=group,
        partitions_def=partitions_def,
        io_manager_key="gradsentry_io_manager",
        kinds={"pandas", "parquet"},
        description=f"One version of a dataset file matching {dataset_glob}, as one canonical table.",
    )
    def raw_dataset(context: AssetExecutionContext) -> Output[pd.DataFrame]:
        try:
            path = find_version(dataset_glob, context.partition_key)
        except LookupError as error:
            raise Failure(description=str(error)) from error
        frame = read_dataset(path, file_format=file_format, preset=preset, mapping=field_mapping or None)
        return dataset_output(context, frame, f"{path} (version {context.partition_key})")

    @op(
        name=f"{key_prefix}_split_into_shards",
        out=DynamicOut(pd.DataFrame),
        config_schema={"shards": ConfigField(int, default_value=shards)},
    )
    def split_into_shards(context: OpExecutionContext, raw_dataset: pd.DataFrame):
        pieces = shard_positions(len(raw_dataset), context.op_config["shards"])
        context.log.info(
            f"scoring {len(raw_dataset)} rows in {len(pieces)} shard(s) of "
            f"{min(map(len, pieces))} to {max(map(len, pieces))} rows"
        )
        for number, positions in enumerate(pieces):
            shard = raw_dataset.iloc[positions].copy()
            shard.index = positions
            yield DynamicOutput(shard, mapping_key=f"shard_{number}")

    @op(name=f"{key_prefix}_score_shard", tags=scoring_op_tags, pool=scoring_pool)
    def score_shard(
        context: OpExecutionContext, shard: pd.DataFrame, model: GradSentryModelResource, policy: ScanPolicy
    ) -> pd.DataFrame:
        loaded, settings, reporter = start_scoring(context, model, policy, len(shard))
        scores = score_frame(loaded.model, loaded.tokenizer, shard, settings, progress=reporter.update)
        scores.index = shard.index
        return scores

    @op(
        name=f"{key_prefix}_gather_scores",
        out=Out(io_manager_key="gradsentry_io_manager"),
    )
    def gather_scores(
        context: OpExecutionContext,
        shard_scores: list[pd.DataFrame],
        raw_dataset: pd.DataFrame,
        model: GradSentryModelResource,
        policy: ScanPolicy,
    ) -> Output[pd.DataFrame]:
        raw_scores = gather_shards(shard_scores, len(raw_dataset))
        result = flag_scores(
            raw_scores,
            policy.threshold_config(),
            policy.mode,
            policy.robust_calibration(model.model),
            model.scoring_settings().top_k,
        )
        context.log.info(
            f"threshold {result.decision.threshold:.4f} set by rule '{result.decision.rule}' "
            f"on all {len(raw_scores)} rows of {len(shard_scores)} shard(s): {result.decision.detail}"
        )
        # The settings the shards scored with, question gain included where the mode reads it.
        settings = settings_for_mode(model.scoring_settings(), policy.mode, policy.robust_calibration(model.model))
        metadata = scores_metadata(
            result.scores,
            raw_dataset,
            artifacts_dir(context) / "score_histogram.png",
            extra={
                "threshold_detail": result.decision.detail,
                "shards": len(shard_scores),
                "model": model.model,
                "scoring_settings": MetadataValue.json(
                    {"fingerprint": settings.fingerprint(), **settings.__dict__}
                ),
            },
        )
        return Output(result.scores, metadata=metadata)

    @graph_asset(
        name="gradient_entropy_scores",
        key_prefix=prefix,
        group_name=group,
        partitions_def=partitions_def,
        ins={"raw_dataset": AssetIn(key=key("raw_dataset"))},
        config=ConfigMapping(
            config_schema={"shards": ConfigField(int, default_value=shards, description="Scoring shards, each a separate step.")},
            config_fn=lambda config: {split_into_shards.name: {"config": {"shards": config["shards"]}}},
        ),
        kinds={"pytorch", "parquet"},
        description=(
            "GradSentry gradient spectral entropy of every row of one dataset version, scored in "
            "shards and thresholded on all rows together."
        ),
    )
    def gradient_entropy_scores(raw_dataset):
        shard_scores = split_into_shards(raw_dataset).map(score_shard).collect()
        return gather_scores(shard_scores, raw_dataset)

    @asset_check(
        asset=key("gradient_entropy_scores"),
        name="gradsentry_gate",
        blocking=True,
        # Partitioned like its asset, so it loads and judges only the run's version. Without
        # it, Dagster 1.13 loads every partition into the check and the IO manager raises.
        # NOTE: partitioned asset checks are a preview feature in Dagster 1.13 (PreviewWarning).
        partitions_def=partitions_def,
        additional_ins={"raw_dataset": AssetIn(key("raw_dataset"))},
        description=(
            "Great Expectations suite on one version's scores: fraction flagged at most the policy "
            "maximum, every scored row has a finite score in [0, 1], and every input row is scored "
            "or rejected. Blocking: when it fails, nothing downstream of the scores runs."
        ),
    )
    def gradsentry_gate(
        context: AssetCheckExecutionContext,
        gradient_entropy_scores: pd.DataFrame,
        raw_dataset: pd.DataFrame,
        policy: ScanPolicy,
    ) -> AssetCheckResult:
        return evaluate_gate(context, gradient_entropy_scores, raw_dataset, policy)

    @multi_asset(
        name=f"{key_prefix}_split_by_score",
        group_name=group,
        partitions_def=partitions_def,
        ins={
            "raw_dataset": AssetIn(key("raw_dataset")),
            "gradient_entropy_scores": AssetIn(key("gradient_entropy_scores")),
        },
        outs={
            "clean_dataset": AssetOut(
                key=key("clean_dataset"),
                io_manager_key="gradsentry_io_manager",
                description="Scored rows of this version below the threshold.",
                kinds={"pandas", "parquet"},
            ),
            "quarantined_samples": AssetOut(
                key=key("quarantined_samples"),
                io_manager_key="gradsentry_io_manager",
                description="Scored rows of this version above the threshold, with score and reason.",
                kinds={"pandas", "parquet"},
            ),
        },
    )
    def split_by_score(
        context: AssetExecutionContext, raw_dataset: pd.DataFrame, gradient_entropy_scores: pd.DataFrame
    ):
        yield from split_outputs(context, raw_dataset, gradient_entropy_scores)

    @asset(
        name="lora_finetuned_adapter",
        key_prefix=prefix,
        group_name=group,
        partitions_def=partitions_def,
        deps=[key("quarantined_samples")],
        ins={
            "clean_dataset": AssetIn(key("clean_dataset")),
            "gradient_entropy_scores": AssetIn(key("gradient_entropy_scores")),
            "raw_dataset": AssetIn(key("raw_dataset")),
        },
        kinds={"pytorch", "peft"},
        description=(
            "A LoRA adapter fine-tuned on one version's clean rows. Never runs when that version's "
            "gradsentry_gate check fails, and re-runs the gate on that version's scores itself."
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

    return VersionedScan(
        partitions_def=partitions_def,
        assets=[raw_dataset, gradient_entropy_scores, split_by_score, lora_finetuned_adapter],
        checks=[gradsentry_gate],
        group_name=group,
        key_prefix=prefix,
    )
