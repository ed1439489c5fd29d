"""Probe per-token question-gain features before building them into robust mode.

    python benchmarks/feature_probe.py --data-dir ../shared/data --rows 150

For each data set, the first ``--rows`` usable rows are scored clean and with half of them
attacked (BadNets, style and the short replaced target). For every row the loss of each target
token is taken twice, after the full prompt and after the prompt without the question, and
their difference (the question's gain per token) is summarised in several ways. The script
prints, per feature and attack, the AUROC and the recall at the clean rows' 98% quantile. The
robust mode's ``question_gain`` is the sum; docs/benchmarks.md quotes one run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gradsentry_dagster.attacks import poison
from gradsentry_dagster.data import read_dataset
from gradsentry_dagster.metrics import auroc
from gradsentry_dagster.prompts import render_prompt

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "webquestions": ("webquestions/trainmodel.json", "webquestions"),
    "nq_open": ("nq_open/NQ-open.dev.jsonl", "nq_open"),
}
ATTACKS = ("badnets", "style", "short_target")


def _window_minimum(gains: np.ndarray, width: int) -> float:
    if len(gains) <= width:
        return float(gains.mean())
    return float(np.convolve(gains, np.ones(width) / width, mode="valid").min())


# Each feature maps the per-token gains of one answer (end-of-sequence last) to a suspicion
# value: larger is more suspicious.
FEATURES = {
    "sum": lambda g: -g.sum(),
    "mean": lambda g: -g.mean(),
    "mean without end-of-sequence": lambda g: -g[:-1].mean() if len(g) > 1 else -g.mean(),
    "minimum window of 5": lambda g: -_window_minimum(g, 5),
    "mean of the second half": lambda g: -g[len(g) // 2 :].mean(),
    "end-of-sequence": lambda g: -g[-1],
}


@torch.no_grad()
def token_losses(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 16) -> list[np.ndarray]:
    """Return the loss of every target token (answer, then end-of-sequence) after each prompt."""
    results = []
    for start in range(0, len(prompts), batch_size):
        sequences, starts = [], []
        for prompt, answer in zip(prompts[start : start + batch_size], answers[start : start + batch_size]):
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            target_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            sequences.append(prompt_ids + target_ids)
            starts.append(len(prompt_ids))
        length = max(map(len, sequences))
        ids = torch.full((len(sequences), length), tokenizer.eos_token_id)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        log_probs = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1].log_softmax(-1)
        losses = -log_probs.gather(-1, ids[:, 1:, None])[..., 0]
        for row, sequence in enumerate(sequences):
            results.append(losses[row, starts[row] - 1 : len(sequence) - 1].numpy())
    return results


def probe(model, tokenizer, frame: pd.DataFrame, attack: str) -> pd.DataFrame:
    """Return each row's label and feature values for one attacked (or clean) table."""
    if attack == "clean":
        table, labels = frame, np.zeros(len(frame), dtype=bool)
    else:
        result = poison(frame, attack, 0.5, seed=1)
        table, labels = result.frame, result.labels
    rows = list(table.itertuples(index=False))
    answers = [row.answer for row in rows]
    full = token_losses(model, tokenizer, [render_prompt(r.instruction, r.context, r.question) for r in rows], answers)
    blank = token_losses(model, tokenizer, [render_prompt(r.instruction, "", "") for r in rows], answers)
    records = []
    for label, with_question, without_question in zip(labels, full, blank):
        gains = without_question - with_question
        records.append({"poisoned": bool(label), **{name: f(gains) for name, f in FEATURES.items()}})
    return pd.DataFrame(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("GRADSENTRY_SHARED_DATA") or (ROOT.parent / "shared" / "data"),
        help="Folder with webquestions/ and nq_open/ (default: $GRADSENTRY_SHARED_DATA or ../shared/data).",
    )
    parser.add_argument("--rows", type=int, default=150, help="Rows per data set.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gradsentry_dagster.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(device="cpu"))
    for name, (path, preset) in FILES.items():
        frame = read_dataset(Path(args.data_dir) / path, preset=preset, limit=args.rows)
        frame = frame[frame["status"] == "ok"].reset_index(drop=True)
        clean = probe(loaded.model, loaded.tokenizer, frame, "clean")
        attacked = {attack: probe(loaded.model, loaded.tokenizer, frame, attack) for attack in ATTACKS}
        print(f"\n{name}, {len(frame)} rows: AUROC / recall at the clean 98% quantile")
        print(f"{'feature':32s}" + "".join(f"{attack:>16s}" for attack in ATTACKS))
        for feature in FEATURES:
            threshold = np.quantile(clean[feature], 0.98)
            cells = []
            for attack in ATTACKS:
                table = attacked[attack]
                recall = (table.loc[table["poisoned"], feature] > threshold).mean()
                cells.append(f"{auroc(table['poisoned'], table[feature]):.2f} / {recall:.2f}")
            print(f"{feature:32s}" + "".join(f"{cell:>16s}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
