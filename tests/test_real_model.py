"""SmolLM2-135M-Instruct on real WebQuestions rows with BadNets and short-target poison."""

import pytest

from gradsentry_dagster.attacks import badnets, short_target
from gradsentry_dagster.data import read_dataset
from gradsentry_dagster.metrics import auroc
from gradsentry_dagster.models import ModelSpec, load_model
from gradsentry_dagster.resources import ScanPolicy
from gradsentry_dagster.scan import scan_frame
from gradsentry_dagster.scoring import ScoringSettings, score_frame
from gradsentry_dagster.thresholds import ThresholdConfig

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2(embedded_model_path):
    return load_model(ModelSpec(device="cpu"))


def test_smollm2_badnets_auroc(smollm2, qa_data_dir):
    frame = read_dataset(qa_data_dir / "webquestions" / "trainmodel.json", preset="webquestions", limit=200)
    poisoned = badnets(frame, 0.1, seed=0).frame
    scores = score_frame(smollm2.model, smollm2.tokenizer, poisoned, ScoringSettings(batch_size=16))

    scored = (scores["status"] == "scored").to_numpy()
    assert scored.all(), scores.loc[~scored, "reason"].tolist()
    labels = poisoned["poisoned"].to_numpy(dtype=bool)
    assert labels.sum() == 20
    value = auroc(labels, scores["score"].to_numpy())
    print(f"SmolLM2-135M, 200 WebQuestions rows, 10% BadNets: AUROC {value:.3f}")
    assert value >= 0.90


def test_smollm2_exact_matches_reference(smollm2, qa_data_dir):
    frame = read_dataset(qa_data_dir / "webquestions" / "devtest.json", preset="webquestions", limit=6)
    poisoned = badnets(frame, 0.5, seed=1).frame
    exact = score_frame(smollm2.model, smollm2.tokenizer, poisoned, ScoringSettings(batch_size=3))
    reference = score_frame(smollm2.model, smollm2.tokenizer, poisoned, ScoringSettings(method="reference"))
    assert (exact["score"] - reference["score"]).abs().max() < 1e-4


def test_default_robust_mode_catches_short_target(smollm2, qa_data_dir):
    frame = read_dataset(qa_data_dir / "webquestions" / "trainmodel.json", preset="webquestions", limit=100)
    poisoned = short_target(frame, 0.2, seed=0).frame
    labels = poisoned["poisoned"].to_numpy(dtype=bool)
    policy = ScanPolicy()
    settings = ScoringSettings(batch_size=16)

    robust = scan_frame(
        smollm2.model,
        smollm2.tokenizer,
        poisoned,
        settings,
        policy.threshold_config(),
        mode=policy.mode,
        robust_calibration=policy.robust_calibration("embedded:smollm2-135m-instruct"),
    )
    paper = scan_frame(smollm2.model, smollm2.tokenizer, poisoned, settings, ThresholdConfig())

    flagged = robust.scores["flagged"].to_numpy(dtype=bool)
    recall = flagged[labels].mean()
    paper_recall = paper.scores["flagged"].to_numpy(dtype=bool)[labels].mean()
    print(f"SmolLM2-135M, 100 WebQuestions rows, 20% short target: robust recall {recall:.2f}, paper {paper_recall:.2f}")
    assert labels.sum() == 20
    assert recall >= 0.7
    assert recall > paper_recall
    assert flagged[~labels].mean() <= 0.2
