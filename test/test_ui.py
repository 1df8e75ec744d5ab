"""Offline /docs and /redoc, and the web dashboard, in a real browser (Debian's Chromium via Playwright)."""

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import OfflinePage

from conftest import SAMPLE, start_server, stop_server

EXTERNAL_URL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_root: Path) -> Iterator[str]:
    """A real server on loopback serving the tiny model (the browser needs a socket)."""
    url, proc = start_server(tmp_path_factory.mktemp("ui_server"), tiny_model_root)
    yield url
    stop_server(proc)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_reference_no_external_url(live: str, path: str) -> None:
    html = httpx.get(live + path).text
    assert "/static/vendor/" in html
    assert not EXTERNAL_URL.search(html), html
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        assert httpx.get(live + asset).status_code == 200, asset


def test_swagger_ui_renders_operations_offline(live: str, offline_page: OfflinePage, artefact_dir: Path) -> None:
    page = offline_page.page
    page.goto(live + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/api/train/start" in p for p in paths), paths
    assert any("/v1/chat/completions" in p for p in paths), paths
    page.locator(".opblock-summary-path", has_text="/health").first.click()
    page.wait_for_selector("text=Try it out")
    page.screenshot(path=str(artefact_dir / "docs.png"))
    assert offline_page.external == []


def test_redoc_renders_operations_offline(live: str, offline_page: OfflinePage, artefact_dir: Path) -> None:
    page = offline_page.page
    page.goto(live + "/redoc")
    page.wait_for_selector("[data-section-id^='operation/']", timeout=60_000)
    assert page.locator("[data-section-id^='operation/']").count() > 10
    assert "/api/train/start" in page.content()
    page.screenshot(path=str(artefact_dir / "redoc.png"))
    assert offline_page.external == []


# -- the dashboard ------------------------------------------------------------------------------------------

KEY = "dashboard-test-key"
STATE: dict[str, str] = {}


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, tiny_model_root: Path) -> Iterator[str]:
    """A real server with an API key, so every data call of the dashboard must carry it."""
    url, proc = start_server(tmp_path_factory.mktemp("dash_server"), tiny_model_root, {"auth": {"api_keys": [KEY]}})
    yield url
    stop_server(proc)


def api(dash: str) -> httpx.Client:
    """An API client holding the key."""
    return httpx.Client(base_url=dash, headers={"X-API-Key": KEY}, timeout=60)


def login(offline_page: OfflinePage, dash: str, path: str = "/ui") -> object:
    """Open a page, enter the key once (kept in sessionStorage), and return the reloaded page."""
    page = offline_page.page
    page.goto(dash + path)
    page.fill("#api-key", KEY)
    with page.expect_navigation():
        page.click("#key-form button[type=submit]")
    assert page.locator("#key-state").inner_text() == "key set"
    offline_page.errors.clear()  # the 401s of the first, keyless load were expected
    return page


def upload_sample(dash: str, name: str) -> str:
    """Upload the sample dataset through the API; return its path under the data dir."""
    with api(dash) as c:
        r = c.post("/api/data/upload", files={"file": (name, SAMPLE.read_bytes())}, data={"overwrite": "true"})
        assert r.status_code == 201, r.text
    return f"uploads/{name}"


def test_pages_load_without_a_key_and_ask_for_one(dash: str, offline_page: OfflinePage) -> None:
    page = offline_page.page
    assert httpx.get(dash + "/", follow_redirects=False).headers["location"] == "/ui"
    for path in ("/ui", "/ui/datasets", "/ui/models", "/ui/evals", "/ui/tasks/" + "0" * 32):
        assert httpx.get(dash + path).status_code == 200, path
    page.goto(dash + "/")
    assert page.url.endswith("/ui")
    page.wait_for_selector("#banner:not([hidden])")
    assert "API key is required" in page.inner_text("#banner")
    assert httpx.get(dash + "/api/train/tasks").status_code == 401
    page = login(offline_page, dash)
    page.wait_for_selector("#tasks-body >> text=no tasks")
    assert page.locator("#banner").is_hidden()
    assert page.evaluate("sessionStorage.getItem('wintrain.apiKey')") == KEY
    assert offline_page.external == []


def test_upload_a_dataset_and_see_its_report(
    dash: str, offline_page: OfflinePage, artefact_dir: Path, tmp_path: Path
) -> None:
    records = json.loads(SAMPLE.read_text())
    lines = [json.dumps(r) for r in records[:12]] + ['{"messages": [{"role": "user", "content": "hi"}', '{"foo": 1}']
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(lines) + "\n")
    page = login(offline_page, dash, "/ui/datasets")
    page.set_input_files("#upload-file", str(data))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#report:not([hidden])")
    page.wait_for_function("document.querySelector('#report-total').textContent === '14'")
    assert page.inner_text("#report-valid") == "12"
    assert page.inner_text("#report-invalid") == "2"
    assert "conversations" in page.inner_text("#report-formats")
    errors = page.locator("#report-errors tbody tr").all_inner_texts()
    assert len(errors) == 2 and errors[0].startswith("13") and "bad JSON" in errors[0] and errors[1].startswith("14")
    bars = page.locator("#report-histogram .bar")
    assert bars.count() >= 1
    assert sum(int(t or 0) for t in page.locator("#report-histogram .bar span").all_inner_texts()) == 12
    assert "uploads/mine.jsonl" in page.inner_text("#dataset-files")
    page.screenshot(path=str(artefact_dir / "datasets-report.png"), full_page=True)
    # preview, then process/split the upload (the form was filled in by the upload)
    page.locator("#dataset-files tr", has_text="uploads/mine.jsonl").locator("button", has_text="Preview").click()
    page.wait_for_selector("#preview:not([hidden])")
    rows = page.locator("#preview-table tbody tr")
    assert rows.count() == 14
    assert "What is the capital of France?" in rows.first.inner_text()
    assert "invalid" in rows.last.inner_text()
    assert page.input_value("#process-form input[name=input_file]") == "uploads/mine.jsonl"
    page.fill("#process-form input[name=output_dir]", "processed/mine")
    page.click("#process-form button[type=submit]")
    page.wait_for_selector("#process-splits")
    assert "kept 12 of 14" in page.inner_text("#process-result")
    split_rows = page.locator("#process-splits tr").all_inner_texts()
    assert [r.split("\t")[:2] for r in split_rows] == [["train", "10"], ["val", "1"], ["test", "1"]]
    page.screenshot(path=str(artefact_dir / "datasets.png"), full_page=True)
    assert offline_page.external == [] and offline_page.errors == []


def test_start_training_and_watch_the_loss_curve_grow(dash: str, offline_page: OfflinePage, artefact_dir: Path) -> None:
    dataset = upload_sample(dash, "train-ui.json")
    page = login(offline_page, dash, f"/ui?dataset={dataset}")
    assert page.input_value("#train-form input[name=dataset_path]") == dataset
    page.fill("#train-form input[name=max_steps]", "30")
    page.fill("#train-form input[name=eval_dataset_path]", dataset)
    page.fill("#train-form input[name=eval_steps]", "10")
    with page.expect_navigation(url=re.compile(r"/ui/tasks/[0-9a-f]{32}$")):
        page.click("#train-form button[type=submit]")
    task_id = page.url.rsplit("/", 1)[1]
    STATE["train_task"] = task_id
    # points arrive while the task runs: seen at least twice with a growing count and status running
    counts: list[int] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(set(counts)) < 3:
        running = "running" in page.inner_text("#task-status")
        n = page.evaluate("WT.charts.loss.data[0].length")
        if running and n and (not counts or n > counts[-1]):
            counts.append(n)
        page.wait_for_timeout(300)
    assert len(set(counts)) >= 3, counts  # three different sizes of the curve, all while running
    assert page.locator("#chart-loss canvas").count() == 1
    page.screenshot(path=str(artefact_dir / "task-running.png"), full_page=True)
    page.wait_for_selector("#task-status.succeeded", timeout=240_000)
    page.wait_for_function("WT.charts.loss.data[0].length === 30")
    assert page.inner_text("#points-loss") == "30 points"
    assert page.evaluate("WT.charts.learning_rate.data[0].length") == 30
    page.wait_for_function("WT.charts.eval_loss.data[0].length === 3")
    assert page.evaluate("WT.charts.eval_loss.data[0]") == [10, 20, 30]
    assert page.evaluate("WT.charts.tokens_per_second.data[1].every(v => v > 0)")
    assert "training started: 30 steps" in page.inner_text("#task-logs")
    page.wait_for_selector("#task-files >> text=adapter_config.json")
    assert '"max_steps": 30' in page.inner_text("#task-request")
    with page.expect_download() as dl:
        top_level = page.locator("code", has_text=re.compile(r"^adapter_config\.json$"))
        page.locator("#task-files tr").filter(has=top_level).locator("button").click()
    assert json.loads(Path(dl.value.path()).read_text())["peft_type"] == "LORA"
    page.screenshot(path=str(artefact_dir / "task.png"), full_page=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artefact_dir / "task-top.png"))  # the README's picture (docs/dashboard.png)
    assert page.locator("#task-files code", has_text=re.compile(r"^tensorboard/events\.out\.tfevents")).count() >= 1
    # a finished task draws its curve from the stored events
    page.reload()
    page.wait_for_function("WT.charts.loss.data[0].length === 30")
    page.goto(dash + "/ui")
    page.wait_for_selector(f"#tasks-body tr[data-task-id='{task_id}'][data-status='succeeded']")
    page.select_option("#task-filter select[name=status]", "failed")
    page.wait_for_selector(f"#tasks-body tr[data-task-id='{task_id}']", state="detached")
    page.select_option("#task-filter select[name=status]", "succeeded")
    page.select_option("#task-filter select[name=kind]", "train")
    page.wait_for_selector(f"#tasks-body tr[data-task-id='{task_id}']")
    assert page.locator(f"#tasks-body tr[data-task-id='{task_id}'] td.loss").inner_text() != "\u2013"  # not the dash
    page.screenshot(path=str(artefact_dir / "tasks.png"), full_page=True)
    assert offline_page.external == []


def trained_task(dash: str) -> str:
    """The task trained by the browser test, or (run alone) one trained through the API now."""
    with api(dash) as c:
        task_id = STATE.get("train_task")
        if not task_id:
            dataset = upload_sample(dash, "train-api.json")
            body = {"strategy": "lora", "dataset_path": dataset, "config": {"max_steps": 3}}
            task_id = c.post("/api/train/start", json=body).json()["task_id"]
            STATE["train_task"] = task_id
        deadline = time.monotonic() + 240
        while (status := c.get(f"/api/train/status/{task_id}").json()["status"]) not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert status == "succeeded"
    return task_id


def test_chat_with_the_trained_model_streams(dash: str, offline_page: OfflinePage, artefact_dir: Path) -> None:
    task_id = trained_task(dash)
    page = login(offline_page, dash, "/ui/models")
    page.wait_for_selector(f"#models-table >> text={task_id}")
    assert "base" in page.inner_text("#models-table")
    page.select_option("#chat-model", task_id)
    page.fill("#chat-settings input[name=max_tokens]", "24")
    page.evaluate(
        """() => { window.__texts = new Set();
        new MutationObserver(() => { const b = document.querySelector('.bubble.assistant');
          if (b) window.__texts.add(b.textContent); })
        .observe(document.querySelector('#chat-log'), {subtree: true, childList: true, characterData: true}); }"""
    )
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    page.wait_for_selector(".bubble.assistant[data-done='1']", timeout=120_000)
    answer = page.inner_text(".bubble.assistant")
    assert answer.strip() and "error" not in answer
    assert page.evaluate("window.__texts.size") >= 3  # the answer grew piece by piece
    assert re.search(r"(length|stop) · \d+ tokens", page.inner_text("#chat-meta"))
    page.screenshot(path=str(artefact_dir / "models.png"), full_page=True)
    assert offline_page.external == []


def test_evaluate_fine_tuned_against_base(dash: str, offline_page: OfflinePage, artefact_dir: Path) -> None:
    task_id = trained_task(dash)
    dataset = upload_sample(dash, "eval-ui.json")
    page = login(offline_page, dash, "/ui/evals")
    page.wait_for_function(f"document.querySelector('#eval-form select[name=model]').value === '{task_id}'")
    assert page.input_value("#eval-form select[name=compare_with]") == "tiny-llama"
    page.fill("#eval-form input[name=dataset_path]", dataset)
    page.fill("#eval-form input[name=max_samples]", "3")
    page.fill("#eval-form input[name=max_tokens]", "6")
    page.click("#eval-form button[type=submit]")
    page.wait_for_selector("#eval-status.succeeded", timeout=240_000)
    header = page.locator("#eval-metrics thead").inner_text()
    assert "tiny-llama" in header and task_id in header and "difference" in header
    metrics = page.locator("#eval-metrics tbody").inner_text()
    assert "loss" in metrics and "accuracy" in metrics
    page.wait_for_function("document.querySelectorAll('#eval-examples tbody tr').length === 3")
    first = page.locator("#eval-examples tbody tr").first.locator("td").all_inner_texts()
    assert first[1] == "What is the capital of France?" and first[2] == "The capital of France is Paris."
    assert len(first) == 5  # fine-tuned and base answers side by side
    page.screenshot(path=str(artefact_dir / "evals.png"), full_page=True)
    assert offline_page.external == []


def test_cancel_a_running_task_from_the_table(dash: str, offline_page: OfflinePage) -> None:
    trained_task(dash)  # the single job slot is free again
    dataset = upload_sample(dash, "cancel-ui.json")
    with api(dash) as c:
        body = {"strategy": "lora", "dataset_path": dataset, "config": {"max_steps": 5000}}
        task_id = c.post("/api/train/start", json=body).json()["task_id"]
    page = login(offline_page, dash)
    row = f"#tasks-body tr[data-task-id='{task_id}']"
    page.wait_for_selector(f"{row}[data-status='running']", timeout=120_000)
    page.click(f"{row} button.cancel")
    page.wait_for_selector(f"{row}[data-status='cancelled']", timeout=60_000)
    assert page.locator(f"{row} button.cancel").count() == 0
    with api(dash) as c:
        assert c.get(f"/api/train/status/{task_id}").json()["status"] == "cancelled"
