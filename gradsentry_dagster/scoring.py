"""GradSentry scores: spectral entropy of each sample's output-projection gradient.

Two paths compute the same score:

- ``reference``: one sample at a time, autograd gives the gradient of the sample's loss with
  respect to the output projection weight (``vocab x hidden``), which is cropped to its top-left
  block before its singular values are taken, as the GradSentry reference code does.
- ``exact``: one forward pass per padded batch and no backward pass. The cropped gradient is
  ``E^T H`` with ``E`` the cropped ``softmax - onehot`` rows and ``H`` the cropped final hidden
  states at the target positions, so its spectrum comes from ``tokens x tokens`` Gram matrices
  (see :mod:`gradsentry_dagster.spectral`).

The weight used is always the output projection's own, so models whose input and output
embeddings are tied (SmolLM2, small Qwen2.5, Gemma) are scored correctly: the gradient that
flows into the shared embedding matrix through the input side is never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F

from gradsentry_dagster.data import STATUS_OK
from gradsentry_dagster.prompts import EncodedSample, SampleTooLongError, encode_sample
from gradsentry_dagster.spectral import (
    DEFAULT_CROP_FRACTION,
    DEFAULT_TOP_K,
    crop_size,
    dense_singular_values,
    low_rank_singular_values,
    spectral_entropy,
)

logger = logging.getLogger(__name__)

STATUS_SCORED = "scored"
STATUS_REJECTED = "rejected"
SCORE_COLUMNS = ["row_id", "status", "score", "num_target_tokens", "loss", "reason"]


@dataclass(frozen=True)
class ScoringSettings:
    """Settings that decide a sample's score; they are part of every cache key.

    Attributes:
        method: ``"exact"`` (batched, no backward pass) or ``"reference"`` (per-sample autograd).
        estimator: Singular value estimator of the reference path: ``"exact"`` or
            ``"randomized"`` (``torch.svd_lowrank`` with ``q = top_k``, as the paper's code).
        top_k: Number of singular values in the entropy; the score is divided by ``log(top_k)``.
        row_crop: Fraction of the output projection's rows (vocabulary) kept, from row 0.
        col_crop: Fraction of the output projection's columns (hidden size) kept, from column 0.
        prompt_format: ``"qa"`` for the QA templates, ``"chat"`` for the tokenizer's chat template.
        max_tokens: Longest token sequence scored; longer prompts lose tokens from the left.
        batch_size: Samples per forward pass on the exact path.
    """

    method: Literal["exact", "reference"] = "exact"
    estimator: Literal["exact", "randomized"] = "exact"
    top_k: int = DEFAULT_TOP_K
    row_crop: float | None = DEFAULT_CROP_FRACTION
    col_crop: float | None = DEFAULT_CROP_FRACTION
    prompt_format: Literal["qa", "chat"] = "qa"
    max_tokens: int = 512
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method not in ("exact", "reference"):
            raise ValueError(f"method must be 'exact' or 'reference', got {self.method!r}")
        if self.estimator not in ("exact", "randomized"):
            raise ValueError(f"estimator must be 'exact' or 'randomized', got {self.estimator!r}")
        if self.method == "exact" and self.estimator != "exact":
            raise ValueError("the randomized estimator exists only on the reference path")
        if self.top_k < 2:
            raise ValueError(f"top_k must be at least 2, got {self.top_k}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def fingerprint(self) -> str:
        """Return a hash of the settings that change scores (not the batch size or path)."""
        relevant = asdict(self)
        relevant.pop("batch_size")
        relevant.pop("method")
        if self.method == "exact":
            relevant["estimator"] = "exact"
        blob = json.dumps(relevant, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class SampleScore:
    """Score of one sample with the quantities behind it."""

    score: float
    num_target_tokens: int
    loss: float


def output_projection(model: torch.nn.Module) -> torch.nn.Module:
    """Return the module that maps final hidden states to vocabulary logits."""
    module = model.get_output_embeddings()
    if module is None or not hasattr(module, "weight"):
        raise ValueError(
            f"{type(model).__name__} has no output projection (get_output_embeddings() "
            "returned None); GradSentry needs a causal language model with a language-model head"
        )
    return module


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    if get_decoder is None:
        return None
    try:
        return get_decoder()
    except (AttributeError, NotImplementedError):
        return None


def final_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Return the hidden states that enter the output projection, ``(batch, seq, hidden)``.

    Uses the model's decoder stack where it has one, so that no vocabulary-sized logits are
    computed; otherwise captures the output projection's input during a full forward pass.
    """
    decoder = _decoder(model)
    if decoder is not None:
        outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return outputs[0]

    captured: list[torch.Tensor] = []
    handle = output_projection(model).register_forward_pre_hook(
        lambda _module, args: captured.append(args[0])
    )
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def _pad_batch(
    samples: Sequence[EncodedSample], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch: ``(batch, seq)`` input ids and attention mask."""
    length = max(len(sample.input_ids) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for index, sample in enumerate(samples):
        input_ids[index, : len(sample.input_ids)] = torch.tensor(sample.input_ids)
        attention_mask[index, : len(sample.input_ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _target_positions(samples: Sequence[EncodedSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors for the target tokens of a right-padded batch.

    Returns ``(hidden_positions, labels, mask)``, each ``(batch, max_targets)``: the position
    whose hidden state predicts each target token, that token's id, and 1 for real targets.
    """
    width = max(sample.num_target_tokens for sample in samples)
    positions = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.zeros((len(samples), width), dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for index, sample in enumerate(samples):
        count = sample.num_target_tokens
        start = sample.target_start
        positions[index, :count] = torch.arange(start - 1, start - 1 + count)
        labels[index, :count] = torch.tensor(sample.input_ids[start:])
        mask[index, :count] = True
    return positions, labels, mask


@dataclass
class GradientFactors:
    """The two factors of a batch's cropped output-projection gradients, ``G = E^T H``.

    Attributes:
        output_grads: ``(batch, targets, rows)`` cropped ``(softmax - onehot) / T`` rows of ``E``.
        inputs: ``(batch, targets, cols)`` cropped final hidden states, the rows of ``H``.
        hidden: ``(batch, targets, hidden)`` uncropped final hidden states at target positions.
        mask: ``(batch, targets)`` True at real target tokens; padded rows of the factors are 0.
        losses: ``(batch,)`` mean cross-entropy over each sample's target tokens.
        counts: ``(batch,)`` number of target tokens.
    """

    output_grads: torch.Tensor
    inputs: torch.Tensor
    hidden: torch.Tensor
    mask: torch.Tensor
    losses: torch.Tensor
    counts: torch.Tensor


@torch.no_grad()
def gradient_factors(
    model: torch.nn.Module,
    samples: Sequence[EncodedSample],
    settings: ScoringSettings,
    pad_id: int,
    projection_weight: torch.Tensor | None = None,
) -> GradientFactors:
    """Compute the factors of each sample's cropped output-projection gradient in one pass."""
    head = output_projection(model)
    device = head.weight.device
    weight = projection_weight if projection_weight is not None else head.weight.float()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    vocab, hidden_size = weight.shape
    rows = crop_size(vocab, settings.row_crop)
    cols = crop_size(hidden_size, settings.col_crop)

    # Final hidden states of the whole batch: (batch, seq, hidden).
    input_ids, attention_mask = _pad_batch(samples, pad_id, device)
    hidden = final_hidden_states(model, input_ids, attention_mask)

    # Hidden states at the positions that predict target tokens: (batch, targets, hidden).
    positions, labels, mask = (t.to(device) for t in _target_positions(samples))
    gathered = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    gathered = gathered.float() * mask.unsqueeze(-1)

    # Logits and probabilities at target positions only, in float32: (batch, targets, vocab).
    logits = F.linear(gathered, weight, bias)
    log_probs = logits.log_softmax(dim=-1)
    counts = mask.sum(dim=1).clamp_min(1)
    token_loss = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
    losses = token_loss.sum(dim=1) / counts

    # Output gradient of the mean loss: (softmax - onehot) / T, cropped to (batch, targets, rows).
    output_grads = log_probs[..., :rows].exp()
    in_crop = (labels < rows) & mask
    output_grads.scatter_add_(
        -1, labels.clamp_max(rows - 1).unsqueeze(-1), -in_crop.unsqueeze(-1).float()
    )
    output_grads = output_grads * (mask.unsqueeze(-1) / counts.view(-1, 1, 1))
    return GradientFactors(output_grads, gathered[..., :cols], gathered, mask, losses, counts)


@torch.no_grad()
def score_batch_exact(
    model: torch.nn.Module,
    samples: Sequence[EncodedSample],
    settings: ScoringSettings,
    pad_id: int,
    projection_weight: torch.Tensor | None = None,
) -> list[SampleScore]:
    """Score a batch with one forward pass and the Gram-matrix spectrum."""
    factors = gradient_factors(model, samples, settings, pad_id, projection_weight)

    # Spectrum of E^T H for each sample, then the normalised entropy.
    singular = low_rank_singular_values(factors.output_grads, factors.inputs, settings.top_k)
    scores = spectral_entropy(singular, settings.top_k)

    return [
        SampleScore(
            score=float(scores[i]),
            num_target_tokens=int(factors.counts[i]),
            loss=float(factors.losses[i]),
        )
        for i in range(len(samples))
    ]


def score_sample_reference(
    model: torch.nn.Module,
    sample: EncodedSample,
    settings: ScoringSettings,
    seed: int = 0,
) -> SampleScore:
    """Score one sample with autograd on the output projection, as the reference code does.

    The output projection's weight is replaced, for this forward pass, by a detached copy that
    requires a gradient. Autograd then returns that weight's own gradient, which for tied
    embeddings excludes the input-embedding contribution.
    """
    head = output_projection(model)
    device = head.weight.device
    probe = head.weight.detach().float().clone().requires_grad_(True)
    bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None

    def replace_output(_module, args, _output):
        return F.linear(args[0].float(), probe, bias)

    input_ids = torch.tensor([sample.input_ids], device=device)
    labels = torch.tensor([sample.labels()], device=device)
    handle = head.register_forward_hook(replace_output)
    try:
        with torch.enable_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits

            # Causal-LM loss: position t predicts token t + 1; prompt labels are -100.
            loss = F.cross_entropy(
                logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="mean"
            )
            (gradient,) = torch.autograd.grad(loss, probe)
    finally:
        handle.remove()

    rows = crop_size(gradient.shape[0], settings.row_crop)
    cols = crop_size(gradient.shape[1], settings.col_crop)
    singular = dense_singular_values(
        gradient[:rows, :cols], settings.top_k, settings.estimator, seed=seed
    )
    score = spectral_entropy(singular, settings.top_k)
    return SampleScore(
        score=float(score), num_target_tokens=sample.num_target_tokens, loss=float(loss.detach())
    )


def encode_frame(
    tokenizer, frame: pd.DataFrame, settings: ScoringSettings
) -> tuple[dict[int, EncodedSample], dict[int, str]]:
    """Tokenize the usable rows of a canonical table.

    Returns ``(encoded, rejected)``, both keyed by the row's position in ``frame``: the encoded
    samples, and a reason for each row that cannot be scored.
    """
    encoded: dict[int, EncodedSample] = {}
    rejected: dict[int, str] = {}
    for position, row in enumerate(frame.itertuples(index=False)):
        if row.status != STATUS_OK:
            rejected[position] = row.reject_reason or "rejected at ingestion"
            continue
        try:
            encoded[position] = encode_sample(
                tokenizer,
                instruction=row.instruction,
                context=row.context,
                question=row.question,
                answer=row.answer,
                max_tokens=settings.max_tokens,
                prompt_format=settings.prompt_format,
            )
        except SampleTooLongError as error:
            rejected[position] = f"answer too long: {error}"
    return encoded, rejected


def score_frame(
    model: torch.nn.Module,
    tokenizer,
    frame: pd.DataFrame,
    settings: ScoringSettings,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Score every usable row of a canonical table; rejected rows keep their reason.

    Args:
        model: A causal language model in eval mode.
        tokenizer: Its tokenizer.
        frame: The canonical table from :func:`gradsentry_dagster.data.read_dataset`.
        settings: Scoring settings.
        progress: Called with the number of rows finished so far, after each batch.
        seed: Seed of the randomized estimator (reference path only).

    Returns:
        One row per input row, in input order, with the columns of ``SCORE_COLUMNS``. A row
        whose score is not finite keeps ``status == "scored"`` with a NaN score and a reason,
        so that the gate fails instead of passing it.
    """
    model.eval()
    encoded, rejected = encode_frame(tokenizer, frame, settings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: dict[int, SampleScore] = {}
    truncated = sum(1 for sample in encoded.values() if sample.prompt_truncated)
    if truncated:
        logger.info("%d prompts were truncated from the left to fit max_tokens", truncated)

    done = len(rejected)
    if progress:
        progress(done)
    if settings.method == "reference":
        for position, sample in encoded.items():
            results[position] = score_sample_reference(model, sample, settings, seed=seed)
            done += 1
            if progress:
                progress(done)
    else:
        # Sorting by length keeps padding low; results are put back in input order below.
        order = sorted(encoded, key=lambda position: len(encoded[position].input_ids))
        weight = output_projection(model).weight.detach().float()
        for start in range(0, len(order), settings.batch_size):
            chunk = order[start : start + settings.batch_size]
            scores = score_batch_exact(
                model, [encoded[p] for p in chunk], settings, pad_id, projection_weight=weight
            )
            results.update(zip(chunk, scores))
            done += len(chunk)
            if progress:
                progress(done)

    records = []
    for position, row_id in enumerate(frame["row_id"]):
        if position in rejected:
            records.append(
                {
                    "row_id": row_id,
                    "status": STATUS_REJECTED,
                    "score": math.nan,
                    "num_target_tokens": 0,
                    "loss": math.nan,
                    "reason": rejected[position],
                }
            )
            continue
        result = results[position]
        finite = math.isfinite(result.score) and math.isfinite(result.loss)
        reason = "" if finite else "score or loss is not finite"
        if encoded[position].prompt_truncated:
            reason = (reason + "; " if reason else "") + "prompt truncated from the left"
        records.append(
            {
                "row_id": row_id,
                "status": STATUS_SCORED,
                "score": result.score if math.isfinite(result.score) else math.nan,
                "num_target_tokens": result.num_target_tokens,
                "loss": result.loss,
                "reason": reason,
            }
        )
    return pd.DataFrame.from_records(records, columns=SCORE_COLUMNS)
