"""Save every job's record (training, evaluation, export) to JSON and CSV, for a spreadsheet or a notebook.

Pages through `tunings.list` (all kinds, newest first) and writes jobs.json (full records) and jobs.csv (one
flat row per job: times in UTC, duration, steps, final loss, output folder, metrics as JSON).

Usage: python examples/sdk_records.py [--base-url URL] [--api-key KEY] [--out-dir DIR] [--status S] [--kind K]
"""

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdk import Job, TuningClient

COLUMNS = [
    "id", "kind", "status", "created_at", "started_at", "finished_at", "duration_s",
    "current_step", "total_steps", "loss", "output_dir", "error", "metrics",
]  # fmt: skip


def all_jobs(client: TuningClient, status: str | None, kind: str | None, page: int = 100) -> list[Job]:
    """Every job matching the filters, following the pages."""
    jobs: list[Job] = []
    while True:
        batch = client.tunings.list(status=status, kind=kind, limit=page, offset=len(jobs))
        jobs += batch
        if len(batch) < page:
            return jobs


def row(job: Job) -> dict[str, Any]:
    """A flat CSV row."""
    stamp = {
        k: (getattr(job, k).isoformat() if getattr(job, k) else "") for k in ("created_at", "started_at", "finished_at")
    }
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        **stamp,
        "duration_s": "" if job.duration is None else round(job.duration, 3),
        "current_step": job.current_step,
        "total_steps": job.total_steps if job.total_steps is not None else "",
        "loss": job.loss if job.loss is not None else "",
        "output_dir": job.output_dir or "",
        "error": job.error or "",
        "metrics": json.dumps(job.metrics, sort_keys=True) if job.metrics else "",
    }


def main() -> int:
    """Write jobs.json and jobs.csv into --out-dir."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="server URL (default: WINTRAIN_BASE_URL or local)")
    parser.add_argument("--api-key", default=None, help="API key (default: WINTRAIN_API_KEY)")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where jobs.json and jobs.csv go")
    parser.add_argument("--status", default=None, help="only jobs in this status (e.g. succeeded)")
    parser.add_argument("--kind", default=None, help="only jobs of this kind: train, eval or export")
    args = parser.parse_args()
    with TuningClient(base_url=args.base_url, api_key=args.api_key) as client:
        jobs = all_jobs(client, args.status, args.kind)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "jobs.json").write_text(json.dumps([j.raw for j in jobs], indent=2), encoding="utf-8")
    with (args.out_dir / "jobs.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(row(j) for j in jobs)
    print(f"wrote {len(jobs)} jobs to {args.out_dir / 'jobs.json'} and {args.out_dir / 'jobs.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
