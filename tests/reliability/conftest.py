"""Fixtures of the reliability tests: the bad-input corpus."""

from __future__ import annotations

import pytest

from tests.reliability.corpus import write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """The bad-input corpus, written once per test session."""
    return write_corpus(tmp_path_factory.mktemp("bad-input"))
