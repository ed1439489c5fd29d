import json
import subprocess
import sys

import pytest
import torch

from gradsentry_dagster.prompts import EncodedSample, encode_sample
from gradsentry_dagster.scoring import (
    ScoringSettings,
    pad_batch,
    score_frame,
    shared_prefix_length,
    template_prefix_length,
)
from tests.conftest import PROJECT_ROOT, make_tiny_llama
from tests.test_scoring import qa_frame


@pytest.fixture(scope="module")
def random_models(tokenizer):
    """Tiny random Llamas of different seeds and widths, one with untied embeddings, each with
    its reference scores on ``qa_frame(13)``."""
    frame = qa_frame(13)
    models = [
        make_tiny_llama(len(tokenizer), seed=11, tied=True, hidden_size=64),
        make_tiny_llama(len(tokenizer), seed=12, tied=False, hidden_size=96),
    ]
    settings = ScoringSettings(method="reference")
    return [(model, score_frame(model, tokenizer, frame, settings)) for model in models]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 4, 13])
def test_fast_path_equals_reference(tokenizer, random_models, padding_side, batch_size):
    frame = qa_frame(13)
    settings = ScoringSettings(batch_size=batch_size, padding_side=padding_side)
    for model, reference in random_models:
        fast = score_frame(model, tokenizer, frame, settings)
        assert (fast["score"] - reference["score"]).abs().max() < 1e-5
        assert (fast["loss"] - reference["loss"]).abs().max() < 1e-4
        assert list(fast["num_target_tokens"]) == list(reference["num_target_tokens"])


def test_prefix_sharing_changes_nothing(tokenizer, tiny_model):
    frame = qa_frame(9)
    shared = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=9))
    unshared = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=9, share_prefix=False))
    assert (shared["score"] - unshared["score"]).abs().max() < 1e-6


def test_bfloat16_within_looser_bound(tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=5).to(torch.bfloat16)
    frame = qa_frame(8)
    reference = score_frame(model, tokenizer, frame, ScoringSettings(method="reference"))
    for padding_side in ("right", "left"):
        fast = score_frame(model, tokenizer, frame, ScoringSettings(batch_size=4, padding_side=padding_side))
        assert fast["score"].notna().all()
        # The body runs in bfloat16 (8 mantissa bits); logits and spectra are float32 or wider.
        assert (fast["score"] - reference["score"]).abs().max() < 2e-2


def test_shared_prefix_covers_template(tokenizer):
    samples = [
        encode_sample(tokenizer, instruction="", context="", question=q, answer="x", max_tokens=64)
        for q in ("Who is it?", "Where is it?", "Which one?")
    ]
    length = shared_prefix_length(samples)
    template = encode_sample(tokenizer, instruction="", context="", question="", answer="x", max_tokens=64)
    assert length >= 10
    assert length < min(sample.target_start for sample in samples)
    assert samples[0].input_ids[:length] == template.input_ids[:length]
    assert all(sample.input_ids[:length] == samples[0].input_ids[:length] for sample in samples)


def test_shared_prefix_stops_before_first_target():
    samples = [EncodedSample([5, 6, 7, 8], target_start=2), EncodedSample([5, 6, 7, 9, 9], target_start=3)]
    # Position 1 predicts the first target of the first sample, so only token 0 is shared.
    assert shared_prefix_length(samples) == 1
    assert shared_prefix_length(samples[:1]) == 0
    assert shared_prefix_length([EncodedSample([1, 2], 1), EncodedSample([3, 2], 1)]) == 0


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pad_batch_layout(padding_side):
    samples = [EncodedSample([1, 2, 3, 4, 5], target_start=3), EncodedSample([1, 2, 9], target_start=2)]
    batch = pad_batch(samples, pad_id=0, prefix_length=1, padding_side=padding_side)
    if padding_side == "right":
        assert batch.input_ids.tolist() == [[2, 3, 4, 5], [2, 9, 0, 0]]
        assert batch.position_ids[0].tolist() == [1, 2, 3, 4]
        assert batch.hidden_positions.tolist() == [[1, 2], [0, 0]]
    else:
        assert batch.input_ids.tolist() == [[2, 3, 4, 5], [0, 0, 2, 9]]
        assert batch.position_ids[1, 2:].tolist() == [1, 2]
        assert batch.hidden_positions.tolist() == [[1, 2], [2, 0]]
    assert batch.attention_mask[:, 0].tolist() == [1, 1]
    assert batch.attention_mask.sum(dim=1).tolist() == [5, 3]
    assert batch.labels.tolist() == [[4, 5], [9, 0]]
    assert batch.target_mask.tolist() == [[True, True], [True, False]]


def test_execution_settings_leave_fingerprint():
    base = ScoringSettings()
    same = ScoringSettings(batch_size=64, padding_side="left", share_prefix=False)
    assert base.fingerprint() == same.fingerprint()
    assert base.fingerprint() != ScoringSettings(top_k=8).fingerprint()
    with pytest.raises(ValueError, match="padding_side"):
        ScoringSettings(padding_side="middle")


def test_benchmark_script_gpu_mode_on_cpu(tmp_path, qa_data_dir, embedded_model_path):
    # The CUDA variant with a tiny shape instead of the 7B one, on the CPU.
    output = tmp_path / "performance.json"
    command = [
        sys.executable, "benchmarks/performance.py", "--device", "cpu", "--shape", "tiny",
        "--dtype", "bfloat16", "--batch-sizes", "1,4", "--n-samples", "6", "--streaming-rows", "",
        "--data", str(qa_data_dir / "webquestions" / "devtest.json"), "--output", str(output),
    ]
    subprocess.run(command, cwd=PROJECT_ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(output.read_text())
    for key in (
        "model", "device", "n_samples", "batch_size", "reference_ms_per_sample", "fast_ms_per_sample",
        "forward_ms_per_sample", "speedup_vs_reference", "throughput_vs_forward",
        "max_abs_score_diff", "peak_rss_mb",
    ):
        assert key in result
    assert [run["batch_size"] for run in result["batch_sizes"]] == [1, 4]
    assert result["n_samples"] == 6
    assert result["max_abs_score_diff"] < 2e-2


@pytest.mark.parametrize("prompt_format", ["qa", "chat"])
def test_template_prefix_length_within_template(tokenizer, prompt_format):
    settings = ScoringSettings(prompt_format=prompt_format)
    length = template_prefix_length(tokenizer, settings)
    questions = ("Who founded the city?", "which river is longest?", "1990 winner?")
    samples = [
        encode_sample(
            tokenizer, instruction="", context="", question=q, answer="a", max_tokens=128,
            prompt_format=prompt_format,
        )
        for q in questions
    ]
    assert length >= 10
    assert length <= shared_prefix_length(samples)
