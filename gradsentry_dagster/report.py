"""Summaries and plots of a scores table, shared by the Dagster UI metadata and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gradsentry_dagster.scoring import STATUS_SCORED


def summarize_scores(scores: pd.DataFrame) -> dict:
    """Return counts and score statistics of a scores table."""
    scored = scores[scores["status"] == STATUS_SCORED]
    values = scored["score"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    flagged = int(scored["flagged"].sum())
    return {
        "rows": int(len(scores)),
        "scored": int(len(scored)),
        "rejected": int(len(scores) - len(scored)),
        "flagged": flagged,
        "flagged_fraction": flagged / len(scored) if len(scored) else float("nan"),
        "threshold": float(scores["threshold"].iloc[0]) if len(scores) else float("nan"),
        "threshold_rule": str(scores["threshold_rule"].iloc[0]) if len(scores) else "",
        "score_mean": float(finite.mean()) if finite.size else float("nan"),
        "score_median": float(np.median(finite)) if finite.size else float("nan"),
    }


def top_suspicious(
    scores: pd.DataFrame, frame: pd.DataFrame | None = None, limit: int = 10, preview_chars: int = 60
) -> pd.DataFrame:
    """Return the flagged rows, then the highest-scoring ones, with previews when ``frame`` is given.

    Flagged rows come first because robust mode also flags rows with a low entropy, such as
    short replaced answers. Within each group, rows are sorted by score.
    """
    scored = scores[scores["status"] == STATUS_SCORED]
    if "flagged" in scored.columns:
        top = scored.sort_values(["flagged", "score"], ascending=[False, False]).head(limit)
    else:
        top = scored.sort_values("score", ascending=False).head(limit)
    columns = ["row_id", "score", "num_target_tokens", "flagged"]
    result = top[columns].reset_index(drop=True)
    if frame is not None:
        lookup = frame.set_index("row_id")
        result["question"] = [
            _truncate(str(lookup.at[row_id, "question"]), preview_chars) for row_id in result["row_id"]
        ]
        result["answer"] = [
            _truncate(str(lookup.at[row_id, "answer"]), preview_chars) for row_id in result["row_id"]
        ]
    return result


def markdown_table(frame: pd.DataFrame) -> str:
    """Return a GitHub-style markdown table of ``frame``, with '|' in cells escaped."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_histogram(
    scores: pd.DataFrame, path: str | Path, labels: np.ndarray | None = None, title: str = ""
) -> Path:
    """Write a PNG histogram of the scores with the threshold marked.

    With ``labels`` (ground truth, True for poisoned) the clean and poisoned rows are drawn
    as two stacked colours.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = (scores["status"] == STATUS_SCORED).to_numpy()
    values = scores["score"].to_numpy(dtype=float)
    keep = scored & np.isfinite(values)
    bins = np.linspace(0, 1, 41)
    figure, axis = plt.subplots(figsize=(7, 3.6), dpi=110)
    if labels is not None:
        labels = np.asarray(labels, dtype=bool)
        axis.hist(
            [values[keep & ~labels], values[keep & labels]],
            bins=bins,
            stacked=True,
            label=["clean (ground truth)", "poisoned (ground truth)"],
            color=["#4c72b0", "#dd8452"],
        )
    else:
        axis.hist(values[keep], bins=bins, color="#4c72b0", label="scored rows")
    if len(scores):
        threshold = float(scores["threshold"].iloc[0])
        rule = str(scores["threshold_rule"].iloc[0])
        axis.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.3f} ({rule})")
    axis.set_xlabel("gradient spectral entropy score")
    axis.set_ylabel("rows")
    axis.set_xlim(0, 1)
    axis.set_title(title or f"{int(keep.sum())} scored rows, {int(scores['flagged'].sum())} flagged")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
