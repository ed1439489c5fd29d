"""Run the demo pipeline twice on the embedded model and data, in a real Dagster instance.

1. The demo set with 20% BadNets poison: the gate check fails and fine-tuning does not run.
2. The same rows without poison: the gate passes and a LoRA adapter is fine-tuned.

Runs are stored in ``$DAGSTER_HOME`` (default ``./.dagster_home``), so ``dagster dev`` shows
them afterwards. Usage: ``python -m gradsentry_dagster.demo [--rows N] [--poison-rate R]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def _scenario(name: str, rows: int, poison_rate: float, steps: int, instance) -> dict:
    from dagster import materialize

    from gradsentry_dagster.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
    from gradsentry_dagster.definitions import default_resources

    run_config = {
        "ops": {
            "raw_dataset": {"config": {"demo_rows": rows, "demo_poison_rate": poison_rate}},
            "lora_finetuned_adapter": {"config": {"max_steps": steps}},
        }
    }
    started = time.monotonic()
    result = materialize(
        PIPELINE_ASSETS + PIPELINE_CHECKS,
        instance=instance,
        resources=default_resources(),
        run_config=run_config,
        raise_on_error=False,
        tags={"gradsentry/demo": name},
    )
    checks = result.get_asset_check_evaluations()
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    check = checks[0] if checks else None
    return {
        "name": name,
        "run_id": result.run_id,
        "seconds": time.monotonic() - started,
        "gate_passed": bool(check and check.passed),
        "flagged_fraction": check.metadata["flagged_fraction"].value if check else float("nan"),
        "max_flagged_fraction": check.metadata["max_flagged_fraction"].value if check else float("nan"),
        "finetuned": "lora_finetuned_adapter" in materialized,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400, help="demo rows per scenario (default 400)")
    parser.add_argument(
        "--poison-rate", type=float, default=0.2, help="BadNets poison fraction of the first scenario (default 0.2)"
    )
    parser.add_argument("--steps", type=int, default=20, help="LoRA fine-tuning steps (default 20)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    started = time.monotonic()
    poisoned = _scenario("poisoned", args.rows, args.poison_rate, args.steps, instance)
    clean = _scenario("clean", args.rows, 0.0, args.steps, instance)

    print("\nGradSentry demo (embedded SmolLM2-135M-Instruct, FanOutQA dev sub-questions)")
    for outcome, rate in ((poisoned, args.poison_rate), (clean, 0.0)):
        print(
            f"  {outcome['name']:>8}: poison rate {rate:.0%}, flagged {outcome['flagged_fraction']:.1%} "
            f"(max {outcome['max_flagged_fraction']:.0%}) -> gate "
            f"{'PASSED' if outcome['gate_passed'] else 'FAILED'}, fine-tuning "
            f"{'ran' if outcome['finetuned'] else 'blocked'} [{outcome['seconds']:.0f} s, run {outcome['run_id']}]"
        )
    print(f"  total {time.monotonic() - started:.0f} s; runs stored in {home}; see them with `dagster dev`")

    expected = (not poisoned["gate_passed"] and not poisoned["finetuned"]) and (
        clean["gate_passed"] and clean["finetuned"]
    )
    if not expected:
        print("  the demo did not behave as expected: check the run logs above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
