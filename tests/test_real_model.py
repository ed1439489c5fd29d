"""SmolLM2-135M-Instruct on real WebQuestions rows with BadNets poison."""

import pytest

from gradsentry_dagster.attacks import badnets
from gradsentry_dagster.data import read_dataset
from gradsentry_dagster.metrics import auroc
from gradsentry_dagster.models import ModelSpec, load_model
from gradsentry_dagster.scoring import ScoringSettings, score_frame

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
