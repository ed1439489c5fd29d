"""Spectral entropy of per-sample weight gradients, with no Dagster or model code.

For a linear layer ``y = W x`` the gradient of a sample's loss with respect to ``W`` is a sum
of one outer product per token, ``G = sum_t g_t x_t^T = E^T H``, where the rows of ``E`` are
the output gradients ``g_t`` and the rows of ``H`` are the inputs ``x_t``. For the output
projection, ``g_t`` is ``softmax(logits_t) - onehot(label_t)`` divided by the number of target
tokens. ``G`` has rank at most ``T`` (the number of target tokens), and its non-zero singular
values are the square roots of the eigenvalues of ``A^(1/2) B A^(1/2)`` with the small Gram
matrices ``A = E E^T`` and ``B = H H^T`` (both ``T x T``). Cropping ``G`` to a block of rows and
columns is the same as cropping the columns of ``E`` and ``H``, so the exact spectrum never
needs the full gradient.
"""

from __future__ import annotations

import math

import torch

DEFAULT_TOP_K = 16
DEFAULT_CROP_FRACTION = 1 / 8


def crop_size(size: int, fraction: float | None) -> int:
    """Return how many leading rows or columns a crop keeps (at least one)."""
    if fraction is None or fraction >= 1:
        return size
    if fraction <= 0:
        raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
    return max(1, int(size * fraction))


def spectral_entropy(singular_values: torch.Tensor, top_k: int = DEFAULT_TOP_K) -> torch.Tensor:
    """Return the normalised Shannon entropy of the top ``top_k`` singular values.

    Args:
        singular_values: ``(..., n)`` non-negative values, in any order.
        top_k: How many of the largest values to keep; missing values count as zero.

    Returns:
        ``(...)`` entropies in ``[0, 1]`` (divided by ``log(top_k)``). A zero spectrum gives 0.
    """
    if top_k < 2:
        raise ValueError(f"top_k must be at least 2, got {top_k}")
    values = singular_values.to(torch.float64).clamp_min(0)
    if values.shape[-1] < top_k:
        padding = values.new_zeros(*values.shape[:-1], top_k - values.shape[-1])
        values = torch.cat([values, padding], dim=-1)
    values = values.topk(top_k, dim=-1).values

    # Probabilities over the kept singular values, then -sum p log p with 0 log 0 = 0.
    total = values.sum(dim=-1, keepdim=True)
    probabilities = torch.where(total > 0, values / total.clamp_min(1e-300), 0.0)
    logs = torch.where(probabilities > 0, probabilities.log(), 0.0)
    entropy = -(probabilities * logs).sum(dim=-1)
    return entropy / math.log(top_k)


def low_rank_singular_values(
    output_grads: torch.Tensor, inputs: torch.Tensor, top_k: int = DEFAULT_TOP_K
) -> torch.Tensor:
    """Return the top singular values of ``E^T H`` for each sample, from Gram matrices.

    Args:
        output_grads: ``(batch, tokens, rows)`` the rows of ``E``; padded tokens are zero rows.
        inputs: ``(batch, tokens, cols)`` the rows of ``H``; padded tokens are zero rows.
        top_k: How many singular values to return per sample.

    Returns:
        ``(batch, top_k)`` singular values in descending order, in float64, zero-padded when
        a sample has fewer than ``top_k`` tokens.
    """
    # Gram matrices in float64: (batch, tokens, tokens).
    e = output_grads.to(torch.float64)
    h = inputs.to(torch.float64)
    gram_e = e @ e.transpose(-1, -2)
    gram_h = h @ h.transpose(-1, -2)

    # Symmetric square root of A through its eigendecomposition (A is positive semi-definite).
    eigenvalues, eigenvectors = torch.linalg.eigh(gram_e)
    root = eigenvectors * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)
    sqrt_e = root @ eigenvectors.transpose(-1, -2)

    # Eigenvalues of A^(1/2) B A^(1/2) are the squared singular values of E^T H.
    middle = sqrt_e @ gram_h @ sqrt_e
    middle = (middle + middle.transpose(-1, -2)) / 2
    squared = torch.linalg.eigvalsh(middle).clamp_min(0)
    singular = squared.sqrt().flip(-1)

    if singular.shape[-1] >= top_k:
        return singular[..., :top_k]
    padding = singular.new_zeros(*singular.shape[:-1], top_k - singular.shape[-1])
    return torch.cat([singular, padding], dim=-1)


def dense_singular_values(
    gradient: torch.Tensor, top_k: int = DEFAULT_TOP_K, estimator: str = "exact", seed: int = 0
) -> torch.Tensor:
    """Return the top singular values of one dense gradient block.

    Args:
        gradient: ``(rows, cols)`` the (cropped) gradient.
        top_k: How many singular values to return.
        estimator: ``"exact"`` for a full SVD in float64, or ``"randomized"`` for
            ``torch.svd_lowrank`` with ``q = top_k``, the estimator of the GradSentry
            reference code.
        seed: Seed of the randomized estimator's random projection.
    """
    if estimator == "exact":
        values = torch.linalg.svdvals(gradient.to(torch.float64))
    elif estimator == "randomized":
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            q = min(top_k, *gradient.shape)
            _, values, _ = torch.svd_lowrank(gradient.to(torch.float32), q=q)
        finally:
            torch.random.set_rng_state(generator_state)
        values = values.to(torch.float64)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; expected 'exact' or 'randomized'")
    values = values.sort(descending=True).values[:top_k]
    if values.shape[0] < top_k:
        values = torch.cat([values, values.new_zeros(top_k - values.shape[0])])
    return values
