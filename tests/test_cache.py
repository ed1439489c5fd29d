import math

import pandas as pd
import pytest

from gradsentry_dagster.cache import ScoreCache
from gradsentry_dagster.data import FieldMapping, records_to_frame
from gradsentry_dagster.models import ModelSpec, load_model
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from tests.conftest import make_tiny_llama


def make_frame(count: int, offset: int = 0) -> pd.DataFrame:
    records = [
        (i, {"id": f"q{i}", "question": f"Which colour is thing {i}?", "answer": ["red"] * (1 + i % 4) + [f"v{i}"]}, None)
        for i in range(offset, offset + count)
    ]
    return records_to_frame(records, FieldMapping())


def assert_same_scores(left: pd.DataFrame, right: pd.DataFrame, tolerance: float = 0.0) -> None:
    assert list(left["row_id"]) == list(right["row_id"])
    assert list(left["status"]) == list(right["status"])
    assert list(left["num_target_tokens"]) == list(right["num_target_tokens"])
    assert list(left["reason"]) == list(right["reason"])
    assert (left["score"] - right["score"]).abs().max() <= tolerance
    assert (left["loss"] - right["loss"]).abs().max() <= max(tolerance, 1e-6)


def test_cache_returns_identical_scores(tmp_path, tokenizer, tiny_model):
    frame = make_frame(12)
    settings = ScoringSettings(batch_size=4)
    first_cache = ScoreCache(tmp_path, "model-a")
    first = score_frame(tiny_model, tokenizer, frame, settings, cache=first_cache)
    assert first_cache.misses == 12

    second_cache = ScoreCache(tmp_path, "model-a")
    second = score_frame(tiny_model, tokenizer, frame, settings, cache=second_cache)
    assert second_cache.hits == 12
    assert second_cache.misses == 0
    assert_same_scores(first, second)
    assert second["score"].dtype == "float64"
    assert second["num_target_tokens"].dtype == "int64"


def test_rescan_scores_only_new_rows(tmp_path, tokenizer, tiny_model):
    settings = ScoringSettings(batch_size=8)
    old = make_frame(99)
    score_frame(tiny_model, tokenizer, old, settings, cache=ScoreCache(tmp_path, "model-a"))

    # One new row in a hundred, inserted in the middle; the order of old rows is kept.
    grown = pd.concat([old.iloc[:50], make_frame(1, offset=1000), old.iloc[50:]], ignore_index=True)
    cache = ScoreCache(tmp_path, "model-a")
    rescan = score_frame(tiny_model, tokenizer, grown, settings, cache=cache)
    full = score_frame(tiny_model, tokenizer, grown, settings)

    assert cache.misses == 1
    assert cache.hits == 99
    # The new row is scored in a batch of its own, which may change the last float bits.
    assert_same_scores(rescan, full, tolerance=1e-6)


def test_cache_keeps_rejected_and_too_long_rows(tmp_path, tokenizer, tiny_model):
    frame = make_frame(4)
    frame.loc[1, "status"] = "rejected"
    frame.loc[1, "reject_reason"] = "answer is missing or null"
    frame.loc[2, "answer"] = "word " * 80
    settings = ScoringSettings(max_tokens=48)
    first = score_frame(tiny_model, tokenizer, frame, settings, cache=ScoreCache(tmp_path, "m"))
    cache = ScoreCache(tmp_path, "m")
    second = score_frame(tiny_model, tokenizer, frame, settings, cache=cache)

    assert list(second["status"]) == ["scored", "rejected", "rejected", "scored"]
    assert second.at[2, "reason"].startswith("answer too long")
    assert math.isnan(second.at[2, "score"])
    # The ingestion rejection is not cached; the too-long rejection and two scores are.
    assert cache.hits == 3
    assert_same_scores(first, second)


@pytest.mark.parametrize(
    "change",
    [
        {"top_k": 8},
        {"row_crop": 0.25},
        {"max_tokens": 40},
    ],
)
def test_settings_change_invalidates(tmp_path, tokenizer, tiny_model, change):
    frame = make_frame(5)
    score_frame(tiny_model, tokenizer, frame, ScoringSettings(), cache=ScoreCache(tmp_path, "m"))
    cache = ScoreCache(tmp_path, "m")
    score_frame(tiny_model, tokenizer, frame, ScoringSettings(**change), cache=cache)
    assert cache.hits == 0
    assert cache.misses == 5


def test_execution_settings_share_entries(tmp_path, tokenizer, tiny_model):
    frame = make_frame(5)
    score_frame(tiny_model, tokenizer, frame, ScoringSettings(batch_size=2), cache=ScoreCache(tmp_path, "m"))
    cache = ScoreCache(tmp_path, "m")
    changed = ScoringSettings(batch_size=5, padding_side="left", share_prefix=False)
    score_frame(tiny_model, tokenizer, frame, changed, cache=cache)
    assert cache.hits == 5


def test_model_and_adapter_change_invalidate(tmp_path, tokenizer, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))
    other_model = make_tiny_llama(len(tokenizer), seed=7)
    other_dir = tmp_path / "other-model"
    other_model.save_pretrained(other_dir)
    tokenizer.save_pretrained(other_dir)
    other = load_model(ModelSpec(model=str(other_dir), device="cpu"))

    lora = get_peft_model(make_tiny_llama(len(tokenizer)), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    lora.save_pretrained(adapter_dir)
    adapted = load_model(ModelSpec(model=str(tiny_model_dir), adapter=str(adapter_dir), device="cpu"))

    fingerprints = {base.fingerprint, other.fingerprint, adapted.fingerprint}
    assert len(fingerprints) == 3

    frame = make_frame(4)
    settings = ScoringSettings()
    cache_dir = tmp_path / "cache"
    base_scores = score_frame(base.model, base.tokenizer, frame, settings, cache=ScoreCache(cache_dir, base.fingerprint))
    for loaded in (other, adapted):
        cache = ScoreCache(cache_dir, loaded.fingerprint)
        scores = score_frame(loaded.model, loaded.tokenizer, frame, settings, cache=cache)
        assert cache.hits == 0
        assert (scores["score"] - base_scores["score"]).abs().max() > 1e-6


def test_unreadable_part_is_rescored(tmp_path, tokenizer, tiny_model):
    frame = make_frame(3)
    settings = ScoringSettings()
    first = score_frame(tiny_model, tokenizer, frame, settings, cache=ScoreCache(tmp_path, "m"))
    cache = ScoreCache(tmp_path, "m")
    (part,) = cache.partition(settings.fingerprint()).glob("part-*.parquet")
    part.write_bytes(b"not parquet")
    second = score_frame(tiny_model, tokenizer, frame, settings, cache=cache)
    assert cache.misses == 3
    assert_same_scores(first, second)


def test_compact_keeps_every_entry(tmp_path, tokenizer, tiny_model):
    frame = make_frame(6)
    settings = ScoringSettings(batch_size=2)
    cache = ScoreCache(tmp_path, "m", flush_rows=2)
    first = score_frame(tiny_model, tokenizer, frame, settings, cache=cache)
    folder = cache.partition(settings.fingerprint())
    assert len(list(folder.glob("part-*.parquet"))) == 3
    cache.compact(settings.fingerprint())
    assert len(list(folder.glob("part-*.parquet"))) == 1

    reread = ScoreCache(tmp_path, "m")
    second = score_frame(tiny_model, tokenizer, frame, settings, cache=reread)
    assert reread.hits == 6
    assert_same_scores(first, second)
