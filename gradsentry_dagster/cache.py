"""A Parquet cache of scores, for incremental rescans and resumable scans.

A cached score is keyed by three things that together decide it:

- the row's content hash (instruction, context, question and answer), so a row keeps its cached
  score when other rows are added, removed or reordered, or when its id changes;
- the model fingerprint (``LoadedModel.fingerprint``: the weight files and any adapter);
- ``ScoringSettings.fingerprint()`` (crop, ``top_k``, prompt format, token budget).

Each model and settings pair has its own folder, ``model=<fingerprint>/settings=<fingerprint>``,
of Parquet part files. New scores are written as a new part file every ``flush_rows`` rows, with
a rename so that a reader never sees half a file. A scan that is killed keeps every part it
finished, and the same scan started again scores only the rows that have no cached score.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gradsentry_dagster.data import content_hash

logger = logging.getLogger(__name__)

CACHE_SCHEMA = pa.schema(
    [
        ("content_hash", pa.string()),
        ("status", pa.string()),
        ("score", pa.float64()),
        ("num_target_tokens", pa.int64()),
        ("loss", pa.float64()),
        ("loss_without_question", pa.float64()),
        ("reason", pa.string()),
    ]
)
# The per-row result columns that a cached entry restores.
RESULT_COLUMNS = CACHE_SCHEMA.names[1:]


def row_content_hashes(frame: pd.DataFrame) -> list[str]:
    """Return the content hash of each canonical row: instruction, context, question, answer."""
    columns = [frame[name].astype(str).tolist() for name in ("instruction", "context", "question", "answer")]
    return [content_hash(*parts) for parts in zip(*columns)]


class ScoreCache:
    """Scores already computed for one model, stored as Parquet part files in a folder.

    Args:
        directory: The cache folder, for example beside the scores table.
        model_fingerprint: ``LoadedModel.fingerprint`` of the model that scores; a different
            model or adapter gets a different fingerprint and so never reads these scores.
        flush_rows: New scores are written to disk once this many are pending. Smaller values
            lose less work to a killed scan and write more files.

    Attributes:
        hits: Rows served from the cache since this object was made.
        misses: Rows looked up and not found since this object was made.
    """

    def __init__(self, directory: str | Path, model_fingerprint: str, flush_rows: int = 1024) -> None:
        if not model_fingerprint:
            raise ValueError("model_fingerprint is empty; pass LoadedModel.fingerprint")
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be at least 1, got {flush_rows}")
        self.directory = Path(directory)
        self.model_fingerprint = model_fingerprint
        self.flush_rows = flush_rows
        self.hits = 0
        self.misses = 0
        self._loaded: dict[str, pd.DataFrame] = {}
        self._pending: dict[str, list[dict]] = {}
        self._parts_written = 0

    def partition(self, settings_fingerprint: str) -> Path:
        """Return the folder of this model's scores under the given settings."""
        return self.directory / f"model={self.model_fingerprint}" / f"settings={settings_fingerprint}"

    def _entries(self, settings_fingerprint: str) -> pd.DataFrame:
        """Return the stored entries of one partition, indexed by content hash."""
        if settings_fingerprint in self._loaded:
            return self._loaded[settings_fingerprint]
        folder = self.partition(settings_fingerprint)
        tables = []
        for part in sorted(folder.glob("part-*.parquet")):
            try:
                tables.append(pq.read_table(part, schema=CACHE_SCHEMA))
            except (pa.ArrowInvalid, OSError) as error:
                # A damaged part only costs a rescore of its rows.
                logger.warning("ignoring unreadable score cache part %s: %s", part, error)
        table = pa.concat_tables(tables) if tables else CACHE_SCHEMA.empty_table()
        entries = table.to_pandas().drop_duplicates("content_hash", keep="last")
        entries = entries.set_index("content_hash")
        self._loaded[settings_fingerprint] = entries
        logger.info("score cache %s holds %d rows", folder, len(entries))
        return entries

    def lookup(self, hashes: Sequence[str], settings_fingerprint: str) -> pd.DataFrame:
        """Return the cached results of the given content hashes that are present.

        Returns:
            A table indexed by content hash with the columns ``RESULT_COLUMNS``, holding only
            the hashes found; a hash repeated in ``hashes`` appears once.
        """
        entries = self._entries(settings_fingerprint)
        requested = pd.Index(hashes)
        found_mask = requested.isin(entries.index)
        self.hits += int(found_mask.sum())
        self.misses += int((~found_mask).sum())
        found = requested[found_mask].unique()
        return entries.loc[found, RESULT_COLUMNS]

    def add(self, settings_fingerprint: str, records: Iterable[dict]) -> None:
        """Queue new results (``content_hash`` plus ``RESULT_COLUMNS``); flush when enough."""
        pending = self._pending.setdefault(settings_fingerprint, [])
        pending.extend(records)
        if len(pending) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write every queued result to a new part file of its partition."""
        for settings_fingerprint, pending in self._pending.items():
            if not pending:
                continue
            table = pa.Table.from_pylist(pending, schema=CACHE_SCHEMA)
            self._write_part(self.partition(settings_fingerprint), table)

            entries = self._entries(settings_fingerprint)
            added = table.to_pandas().set_index("content_hash")
            merged = pd.concat([entries, added])
            self._loaded[settings_fingerprint] = merged[~merged.index.duplicated(keep="last")]
            pending.clear()

    def _write_part(self, folder: Path, table: pa.Table) -> None:
        """Write one part file under a temporary name, then rename it into place."""
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{os.getpid()}-{self._parts_written:06d}-{os.urandom(4).hex()}.parquet"
        staging = folder / f".{name}.tmp"
        pq.write_table(table, staging)
        os.replace(staging, folder / name)
        self._parts_written += 1

    def compact(self, settings_fingerprint: str) -> None:
        """Merge a partition's part files into one, to keep the file count low."""
        self.flush()
        folder = self.partition(settings_fingerprint)
        old_parts = sorted(folder.glob("part-*.parquet"))
        if len(old_parts) < 2:
            return
        entries = self._entries(settings_fingerprint).reset_index()
        self._write_part(folder, pa.Table.from_pandas(entries, schema=CACHE_SCHEMA, preserve_index=False))
        for part in old_parts:
            part.unlink()

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *_exc_info) -> None:
        self.flush()
