"""Dataset versions: one key per file content, so each version is scanned and gated on its own.

A version key is ``<file name>@<first 12 hex digits of the SHA-256 of its bytes>``, for example
``train.jsonl@3fa2b1c4d5e6``. Editing a file gives it a new key; the old key keeps naming the
old content, and a lookup by an old key fails once that content is gone.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DIGEST_CHARS = 12
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class DatasetVersion:
    """One dataset file at one content: its path, its version key and its file stamp."""

    path: str
    key: str
    mtime_ns: int
    size: int


def file_digest(path: str | Path) -> str:
    """Return the SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_name(path: str | Path) -> str:
    """Return the file name part of a version key, with characters outside ``[A-Za-z0-9._-]`` as '_'."""
    return _UNSAFE_NAME_CHARS.sub("_", Path(path).name)


def version_key(path: str | Path) -> str:
    """Return the version key of a file's current content."""
    return f"{version_name(path)}@{file_digest(path)[:DIGEST_CHARS]}"


def matching_files(dataset_glob: str) -> list[str]:
    """Return the regular files that ``dataset_glob`` matches (``**`` recurses), sorted."""
    pattern = os.path.expanduser(dataset_glob)
    return sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))


def current_versions(
    dataset_glob: str, known: dict[str, DatasetVersion] | None = None
) -> list[DatasetVersion]:
    """Return the version of every file the glob matches.

    Args:
        dataset_glob: Files to watch, such as ``/data/incoming/*.jsonl``.
        known: Versions from an earlier call, by path. A file whose modification time and size
            are unchanged keeps its earlier key without being hashed again.
    """
    known = known or {}
    versions = []
    for path in matching_files(dataset_glob):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            # Removed between the glob and the stat; the next call no longer lists it.
            continue
        previous = known.get(path)
        if previous and (previous.mtime_ns, previous.size) == (stat.st_mtime_ns, stat.st_size):
            versions.append(previous)
            continue
        versions.append(DatasetVersion(path, version_key(path), stat.st_mtime_ns, stat.st_size))
    return versions


def find_version(dataset_glob: str, key: str) -> str:
    """Return the path of a file the glob matches whose current content has version ``key``.

    Raises:
        LookupError: No matching file has that content any more.
    """
    name, _, digest = key.rpartition("@")
    if not name or len(digest) != DIGEST_CHARS:
        raise LookupError(
            f"invalid dataset version key {key!r}: expected '<file name>@<{DIGEST_CHARS} hex digits>'"
        )
    candidates = [path for path in matching_files(dataset_glob) if version_name(path) == name]
    for path in candidates:
        if file_digest(path)[:DIGEST_CHARS] == digest:
            return path
    raise LookupError(
        f"dataset version {key!r} not found under {dataset_glob!r}: "
        f"{len(candidates)} file(s) named {name!r} exist but none has that content any more. "
        "Scan the file's current version (the dataset version sensor registers it)."
    )
