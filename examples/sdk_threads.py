"""Run training jobs concurrently from threads, each then asking its own model a question.

One `TuningClient` is shared by every thread (its httpx connection pool is thread-safe). The server queues
what it cannot run at once (`jobs.max_concurrent_jobs`), so the threads simply wait for their own job.

Usage: python examples/sdk_threads.py [--base-url URL] [--api-key KEY] [--threads 3] [--steps 10]
"""

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdk import JobFailedError, TuningClient

DATA = Path(__file__).resolve().parent / "data" / "capitals.jsonl"
QUESTIONS = ["Capital of Peru?", "Capital of Norway?", "Capital of Kenya?", "Capital of Chile?"]


def train_and_ask(client: TuningClient, index: int, steps: int) -> tuple[int, str, str, str]:
    """Train one LoRA (its own seed and output), wait for it, and ask it one question."""
    hyper = {"steps": steps, "batch_size": 4, "learning_rate": 1e-3, "lora_r": 8, "seed": index, "save_steps": 1000}
    job = client.tunings.create(
        "capitals/train.jsonl", hyperparameters=hyper, output_dir=f"outputs/thread-{index}", overwrite=True
    )
    job = client.tunings.wait(job.id, show_progress=False, poll_interval=0.5)
    question = QUESTIONS[index % len(QUESTIONS)]
    answer = client.inference.chat(question, model=job.fine_tuned_model, max_tokens=8, temperature=0)["content"]
    return index, job.id, question, answer


def main() -> int:
    """Prepare the data once, then train from several threads; exit 1 if any job failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="server URL (default: WINTRAIN_BASE_URL or local)")
    parser.add_argument("--api-key", default=None, help="API key (default: WINTRAIN_API_KEY)")
    parser.add_argument("--threads", type=int, default=3, help="concurrent jobs")
    parser.add_argument("--steps", type=int, default=10, help="training steps per job")
    args = parser.parse_args()
    failures = 0
    with TuningClient(base_url=args.base_url, api_key=args.api_key) as client:
        client.data.upload(DATA, overwrite=True)
        client.data.process("uploads/capitals.jsonl", "capitals", split=(0.7, 0.1, 0.2), overwrite=True)
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            futures = [pool.submit(train_and_ask, client, i, args.steps) for i in range(args.threads)]
            for future in as_completed(futures):
                try:
                    index, job_id, question, answer = future.result()
                except JobFailedError as exc:
                    failures += 1
                    print(f"a job failed: {exc.job.id}: {exc.job.error}")
                    continue
                print(f"thread {index}: job {job_id} succeeded; {question} -> {answer!r}")
    print(f"{args.threads - failures}/{args.threads} jobs succeeded")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
