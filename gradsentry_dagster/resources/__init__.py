"""Dagster resources: the scoring model, the scan policy and the Parquet IO manager."""

from gradsentry_dagster.resources.io import ParquetIOManager, default_storage_dir
from gradsentry_dagster.resources.model import GradSentryModelResource
from gradsentry_dagster.resources.policy import ScanPolicy

__all__ = ["GradSentryModelResource", "ParquetIOManager", "ScanPolicy", "default_storage_dir"]
