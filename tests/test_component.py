"""GradSentryScanComponent: loaded from a defs.yaml, and listed by `dg list components`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, build_sensor_context, instance_for_test
from dagster.components.testing import create_defs_folder_sandbox

from gradsentry_dagster.components import GradSentryScanComponent
from gradsentry_dagster.versions import version_key

COMPONENT_TYPE = "gradsentry_dagster.components.GradSentryScanComponent"


def test_component_loads_from_yaml(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    dataset = folder / "faq.jsonl"
    dataset.write_text('{"question": "q", "answer": "a"}\n')
    attributes = {
        "name": "support_faq",
        "dataset": str(folder / "*.jsonl"),
        "model": "/models/tiny",
        "batch_size": 4,
        "policy": {"threshold_rule": "fixed", "fixed_threshold": 0.6, "max_flagged_fraction": 0.1},
        "schedule": "0 3 * * *",
        "shards": 2,
        "storage_dir": str(tmp_path / "storage"),
    }
    with create_defs_folder_sandbox() as sandbox:
        defs_path = sandbox.scaffold_component(
            component_cls=GradSentryScanComponent,
            defs_yaml_contents={"type": COMPONENT_TYPE, "attributes": attributes},
        )
        with sandbox.load_component_and_build_defs(defs_path=defs_path) as (component, defs):
            assert isinstance(component, GradSentryScanComponent)
            assert component.policy.fixed_threshold == 0.6
            keys = {spec.key for spec in defs.resolve_all_asset_specs()}
            assert AssetKey(["support_faq", "gradient_entropy_scores"]) in keys
            assert AssetKey(["support_faq", "lora_finetuned_adapter"]) in keys
            assert defs.resolve_schedule_def("support_faq_rescan_schedule").cron_schedule == "0 3 * * *"
            assert defs.resolve_job_def("support_faq_scan_and_finetune").partitions_def.name == (
                "support_faq_versions"
            )
            assert defs.resources["policy"].max_flagged_fraction == 0.1
            assert defs.resources["model"].model == "/models/tiny"
            assert defs.resources["gradsentry_io_manager"].base_dir == str(tmp_path / "storage")

            sensor = defs.resolve_sensor_def("support_faq_dataset_versions")
            with instance_for_test() as instance:
                result = sensor(build_sensor_context(instance=instance))
            assert [request.partition_key for request in result.run_requests] == [version_key(dataset)]


def test_component_rejects_invalid_policy():
    with create_defs_folder_sandbox() as sandbox:
        defs_path = sandbox.scaffold_component(
            component_cls=GradSentryScanComponent,
            defs_yaml_contents={
                "type": COMPONENT_TYPE,
                "attributes": {"name": "bad", "dataset": "/x/*.jsonl", "policy": {"max_flagged_fraction": 2}},
            },
        )
        with pytest.raises(Exception) as raised:
            with sandbox.load_component_and_build_defs(defs_path=defs_path):
                pass
    messages = []
    error = raised.value
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("max_flagged_fraction" in message for message in messages), messages


def test_dg_lists_the_component(tmp_path):
    dg = Path(sys.executable).with_name("dg")
    if not dg.exists():
        dg = shutil.which("dg")
    if dg is None:
        pytest.skip("the dg command (dagster-dg-cli) is not installed")
    listing = subprocess.run(
        [str(dg), "list", "components"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert COMPONENT_TYPE in listing.stdout
