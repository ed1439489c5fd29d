"""GradSentry scores: spectral entropy of each sample's output-projection gradient.

Two paths compute the same score:

- ``reference``: one sample at a time, autograd gives the gradient of the sample's loss with
  respect to the output projection weight (``vocab x hidden``), which is cropped to its top-left
  block before its singular values are taken, as the GradSentry reference code does.
- ``exact``: one forward pass per padded batch and no backward pass. The cropped gradient is
  ``E^T H`` with ``E`` the cropped ``softmax - onehot`` rows and ``H`` the cropped final hidden
  states at the target positions, so its spectrum comes from ``tokens x tokens`` Gram matrices
  (see :mod:`gradsentry_dagster.spectral`). Batches hold samples of similar length, and the
  token prefix that a batch's samples share (the prompt template) runs once and its keys and
  values are reused, which causal attention makes exact.

The weight used is always the output projection's own, so models whose input and output
embeddings are tied (SmolLM2, small Qwen2.5, Gemma) are scored correctly: the gradient that
flows into the shared embedding matrix through the input side is never mixed in.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F

from gradsentry_dagster.cache import RESULT_COLUMNS, ScoreCache, row_content_hashes
from gradsentry_dagster.data import STATUS_OK
from gradsentry_dagster.models import clamp_max_tokens
from gradsentry_dagster.prompts import DEFAULT_CONTEXT_INSTRUCTION, EncodedSample, SampleTooLongError, encode_samples
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
SCORE_COLUMNS = ["row_id", "status", "score", "num_target_tokens", "loss", "loss_without_question", "reason"]
RESULT_DTYPES = {
    "status": object,
    "score": "float64",
    "num_target_tokens": "int64",
    "loss": "float64",
    "loss_without_question": "float64",
    "reason": object,
}
# ScoringSettings fields that change how a score is computed but not its value.
EXECUTION_FIELDS = ("method", "batch_size", "padding_side", "share_prefix")


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
        padding_side: ``"right"`` or ``"left"``: where the exact path pads shorter samples.
            Scores do not depend on it.
        share_prefix: On the exact path, run the token prefix that every sample of a batch
            shares, up to the prompt template's length, once and reuse its keys and values.
            Scores do not depend on it.
        target: Weight matrices whose gradient is scored: ``"output_projection"`` (cropped by
            ``row_crop`` and ``col_crop``), or a linear layer or LoRA matrix as
            :func:`gradsentry_dagster.targets.parse_target` reads it.
        question_gain: Also compute ``loss_without_question``: the mean loss of the same target
            tokens after a prompt that keeps the instruction but drops the question and the
            context. Robust mode compares it with ``loss`` (see
            :mod:`gradsentry_dagster.robust`); it costs one more forward pass over the target
            tokens. When off, the column is NaN.
    """

    method: Literal["exact", "reference"] = "exact"
    estimator: Literal["exact", "randomized"] = "exact"
    top_k: int = DEFAULT_TOP_K
    row_crop: float | None = DEFAULT_CROP_FRACTION
    col_crop: float | None = DEFAULT_CROP_FRACTION
    prompt_format: Literal["qa", "chat"] = "qa"
    max_tokens: int = 512
    batch_size: int = 8
    padding_side: str = "right"
    share_prefix: bool = True
    target: str = "output_projection"
    question_gain: bool = False

    def __post_init__(self) -> None:
        # Imported here because the targets module builds on this one.
        from gradsentry_dagster.targets import parse_target

        parse_target(self.target)
        if self.method not in ("exact", "reference"):
            raise ValueError(f"method must be 'exact' or 'reference', got {self.method!r}")
        if self.estimator not in ("exact", "randomized"):
            raise ValueError(f"estimator must be 'exact' or 'randomized', got {self.estimator!r}")
        if self.method == "exact" and self.estimator != "exact":
            raise ValueError("the randomized estimator exists only on the reference path")
        if self.top_k < 2:
            raise ValueError(f"top_k must be at least 2, got {self.top_k}")
        if self.prompt_format not in ("qa", "chat"):
            raise ValueError(f"prompt_format must be 'qa' or 'chat', got {self.prompt_format!r}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def fingerprint(self) -> str:
        """Return a hash of the settings that change scores.

        The path, batch size, padding side and prefix sharing are left out: they change only
        how a score is computed, not its value.
        """
        relevant = asdict(self)
        for name in EXECUTION_FIELDS:
            relevant.pop(name)
        if not self.question_gain:
            # Scans made before this setting existed keep their cache keys.
            relevant.pop("question_gain")
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
    loss_without_question: float = math.nan


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


def _cache_keyword(decoder: torch.nn.Module) -> str:
    """Return the decoder's argument name for cached keys and values.

    transformers 5 renamed ``past_key_values`` to ``cache`` and warns on the old name.
    """
    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def final_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
) -> torch.Tensor:
    """Return the hidden states that enter the output projection, ``(batch, seq, hidden)``.

    Uses the model's decoder stack where it has one, so that no vocabulary-sized logits are
    computed; otherwise captures the output projection's input during a full forward pass.

    Args:
        model: The causal language model.
        input_ids: ``(batch, seq)`` token ids, after any cached prefix.
        attention_mask: ``(batch, prefix + seq)`` 1 for real tokens, 0 for padding.
        position_ids: ``(batch, seq)`` positions; needed with left padding.
        past_key_values: Keys and values of a prefix that precedes ``input_ids``; only
            models with a decoder stack accept it.
    """
    decoder = _decoder(model)
    if decoder is not None:
        cache_argument = {}
        if past_key_values is not None:
            cache_argument[_cache_keyword(decoder)] = past_key_values
        outputs = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=past_key_values is not None,
            **cache_argument,
        )
        return outputs[0]
    if past_key_values is not None:
        raise ValueError(f"{type(model).__name__} has no decoder stack to reuse a prefix with")

    captured: list[torch.Tensor] = []
    handle = output_projection(model).register_forward_pre_hook(
        lambda _module, args: captured.append(args[0])
    )
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    finally:
        handle.remove()
    return captured[-1]


def shared_prefix_length(samples: Sequence[EncodedSample]) -> int:
    """Return how many leading prompt tokens every sample of a batch has in common.

    The count compares token ids, not text, because a tokenizer can merge the template's last
    characters with the question's first ones. It stops one token before the earliest target
    so that the hidden state predicting every target token is computed with the batch.
    """
    if len(samples) < 2:
        return 0
    limit = min(sample.target_start for sample in samples) - 1
    if limit <= 0:
        return 0

    # (batch, limit) leading token ids; a column counts while every row equals the first.
    head = torch.tensor([sample.input_ids[:limit] for sample in samples])
    same = (head == head[0]).all(dim=0)
    return int(same.long().cumprod(dim=0).sum())


def template_prefix_length(tokenizer, settings: ScoringSettings) -> int:
    """Return the number of leading tokens that the prompt template gives every sample.

    It is measured on two samples with unrelated questions, so it depends only on the
    tokenizer and the settings and not on the data.
    """
    probes = encode_samples(
        tokenizer,
        instructions=["", ""],
        contexts=["", ""],
        questions=["Why", "7"],
        answers=["x", "y"],
        max_tokens=settings.max_tokens,
        prompt_format=settings.prompt_format,
    )
    if any(isinstance(probe, SampleTooLongError) for probe in probes):
        return 0
    return shared_prefix_length(probes)


class PrefixStates:
    """Keys and values of shared token prefixes, computed once per distinct prefix.

    A prefix is always run on its own from position 0, so a batch's scores depend only on the
    batch's samples and not on which batches ran before it (resumed scans repeat them exactly).

    Args:
        model: The causal language model.
        max_entries: How many distinct prefixes are kept.
        max_length: Longest prefix shared, usually the prompt template's length. Without a cap,
            batches sorted by length also share the first words of their questions, and each
            batch would then run a prefix of its own.
    """

    def __init__(
        self, model: torch.nn.Module, max_entries: int = 4, max_length: int | None = None
    ) -> None:
        self.decoder = _decoder(model)
        self.max_entries = max_entries
        self.max_length = max_length
        self._entries: OrderedDict[tuple[int, ...], object] = OrderedDict()

    @property
    def available(self) -> bool:
        """Whether the model has a decoder stack that accepts cached keys and values."""
        return self.decoder is not None

    def expanded(self, prefix: Sequence[int], batch: int, device: torch.device):
        """Return a fresh cache holding the prefix's keys and values for ``batch`` rows."""
        key = tuple(prefix)
        if key in self._entries:
            self._entries.move_to_end(key)
        else:
            input_ids = torch.tensor([key], device=device)
            outputs = self.decoder(input_ids=input_ids, use_cache=True)
            cache = getattr(outputs, "cache", None)
            self._entries[key] = cache if cache is not None else outputs.past_key_values
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

        # The decoder appends the batch's keys and values to the cache it is given.
        cache = copy.deepcopy(self._entries[key])
        cache.batch_repeat_interleave(batch)
        return cache


@dataclass
class PaddedBatch:
    """A batch laid out for one forward pass after an optional shared prefix.

    Attributes:
        input_ids: ``(batch, seq)`` token ids after the prefix, padded with the pad id.
        attention_mask: ``(batch, prefix + seq)`` 1 for the prefix and for real tokens.
        position_ids: ``(batch, seq)`` each token's position in its own sample.
        hidden_positions: ``(batch, max_targets)`` column of the hidden state that predicts
            each target token.
        labels: ``(batch, max_targets)`` target token ids, 0 where ``target_mask`` is off.
        target_mask: ``(batch, max_targets)`` True for real target tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    hidden_positions: torch.Tensor
    labels: torch.Tensor
    target_mask: torch.Tensor


def pad_batch(
    samples: Sequence[EncodedSample],
    pad_id: int,
    prefix_length: int = 0,
    padding_side: str = "right",
) -> PaddedBatch:
    """Pad the samples' tokens after their first ``prefix_length`` into one batch."""
    starts = torch.tensor([sample.target_start for sample in samples]) - prefix_length
    lengths = torch.tensor([len(sample.input_ids) for sample in samples]) - prefix_length
    flat = torch.tensor(
        list(itertools.chain.from_iterable(sample.input_ids[prefix_length:] for sample in samples))
    )

    # Real tokens fill each row from the left or end at the right; (batch, seq) layout.
    width = int(lengths.max())
    columns = torch.arange(width)
    offsets = width - lengths if padding_side == "left" else torch.zeros_like(lengths)
    real = (columns >= offsets.unsqueeze(1)) & (columns < (offsets + lengths).unsqueeze(1))
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    input_ids[real] = flat
    position_ids = (prefix_length + columns - offsets.unsqueeze(1)).clamp_min(prefix_length)
    attention_mask = torch.cat(
        [torch.ones((len(samples), prefix_length), dtype=torch.long), real.long()], dim=1
    )

    # The hidden state at column c predicts the token at column c + 1: (batch, max_targets).
    counts = lengths - starts
    slots = torch.arange(int(counts.max()))
    target_mask = slots < counts.unsqueeze(1)
    hidden_positions = (offsets + starts - 1).unsqueeze(1) + slots
    hidden_positions = torch.where(target_mask, hidden_positions, 0)
    labels = input_ids.gather(1, (hidden_positions + 1).clamp_max(width - 1))
    labels = torch.where(target_mask, labels, 0)
    return PaddedBatch(input_ids, attention_mask, position_ids, hidden_positions, labels, target_mask)


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
    prefix_states: PrefixStates | None = None,
) -> GradientFactors:
    """Compute the factors of each sample's cropped output-projection gradient in one pass.

    Args:
        model: The causal language model, in eval mode.
        samples: The batch; samples of similar length waste the least padding.
        settings: Scoring settings (crop, ``top_k``, padding side, prefix sharing).
        pad_id: Token id written into padding; it never affects a score.
        projection_weight: The output projection's weight in float32, to convert it once.
        prefix_states: Where shared prefixes are computed and kept; made for this batch
            when unset and ``settings.share_prefix`` is on.
    """
    head = output_projection(model)
    device = head.weight.device
    weight = projection_weight if projection_weight is not None else head.weight.float()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    vocab, hidden_size = weight.shape
    rows = crop_size(vocab, settings.row_crop)
    cols = crop_size(hidden_size, settings.col_crop)

    # The prompt prefix that all samples share runs once, as a batch of one.
    if prefix_states is None and settings.share_prefix:
        prefix_states = PrefixStates(model, max_entries=1)
    prefix_length = 0
    if prefix_states is not None and prefix_states.available:
        prefix_length = shared_prefix_length(samples)
        if prefix_states.max_length is not None:
            prefix_length = min(prefix_length, prefix_states.max_length)
    past = None
    if prefix_length:
        past = prefix_states.expanded(samples[0].input_ids[:prefix_length], len(samples), device)

    # Final hidden states of the tokens after the prefix: (batch, seq, hidden).
    batch = pad_batch(samples, pad_id, prefix_length, settings.padding_side)
    hidden = final_hidden_states(
        model,
        batch.input_ids.to(device),
        batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        past_key_values=past,
    )

    # Hidden states at the positions that predict target tokens: (batch, targets, hidden).
    positions = batch.hidden_positions.to(device)
    labels = batch.labels.to(device)
    mask = batch.target_mask.to(device)
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
    prefix_states: PrefixStates | None = None,
) -> list[SampleScore]:
    """Score a batch with one forward pass and the Gram-matrix spectrum.

    Arguments are those of :func:`gradient_factors`.
    """
    factors = gradient_factors(model, samples, settings, pad_id, projection_weight, prefix_states)
    output_grads, inputs = factors.output_grads, factors.inputs

    # A sample with non-finite values gets a NaN score, so the gate fails on it. Its factors
    # are zeroed first because one NaN makes the batched eigendecomposition raise.
    broken = ~(output_grads.isfinite().all(dim=(1, 2)) & inputs.isfinite().all(dim=(1, 2)))
    if broken.any():
        output_grads = output_grads.masked_fill(broken.view(-1, 1, 1), 0.0)
        inputs = inputs.masked_fill(broken.view(-1, 1, 1), 0.0)

    # Spectrum of E^T H for each sample, then the normalised entropy.
    singular = low_rank_singular_values(output_grads, inputs, settings.top_k)
    scores = spectral_entropy(singular, settings.top_k)
    scores = scores.masked_fill(broken.to(scores.device), math.nan).tolist()
    counts_list = factors.counts.tolist()
    losses_list = factors.losses.tolist()
    return [
        SampleScore(score=score, num_target_tokens=int(count), loss=loss)
        for score, count, loss in zip(scores, counts_list, losses_list)
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
    block = gradient[:rows, :cols]
    if not bool(block.isfinite().all()):
        # The SVD raises on non-finite input; a NaN score makes the gate fail instead.
        return SampleScore(
            score=math.nan, num_target_tokens=sample.num_target_tokens, loss=float(loss.detach())
        )
    singular = dense_singular_values(block, settings.top_k, settings.estimator, seed=seed)
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
    usable = []
    for position, (status, reason) in enumerate(zip(frame["status"], frame["reject_reason"])):
        if status == STATUS_OK:
            usable.append(position)
        else:
            rejected[position] = reason or "rejected at ingestion"

    rows = frame.iloc[usable]
    samples = encode_samples(
        tokenizer,
        instructions=rows["instruction"].tolist(),
        contexts=rows["context"].tolist(),
        questions=rows["question"].tolist(),
        answers=rows["answer"].tolist(),
        max_tokens=settings.max_tokens,
        prompt_format=settings.prompt_format,
    )
    for position, sample in zip(usable, samples):
        if isinstance(sample, SampleTooLongError):
            rejected[position] = f"answer too long: {sample}"
        else:
            encoded[position] = sample
    return encoded, rejected


def encode_without_question(tokenizer, rows: pd.DataFrame, settings: ScoringSettings) -> list[EncodedSample]:
    """Tokenize each row with its question and context left out of the prompt.

    The target tokens are those of the full sample, so the two losses compare the same tokens.
    The shorter prompt always fits where the full one did.
    """
    # A row with a context and no instruction is scored under the context template's default
    # instruction, so the prompt without the question keeps that instruction.
    instructions = [
        instruction or (DEFAULT_CONTEXT_INSTRUCTION if context else "")
        for instruction, context in zip(rows["instruction"].tolist(), rows["context"].tolist())
    ]
    samples = encode_samples(
        tokenizer,
        instructions=instructions,
        contexts=[""] * len(rows),
        questions=[""] * len(rows),
        answers=rows["answer"].tolist(),
        max_tokens=settings.max_tokens,
        prompt_format=settings.prompt_format,
    )
    for sample in samples:
        if isinstance(sample, SampleTooLongError):
            raise sample
    return samples


class UnconditionedLosses:
    """Mean target loss of samples encoded by :func:`encode_without_question`, batch by batch.

    With ``settings.share_prefix`` on, the prompt template's header is computed once and its
    keys and values are reused, as on the scoring path.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, settings: ScoringSettings):
        self.model = model
        self.settings = settings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.weight = output_projection(model).weight.detach().float()
        self.prefix_states = None
        if settings.share_prefix:
            self.prefix_states = PrefixStates(model, max_length=template_prefix_length(tokenizer, settings))

    def __call__(self, samples: Sequence[EncodedSample]) -> list[float]:
        losses: list[float] = []
        size = self.settings.batch_size
        for start in range(0, len(samples), size):
            factors = gradient_factors(
                self.model,
                samples[start : start + size],
                self.settings,
                self.pad_id,
                projection_weight=self.weight,
                prefix_states=self.prefix_states,
            )
            losses.extend(factors.losses.tolist())
        return losses


def _scored_record(result: SampleScore, sample: EncodedSample) -> dict:
    """Return the result columns of a scored row; a non-finite score becomes NaN with a reason."""
    finite = math.isfinite(result.score) and math.isfinite(result.loss)
    reasons = [] if finite else ["score or loss is not finite"]
    if sample.prompt_truncated:
        reasons.append("prompt truncated from the left")
    return {
        "status": STATUS_SCORED,
        "score": result.score if math.isfinite(result.score) else math.nan,
        "num_target_tokens": result.num_target_tokens,
        "loss": result.loss,
        "loss_without_question": result.loss_without_question,
        "reason": "; ".join(reasons),
    }


def _rejected_record(reason: str) -> dict:
    return {
        "status": STATUS_REJECTED,
        "score": math.nan,
        "num_target_tokens": 0,
        "loss": math.nan,
        "loss_without_question": math.nan,
        "reason": reason,
    }


def score_frame(
    model: torch.nn.Module,
    tokenizer,
    frame: pd.DataFrame,
    settings: ScoringSettings,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
    cache: ScoreCache | None = None,
) -> pd.DataFrame:
    """Score every usable row of a canonical table; rejected rows keep their reason.

    Args:
        model: A causal language model in eval mode.
        tokenizer: Its tokenizer.
        frame: The canonical table from :func:`gradsentry_dagster.data.read_dataset`.
        settings: Scoring settings.
        progress: Called with the number of rows finished so far, after each batch.
        seed: Seed of the randomized estimator (reference path only).
        cache: Scores of earlier scans by the same model. Rows whose content, model and
            settings match a cached entry are not scored again, and every new result is
            added to the cache batch by batch, so a killed scan resumes where it stopped.

    Returns:
        One row per input row, in input order, with the columns of ``SCORE_COLUMNS``. A row
        whose score is not finite keeps ``status == "scored"`` with a NaN score and a reason,
        so that the gate fails instead of passing it.
    """
    model.eval()
    max_tokens = clamp_max_tokens(settings.max_tokens, model)
    if max_tokens != settings.max_tokens:
        settings = replace(settings, max_tokens=max_tokens)
    results: dict[int, dict] = {}
    usable = []
    for position, (status, reason) in enumerate(zip(frame["status"], frame["reject_reason"])):
        if status == STATUS_OK:
            usable.append(position)
        else:
            results[position] = _rejected_record(reason or "rejected at ingestion")

    # Rows with a cached result skip tokenization and scoring.
    settings_fingerprint = settings.fingerprint()
    hashes: dict[int, str] = {}
    cached = pd.DataFrame()
    pending = usable
    if cache is not None:
        hashes = dict(zip(usable, row_content_hashes(frame.iloc[usable])))
        found = cache.lookup(list(hashes.values()), settings_fingerprint)
        hit_positions = [position for position in usable if hashes[position] in found.index]
        cached = found.reindex([hashes[position] for position in hit_positions])
        cached.index = hit_positions
        hit_set = set(hit_positions)
        pending = [position for position in usable if position not in hit_set]
        logger.info("score cache: %d of %d usable rows already scored", len(hit_positions), len(usable))

    def record(positions: Sequence[int], records: Sequence[dict]) -> None:
        results.update(zip(positions, records))
        if cache is not None:
            cache.add(
                settings_fingerprint,
                [{"content_hash": hashes[p], **r} for p, r in zip(positions, records)],
            )

    encoded_subset, too_long = encode_frame(tokenizer, frame.iloc[pending], settings)
    encoded = {pending[index]: sample for index, sample in encoded_subset.items()}
    record([pending[index] for index in too_long], [_rejected_record(r) for r in too_long.values()])
    truncated = sum(1 for sample in encoded.values() if sample.prompt_truncated)
    if truncated:
        logger.info("%d prompts were truncated from the left to fit max_tokens", truncated)

    unconditioned: dict[int, EncodedSample] = {}
    losses_without_question = None
    if settings.question_gain and encoded:
        positions = sorted(encoded)
        blank = encode_without_question(tokenizer, frame.iloc[positions], settings)
        unconditioned = dict(zip(positions, blank))
        losses_without_question = UnconditionedLosses(model, tokenizer, settings)

    done = len(frame) - len(encoded)
    if progress:
        progress(done)
    for chunk, scores in _score_encoded(model, tokenizer, encoded, settings, seed):
        if losses_without_question is not None:
            values = losses_without_question([unconditioned[p] for p in chunk])
            scores = [replace(score, loss_without_question=value) for score, value in zip(scores, values)]
        record(chunk, [_scored_record(score, encoded[p]) for p, score in zip(chunk, scores)])
        done += len(chunk)
        if progress:
            progress(done)
    if cache is not None:
        cache.flush()

    parts = [pd.DataFrame.from_dict(results, orient="index", columns=RESULT_COLUMNS)]
    if len(cached):
        parts.append(cached)
    table = pd.concat(parts).reindex(range(len(frame)))
    table = table.astype(RESULT_DTYPES)
    table.insert(0, "row_id", frame["row_id"].to_numpy())
    return table.reset_index(drop=True)[SCORE_COLUMNS]


def _score_encoded(
    model: torch.nn.Module,
    tokenizer,
    encoded: dict[int, EncodedSample],
    settings: ScoringSettings,
    seed: int,
) -> Iterator[tuple[list[int], list[SampleScore]]]:
    """Yield ``(positions, scores)`` batch by batch, in a deterministic order."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if settings.target != "output_projection":
        # Other matrices need a backward pass; the targets module computes them.
        from gradsentry_dagster.targets import iter_target_scores

        yield from iter_target_scores(model, encoded, settings, pad_id, seed=seed)
        return

    if settings.method == "reference":
        for position, sample in encoded.items():
            yield [position], [score_sample_reference(model, sample, settings, seed=seed)]
        return

    # Sorting by length keeps padding low. The order depends only on the samples, so a resumed
    # scan forms the same batches as the scan it resumes.
    order = sorted(encoded, key=lambda position: len(encoded[position].input_ids))
    weight = output_projection(model).weight.detach().float()
    prefix_states = None
    if settings.share_prefix:
        prefix_states = PrefixStates(model, max_length=template_prefix_length(tokenizer, settings))
    for start in range(0, len(order), settings.batch_size):
        chunk = order[start : start + settings.batch_size]
        scores = score_batch_exact(
            model,
            [encoded[p] for p in chunk],
            settings,
            pad_id,
            projection_weight=weight,
            prefix_states=prefix_states,
        )
        yield chunk, scores
