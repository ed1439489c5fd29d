import math

import pandas as pd
import pytest
import torch

from gradsentry_dagster.data import FieldMapping, records_to_frame
from gradsentry_dagster.prompts import SampleTooLongError, encode_sample
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from gradsentry_dagster.spectral import dense_singular_values, low_rank_singular_values, spectral_entropy
from tests.conftest import make_tiny_llama


def qa_frame(count: int = 10) -> pd.DataFrame:
    records = [
        (i, {"question": f"What is item {i}?", "answer": ["value"] * (1 + i % 5) + ["x" * (i + 1)]}, None)
        for i in range(count)
    ]
    return records_to_frame(records, FieldMapping())


def test_entropy_bounds_and_extremes():
    uniform = spectral_entropy(torch.ones(16))
    single = spectral_entropy(torch.tensor([3.0] + [0.0] * 15))
    zero = spectral_entropy(torch.zeros(16))
    assert float(uniform) == pytest.approx(1.0)
    assert float(single) == pytest.approx(0.0)
    assert float(zero) == 0.0


def test_gram_spectrum_matches_dense_svd():
    torch.manual_seed(0)
    e = torch.randn(3, 7, 50)
    h = torch.randn(3, 7, 9)
    e[1, 4:] = 0
    h[1, 4:] = 0
    from_gram = low_rank_singular_values(e, h, top_k=16)
    for i in range(3):
        dense = dense_singular_values(e[i].T @ h[i], top_k=16)
        assert torch.allclose(from_gram[i], dense, atol=1e-5)


def test_exact_path_matches_reference(tokenizer, tiny_model):
    frame = qa_frame(10)
    exact = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=4))
    reference = score_frame(tiny_model, tokenizer, frame, ScoringSettings(method="reference"))
    assert (exact["status"] == "scored").all()
    assert (exact["score"] - reference["score"]).abs().max() < 1e-4
    assert (exact["loss"] - reference["loss"]).abs().max() < 1e-4
    assert list(exact["num_target_tokens"]) == list(reference["num_target_tokens"])


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_exact_path_independent_of_batch_size(tokenizer, tiny_model, batch_size):
    frame = qa_frame(7)
    single = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=1))
    batched = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=batch_size))
    assert (single["score"] - batched["score"]).abs().max() < 1e-5


def test_untied_model_matches_reference(tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=3, tied=False)
    frame = qa_frame(5)
    exact = score_frame(model, tokenizer, frame, ScoringSettings(batch_size=5))
    reference = score_frame(model, tokenizer, frame, ScoringSettings(method="reference"))
    assert (exact["score"] - reference["score"]).abs().max() < 1e-4


def test_tied_score_uses_output_projection_only(tokenizer, tiny_model):
    # With tied embeddings the shared weight also receives an input-embedding gradient;
    # the reference path must ignore it, so its score equals an untied copy's score.
    untied = make_tiny_llama(len(tokenizer), tied=False)
    untied.load_state_dict(tiny_model.state_dict(), strict=False)
    untied.lm_head.weight.data.copy_(tiny_model.lm_head.weight.data)
    frame = qa_frame(4)
    tied_scores = score_frame(tiny_model, tokenizer, frame, ScoringSettings(method="reference"))
    untied_scores = score_frame(untied, tokenizer, frame, ScoringSettings(method="reference"))
    assert (tied_scores["score"] - untied_scores["score"]).abs().max() < 1e-5


def test_randomized_estimator_close_to_exact(tokenizer, tiny_model):
    frame = qa_frame(6)
    exact = score_frame(tiny_model, tokenizer, frame, ScoringSettings(method="reference"))
    randomized = score_frame(
        tiny_model, tokenizer, frame, ScoringSettings(method="reference", estimator="randomized")
    )
    # Gradients of these samples have rank <= 16, so q = 16 recovers the spectrum closely.
    assert (exact["score"] - randomized["score"]).abs().max() < 1e-3


def test_scores_in_unit_interval_and_single_token_zero(tokenizer, tiny_model):
    frame = records_to_frame([(0, {"question": "Yes?", "answer": "yes"}, None)], FieldMapping())
    frame.at[0, "answer"] = ""
    scores = score_frame(tiny_model, tokenizer, qa_frame(8), ScoringSettings())
    assert scores["score"].between(0, 1).all()


def test_rejected_rows_pass_through(tokenizer, tiny_model):
    frame = qa_frame(3)
    frame.loc[1, "status"] = "rejected"
    frame.loc[1, "reject_reason"] = "answer is missing or null"
    scores = score_frame(tiny_model, tokenizer, frame, ScoringSettings())
    assert list(scores["status"]) == ["scored", "rejected", "scored"]
    assert scores.at[1, "reason"] == "answer is missing or null"
    assert math.isnan(scores.at[1, "score"])


def test_long_prompt_truncated_from_left(tokenizer):
    sample = encode_sample(
        tokenizer, instruction="", context="", question="word " * 200, answer="short", max_tokens=32
    )
    assert len(sample.input_ids) == 32
    assert sample.prompt_truncated
    assert sample.input_ids[-1] == tokenizer.eos_token_id


def test_answer_too_long_raises(tokenizer):
    with pytest.raises(SampleTooLongError, match="max_tokens=8"):
        encode_sample(tokenizer, instruction="", context="", question="q?", answer="word " * 20, max_tokens=8)


def test_labels_cover_answer_and_eos_only(tokenizer):
    sample = encode_sample(tokenizer, instruction="", context="", question="q?", answer="Paris", max_tokens=64)
    labels = sample.labels()
    assert all(label == -100 for label in labels[: sample.target_start])
    assert labels[sample.target_start :] == sample.input_ids[sample.target_start :]
    assert labels[-1] == tokenizer.eos_token_id
