"""The ``clean_dataset`` and ``quarantined_samples`` assets."""


import pandas as pd
from dagster import AssetExecutionContext, AssetOut, Output, multi_asset

from gradsentry_dagster.scan import split_dataset


@multi_asset(
    group_name="gradsentry",
    outs={
        "clean_dataset": AssetOut(
            io_manager_key="gradsentry_io_manager",
            description="Scored rows below the threshold: the data fine-tuning may use.",
            kinds={"pandas", "parquet"},
        ),
        "quarantined_samples": AssetOut(
            io_manager_key="gradsentry_io_manager",
            description="Scored rows above the threshold, with their score and reason.",
            kinds={"pandas", "parquet"},
        ),
    },
)
def split_by_score(
    context: AssetExecutionContext, raw_dataset: pd.DataFrame, gradient_entropy_scores: pd.DataFrame
):
    yield from split_outputs(context, raw_dataset, gradient_entropy_scores)


def split_outputs(
    context: AssetExecutionContext, raw_dataset: pd.DataFrame, gradient_entropy_scores: pd.DataFrame
):
    """Yield the ``clean_dataset`` and ``quarantined_samples`` outputs of one scan."""
    clean, quarantined = split_dataset(raw_dataset, gradient_entropy_scores)
    rejected = len(raw_dataset) - len(clean) - len(quarantined)
    context.log.info(
        f"{len(clean)} clean rows, {len(quarantined)} quarantined, "
        f"{rejected} rejected at ingestion or tokenization (listed in the scores table)"
    )
    yield Output(clean, output_name="clean_dataset", metadata={"rows": len(clean)})
    yield Output(
        quarantined,
        output_name="quarantined_samples",
        metadata={"rows": len(quarantined), "rejected_rows_not_included": rejected},
    )
