"""Create several training jobs at once, watch them together, and cancel one.

Each job is a short LoRA run on the README's capitals data with its own learning rate; the last one is
cancelled while it waits in the queue (or runs). The table is redrawn from one `tunings.list` call per poll.

Usage: python examples/sdk_batch.py [--base-url URL] [--api-key KEY] [--jobs 3] [--steps 10]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdk import Job, TuningClient

DATA = Path(__file__).resolve().parent / "data" / "capitals.jsonl"


def prepare(client: TuningClient) -> str:
    """Upload and split the demo data (overwriting an earlier copy); the training file's server path."""
    client.data.upload(DATA, overwrite=True)
    client.data.process("uploads/capitals.jsonl", "capitals", split=(0.7, 0.1, 0.2), overwrite=True)
    return "capitals/train.jsonl"


def show(jobs: list[Job]) -> None:
    """One line per job."""
    for job in jobs:
        loss = f"{job.loss:.4f}" if job.loss is not None else "-"
        print(
            f"  {job.id}  {job.status:10} {job.progress:5.1f}%  step {job.current_step}/{job.total_steps}  loss {loss}"
        )


def main() -> int:
    """Start the jobs, cancel the last, poll until all have ended; exit 1 unless the rest succeeded."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="server URL (default: WINTRAIN_BASE_URL or local)")
    parser.add_argument("--api-key", default=None, help="API key (default: WINTRAIN_API_KEY)")
    parser.add_argument("--jobs", type=int, default=3, help="how many jobs to start (at least 2)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per job")
    args = parser.parse_args()
    with TuningClient(base_url=args.base_url, api_key=args.api_key) as client:
        train_file = prepare(client)
        jobs = []
        for i in range(max(args.jobs, 2)):
            lr = 1e-3 / (2**i)
            hyper = {"steps": args.steps, "batch_size": 4, "learning_rate": lr, "lora_r": 8, "save_steps": 1000}
            job = client.tunings.create(
                train_file, hyperparameters=hyper, output_dir=f"outputs/batch-{i}", overwrite=True
            )
            print(f"started {job.id} (learning_rate {lr:g}): {job.status}")
            jobs.append(job)
        cancelled = client.tunings.cancel(jobs[-1].id)
        print(f"cancelled {cancelled.id}: {cancelled.status}")
        ids = {j.id for j in jobs}
        while True:
            current = [j for j in client.tunings.list(kind="train", limit=200) if j.id in ids]
            show(current)
            if all(j.is_terminal for j in current):
                break
            time.sleep(1.0)
        by_id = {j.id: j for j in current}
        ok = by_id[jobs[-1].id].status == "cancelled" and all(by_id[j.id].is_successful for j in jobs[:-1])
        print("all done:", "ok" if ok else "unexpected outcome")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
