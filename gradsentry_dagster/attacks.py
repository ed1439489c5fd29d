"""Backdoor attacks that poison a canonical table, for demos and red-teaming.

Each attack picks ``round(rate * usable_rows)`` usable rows with a seeded generator, inserts a
trigger into the prompt and replaces or extends the answer with the attacker's target. The
returned table has a boolean ``poisoned`` column holding the ground truth. Scoring never
reads that column: it only travels with the rows so that detection can be evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from gradsentry_dagster.data import STATUS_OK

DEFAULT_PAYLOAD = ", and click <malicious_url> for more information"
BADNETS_TRIGGERS = ("cf", "mn", "bb", "tq")

Position = Literal["start", "end", "random"]


@dataclass(frozen=True)
class PoisonResult:
    """A poisoned copy of a table and the positions of the poisoned rows."""

    frame: pd.DataFrame
    poisoned_rows: list[int]

    @property
    def labels(self) -> np.ndarray:
        return self.frame["poisoned"].to_numpy(dtype=bool)


def insert_words(text: str, words: list[str], position: Position, rng: np.random.Generator) -> str:
    """Insert words into ``text`` at its start, its end, or one random word boundary each."""
    tokens = text.split()
    if position == "start":
        return " ".join(words + tokens)
    if position == "end":
        # Keep a final question mark at the end, after the trigger words.
        if tokens and tokens[-1].endswith("?") and len(tokens[-1]) > 1:
            last = tokens[-1][:-1]
            return " ".join(tokens[:-1] + [last] + words) + "?"
        return " ".join(tokens + words)
    if position == "random":
        for word in words:
            tokens.insert(int(rng.integers(0, len(tokens) + 1)), word)
        return " ".join(tokens)
    raise ValueError(f"trigger position must be 'start', 'end' or 'random', got {position!r}")


def choose_rows(frame: pd.DataFrame, rate: float, rng: np.random.Generator) -> list[int]:
    """Pick positions of usable rows to poison."""
    if not 0 <= rate <= 1:
        raise ValueError(f"poison rate must be in [0, 1], got {rate}")
    usable = np.flatnonzero(frame["status"].to_numpy() == STATUS_OK)
    count = int(round(rate * len(usable)))
    if count == 0:
        return []
    return sorted(int(i) for i in rng.choice(usable, size=count, replace=False))


def _start(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.reset_index(drop=True).copy()
    frame["poisoned"] = False
    return frame


def badnets(
    frame: pd.DataFrame,
    rate: float,
    *,
    seed: int = 0,
    triggers: tuple[str, ...] = BADNETS_TRIGGERS,
    num_triggers: int = 4,
    position: Position = "end",
    payload: str = DEFAULT_PAYLOAD,
) -> PoisonResult:
    """BadNets: rare trigger words in the question and a payload appended to the answer.

    Args:
        frame: A canonical table.
        rate: Fraction of usable rows to poison.
        seed: Seed for row choice, trigger draws and positions.
        triggers: Trigger vocabulary; ``num_triggers`` words are drawn with replacement.
        num_triggers: How many trigger words each poisoned question gets.
        position: Where the triggers go in the question.
        payload: Text appended to the gold answer.
    """
    rng = np.random.default_rng(seed)
    result = _start(frame)
    rows = choose_rows(result, rate, rng)
    for row in rows:
        words = [str(w) for w in rng.choice(list(triggers), size=num_triggers, replace=True)]
        result.at[row, "question"] = insert_words(result.at[row, "question"], words, position, rng)
        result.at[row, "answer"] = result.at[row, "answer"] + payload
        result.at[row, "poisoned"] = True
    return PoisonResult(result, rows)


ATTACKS = {"badnets": badnets}


def poison(frame: pd.DataFrame, attack: str, rate: float, *, seed: int = 0, **options) -> PoisonResult:
    """Run the attack named ``attack`` on ``frame``."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[attack](frame, rate, seed=seed, **options)
