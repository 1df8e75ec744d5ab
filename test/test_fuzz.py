"""Schemathesis fuzzes every documented operation of a live server (API keys on): no 5xx, responses match the schema.

How to extend it: new routes are fuzzed automatically, because the run reads the server's /openapi.json.
- An operation that cannot answer briefly on the tiny model, or that starts work outliving the request, goes in
  EXCLUDED below as (path regex, reason). First try bounding it through FUZZ_CONFIG instead (small limits).
- MAX_EXAMPLES bounds the cases per operation. Keep the whole file under about 2 minutes on 2 cores.
- A failure prints schemathesis' report, with a curl line that reproduces each case. The run is seeded, so it
  repeats exactly.
"""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import start_server, stop_server

KEY = "fuzz-key"
MAX_EXAMPLES = 5  # per operation in the fuzzing phase (the coverage phase adds boundary cases of its own)
SEED = 20261125
CHECKS = "not_a_server_error,response_schema_conformance"
# Operations left out, as (path regex, why). Everything else in /openapi.json is fuzzed.
EXCLUDED: list[tuple[str, str]] = [
    ("^/api/export/onnx$", "an ONNX export of even the tiny model takes minutes of CPU in its worker"),
]
# Small limits, so whatever the fuzzer starts stays cheap: a few tokens, a short queue, one run, short waits.
FUZZ_CONFIG = {
    "jobs": {"poll_interval": 0.2, "max_concurrent_jobs": 1, "max_queued": 4, "wait_timeout_seconds": 1},
    "inference": {"max_tokens_limit": 4, "default_max_tokens": 4, "max_batch_size": 4},
    "runs": {"max_runs": 1},
    "data": {"max_upload_mb": 1, "max_validate_mb": 1, "validate_timeout_seconds": 5},
    "auth": {"api_keys": [KEY]},
}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_root: Path) -> Iterator[str]:
    """A live server on the tiny model, with its own data and model folders; yields its URL."""
    work = tmp_path_factory.mktemp("fuzz")
    (work / "model").mkdir()
    (work / "model" / "base").symlink_to(tiny_model_root / "base", target_is_directory=True)
    url, proc = start_server(work, work / "model", FUZZ_CONFIG)
    try:
        yield url
    finally:
        stop_server(proc)


def test_api_never_errors_and_matches_its_schema(fuzz_server: str, tmp_path: Path) -> None:
    """Every generated request, valid or not, gets a non-5xx answer whose body matches the documented schema."""
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{fuzz_server}/openapi.json",
        f"--checks={CHECKS}",
        f"--header=Authorization: Bearer {KEY}",
        f"--max-examples={MAX_EXAMPLES}",
        f"--seed={SEED}",
        "--phases=examples,coverage,fuzzing",
        "--workers=2",
        "--request-timeout=60",
        "--suppress-health-check=all",
        "--no-color",
        f"--report-dir={tmp_path}",
    ]
    for path_regex, _why in EXCLUDED:
        cmd.append(f"--exclude-path-regex={path_regex}")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, f"schemathesis found problems:\n{run.stdout[-20000:]}\n{run.stderr[-4000:]}"
    print(run.stdout[run.stdout.rfind("SUMMARY") :])  # operations, phases and case counts (shown with -s)
