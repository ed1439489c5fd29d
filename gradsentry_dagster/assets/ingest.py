"""The ``raw_dataset`` asset: a dataset file, or the embedded demo set, as a canonical table."""


from typing import Optional

import pandas as pd
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field

from gradsentry_dagster.data import STATUS_REJECTED, read_dataset
from gradsentry_dagster.demo_data import DEMO_LICENSE, demo_dataset


class DatasetSourceConfig(Config):
    """Source of ``raw_dataset``: a dataset file, or the embedded demo set when ``path`` is empty."""

    path: str = Field(
        default="",
        description=(
            "Dataset file (.jsonl, .json, .parquet or .csv). Empty: the embedded FanOutQA demo "
            "set, poisoned as the demo_* fields say."
        ),
    )
    file_format: Optional[str] = Field(
        default=None, description="File format; from the file suffix when unset."
    )
    preset: str = Field(
        default="generic", description="Named column mapping for known datasets."
    )
    field_mapping: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Source column for each canonical field, overriding the preset: keys question, "
            "answer, row_id, instruction, context."
        ),
    )
    limit: Optional[int] = Field(default=None, ge=1, description="Read only the first N records.")
    demo_rows: int = Field(default=400, ge=1, description="Rows of the demo set.")
    demo_poison_rate: float = Field(
        default=0.2, ge=0, le=1, description="Fraction of demo rows poisoned with demo_attack."
    )
    demo_attack: str = Field(default="badnets", description="Attack used on the demo set.")
    seed: int = Field(default=0, description="Seed of the demo set's row order and poisoning.")


def load_source(config: DatasetSourceConfig) -> pd.DataFrame:
    """Read the table that ``config`` names."""
    if not config.path:
        return demo_dataset(
            n_rows=config.demo_rows,
            poison_rate=config.demo_poison_rate,
            attack=config.demo_attack,
            seed=config.seed,
        )
    return read_dataset(
        config.path,
        file_format=config.file_format,
        preset=config.preset,
        mapping=config.field_mapping or None,
        limit=config.limit,
    )


@asset(
    group_name="gradsentry",
    io_manager_key="gradsentry_io_manager",
    kinds={"pandas", "parquet"},
    description="The fine-tuning dataset as one canonical table (id, prompt parts, answer, status).",
)
def raw_dataset(context: AssetExecutionContext, config: DatasetSourceConfig) -> Output[pd.DataFrame]:
    frame = load_source(config)
    source = config.path or f"embedded demo set ({DEMO_LICENSE})"
    return dataset_output(context, frame, source)


def dataset_output(context: AssetExecutionContext, frame: pd.DataFrame, source: str) -> Output[pd.DataFrame]:
    """Log the row counts of a freshly read table and wrap it with its metadata."""
    rejected = int((frame["status"] == STATUS_REJECTED).sum())
    context.log.info(
        f"read {len(frame)} rows from {source}: {len(frame) - rejected} usable, {rejected} rejected"
    )
    metadata = {
        "source": source,
        "rows": len(frame),
        "rejected_rows": rejected,
    }
    if "poisoned" in frame.columns:
        metadata["ground_truth_poisoned"] = int(frame["poisoned"].astype(bool).sum())
    if rejected:
        reasons = frame.loc[frame["status"] == STATUS_REJECTED, "reject_reason"].value_counts().head(10)
        metadata["reject_reasons"] = MetadataValue.json(
            {str(reason): int(count) for reason, count in reasons.items()}
        )
    return Output(frame, metadata=metadata)
