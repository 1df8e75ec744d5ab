"""README.md runs as written: every ```bash and ```python block, in order, against a live server on the tiny model.

Rules for README authors:
- Blocks run top to bottom from the project folder (a scratch copy of it), bash blocks in one shell session: a
  variable set in one block (`TASK_ID=...`) is there in the next. Each bash block runs with `set -eo pipefail`,
  and `curl` fails on an HTTP error status, so a 4xx/5xx fails the test.
- `http://127.0.0.1:8801` is replaced by the test server's address; `WINTRAIN_BASE_URL` points there too.
- The model named `SmolLM2-135M-Instruct` is the tiny test model under that name.
- A block that cannot run here (it serves forever, needs a GPU, installs things) gets, on the line right before
  its opening fence: `<!-- readme-test: skip (the reason) -->`. Skipped blocks and their reasons are printed.

Run it by hand against any server: `PYTHONPATH=. .venv/bin/python test/test_readme.py --base-url URL [--upto N]`.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DEFAULT_NAME, start_server, stop_server
from util.settings import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
README_URL = "http://127.0.0.1:8801"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
# What a block may use from the checkout, linked into the scratch folder it runs in.
LINKED = ["examples", "test", "sdk", "config.yaml"]
BASH_PRELUDE = r"""
set -eo pipefail
curl() { command curl --fail-with-body "$@"; }
"""


@dataclass
class Block:
    """One fenced code block of the README."""

    lang: str
    code: str
    line: int
    skip: str | None


def readme_blocks(text: str) -> list[Block]:
    """The bash and python blocks, in order, each with the skip reason given right before it (if any)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, lang = i, match.group("lang")
        end = start + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(previous)
        if lang in ("bash", "python"):
            blocks.append(Block(lang, "\n".join(lines[start + 1 : end]), start + 1, skip and skip.group("reason")))
        i = end + 1
    return blocks


def scratch_checkout(root: Path) -> Path:
    """A folder that looks like the project to the README's commands, without writing into the real one."""
    work = root / "checkout"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(PROJECT_ROOT / name)
    (work / ".venv").symlink_to(Path(sys.prefix))
    return work


def run_blocks(blocks: list[Block], base_url: str, work: Path, timeout: float = 600) -> list[str]:
    """Run the blocks in order; returns a line per block. Raises AssertionError on the first failing block."""
    state = work / ".readme_state.sh"
    env = {
        **os.environ,
        "WINTRAIN_BASE_URL": base_url,
        "PYTHONPATH": str(work),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    env.pop("WINTRAIN_API_KEY", None)
    report = []
    for block in blocks:
        where = f"README.md:{block.line} ({block.lang})"
        if block.skip:
            report.append(f"{where}: skipped: {block.skip}")
            continue
        code = block.code.replace(README_URL, base_url)
        if block.lang == "bash":
            script = (
                f"compgen -v > {work}/.vars_before\n[ -f {state} ] && source {state}\n{BASH_PRELUDE}\n{code}\n"
                f'for v in $(compgen -v); do grep -qx "$v" {work}/.vars_before || declare -p "$v"; done'
                f" > {state}\n"
            )
            cmd = ["bash", "-c", script]
        else:
            cmd = [sys.executable, "-c", code]
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        output = (proc.stdout + proc.stderr)[-4000:]
        assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{code}\n--- output ---\n{output}"
        report.append(f"{where}: ok")
    return report


def test_skip_marker_is_parsed():
    text = "intro\n\n<!-- readme-test: skip (serves forever) -->\n```bash\nmake run\n```\n\n```python\nprint(1)\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.skip) for b in blocks] == [("bash", "serves forever"), ("python", None)]
    assert blocks[1].code == "print(1)"


def test_a_failing_block_fails(tmp_path):
    blocks = [Block("bash", "X=1", 1, None), Block("bash", 'test "$X" = 1 && false', 2, None)]
    with pytest.raises(AssertionError, match=r"README\.md:2"):
        run_blocks(blocks, README_URL, scratch_checkout(tmp_path))


@pytest.fixture
def readme_server(tmp_path, default_named_model_root):
    """A live server on the tiny model named like the default one, with an empty data dir."""
    url, proc = start_server(tmp_path, default_named_model_root, {"models": {"base_model": DEFAULT_NAME}})
    yield url
    stop_server(proc)


def test_readme_runs_as_written(readme_server, tmp_path):
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert sum(1 for b in blocks if not b.skip) >= 5, "the README lost its runnable blocks"
    report = run_blocks(blocks, readme_server, scratch_checkout(tmp_path))
    print("\n".join(report))


def main() -> int:
    """Run the README's blocks against a running server (by hand)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=README_URL)
    parser.add_argument("--upto", type=int, default=None, help="stop after the block starting at this README line")
    parser.add_argument("--from-line", type=int, default=0, help="skip blocks before this README line")
    args = parser.parse_args()
    blocks = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.line >= args.from_line]
    if args.upto is not None:
        blocks = [b for b in blocks if b.line <= args.upto]
    with tempfile.TemporaryDirectory() as tmp:
        for line in run_blocks(blocks, args.base_url, scratch_checkout(Path(tmp))):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
