"""The Dagster UI in headless Chromium: a poisoned dataset fails the gate and blocks fine-tuning."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.test_pipeline import write_dataset

CHROMIUM = Path(os.environ.get("GRADSENTRY_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
SERVER_START_SECONDS = 240
RUN_SECONDS = 300

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium not found at {CHROMIUM}: apt-get install -y chromium"),
]

DEFINITIONS = """
from dagster import AssetSelection, Definitions, define_asset_job

from gradsentry_dagster.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
from gradsentry_dagster.resources import GradSentryModelResource, ParquetIOManager, ScanPolicy

scan_and_finetune = define_asset_job(
    name="scan_and_finetune",
    selection=AssetSelection.groups("gradsentry"),
    config={{
        "ops": {{
            "raw_dataset": {{"config": {{"path": {dataset!r}}}}},
            "lora_finetuned_adapter": {{"config": {{"max_steps": 2, "batch_size": 2}}}},
        }}
    }},
)

defs = Definitions(
    assets=PIPELINE_ASSETS,
    asset_checks=PIPELINE_CHECKS,
    jobs=[scan_and_finetune],
    resources={{
        "model": GradSentryModelResource(model={model!r}, batch_size=8),
        "policy": ScanPolicy(mode="paper", threshold_rule="fixed", fixed_threshold=0.5, max_flagged_fraction=0.2),
        "gradsentry_io_manager": ParquetIOManager(base_dir={storage!r}),
    }},
)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"dagster dev exited with {server.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"dagster dev did not answer on {url} within {SERVER_START_SECONDS} s: {log.read_text()[-3000:]}")


@pytest.fixture
def dagster_dev(tmp_path, tiny_model_dir):
    """``dagster dev`` on a free loopback port, serving the pipeline with a tiny model."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dataset = write_dataset(tmp_path / "poisoned.jsonl", rows=40, poisoned=20)
    definitions = tmp_path / "browser_definitions.py"
    definitions.write_text(
        textwrap.dedent(DEFINITIONS).format(
            dataset=str(dataset), model=str(tiny_model_dir), storage=str(tmp_path / "storage")
        )
    )
    port = free_port()
    log = tmp_path / "dagster_dev.log"
    dagster = Path(sys.executable).with_name("dagster")
    env = {**os.environ, "DAGSTER_HOME": str(home), "GRADSENTRY_STORAGE": str(tmp_path / "storage")}
    with open(log, "w") as output:
        server = subprocess.Popen(
            [str(dagster), "dev", "-f", str(definitions), "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_server(url, server, log)
        yield url, tmp_path
    finally:
        # dagster dev starts the webserver, the daemon and code servers: stop the whole group.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_ui_shows_failed_gate_and_blocked_finetune(dagster_dev):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    url, tmp_path = dagster_dev
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{url}/locations/browser_definitions.py/jobs/scan_and_finetune/playground")
            # A first visit opens a "Join the Dagster community" dialog over the page.
            skip = page.get_by_role("button", name="Skip")
            try:
                skip.click(timeout=15_000)
            except PlaywrightTimeout:
                pass
            page.get_by_role("button", name="Launch Run").click()
            page.wait_for_url("**/runs/*", timeout=60_000)
            expect(page.get_by_text("Failure", exact=True).first).to_be_visible(timeout=RUN_SECONDS * 1000)
            # The blocking check failed, so the fine-tuning step never ran.
            expect(page.get_by_text("1 blocking asset check failed").first).to_be_visible()
            expect(
                page.get_by_text("Dependencies for step lora_finetuned_adapter failed").first
            ).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "browser_run.png"), full_page=True)

            page.goto(f"{url}/assets/gradient_entropy_scores?view=checks")
            expect(page.get_by_text("gradsentry_gate").first).to_be_visible()
            expect(page.get_by_text("Failed").first).to_be_visible()
            expect(page.get_by_text("data_docs", exact=True).first).to_be_visible()
            expect(page.get_by_text("great_expectations_result", exact=True).first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "browser_check.png"), full_page=True)

            # Markdown metadata opens in a dialog; the histogram row is the first of them.
            page.goto(f"{url}/assets/gradient_entropy_scores")
            histogram_row = page.get_by_role("row").filter(has_text="score_histogram").first
            histogram_row.get_by_text("[Show Markdown]").click()
            histogram = page.locator("img[src^='data:image/png']").first
            expect(histogram).to_be_visible()
            assert histogram.evaluate("image => image.naturalWidth") > 100
            page.screenshot(path=str(ARTIFACTS / "browser_scores.png"), full_page=True)
            page.keyboard.press("Escape")

            page.goto(f"{url}/assets/lora_finetuned_adapter")
            # Dagster marks the skipped step's materialization as failed, and it has no metadata.
            expect(page.get_by_text("Failed in").first).to_be_visible()
            expect(page.get_by_text("No metadata found").first).to_be_visible()
            expect(page.get_by_text("adapter_dir")).to_have_count(0)
            page.screenshot(path=str(ARTIFACTS / "browser_finetune.png"), full_page=True)
        finally:
            page.screenshot(path=str(ARTIFACTS / "browser_last_page.png"), full_page=True)
            browser.close()

    storage = tmp_path / "storage"
    assert list(storage.glob("artifacts/*/data_docs/index.html")), "the gate wrote no Data Docs"
    assert not list(storage.rglob("adapter_config.json")), "an adapter was saved despite the failed gate"
