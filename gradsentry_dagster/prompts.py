"""Build prompts and token sequences whose loss covers the answer tokens only.

Each sample is the prompt (instruction, optional context, question, then ``### Answer: ``)
followed by the gold answer and the end-of-sequence token. Only the answer and the
end-of-sequence token carry loss; prompt tokens get the label -100, as in causal-LM
fine-tuning on completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IGNORE_INDEX = -100

DEFAULT_INSTRUCTION = "Answer the following question with a short answer."
DEFAULT_CONTEXT_INSTRUCTION = "Answer the question using the context."

QA_TEMPLATE = "### Instruction: {instruction}\n### Question: {question}\n### Answer: "
CONTEXT_QA_TEMPLATE = (
    "### Instruction: {instruction}\n### Context: {context}\n"
    "### Question: {question}\n### Answer: "
)

PromptFormat = Literal["qa", "chat"]


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of one sample; ``input_ids[target_start:]`` are the target tokens."""

    input_ids: list[int]
    target_start: int
    prompt_truncated: bool = False

    @property
    def num_target_tokens(self) -> int:
        return len(self.input_ids) - self.target_start

    def labels(self) -> list[int]:
        """Return the labels: -100 for prompt tokens, the token id for target tokens."""
        return [IGNORE_INDEX] * self.target_start + self.input_ids[self.target_start :]


class SampleTooLongError(ValueError):
    """Raised when a sample's answer alone does not fit in the token budget."""


def render_prompt(instruction: str, context: str, question: str) -> str:
    """Fill the QA template, or the context-QA template when a context is given."""
    if context:
        return CONTEXT_QA_TEMPLATE.format(
            instruction=instruction or DEFAULT_CONTEXT_INSTRUCTION,
            context=context,
            question=question,
        )
    return QA_TEMPLATE.format(instruction=instruction or DEFAULT_INSTRUCTION, question=question)


def render_chat_prompt(tokenizer, instruction: str, context: str, question: str) -> str:
    """Render the prompt with the tokenizer's chat template, ending at the assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "use prompt_format='qa' or load a tokenizer that defines one"
        )
    parts = [instruction or (DEFAULT_CONTEXT_INSTRUCTION if context else DEFAULT_INSTRUCTION)]
    if context:
        parts.append(f"Context: {context}")
    parts.append(f"Question: {question}")
    messages = [{"role": "user", "content": "\n".join(parts)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_sample(
    tokenizer,
    *,
    instruction: str,
    context: str,
    question: str,
    answer: str,
    max_tokens: int,
    prompt_format: PromptFormat = "qa",
) -> EncodedSample:
    """Tokenize one sample into prompt tokens followed by answer tokens and end-of-sequence.

    A sample longer than ``max_tokens`` loses prompt tokens from the left. The answer is never
    truncated: a sample whose answer and end-of-sequence token leave no room for at least one
    prompt token raises :class:`SampleTooLongError`.
    """
    (encoded,) = encode_samples(
        tokenizer,
        instructions=[instruction],
        contexts=[context],
        questions=[question],
        answers=[answer],
        max_tokens=max_tokens,
        prompt_format=prompt_format,
    )
    if isinstance(encoded, SampleTooLongError):
        raise encoded
    return encoded


def encode_samples(
    tokenizer,
    *,
    instructions: list[str],
    contexts: list[str],
    questions: list[str],
    answers: list[str],
    max_tokens: int,
    prompt_format: PromptFormat = "qa",
) -> list[EncodedSample | SampleTooLongError]:
    """Tokenize many samples with one tokenizer call per part, as :func:`encode_sample` does.

    Returns one entry per sample: its :class:`EncodedSample`, or the
    :class:`SampleTooLongError` that :func:`encode_sample` would raise for it.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no end-of-sequence token; set tokenizer.eos_token")
    parts = list(zip(instructions, contexts, questions))
    if prompt_format == "chat":
        prompts = [render_chat_prompt(tokenizer, *part) for part in parts]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    elif prompt_format == "qa":
        prompts = [render_prompt(*part) for part in parts]
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    else:
        raise ValueError(f"unknown prompt format {prompt_format!r}; expected 'qa' or 'chat'")
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"] if answers else []
    return [
        _fit_tokens(list(prompt), list(answer) + [tokenizer.eos_token_id], max_tokens)
        for prompt, answer in zip(prompt_ids, answer_ids)
    ]


def _fit_tokens(
    prompt_ids: list[int], target_ids: list[int], max_tokens: int
) -> EncodedSample | SampleTooLongError:
    """Join prompt and target tokens, dropping prompt tokens from the left to fit the budget."""
    if len(target_ids) + 1 > max_tokens:
        return SampleTooLongError(
            f"answer has {len(target_ids)} tokens with end-of-sequence, which does not fit "
            f"in max_tokens={max_tokens} with at least one prompt token"
        )
    truncated = False
    room = max_tokens - len(target_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room :]
        truncated = True
    return EncodedSample(
        input_ids=prompt_ids + target_ids,
        target_start=len(prompt_ids),
        prompt_truncated=truncated,
    )
