"""Score a dataset once and print each score's exact bits, for the determinism test.

Usage: ``python -m tests.reliability.score_once MODEL_DIR DATASET``. Prints one JSON object
mapping each scoring path to the list of ``float.hex`` scores.
"""

import json
import sys

from gradsentry_dagster.data import read_dataset
from gradsentry_dagster.models import ModelSpec, load_model
from gradsentry_dagster.scoring import ScoringSettings, score_frame


def main(model_dir: str, dataset: str) -> None:
    loaded = load_model(ModelSpec(model=model_dir, device="cpu"))
    frame = read_dataset(dataset)
    settings = {
        "exact": ScoringSettings(batch_size=3),
        "reference_randomized": ScoringSettings(method="reference", estimator="randomized"),
    }
    output = {}
    for name, setting in settings.items():
        scores = score_frame(loaded.model, loaded.tokenizer, frame, setting)
        output[name] = [float(value).hex() for value in scores["score"]]
        output[name + "_loss"] = [float(value).hex() for value in scores["loss"]]
    print(json.dumps(output))


if __name__ == "__main__":
    main(*sys.argv[1:3])
