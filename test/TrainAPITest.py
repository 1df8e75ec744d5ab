"""Drive a live Win-Train server: upload, validate, process, then train a few steps per strategy.

Usage: python test/TrainAPITest.py --base-url http://127.0.0.1:8801 [--steps 5] [--strategies trl,lora]
Exits 0 only if every check passed.
"""

import argparse
import sys
import time
from pathlib import Path

import httpx

SAMPLE = Path(__file__).resolve().parent / "data" / "train_sample.json"
TERMINAL = {"succeeded", "failed", "cancelled"}


class Checks:
    """Collects named pass/fail results and prints them as they happen."""

    def __init__(self) -> None:
        """Start with no results."""
        self.results: list[tuple[str, bool, str]] = []

    def record(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record and print one check."""
        self.results.append((name, ok, detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f" - {detail}" if detail else ""), flush=True)
        return ok


def expect(checks: Checks, name: str, resp: httpx.Response, status: int) -> dict:
    """Check a response's status code and return its JSON body."""
    body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
    detail = "" if resp.status_code == status else f"HTTP {resp.status_code}: {resp.text[:300]}"
    checks.record(name, resp.status_code == status, detail)
    return body


def poll(client: httpx.Client, task_id: str, timeout: float) -> dict:
    """Poll a task until it ends, printing progress lines."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        task = client.get(f"/api/train/status/{task_id}").json()
        line = f"    {task['status']:<9} step {task['current_step']}/{task['total_steps']} loss={task['loss']}"
        if line != last:
            print(line, flush=True)
            last = line
        if task["status"] in TERMINAL:
            return task
        time.sleep(1)
    return {"status": "timeout", "error": f"not finished after {timeout:.0f}s"}


def run(base_url: str, steps: int, strategies: list[str], timeout: float, api_key: str | None) -> int:
    """Run the whole scenario and return the process exit code."""
    checks = Checks()
    headers = {"X-API-Key": api_key} if api_key else {}
    run_id = time.strftime("%Y%m%d-%H%M%S")
    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as client:
        try:
            health = expect(checks, "GET /health", client.get("/health"), 200)
        except httpx.ConnectError as exc:
            print(f"[FAIL] cannot reach {base_url}: {exc}")
            return 2
        print(f"    server {health.get('version')} on {health.get('device', {}).get('type')}")
        files = {"file": (f"train_sample_{run_id}.json", SAMPLE.read_bytes(), "application/json")}
        up = expect(checks, "POST /api/data/upload", client.post("/api/data/upload", files=files), 201)
        report = expect(
            checks,
            "POST /api/data/validate",
            client.post("/api/data/validate", json={"file_path": up.get("file_path")}),
            200,
        )
        checks.record("sample data is valid", bool(report.get("valid")), f"{report.get('valid_count')} records")
        split_dir = f"api_test/{run_id}"
        body = {
            "input_file": up.get("file_path"),
            "output_dir": split_dir,
            "split_config": {"train_ratio": 0.8, "val_ratio": 0.1, "test_ratio": 0.1, "seed": 42},
        }
        processed = expect(checks, "POST /api/data/process", client.post("/api/data/process", json=body), 200)
        train_file = processed.get("splits", {}).get("train", {}).get("path")
        for strategy in strategies:
            request = {
                "strategy": strategy,
                "dataset_path": train_file,
                "output_dir": f"outputs/api_test_{run_id}_{strategy}",
                "config": {
                    "max_steps": steps,
                    "per_device_train_batch_size": 2,
                    "learning_rate": 1e-4,
                    "lora_config": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.05},
                },
            }
            started = expect(
                checks, f"POST /api/train/start ({strategy})", client.post("/api/train/start", json=request), 202
            )
            if "task_id" not in started:
                continue
            task = poll(client, started["task_id"], timeout)
            ok = task["status"] == "succeeded"
            checks.record(f"{strategy} training succeeded", ok, task.get("error") or f"final loss {task.get('loss')}")
            if ok:
                checks.record(f"{strategy} reported {steps} steps", task["current_step"] == steps)
        listing = expect(checks, "GET /api/train/tasks", client.get("/api/train/tasks"), 200)
        checks.record("task list is not empty", listing.get("total", 0) > 0)
    failed = [name for name, ok, _ in checks.results if not ok]
    print(f"\n{len(checks.results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main() -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8801")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategies", default="trl,lora")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait per training task")
    parser.add_argument("--api-key", default=None, help="sent as X-API-Key when the server requires keys")
    args = parser.parse_args()
    return run(args.base_url, args.steps, [s for s in args.strategies.split(",") if s], args.timeout, args.api_key)


if __name__ == "__main__":
    sys.exit(main())
