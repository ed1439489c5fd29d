"""LoRA fine-tuning with peft on a canonical table, with the loss on answer tokens only."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from gradsentry_dagster.data import STATUS_OK
from gradsentry_dagster.models import clamp_max_tokens
from gradsentry_dagster.prompts import IGNORE_INDEX, SampleTooLongError, encode_sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraTrainingConfig:
    """LoRA and optimiser settings.

    Attributes:
        max_steps: Optimiser steps to run.
        batch_size: Samples per step.
        learning_rate: AdamW learning rate.
        rank: LoRA rank ``r``.
        alpha: LoRA scaling ``alpha``.
        dropout: Dropout on the LoRA input.
        target_modules: Module names that get LoRA matrices.
        max_tokens: Maximum training sequence length in tokens; longer prompts lose tokens from the left.
        prompt_format: ``"qa"`` or ``"chat"``; use the format the scan used.
        seed: Seed for data order and LoRA initialisation.
    """

    max_steps: int = 20
    batch_size: int = 4
    learning_rate: float = 2e-4
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_tokens: int = 512
    prompt_format: str = "qa"
    seed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class TrainingSummary:
    """Summary of one fine-tuning run."""

    steps: int
    samples: int
    skipped_samples: int
    first_loss: float
    last_loss: float
    adapter_dir: str


def _encode_training_rows(tokenizer, frame: pd.DataFrame, config: LoraTrainingConfig):
    encoded, skipped = [], 0
    for row in frame.itertuples(index=False):
        if getattr(row, "status", STATUS_OK) != STATUS_OK:
            skipped += 1
            continue
        try:
            encoded.append(
                encode_sample(
                    tokenizer,
                    instruction=row.instruction,
                    context=row.context,
                    question=row.question,
                    answer=row.answer,
                    max_tokens=config.max_tokens,
                    prompt_format=config.prompt_format,
                )
            )
        except SampleTooLongError:
            skipped += 1
    return encoded, skipped


def train_lora(
    model,
    tokenizer,
    frame: pd.DataFrame,
    config: LoraTrainingConfig,
    output_dir: str | Path,
    progress: Callable[[int], None] | None = None,
) -> TrainingSummary:
    """Fine-tune LoRA matrices on ``frame`` and save the adapter to ``output_dir``.

    ``model`` is modified in place (peft injects the LoRA layers), so pass a model that is
    not shared with scoring.
    """
    from peft import LoraConfig, get_peft_model

    max_tokens = clamp_max_tokens(config.max_tokens, model)
    if max_tokens != config.max_tokens:
        config = replace(config, max_tokens=max_tokens)
    encoded, skipped = _encode_training_rows(tokenizer, frame, config)
    if not encoded:
        raise ValueError("no usable training rows: the clean dataset is empty")
    if skipped:
        logger.info("skipped %d rows that are rejected or too long", skipped)

    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    device = next(peft_model.parameters()).device
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=config.learning_rate
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(encoded), generator=generator).tolist()

    losses = []
    cursor = 0
    for step in range(config.max_steps):
        batch = []
        for _ in range(min(config.batch_size, len(encoded))):
            if cursor == len(order):
                order = torch.randperm(len(encoded), generator=generator).tolist()
                cursor = 0
            batch.append(encoded[order[cursor]])
            cursor += 1

        # Right-padded (batch, seq) ids, mask and labels; padding carries no loss.
        length = max(len(s.input_ids) for s in batch)
        input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, sample in enumerate(batch):
            n = len(sample.input_ids)
            input_ids[i, :n] = torch.tensor(sample.input_ids)
            labels[i, :n] = torch.tensor(sample.labels())
            mask[i, :n] = 1

        output = peft_model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)
        )
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(float(output.loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss became {losses[-1]} at step {step + 1}")
        if progress:
            progress(step + 1)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(output_dir)
    summary = TrainingSummary(
        steps=config.max_steps,
        samples=len(encoded),
        skipped_samples=skipped,
        first_loss=losses[0] if losses else math.nan,
        last_loss=losses[-1] if losses else math.nan,
        adapter_dir=str(output_dir),
    )
    (output_dir / "training_summary.json").write_text(
        json.dumps({"summary": asdict(summary), "config": asdict(config)}, indent=2, default=list)
    )
    return summary
