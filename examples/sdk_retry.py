"""Keep working through a flaky or restarting server: wait for it with backoff, and never submit a job twice.

- Reads (GET) are retried by the SDK itself: connection errors and 5xx answers, `max_retries` times with
  exponential backoff.
- Waiting for a server that is down or restarting: `wait_until_up` polls /health with capped exponential backoff.
- Starting a job is not idempotent: if the connection drops after the request was sent, the job may exist.
  `start_once` looks for a job writing the same output folder before it sends the request again.
- A job survives a server restart (it is stored in SQLite); `wait` simply resumes polling.

Usage: python examples/sdk_retry.py [--base-url URL] [--api-key KEY] [--steps 10] [--max-wait 120]
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdk import APIConnectionError, APIError, Job, TuningClient

DATA = Path(__file__).resolve().parent / "data" / "capitals.jsonl"


def wait_until_up(probe: TuningClient, max_wait: float, first: float = 0.5, cap: float = 8.0) -> dict[str, Any]:
    """Poll /health until it answers, sleeping 0.5, 1, 2, 4, 8, 8... s between tries; TimeoutError after max_wait.

    `probe` is a client without retries of its own (max_retries=0), so each try is one request.
    """
    deadline = time.monotonic() + max_wait
    delay, attempt = first, 1
    while True:
        try:
            health = probe.health()
            print(f"server up after {attempt} attempt(s): version {health['version']}, {health['device']['type']}")
            return health
        except (APIConnectionError, APIError) as exc:
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"the server did not come up within {max_wait:.0f}s") from exc
            print(f"attempt {attempt}: server not reachable ({type(exc).__name__}); retrying in {delay:.1f}s")
            time.sleep(delay)
            delay, attempt = min(delay * 2, cap), attempt + 1


def retried(probe: TuningClient, max_wait: float, call: Any) -> Any:
    """Run an idempotent call; if the server is unreachable, wait for it to come back and try again."""
    while True:
        try:
            return call()
        except APIConnectionError:
            wait_until_up(probe, max_wait)


def start_once(client: TuningClient, probe: TuningClient, max_wait: float, output_dir: str, steps: int) -> Job:
    """Start a job unless one writing `output_dir` already exists (from a request whose answer was lost)."""
    hyper = {"steps": steps, "batch_size": 4, "learning_rate": 1e-3, "lora_r": 8, "save_steps": 1000}
    while True:
        for job in retried(probe, max_wait, lambda: client.tunings.list(kind="train", limit=50)):
            if job.output_dir and job.output_dir.endswith(output_dir) and not job.is_failed:
                print(f"found job {job.id} for {output_dir}: not submitting again")
                return job
        try:
            return client.tunings.create(
                "capitals/train.jsonl", hyperparameters=hyper, output_dir=output_dir, overwrite=True
            )
        except APIConnectionError:
            wait_until_up(probe, max_wait)  # then look again before resubmitting


def main() -> int:
    """Wait for the server, prepare data, start one job exactly once, and follow it to the end."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="server URL (default: WINTRAIN_BASE_URL or local)")
    parser.add_argument("--api-key", default=None, help="API key (default: WINTRAIN_API_KEY)")
    parser.add_argument("--steps", type=int, default=10, help="training steps")
    parser.add_argument("--max-wait", type=float, default=120.0, help="longest wait for the server (s)")
    parser.add_argument("--output-dir", default="outputs/retry-demo", help="the job's output folder")
    args = parser.parse_args()
    with (
        TuningClient(base_url=args.base_url, api_key=args.api_key, max_retries=4, backoff=0.5) as client,
        TuningClient(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=5) as probe,
    ):
        wait_until_up(probe, args.max_wait)
        retried(probe, args.max_wait, lambda: client.data.upload(DATA, overwrite=True))
        retried(probe, args.max_wait, lambda: client.data.process(
            "uploads/capitals.jsonl", "capitals", split=(0.7, 0.1, 0.2), overwrite=True))  # fmt: skip
        job = start_once(client, probe, args.max_wait, args.output_dir, args.steps)
        print(f"job {job.id}: {job.status}")
        job = retried(probe, args.max_wait, lambda: client.tunings.wait(job.id, show_progress=False))
        print(f"job {job.id} {job.status} after {job.duration:.1f}s, final loss {job.loss}")
        return 0 if job.is_successful else 1


if __name__ == "__main__":
    sys.exit(main())
