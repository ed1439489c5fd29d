"""An IO manager that stores DataFrame assets as Parquet files through pyarrow."""


import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from dagster import ConfigurableIOManager, InputContext, OutputContext
from pydantic import Field

from gradsentry_dagster.data import write_parquet


def default_storage_dir() -> str:
    """Return ``$GRADSENTRY_STORAGE``, else ``$DAGSTER_HOME/gradsentry``, else ``./gradsentry_storage``."""
    if os.environ.get("GRADSENTRY_STORAGE"):
        return os.environ["GRADSENTRY_STORAGE"]
    if os.environ.get("DAGSTER_HOME"):
        return str(Path(os.environ["DAGSTER_HOME"]) / "gradsentry")
    return str(Path.cwd() / "gradsentry_storage")


class ParquetIOManager(ConfigurableIOManager):
    """Stores each DataFrame asset as ``<base_dir>/<asset key>[/<partition>].parquet``."""

    base_dir: str = Field(
        default_factory=default_storage_dir,
        description="Folder for asset files (Parquet tables, adapters, plots and Data Docs).",
    )

    def _path(self, context: OutputContext | InputContext) -> Path:
        parts = list(context.asset_key.path)
        if context.has_asset_partitions:
            keys = context.asset_partition_keys
            if len(keys) != 1:
                raise ValueError(f"expected one partition, got {len(keys)}: {keys[:5]}")
            return Path(self.base_dir, *parts, f"{keys[0]}.parquet")
        return Path(self.base_dir, *parts[:-1], f"{parts[-1]}.parquet")

    def handle_output(self, context: OutputContext, obj: pd.DataFrame) -> None:
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(
                f"ParquetIOManager stores pandas DataFrames, got {type(obj).__name__} "
                f"for asset {context.asset_key.to_user_string()}"
            )
        path = write_parquet(obj, self._path(context))
        context.add_output_metadata({"path": str(path), "rows": len(obj)})

    def load_input(self, context: InputContext) -> pd.DataFrame:
        path = self._path(context)
        if not path.is_file():
            raise FileNotFoundError(
                f"no stored table for asset {context.asset_key.to_user_string()} at {path}; "
                "materialize the upstream asset first"
            )
        return pq.read_table(path).to_pandas()
