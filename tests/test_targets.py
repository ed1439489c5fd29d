"""Scores against inner linear layers and LoRA matrices, checked against per-sample autograd."""

import logging

import pytest
import torch

from gradsentry_dagster.scoring import ScoringSettings, encode_frame, score_frame
from gradsentry_dagster.spectral import low_rank_singular_values
from gradsentry_dagster.targets import (
    WeightTarget,
    batch_target_spectra,
    linear_gradient_singular_values,
    parse_target,
    reference_target_spectrum,
    resolve_modules,
)
from tests.conftest import make_tiny_llama
from tests.test_scoring import qa_frame

TOLERANCE = 1e-4


def with_lora(model, seed: int = 0):
    """Attach a rank-4 LoRA adapter to q_proj and v_proj, with random (non-zero) B matrices."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config).eval()


@pytest.fixture(scope="module")
def lora_model(tokenizer):
    return with_lora(make_tiny_llama(len(tokenizer), seed=5))


def assert_spectra_match(model, tokenizer, target_text, frame, batch_size=4):
    """Compare the batched spectra of every row with the one-sample autograd reference."""
    settings = ScoringSettings(target=target_text, batch_size=batch_size)
    target = parse_target(target_text)
    modules = resolve_modules(model, target)
    encoded, rejected = encode_frame(tokenizer, frame, settings)
    assert not rejected
    samples = list(encoded.values())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    batched, losses, _ = batch_target_spectra(model, samples, settings, pad_id, target, modules)
    top = batched.sort(dim=-1, descending=True).values[:, : settings.top_k]
    for index, sample in enumerate(samples):
        reference, loss = reference_target_spectrum(model, sample, settings, target, modules)
        assert reference[0] > 0, f"{target_text}: the reference gradient of row {index} is zero"
        assert torch.allclose(top[index], reference, atol=TOLERANCE, rtol=0), (
            f"{target_text}, row {index}: batched {top[index][:4].tolist()} "
            f"vs reference {reference[:4].tolist()}"
        )
        assert abs(float(losses[index]) - loss) < TOLERANCE


@pytest.mark.parametrize(
    "text, expected",
    [
        ("output_projection", WeightTarget("output_projection")),
        ("linear:model.layers.1.mlp.down_proj", WeightTarget("linear", "model.layers.1.mlp.down_proj")),
        ("lora_b:model.layers.*.self_attn.v_proj", WeightTarget("lora_b", "model.layers.*.self_attn.v_proj")),
        ("lora_a:*q_proj@0.5,1", WeightTarget("lora_a", "*q_proj", 0.5, 1.0)),
    ],
)
def test_parse_target_valid(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("lm_head", "expected 'output_projection'"),
        ("conv:model.layers.0", "expected 'output_projection'"),
        ("linear:", "pattern after 'linear:' is empty"),
        ("linear:x@0.5", "expected '@ROWS,COLS'"),
        ("linear:x@0,1", r"fractions must lie in \(0, 1\]"),
        ("linear:x@half,1", "invalid crop"),
    ],
)
def test_parse_target_invalid(text, message):
    with pytest.raises(ValueError, match=message):
        parse_target(text)


def test_settings_reject_invalid_target():
    with pytest.raises(ValueError, match="invalid target"):
        ScoringSettings(target="down_proj")


def test_fingerprint_includes_target():
    default = ScoringSettings().fingerprint()
    inner = ScoringSettings(target="linear:model.layers.1.mlp.down_proj").fingerprint()
    assert default != inner


@pytest.mark.parametrize(
    "target_text",
    [
        "linear:model.layers.1.mlp.down_proj",
        "linear:model.layers.0.mlp.up_proj",
        "linear:model.layers.*.self_attn.[qv]_proj@0.5,0.25",
        "linear:lm_head@0.125,0.125",
    ],
)
def test_linear_target_matches_reference(tokenizer, tiny_model, target_text):
    assert_spectra_match(tiny_model, tokenizer, target_text, qa_frame(6))


@pytest.mark.parametrize(
    "target_text",
    [
        "lora_b:model.layers.1.self_attn.v_proj",
        "lora_a:model.layers.*.self_attn.q_proj",
        "lora_b:model.layers.*@0.5,1",
    ],
)
def test_lora_target_matches_reference(tokenizer, lora_model, target_text):
    assert_spectra_match(lora_model, tokenizer, target_text, qa_frame(5), batch_size=5)


def test_scores_match_reference_path(tokenizer, tiny_model):
    frame = qa_frame(6)
    target = "linear:model.layers.1.mlp.down_proj"
    batched = score_frame(tiny_model, tokenizer, frame, ScoringSettings(target=target, batch_size=4))
    reference = score_frame(tiny_model, tokenizer, frame, ScoringSettings(target=target, method="reference"))
    assert (batched["status"] == "scored").all()
    assert (batched["score"] - reference["score"]).abs().max() < TOLERANCE
    assert (batched["loss"] - reference["loss"]).abs().max() < TOLERANCE
    assert list(batched["num_target_tokens"]) == list(reference["num_target_tokens"])


def test_head_as_linear_equals_output_projection(tokenizer, tiny_model):
    # The hook path on the head and the forward-only output-projection path are two
    # independent computations of the same gradient.
    frame = qa_frame(6)
    hooked = score_frame(tiny_model, tokenizer, frame, ScoringSettings(target="linear:lm_head@0.125,0.125"))
    forward_only = score_frame(tiny_model, tokenizer, frame, ScoringSettings())
    assert (hooked["score"] - forward_only["score"]).abs().max() < TOLERANCE


@pytest.mark.parametrize("batch_size", [2, 7])
def test_padding_contributes_nothing(tokenizer, tiny_model, batch_size):
    frame = qa_frame(7)
    settings = dict(target="linear:model.layers.0.mlp.down_proj")
    single = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=1, **settings))
    batched = score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=batch_size, **settings))
    assert (single["score"] - batched["score"]).abs().max() < 1e-5


def test_dense_route_matches_gram_route():
    # 12 tokens against a 5-column matrix takes the dense route; the Gram route is exact too.
    torch.manual_seed(0)
    e = torch.randn(3, 12, 40)
    h = torch.randn(3, 12, 5)
    e[2, 8:] = 0
    h[2, 8:] = 0
    dense = linear_gradient_singular_values(e, h, top_k=16)
    gram = low_rank_singular_values(e, h, top_k=16)
    assert dense.shape == (3, 16)
    assert torch.allclose(dense, gram, atol=1e-6)
    assert (dense[:, 5:] == 0).all()


def test_lora_target_without_adapter_raises(tokenizer, tiny_model):
    with pytest.raises(ValueError, match="needs a peft LoRA adapter"):
        resolve_modules(tiny_model, parse_target("lora_b:*"))


def test_unmatched_pattern_names_candidates(tokenizer, tiny_model):
    with pytest.raises(ValueError, match="matched none of the model's 15 candidate layers"):
        resolve_modules(tiny_model, parse_target("linear:model.layers.9.mlp.down_proj"))


def test_pattern_ignores_peft_names(lora_model):
    # The same pattern names the base layer with or without the peft wrapper around it.
    modules = resolve_modules(lora_model, parse_target("linear:model.layers.0.self_attn.q_proj"))
    assert [name for name, _ in modules] == ["model.layers.0.self_attn.q_proj"]
    assert modules[0][1] is lora_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    lora = resolve_modules(lora_model, parse_target("lora_a:model.layers.0.self_attn.q_proj"))
    assert [name for name, _ in lora] == ["model.layers.0.self_attn.q_proj.lora_A.default"]


def test_new_adapter_a_matrix_scores_zero(tokenizer, caplog):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny_llama(len(tokenizer), seed=2), LoraConfig(r=4, target_modules=["q_proj"])
    ).eval()
    frame = qa_frame(3)
    with caplog.at_level(logging.WARNING, logger="gradsentry_dagster.targets"):
        a_scores = score_frame(model, tokenizer, frame, ScoringSettings(target="lora_a:*"))
    b_scores = score_frame(model, tokenizer, frame, ScoringSettings(target="lora_b:*"))
    assert (a_scores["score"] == 0).all()
    assert "A matrices get no gradient" in caplog.text
    assert (b_scores["score"] > 0).all()


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_targets_match_reference(embedded_model_path, qa_data_dir):
    from gradsentry_dagster.attacks import badnets
    from gradsentry_dagster.data import read_dataset
    from gradsentry_dagster.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(device="cpu"))
    frame = read_dataset(qa_data_dir / "webquestions" / "devtest.json", preset="webquestions", limit=4)
    frame = badnets(frame, 0.5, seed=1).frame
    for target_text in ("linear:model.layers.29.mlp.down_proj", "linear:model.layers.12.self_attn.o_proj"):
        assert_spectra_match(loaded.model, loaded.tokenizer, target_text, frame)

    model = with_lora(loaded.model)
    for target_text in ("lora_a:model.layers.29.self_attn.q_proj", "lora_b:model.layers.2[89].self_attn.*"):
        assert_spectra_match(model, loaded.tokenizer, target_text, frame)
