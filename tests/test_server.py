"""The combined pipeline against a real `mlflow server` on 127.0.0.1: its REST API and its UI in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import write_idx_dataset
from tests.services import free_port, printed_run_id, wait_for_health

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ",".join(["teacher.epochs=1", "kd.epochs=1"])


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An mlflow server on loopback, and a small combined pipeline run against it."""
    tmp = tmp_path_factory.mktemp("server")
    data_dir = write_idx_dataset(tmp / "data" / "fashion-mnist")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_health(base, server)
        env = {**os.environ, "MLFLOW_TRACKING_URI": base, "XDG_CACHE_HOME": str(tmp / "cache"),
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}
        done = subprocess.run(
            [str(BIN / "kdd"), "combined", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--val-size",
             "100", "--budget", "quick", "--arms", "student-full,kd-full", "--teacher-model", "convnet-w16",
             "--student-model", "convnet-w8", "--overrides", TINY, "--env-manager", "local"],
            env=env, cwd=tmp, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        parent_id = printed_run_id(done.stdout)
        yield base, parent_id
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_server_serves_parent_and_children_over_rest(served):
    base, parent_id = served
    parent = api(base, f"runs/get?run_id={parent_id}")["run"]
    assert parent["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert {"test_acc/teacher-full", "test_acc/student-full", "agreement/kd-full"} <= set(metrics)
    found = api(base, "runs/search", {"experiment_ids": [parent["info"]["experiment_id"]],
                                      "filter": f"tags.mlflow.parentRunId = '{parent_id}'"})["runs"]
    arms = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "kdd.arm") for r in found}
    assert arms == {"teacher-full", "student-full", "kd-full"}
    for run in found:
        keys = {m["key"] for m in run["data"]["metrics"]}
        assert "test_acc" in keys and run["info"]["status"] == "FINISHED"
    listed = api(base, f"artifacts/list?run_id={parent_id}&path=report")["files"]
    assert "report/comparison.md" in {f["path"] for f in listed}


def chromium_driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_ui_shows_the_parent_run_and_its_report(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, parent_id = served
    experiment_id = api(base, f"runs/get?run_id={parent_id}")["run"]["info"]["experiment_id"]
    browser = chromium_driver()
    try:
        browser.get(f"{base}/#/experiments/{experiment_id}/runs/{parent_id}/artifacts")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "combined-fashion-mnist" in b.find_element(By.TAG_NAME, "body").text)
        wait.until(lambda b: "report" in b.find_element(By.TAG_NAME, "body").text)
        browser.find_element(By.XPATH, "//*[normalize-space(text())='report']").click()
        wait.until(lambda b: "comparison.md" in b.find_element(By.TAG_NAME, "body").text)
        browser.find_element(By.XPATH, "//*[normalize-space(text())='comparison.md']").click()
        wait.until(lambda b: "proposal" in b.page_source or "kd-full" in b.find_element(By.TAG_NAME, "body").text)
        browser.save_screenshot(str(tmp_path / "report.png"))
        assert "kd-full" in browser.find_element(By.TAG_NAME, "body").text
    finally:
        browser.quit()
