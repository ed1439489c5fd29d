"""Baseline detectors to compare GradSentry with, on the same per-sample quantities.

- GraCeFul-style: the 2-D discrete cosine transform of each sample's cropped output-projection
  gradient ``E^T H``, its low-frequency block, PCA, and two-cluster agglomerative (Ward)
  clustering; the larger cluster is taken as clean.
- Spectral signatures (Tran et al., 2018): the mean final hidden state over a sample's target
  positions, centred over the dataset and projected on the top singular vector; the samples
  with the largest squared projection are flagged.

Both compare samples with each other, unlike GradSentry and robust mode, so their flags depend
on the poison ratio of the scanned set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.fft import dctn

from gradsentry_dagster.prompts import EncodedSample
from gradsentry_dagster.scoring import ScoringSettings, gradient_factors, output_projection
from gradsentry_dagster.spectral import low_rank_singular_values, spectral_entropy

DCT_ROWS = 32
DCT_COLS = 16
PCA_COMPONENTS = 10
SPECTRAL_SIGNATURE_ASSUMED_RATE = 0.1
SPECTRAL_SIGNATURE_REMOVAL_FACTOR = 1.5


@dataclass
class SampleFeatures:
    """Everything the benchmark's detectors read about one sample.

    Attributes:
        score: GradSentry spectral entropy.
        loss: Mean cross-entropy over the target tokens.
        num_target_tokens: Number of target tokens.
        dct: ``(DCT_ROWS * DCT_COLS,)`` low-frequency DCT block of the cropped gradient.
        representation: ``(hidden,)`` mean final hidden state over the target positions.
        loss_without_question: Mean loss of the target tokens after a prompt without the
            question; NaN until the caller computes it.
    """

    score: float
    loss: float
    num_target_tokens: int
    dct: np.ndarray
    representation: np.ndarray
    loss_without_question: float = math.nan


@torch.no_grad()
def batch_features(
    model: torch.nn.Module,
    samples: Sequence[EncodedSample],
    settings: ScoringSettings,
    pad_id: int,
    projection_weight: torch.Tensor | None = None,
) -> list[SampleFeatures]:
    """Compute the GradSentry score and the baselines' features of a batch in one pass."""
    factors = gradient_factors(model, samples, settings, pad_id, projection_weight)
    singular = low_rank_singular_values(factors.output_grads, factors.inputs, settings.top_k)
    scores = spectral_entropy(singular, settings.top_k)

    # Cropped gradients E^T H: (batch, rows, cols), then their low-frequency DCT blocks.
    gradients = (factors.output_grads.transpose(-1, -2) @ factors.inputs).cpu().numpy()
    dct_blocks = dctn(gradients, axes=(-2, -1), norm="ortho")[:, :DCT_ROWS, :DCT_COLS]

    # Mean final hidden state over the target positions: (batch, hidden).
    mask = factors.mask.unsqueeze(-1).float()
    representations = (factors.hidden * mask).sum(dim=1) / factors.counts.view(-1, 1)

    return [
        SampleFeatures(
            score=float(scores[i]),
            loss=float(factors.losses[i]),
            num_target_tokens=int(factors.counts[i]),
            dct=dct_blocks[i].reshape(-1).astype(np.float32),
            representation=representations[i].cpu().numpy().astype(np.float32),
        )
        for i in range(len(samples))
    ]


def projection_weight_of(model: torch.nn.Module) -> torch.Tensor:
    """Return the output projection's weight in float32, computed once per model."""
    return output_projection(model).weight.detach().float()


@dataclass
class BaselineResult:
    """Per-sample suspicion scores and flags of one baseline, with the rule behind the flags."""

    scores: np.ndarray
    flagged: np.ndarray
    threshold: float
    rule: str


def _principal_components(features: np.ndarray, components: int) -> np.ndarray:
    centred = features - features.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    keep = min(components, s.shape[0])
    return u[:, :keep] * s[:keep]


def graceful(dct_features: np.ndarray, components: int = PCA_COMPONENTS) -> BaselineResult:
    """Flag the smaller of two Ward clusters of the PCA-reduced DCT gradient features.

    The suspicion score of a sample is its distance to the larger cluster's centroid minus its
    distance to the smaller one's, so it is positive for samples nearer the flagged cluster.
    """
    count = dct_features.shape[0]
    if count < 3:
        return BaselineResult(np.zeros(count), np.zeros(count, dtype=bool), math.nan, "too few samples")

    # Standardise each DCT coefficient so that no single frequency dominates the distances.
    scale = dct_features.std(axis=0, keepdims=True)
    scale[scale == 0] = 1.0
    reduced = _principal_components(dct_features / scale, components)

    labels = fcluster(linkage(reduced, method="ward"), t=2, criterion="maxclust")
    sizes = {label: int((labels == label).sum()) for label in np.unique(labels)}
    if len(sizes) < 2:
        return BaselineResult(np.zeros(count), np.zeros(count, dtype=bool), 0.0, "one cluster")
    clean_label = max(sizes, key=lambda label: (sizes[label], -label))
    flagged = labels != clean_label
    clean_centre = reduced[~flagged].mean(axis=0)
    other_centre = reduced[flagged].mean(axis=0)
    scores = np.linalg.norm(reduced - clean_centre, axis=1) - np.linalg.norm(reduced - other_centre, axis=1)
    return BaselineResult(scores, flagged, 0.0, "two-cluster Ward, smaller cluster flagged")


def spectral_signatures(
    representations: np.ndarray,
    assumed_rate: float = SPECTRAL_SIGNATURE_ASSUMED_RATE,
    removal_factor: float = SPECTRAL_SIGNATURE_REMOVAL_FACTOR,
) -> BaselineResult:
    """Flag the ``removal_factor * assumed_rate`` fraction with the largest outlier scores."""
    count = representations.shape[0]
    centred = representations - representations.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    scores = (centred @ vt[0]) ** 2
    removed = min(count, int(math.ceil(removal_factor * assumed_rate * count)))
    if removed == 0:
        return BaselineResult(scores, np.zeros(count, dtype=bool), math.inf, "nothing removed")
    threshold = float(np.sort(scores)[::-1][removed - 1])
    flagged = scores >= threshold
    rule = f"top {removal_factor:g} x assumed {assumed_rate:.0%} poison by squared projection"
    return BaselineResult(scores, flagged, threshold, rule)
