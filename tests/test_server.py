"""The combined pipeline against a real `mlflow server` on 127.0.0.1: its REST API and its UI in Chromium."""

from __future__ import annotations

import json
import os
import re
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
TINY = ",".join(["experts.model=convnet-w8-d2", "experts.num_experts=1", "experts.epochs=2", "distill.iterations=1",
                 "distill.syn_steps=2", "distill.expert_epochs=1", "distill.max_start_epoch=1", "distill.eval_every=1",
                 "distill.num_eval=1", "distill.eval_epochs=2", "teacher.epochs=1", "kd.epochs=1"])
ARMS = ["teacher-full", "student-full", "kd-full", "student-synthetic", "student-subset", "kd-subset"]


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
             "100", "--budget", "quick", "--arms", ",".join(ARMS[1:]), "--ipc", "2", "--teacher-model", "convnet-w16",
             "--student-model", "convnet-w8", "--overrides", TINY, "--env-manager", "local"],
            env=env, cwd=tmp, capture_output=True, text=True, timeout=1500,
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
    arms = {tags(r).get("kdd.arm") for r in found} - {None}
    assert arms == set(ARMS)
    for run in found:
        keys = {m["key"] for m in run["data"]["metrics"]}
        assert run["info"]["status"] == "FINISHED" and (not tags(run).get("kdd.arm") or "test_acc" in keys)
    listed = api(base, f"artifacts/list?run_id={parent_id}&path=report")["files"]
    assert {"report/comparison.md", "report/report.html"} <= {f["path"] for f in listed}


@pytest.mark.slow
def test_runs_are_named_by_arm_filed_by_dataset_and_list_their_data(served):
    base, parent_id = served
    parent = api(base, f"runs/get?run_id={parent_id}")["run"]
    experiment = api(base, f"experiments/get?experiment_id={parent['info']['experiment_id']}")["experiment"]
    assert experiment["name"] == "kdd-fashion-mnist"
    assert parent["info"]["run_name"] == "combined-fashion-mnist-ipc2"
    found = api(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                      "filter": f"tags.mlflow.parentRunId = '{parent_id}'"})["runs"]
    named = {r["info"]["run_name"]: r for r in found}
    assert set(named) == {f"{arm}/seed0" for arm in ARMS} | {"experts", "distill"}
    distill_id = named["distill"]["info"]["run_id"]

    def inputs(name: str) -> set[tuple[str, str]]:
        return {(d["dataset"]["name"], {t["key"]: t["value"] for t in d["tags"]}["mlflow.data.context"])
                for d in named[name]["inputs"]["dataset_inputs"]}

    held_out = {("fashion-mnist-val", "validation"), ("fashion-mnist-test", "test")}
    assert inputs("kd-full/seed0") == {("fashion-mnist-train", "training")} | held_out
    assert inputs("kd-subset/seed0") == {("fashion-mnist-subset-ipc2", "training")} | held_out
    assert inputs("student-synthetic/seed0") == {(f"synthetic-{distill_id}", "training")} | held_out
    assert inputs("experts") == {("fashion-mnist-train", "training"), ("fashion-mnist-test", "test")}
    synthetic = next(d["dataset"] for d in named["student-synthetic/seed0"]["inputs"]["dataset_inputs"]
                     if d["dataset"]["name"].startswith("synthetic-"))
    assert json.loads(synthetic["source"]) == {"uri": f"runs:/{distill_id}/synthetic"}


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def chromium_driver(size: str = "1400,1000"):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={size}"):
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


@pytest.mark.slow
def test_ui_overview_shows_the_comparison_table(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, parent_id = served
    experiment_id = api(base, f"runs/get?run_id={parent_id}")["run"]["info"]["experiment_id"]
    browser = chromium_driver("1400,1200")

    def comparison(b):  # the description's table, once its rows are shown
        return next((t for t in b.find_elements(By.TAG_NAME, "table") if "kd-subset" in t.text), None)

    try:
        browser.get(f"{base}/#/experiments/{experiment_id}/runs/{parent_id}?workflowType=machine_learning")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "teacher-full" in b.find_element(By.TAG_NAME, "body").text)
        for button in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):  # a side panel
            button.click()
        for folded in browser.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']"):
            folded.click()
        table = wait.until(comparison)
        browser.save_screenshot(str(tmp_path / "overview.png"))
        headers = [h.text for h in table.find_elements(By.TAG_NAME, "th")]
        assert headers == ["arm", "model", "test acc", "agreement", "KL", "ECE", "training images", "labels"]
        rows = [[c.text for c in row.find_elements(By.TAG_NAME, "td")] for row in table.find_elements(By.CSS_SELECTOR,
                                                                                                      "tbody tr")]
        cells = {row[0]: row for row in rows}
        assert list(cells) == ARMS
        assert cells["kd-subset"][-1] == "soft, teacher on full data" and cells["student-subset"][-2] == "20"
        assert re.fullmatch(r"0\.\d{4} ± 0\.\d{4}", cells["teacher-full"][2])
    finally:
        browser.quit()


@pytest.mark.slow
def test_report_page_renders_offline_with_plotly_inlined_once(served, tmp_path):
    from plotly.offline import get_plotlyjs
    from selenium.webdriver.support.ui import WebDriverWait

    base, parent_id = served
    with urllib.request.urlopen(f"{base}/get-artifact?path=report/report.html&run_id={parent_id}", timeout=60) as got:
        page = got.read().decode()
    assert page.count(get_plotlyjs()[:300]) == 1  # the plotly.js bundle, once for every figure
    assert not re.search(r"<(script|link|img)\b[^>]*\b(src|href)=", page)  # nothing to fetch
    local = tmp_path / "report.html"
    local.write_text(page, encoding="utf-8")
    browser = chromium_driver("1400,1000")
    try:
        browser.get(local.as_uri())
        rendered = "return document.querySelectorAll('.js-plotly-plot .main-svg').length"
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(rendered) > 0)
        figures = browser.execute_script("return document.querySelectorAll('.js-plotly-plot').length")
        assert figures == 3 == browser.execute_script("return document.querySelectorAll('.plotly-graph-div').length")
        assert browser.execute_script("return document.querySelectorAll('.js-plotly-plot .bars .point').length") > 0
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [url for url in fetched if not url.startswith(("file:", "data:", "blob:"))] == []
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1400, height + 120)
        browser.save_screenshot(str(tmp_path / "report.png"))
        assert "kd-subset" in browser.execute_script("return document.querySelector('table').innerText")
    finally:
        browser.quit()
