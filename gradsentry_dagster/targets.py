"""GradSentry scores against any linear weight matrix, not only the output projection.

A target names the weight matrices whose per-sample gradient is scored:

- ``output_projection``: the language-model head, cropped by ``ScoringSettings.row_crop`` and
  ``col_crop`` (scored by :mod:`gradsentry_dagster.scoring` without a backward pass);
- ``linear:PATTERN``: every ``torch.nn.Linear`` whose module name matches ``PATTERN``;
- ``lora_a:PATTERN`` and ``lora_b:PATTERN``: the A or B matrix of the active peft LoRA adapter
  on every layer whose name matches ``PATTERN``.

``PATTERN`` is a module name or an ``fnmatch`` glob (``model.layers.2[89].self_attn.v_proj``),
matched against names as the plain model reports them: peft's ``base_model.model.`` prefix and
``.base_layer`` suffix are removed, so one pattern works with and without an adapter. A suffix
``@ROWS,COLS`` (fractions in (0, 1]) keeps the leading ``ROWS`` of each matched matrix's output
rows and ``COLS`` of its input columns. Without it nothing is cropped, because the GradSentry
reference code (arXiv 2605.26574) crops only the output projection.

For a linear layer ``y = W x`` the gradient of one sample's loss is ``G = E^T H``, with one row
per token position in ``E`` (the gradient at the layer's output) and ``H`` (the layer's input).
Inside the decoder every position of the sample contributes, prompt included, because the loss
on target tokens flows back through attention to earlier positions. Padding rows are zeroed.
When a pattern matches several matrices, their gradients are scored as one block-diagonal
matrix, whose singular values are the union of the matrices' singular values.

The batched path gets ``E`` and ``H`` of a whole batch from one forward and one backward pass:
a forward hook records each target module's input and adds a zero tensor that requires a
gradient to its output, and the gradient of that zero tensor is ``E``. The backward pass runs
on the sum of the per-sample mean losses, so each sample's rows of ``E`` hold the gradient of
that sample's own loss (samples share no computation in a causal language model).

NOTE: the fallback threshold of 0.7 suits the output projection. With SmolLM2-135M on 150
WebQuestions rows (benchmarks/targets.py), every row scored above 0.7 for a LoRA B target and
for an MLP down projection, so those targets need a fixed threshold of their own.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradsentry_dagster.prompts import EncodedSample
from gradsentry_dagster.scoring import (
    SampleScore,
    ScoringSettings,
    final_hidden_states,
    output_projection,
    pad_batch,
)
from gradsentry_dagster.spectral import (
    crop_size,
    dense_singular_values,
    low_rank_singular_values,
    spectral_entropy,
)

logger = logging.getLogger(__name__)

OUTPUT_PROJECTION = "output_projection"
LINEAR = "linear"
LORA_A = "lora_a"
LORA_B = "lora_b"
MODULE_KINDS = (LINEAR, LORA_A, LORA_B)
PEFT_PREFIX = "base_model.model."
TARGET_SYNTAX = (
    "'output_projection', 'linear:PATTERN', 'lora_a:PATTERN' or 'lora_b:PATTERN', "
    "optionally followed by '@ROWS,COLS' crop fractions"
)


@dataclass(frozen=True)
class WeightTarget:
    """A parsed target.

    Attributes:
        kind: ``"output_projection"``, ``"linear"``, ``"lora_a"`` or ``"lora_b"``.
        pattern: Module name or glob; empty for the output projection.
        row_crop: Fraction of each matrix's output rows kept, from row 0; None keeps all.
        col_crop: Fraction of each matrix's input columns kept, from column 0; None keeps all.
    """

    kind: str
    pattern: str = ""
    row_crop: float | None = None
    col_crop: float | None = None


def parse_target(text: str) -> WeightTarget:
    """Parse a target such as ``lora_b:model.layers.29.self_attn.*_proj@0.5,1``.

    Raises:
        ValueError: The text does not follow the target syntax.
    """
    if text == OUTPUT_PROJECTION:
        return WeightTarget(OUTPUT_PROJECTION)
    kind, colon, rest = text.partition(":")
    if not colon or kind not in MODULE_KINDS:
        raise ValueError(f"invalid target {text!r}: expected {TARGET_SYNTAX}")
    pattern, at, crop = rest.partition("@")
    if not pattern.strip():
        raise ValueError(f"invalid target {text!r}: the module pattern after '{kind}:' is empty")
    if not at:
        return WeightTarget(kind, pattern.strip())

    parts = crop.split(",")
    if len(parts) != 2:
        raise ValueError(f"invalid crop in target {text!r}: expected '@ROWS,COLS', such as '@0.125,0.125'")
    try:
        row_crop, col_crop = (float(part) for part in parts)
    except ValueError as error:
        raise ValueError(f"invalid crop in target {text!r}: {error}") from error
    for fraction in (row_crop, col_crop):
        if not 0 < fraction <= 1:
            raise ValueError(f"invalid crop in target {text!r}: fractions must lie in (0, 1], got {fraction}")
    return WeightTarget(kind, pattern.strip(), row_crop, col_crop)


def plain_module_name(name: str) -> str:
    """Return a module name as the model without a peft wrapper reports it."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    if name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and isinstance(
        getattr(module, "lora_B", None), torch.nn.ModuleDict
    )


def _linear_candidates(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """List the model's own linear layers, leaving out LoRA matrices."""
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if ".lora_A." in name or ".lora_B." in name:
            continue
        candidates.append((plain_module_name(name), module))
    return candidates


def _lora_candidates(model: torch.nn.Module, matrix: str) -> list[tuple[str, torch.nn.Linear]]:
    """List the A or B matrices of the active LoRA adapters as ``(<layer>.lora_A.<adapter>, module)``."""
    candidates = []
    for name, module in model.named_modules():
        if not _is_lora_layer(module):
            continue
        if getattr(module, "merged", False):
            raise ValueError(
                f"the LoRA adapter of {plain_module_name(name)} is merged into the base weight, "
                "so its A and B matrices get no gradient of their own; load it unmerged"
            )
        matrices = getattr(module, matrix)
        for adapter in module.active_adapters:
            if adapter in matrices:
                candidates.append((f"{plain_module_name(name)}.{matrix}.{adapter}", matrices[adapter]))
    return candidates


def resolve_modules(model: torch.nn.Module, target: WeightTarget) -> list[tuple[str, torch.nn.Linear]]:
    """Return ``(name, module)`` for every linear module the target names, in model order.

    Raises:
        ValueError: Nothing matches, or a LoRA target is used on a model without an adapter.
    """
    if target.kind == OUTPUT_PROJECTION:
        head = output_projection(model)
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"the output projection is a {type(head).__name__}, not a torch.nn.Linear")
        return [("output_projection", head)]

    if target.kind == LINEAR:
        candidates = _linear_candidates(model)
        matches = [(name, module) for name, module in candidates if fnmatch.fnmatchcase(name, target.pattern)]
    else:
        matrix = "lora_A" if target.kind == LORA_A else "lora_B"
        candidates = _lora_candidates(model, matrix)
        if not candidates:
            raise ValueError(
                f"target '{target.kind}:{target.pattern}' needs a peft LoRA adapter, but the model "
                "has none attached; set the model's adapter folder, or use a 'linear:' target"
            )
        layer_names = {name: name.rsplit(f".{matrix}.", 1)[0] for name, _ in candidates}
        matches = [
            (name, module)
            for name, module in candidates
            if fnmatch.fnmatchcase(layer_names[name], target.pattern)
        ]
        candidates = [(layer_names[name], module) for name, module in candidates]

    if not matches:
        examples = ", ".join(name for name, _ in candidates[-3:]) or "none"
        raise ValueError(
            f"target '{target.kind}:{target.pattern}' matched none of the model's "
            f"{len(candidates)} candidate layers (the last ones are named {examples}); "
            "use a module name or a glob such as 'model.layers.*.mlp.down_proj'"
        )
    return matches


def matrix_crop(module: torch.nn.Linear, target: WeightTarget, settings: ScoringSettings) -> tuple[int, int]:
    """Return how many output rows and input columns of the module's weight are scored."""
    if target.kind == OUTPUT_PROJECTION:
        row_crop, col_crop = settings.row_crop, settings.col_crop
    else:
        row_crop, col_crop = target.row_crop, target.col_crop
    return crop_size(module.out_features, row_crop), crop_size(module.in_features, col_crop)


def linear_gradient_singular_values(
    output_grads: torch.Tensor, inputs: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Return the top singular values of ``E^T H`` per sample, by the cheaper exact route.

    Args:
        output_grads: ``(batch, tokens, rows)`` rows of ``E``; padding rows are zero.
        inputs: ``(batch, tokens, cols)`` rows of ``H``; padding rows are zero.
        top_k: How many singular values to return per sample.

    Returns:
        ``(batch, top_k)`` singular values in descending order, in float64, zero-padded.
    """
    tokens, rows, cols = output_grads.shape[1], output_grads.shape[2], inputs.shape[2]
    if tokens <= min(rows, cols):
        return low_rank_singular_values(output_grads, inputs, top_k)

    # More tokens than the smaller side of the matrix (a LoRA matrix of rank r, or a long
    # sequence): the (batch, rows, cols) gradient itself is the smaller problem.
    gradient = output_grads.to(torch.float64).transpose(-1, -2) @ inputs.to(torch.float64)
    singular = torch.linalg.svdvals(gradient)
    if singular.shape[-1] >= top_k:
        return singular[..., :top_k]
    padding = singular.new_zeros(*singular.shape[:-1], top_k - singular.shape[-1])
    return torch.cat([singular, padding], dim=-1)


class _FactorRecorder:
    """Forward hooks that record each target module's input and a probe on its output."""

    def __init__(self, modules: list[torch.nn.Linear]) -> None:
        self.modules = modules
        self.token_mask: torch.Tensor | None = None
        # One entry per module call: (module index, input, output probe, token mask).
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(self, index: int):
        def record(_module, args, output):
            probe = torch.zeros_like(output, requires_grad=True)
            self.calls.append((index, args[0], probe, self.token_mask))
            return output + probe

        return record

    def attach(self) -> list:
        return [module.register_forward_hook(self.hook(i)) for i, module in enumerate(self.modules)]


def batch_target_spectra(
    model: torch.nn.Module,
    samples: list[EncodedSample],
    settings: ScoringSettings,
    pad_id: int,
    target: WeightTarget,
    modules: list[tuple[str, torch.nn.Linear]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute a batch's gradient spectra with one forward and one backward pass.

    Returns:
        ``(singular, losses, counts)``: ``(batch, modules * top_k)`` the top singular values of
        each matched matrix side by side (float64, each module's block in descending order),
        ``(batch,)`` mean target-token losses, and ``(batch,)`` target-token counts.
    """
    head = output_projection(model)
    device = head.weight.device
    recorder = _FactorRecorder([module for _, module in modules])
    batch = pad_batch(samples, pad_id)
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    positions = batch.hidden_positions.to(device)
    labels = batch.labels.to(device)
    mask = batch.target_mask.to(device)

    handles = recorder.attach()
    try:
        with torch.enable_grad():
            # Decoder calls see every real position: (batch, seq, hidden).
            recorder.token_mask = attention_mask.bool()
            hidden = final_hidden_states(model, input_ids, attention_mask)

            # The head sees only the positions that predict target tokens: (batch, targets, vocab).
            recorder.token_mask = mask
            gathered = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            gathered = gathered * mask.unsqueeze(-1).to(gathered.dtype)
            logits = head(gathered)

            # Sum of per-sample mean losses, so each sample's factors hold its own gradient.
            log_probs = logits.float().log_softmax(dim=-1)
            counts = mask.sum(dim=1).clamp_min(1)
            token_loss = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
            losses = token_loss.sum(dim=1) / counts
            probes = [probe for _, _, probe, _ in recorder.calls]
            if not probes:
                names = ", ".join(name for name, _ in modules)
                raise ValueError(f"the target modules ({names}) were not called in the forward pass")
            probe_grads = torch.autograd.grad(losses.sum(), probes, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()

    # Per module, the masked and cropped factors of every call, joined along the token axis.
    output_factors: list[list[torch.Tensor]] = [[] for _ in modules]
    input_factors: list[list[torch.Tensor]] = [[] for _ in modules]
    for (index, inputs, probe, token_mask), grad in zip(recorder.calls, probe_grads):
        name, module = modules[index]
        if inputs.dim() != 3 or tuple(inputs.shape[:2]) != tuple(token_mask.shape):
            raise ValueError(
                f"module {name} received input of shape {tuple(inputs.shape)}; expected "
                f"(batch, tokens, features) with (batch, tokens) = {tuple(token_mask.shape)}"
            )
        rows, cols = matrix_crop(module, target, settings)
        keep = token_mask.unsqueeze(-1)
        grad = torch.zeros_like(probe) if grad is None else grad
        output_factors[index].append((grad[..., :rows].float() * keep).detach())
        input_factors[index].append((inputs[..., :cols].float() * keep).detach())

    singular = []
    for index, (name, _) in enumerate(modules):
        if not output_factors[index]:
            raise ValueError(f"target module {name} was not called in the forward pass")
        e = torch.cat(output_factors[index], dim=1)
        h = torch.cat(input_factors[index], dim=1)
        singular.append(linear_gradient_singular_values(e, h, settings.top_k))
    return torch.cat(singular, dim=-1), losses.detach(), counts


def score_batch_target(
    model: torch.nn.Module,
    samples: list[EncodedSample],
    settings: ScoringSettings,
    pad_id: int,
    target: WeightTarget,
    modules: list[tuple[str, torch.nn.Linear]],
) -> list[SampleScore]:
    """Score a batch against the target's matrices with one forward and one backward pass."""
    spectrum, losses, counts = batch_target_spectra(model, samples, settings, pad_id, target, modules)
    if not spectrum.any():
        logger.warning(
            "the gradient of target %s is zero for all %d samples of a batch; a new LoRA adapter "
            "has B = 0, so its A matrices get no gradient until it is trained",
            settings.target,
            len(samples),
        )
    scores = spectral_entropy(spectrum, settings.top_k)
    return [
        SampleScore(score=float(scores[i]), num_target_tokens=int(counts[i]), loss=float(losses[i]))
        for i in range(len(samples))
    ]


def reference_target_spectrum(
    model: torch.nn.Module,
    sample: EncodedSample,
    settings: ScoringSettings,
    target: WeightTarget,
    modules: list[tuple[str, torch.nn.Linear]],
    seed: int = 0,
) -> tuple[torch.Tensor, float]:
    """Compute one sample's spectrum with autograd on the target's weights and a dense SVD.

    Each matched module computes its output, for this forward pass, from a detached float32
    copy of its weight that requires a gradient, so autograd returns that matrix's own
    gradient even where the weight is shared (tied embeddings). Several matrices are joined
    into one block-diagonal matrix before the SVD.

    Returns:
        ``(singular, loss)``: ``(top_k,)`` singular values in descending order, and the mean
        target-token loss.
    """
    device = output_projection(model).weight.device
    probes = [module.weight.detach().float().clone().requires_grad_(True) for _, module in modules]

    def replace_output(index: int):
        module = modules[index][1]

        def hook(_module, args, output):
            bias = module.bias.detach().float() if module.bias is not None else None
            return F.linear(args[0].float(), probes[index], bias).to(output.dtype)

        return hook

    input_ids = torch.tensor([sample.input_ids], device=device)
    labels = torch.tensor([sample.labels()], device=device)
    handles = [module.register_forward_hook(replace_output(i)) for i, (_, module) in enumerate(modules)]
    try:
        with torch.enable_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits

            # Causal-LM loss: position t predicts token t + 1; prompt labels are -100.
            loss = F.cross_entropy(
                logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="mean"
            )
            gradients = torch.autograd.grad(loss, probes, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()

    blocks = []
    for (_, module), probe, gradient in zip(modules, probes, gradients):
        gradient = torch.zeros_like(probe) if gradient is None else gradient
        rows, cols = matrix_crop(module, target, settings)
        blocks.append(gradient[:rows, :cols])
    singular = dense_singular_values(torch.block_diag(*blocks), settings.top_k, settings.estimator, seed=seed)
    return singular, float(loss.detach())


def score_sample_reference_target(
    model: torch.nn.Module,
    sample: EncodedSample,
    settings: ScoringSettings,
    target: WeightTarget,
    modules: list[tuple[str, torch.nn.Linear]],
    seed: int = 0,
) -> SampleScore:
    """Score one sample with autograd on the target's weights, as the reference code does."""
    singular, loss = reference_target_spectrum(model, sample, settings, target, modules, seed)
    score = spectral_entropy(singular, settings.top_k)
    return SampleScore(score=float(score), num_target_tokens=sample.num_target_tokens, loss=loss)


def iter_target_scores(
    model: torch.nn.Module,
    encoded: Mapping[int, EncodedSample],
    settings: ScoringSettings,
    pad_id: int,
    seed: int = 0,
) -> Iterator[tuple[list[int], list[SampleScore]]]:
    """Yield ``(positions, scores)`` against ``settings.target``, batch by batch.

    Args:
        model: A causal language model in eval mode, with a peft adapter for LoRA targets.
        encoded: Encoded samples keyed by row position.
        settings: Scoring settings; ``target`` names the matrices.
        pad_id: Token id used to right-pad a batch.
        seed: Seed of the randomized estimator (reference path only).
    """
    target = parse_target(settings.target)
    modules = resolve_modules(model, target)
    logger.info(
        "scoring against %d weight matrices for target %s (%s path): %s",
        len(modules),
        settings.target,
        settings.method,
        ", ".join(name for name, _ in modules[:4]) + (", ..." if len(modules) > 4 else ""),
    )

    if settings.method == "reference":
        for position, sample in encoded.items():
            yield [position], [score_sample_reference_target(model, sample, settings, target, modules, seed)]
        return

    # Sorting by length keeps padding low; the caller puts results back in input order.
    order = sorted(encoded, key=lambda position: len(encoded[position].input_ids))
    for start in range(0, len(order), settings.batch_size):
        chunk = order[start : start + settings.batch_size]
        yield chunk, score_batch_target(model, [encoded[p] for p in chunk], settings, pad_id, target, modules)


def score_samples_for_target(
    model: torch.nn.Module,
    encoded: Mapping[int, EncodedSample],
    settings: ScoringSettings,
    pad_id: int,
    advance: Callable[[int], None],
    seed: int = 0,
) -> dict[int, SampleScore]:
    """Score encoded samples against ``settings.target``; ``advance`` gets each batch's size."""
    results: dict[int, SampleScore] = {}
    for chunk, scores in iter_target_scores(model, encoded, settings, pad_id, seed):
        results.update(zip(chunk, scores))
        advance(len(chunk))
    return results
