"""Fixtures of the reliability tests: the bad-input corpus and a real Dagster instance."""

from __future__ import annotations

import pytest
from dagster import DagsterInstance

from tests.reliability.corpus import write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """The bad-input corpus, written once per test session."""
    return write_corpus(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture
def instance(tmp_path, monkeypatch):
    """A real Dagster instance in a temporary DAGSTER_HOME, with storage beside it."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("GRADSENTRY_STORAGE", str(tmp_path / "storage"))
    with DagsterInstance.get() as dagster_instance:
        yield dagster_instance
