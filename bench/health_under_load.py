"""Latency of GET /health at fixed request rates, with and without a CPU training task running.

Usage: python bench/health_under_load.py [--rates 50,200] [--seconds 10] [--worker-nice 10] [--train-threads N]
Starts `python main.py` on a free loopback port with a throw-away data dir and the default base model
(model/base/<models.base_model>; `make model` prepares it), fires /health open-loop at each rate, then starts a
LoRA training task and repeats while it trains. Latency counts from each request's scheduled send time, so a
stalled server cannot hide behind a slowed-down client. Prints p50/p99/max per rate and phase.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "test" / "data" / "train_sample.json"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, worker_nice: int, train_threads: int | None) -> tuple[str, subprocess.Popen]:
    """Run the service in its own process and wait until /health answers.

    Its training worker uses `train_threads` torch threads, or by default every core, as a real task would.
    """
    config = {
        "paths": {"data_dir": str(work / "data"), "model_dir": str(ROOT / "model"), "db_path": str(work / "t.db")},
        "jobs": {"poll_interval": 0.5, "worker_nice": worker_nice},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = (work / "server.log").open("wb")
    cmd = [
        sys.executable,
        "main.py",
        "--config",
        str(work / "config.yaml"),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if train_threads:
        env["OMP_NUM_THREADS"] = str(train_threads)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited:\n{(work / 'server.log').read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("server did not answer /health")


class Connection:
    """One keep-alive HTTP/1.1 connection that speaks just enough HTTP to GET /health.

    It is cheaper than a full client, so the load generator takes less of the CPU it shares with the server.
    """

    def __init__(self, host: str, port: int) -> None:
        """Not connected until the first request."""
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        """Send GET `path` and read the whole answer; return its status code."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(h.split(":", 1)[1]) for h in lines if h.lower().startswith("content-length:"))
        await self.reader.readexactly(length)
        return int(lines[0].split()[1])

    def close(self) -> None:
        """Drop the connection (after an error, or at the end)."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def fire(url: str, rate: float, seconds: float, connections: int) -> dict[str, float]:
    """Send GET /health open-loop at `rate` per second for `seconds`; latency percentiles in ms.

    Each request is due at its scheduled time and waits for a free connection if all are busy; its latency runs
    from when it was due.
    """
    host, port = url.removeprefix("http://").split(":")
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(Connection(host, int(port)))
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        conn = await pool.get()
        try:
            ok = await asyncio.wait_for(conn.get("/health"), 60) == 200
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
            conn.close()
            ok = False
        finally:
            pool.put_nowait(conn)
        if ok:
            latencies.append((time.perf_counter() - scheduled) * 1000)
        else:
            errors += 1

    start = time.perf_counter() + 0.2
    await asyncio.gather(*(one(start + i / rate) for i in range(n)))
    while not pool.empty():
        pool.get_nowait().close()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"sent": n, "errors": errors, "p50": q[49], "p99": q[98], "max": latencies[-1] if latencies else 0.0}


def start_training(url: str, steps: int) -> str:
    """Upload the sample data and start a LoRA task; return its id once it is stepping."""
    with httpx.Client(base_url=url, timeout=120) as c:
        c.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())}).raise_for_status()
        body = {
            "strategy": "lora",
            "dataset_path": "uploads/train_sample.json",
            "config": {"max_steps": steps, "per_device_train_batch_size": 2, "save_steps": steps},
        }
        r = c.post("/api/train/start", json=body)
        r.raise_for_status()
        task_id = r.json()["task_id"]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            task = c.get(f"/api/train/status/{task_id}").json()
            if task["status"] not in ("queued", "running"):
                sys.exit(f"training ended early: {task['status']} {task.get('error')}")
            if task["current_step"] >= 1:
                return task_id
            time.sleep(1)
    sys.exit("training did not reach its first step in 600 s")


def main() -> None:
    """Measure both phases and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50,200", help="comma-separated request rates (req/s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    parser.add_argument("--steps", type=int, default=400, help="max_steps of the training task (it is cancelled)")
    parser.add_argument("--worker-nice", type=int, default=10, help="jobs.worker_nice of the server")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections of the load generator")
    parser.add_argument("--train-threads", type=int, default=None, help="torch threads of the task (default: all)")
    parser.add_argument("--idle-only", action="store_true", help="skip the training phase (a quick check)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url, proc = start_server(Path(tmp), args.worker_nice, args.train_threads)
        try:
            for rate in rates:
                rows.append(
                    {"phase": "idle", "rate": rate, **asyncio.run(fire(url, rate, args.seconds, args.connections))}
                )
            task_id = None if args.idle_only else start_training(url, args.steps)
            for rate in rates if task_id else []:
                rows.append(
                    {"phase": "training", "rate": rate, **asyncio.run(fire(url, rate, args.seconds, args.connections))}
                )
            if task_id:
                httpx.post(f"{url}/api/train/cancel/{task_id}", timeout=60)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"{'phase':<10}{'req/s':>7}{'sent':>7}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for row in rows:
        print(
            f"{row['phase']:<10}{row['rate']:>7.0f}{row['sent']:>7}{row['errors']:>8}"
            f"{row['p50']:>10.1f}{row['p99']:>10.1f}{row['max']:>10.1f}"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
