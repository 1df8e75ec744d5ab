"""Dataset parsing, validation, normalisation and splitting for chat data."""

import errno
import fcntl
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import stat
import statistics
import sys
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import forkserver
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entity.data import (
    DataFile,
    DataFileList,
    DeleteResponse,
    DuplicateRecord,
    HistogramBin,
    LengthStats,
    PreviewRecord,
    PreviewResponse,
    ProcessRequest,
    ProcessResponse,
    RecordError,
    SplitFile,
    UploadResponse,
    ValidateResponse,
)
from entity.task import TaskStatus
from service import models
from util.errors import (
    AppError,
    ConflictError,
    ForbiddenPathError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
)
from util.files import check_replaceable, default_dir_mode, fresh_dir, publish
from util.paths import file_ids, resolve_client_path, resolve_in_roots, resolve_output
from util.settings import Settings, secrets_hidden

if TYPE_CHECKING:
    from service.tasks import TaskStore

log = logging.getLogger(__name__)
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
SPLIT_NAMES = ("train", "val", "test")
UPLOAD_DIR = "uploads"
PROCESS_KIND = "process"
PROCESS_LOCK_SUFFIX = ".process-lock"  # .NAME.process-lock beside a process output folder NAME
TOKENIZE_CHUNK = 256  # conversations per batched tokenizer call in validate
# Python refuses to convert longer integer literals (CVE-2020-10735); such a record is reported, not parsed.
MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300
DATASET_SUFFIXES = (".json", ".jsonl")
UPLOAD_MARKERS = ".uploaded"  # uploads/.uploaded/NAME marks uploads/NAME as sent by a client
NOT_DATASETS = ("logs",)  # folders of the data dir that hold no datasets (task logs)

Message = dict[str, str]
Preference = dict[str, list[Message]]  # {"prompt": [...], "chosen": [...], "rejected": [...]}


class RecordInvalid(ValueError):
    """A record that cannot be used for training, with the reason."""


@dataclass
class ParsedRecord:
    """One raw record with its position in the file (line for JSONL, 1-based index for arrays)."""

    line: int
    obj: Any = None
    error: str | None = None


class _Decoder:
    """A JSON decoder that turns the inputs Python's json refuses with non-JSON errors into per-record reasons.

    Integers of more than sys.get_int_max_str_digits() digits make int() raise ValueError, and deep nesting makes
    the scanner raise RecursionError; both would otherwise escape as a 500.
    """

    def __init__(self) -> None:
        """A decoder whose integer hook notes an oversized integer instead of raising mid-parse."""
        self.big_int = False
        self._json = json.JSONDecoder(parse_int=self._int)

    def _int(self, text: str) -> int:
        """Parse an integer literal; one too long to convert becomes 0 and marks the record."""
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            self.big_int = True
            return 0
        return int(text)

    def decode(self, text: str, pos: int = 0) -> tuple[Any, int, str | None]:
        """Decode one value at `pos`: (value, end, None), or (None, pos, reason) when it is unusable."""
        self.big_int = False
        try:
            obj, end = self._json.raw_decode(text, pos)
        except RecursionError:
            return None, pos, "JSON nested too deeply"
        if self.big_int:
            return None, end, f"an integer has more than {MAX_INT_DIGITS} digits"
        return obj, end, None


class _Lines:
    """1-based line numbers of increasing character offsets in one text, counted incrementally."""

    def __init__(self, text: str) -> None:
        """Start at the top of `text`."""
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        """The line of offset `pos` (offsets must not decrease between calls)."""
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _read_array(text: str) -> Iterator[ParsedRecord]:
    """Yield the elements of a JSON array one by one, so one bad element names its index and line."""
    decoder = _Decoder()
    lines = _Lines(text)
    ws = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]
    pos = ws(text, 0).end()
    if text[pos : pos + 1] != "[":
        yield ParsedRecord(1, error="bad JSON: a JSON array file must start with '['")
        return
    pos = ws(text, pos + 1).end()
    if text[pos : pos + 1] == "]":
        return
    index = 0
    while True:
        index += 1
        try:
            obj, end, reason = decoder.decode(text, pos)
        except json.JSONDecodeError as exc:
            yield ParsedRecord(index, error=f"bad JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
            return
        if reason is not None:
            if end == pos:  # the scanner gave up inside the element: where it ends, and so the rest, is unknown
                yield ParsedRecord(index, error=f"{reason} (line {lines.at(pos)}); the rest of the file was not read")
                return
            yield ParsedRecord(index, error=f"{reason} (line {lines.at(pos)})")
        else:
            yield ParsedRecord(index, obj)
        pos = ws(text, end).end()
        sep = text[pos : pos + 1]
        if sep == "]":
            if text[ws(text, pos + 1).end() :]:
                yield ParsedRecord(index + 1, error=f"bad JSON: extra data after the array (line {lines.at(pos)})")
            return
        if sep != ",":
            line = lines.at(pos)
            yield ParsedRecord(index + 1, error=f"bad JSON: expected ',' or ']' after record {index} (line {line})")
            return
        pos = ws(text, pos + 1).end()


def read_records(path: Path) -> Iterator[ParsedRecord]:
    """Yield records from a JSON array file or a JSONL file, reporting bad JSON per line (per element for arrays)."""
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        yield from _read_array(path.read_text(encoding="utf-8", errors="replace"))
        return
    decoder = _Decoder()
    ws = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:  # without its line break, a truncated line's error points at its end, not at "column 1" of the next
                line = line.rstrip("\r\n")
                obj, end, reason = decoder.decode(line, ws(line, 0).end())
            except json.JSONDecodeError as exc:
                yield ParsedRecord(lineno, error=f"bad JSON: {exc.msg} (column {exc.colno})")
                continue
            if reason is None and ws(line, end).end() != len(line):
                reason = f"bad JSON: Extra data (column {end + 1})"
            yield ParsedRecord(lineno, error=reason) if reason else ParsedRecord(lineno, obj)


def conversation_key(messages: Any) -> str:
    """The duplicate key: two records are duplicates when their normalised conversations are equal.

    Normalisation maps every format to the same role/content messages and trims and unifies each content's
    line breaks, so the same conversation written as ShareGPT and as messages counts as one. The first is kept.
    """
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def _content(value: Any, index: int) -> str:
    """Normalise one message's content: a non-empty string with unified newlines and trimmed edges."""
    if not isinstance(value, str):
        raise RecordInvalid(f"message {index}: content must be a string")
    text = value.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise RecordInvalid(f"message {index}: empty content")
    return text


def _role(value: Any, index: int) -> str:
    """Map a role (or ShareGPT 'from') to system/user/assistant."""
    role = ROLE_ALIASES.get(str(value).strip().lower()) if isinstance(value, str) else None
    if role is None:
        raise RecordInvalid(f"message {index}: unknown role {value!r} (expected system, user or assistant)")
    return role


def _messages_from_turns(turns: Any, role_key: str, content_key: str) -> list[Message]:
    """Normalise a list of turn objects that use the given role/content keys."""
    if not isinstance(turns, list) or not turns:
        raise RecordInvalid("conversation is empty or not a list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordInvalid(f"message {i}: not an object")
        out.append({"role": _role(turn.get(role_key), i), "content": _content(turn.get(content_key), i)})
    return out


def check_conversation(messages: list[Message]) -> None:
    """Require optional leading system turns, then user/assistant alternation ending on assistant."""
    turns = list(messages)
    while turns and turns[0]["role"] == "system":
        turns.pop(0)
    if not any(m["role"] == "assistant" for m in turns):
        raise RecordInvalid("no assistant turn")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            where = "a system turn after the start" if msg["role"] == "system" else f"two {msg['role']} turns in a row"
            if i == 0 and msg["role"] == "assistant":
                where = "it starts with an assistant turn"
            raise RecordInvalid(f"conversation does not alternate user/assistant: {where}")
    if turns[-1]["role"] != "assistant":
        raise RecordInvalid("conversation must end with an assistant turn")


def normalize_record(obj: Any) -> tuple[str, list[Message]]:
    """Detect a record's format and return (format, normalised messages); raise RecordInvalid."""
    if not isinstance(obj, dict):
        raise RecordInvalid("record is not a JSON object")
    if "conversations" in obj:
        turns = obj["conversations"]
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        if "from" in first or "value" in first:
            fmt, messages = "sharegpt", _messages_from_turns(turns, "from", "value")
        else:
            fmt, messages = "conversations", _messages_from_turns(turns, "role", "content")
    elif "messages" in obj:
        fmt, messages = "messages", _messages_from_turns(obj["messages"], "role", "content")
    elif "instruction" in obj and "output" in obj:
        fmt = "alpaca"
        prompt = _content(obj["instruction"], 0)
        extra = obj.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra.strip()}"
        messages = []
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            messages.append({"role": "system", "content": obj["system"].strip()})
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _content(obj["output"], 1)}]
    elif "question" in obj and "answer" in obj:  # GSM8K: the answer keeps its reasoning and '#### N' line
        fmt = "gsm8k"
        messages = [
            {"role": "user", "content": _content(obj["question"], 0)},
            {"role": "assistant", "content": _content(obj["answer"], 1)},
        ]
    elif "query" in obj and "response" in obj:  # single-turn QA (evalscope's general_qa files)
        fmt = "qa"
        messages = [
            {"role": "user", "content": _content(obj["query"], 0)},
            {"role": "assistant", "content": _content(obj["response"], 1)},
        ]
    else:
        raise RecordInvalid(
            "unknown format: expected 'conversations', 'messages', 'instruction'/'output', 'question'/'answer' "
            "(GSM8K) or 'query'/'response' keys"
        )
    check_conversation(messages)
    return fmt, messages


def _turns_or_text(value: Any, role: str, what: str) -> list[Message]:
    """A preference field as messages: a string becomes one `role` message, a list is read as turns."""
    if isinstance(value, str):
        return [{"role": role, "content": _content(value, 0)}]
    try:
        return _messages_from_turns(value, "role", "content")
    except RecordInvalid as exc:
        raise RecordInvalid(f"{what}: {exc}") from None


def is_preference_record(obj: Any) -> bool:
    """Whether a record is preference data (OpenAI's DPO JSONL or TRL's prompt/chosen/rejected), not chat."""
    return isinstance(obj, dict) and (
        "preferred_output" in obj or "non_preferred_output" in obj or ("chosen" in obj and "rejected" in obj)
    )


def normalize_preference(obj: Any) -> tuple[str, Preference]:
    """Detect a preference record's format and return (format, {prompt, chosen, rejected} as messages).

    OpenAI's DPO format is `input.messages` + `preferred_output` + `non_preferred_output`; TRL's is
    `prompt` / `chosen` / `rejected`, each a string (a user prompt, an assistant answer) or a list of messages.
    """
    if not isinstance(obj, dict):
        raise RecordInvalid("record is not a JSON object")
    if "preferred_output" in obj or "non_preferred_output" in obj:
        fmt = "openai_dpo"
        inp = obj.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise RecordInvalid("'input' must be an object with a 'messages' list")
        missing = [k for k in ("preferred_output", "non_preferred_output") if k not in obj]
        if missing:
            raise RecordInvalid(f"missing {' and '.join(repr(k) for k in missing)}")
        prompt = _turns_or_text(inp["messages"], "user", "input.messages")
        chosen = _turns_or_text(obj["preferred_output"], "assistant", "preferred_output")
        rejected = _turns_or_text(obj["non_preferred_output"], "assistant", "non_preferred_output")
    elif all(k in obj for k in ("prompt", "chosen", "rejected")):
        fmt = "preference"
        prompt = _turns_or_text(obj["prompt"], "user", "prompt")
        chosen = _turns_or_text(obj["chosen"], "assistant", "chosen")
        rejected = _turns_or_text(obj["rejected"], "assistant", "rejected")
    else:
        raise RecordInvalid("preference record needs 'prompt', 'chosen' and 'rejected'")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if any(m["role"] != "assistant" for m in answer):
            raise RecordInvalid(f"{name}: every message must be an assistant message")
    if prompt[-1]["role"] != "user":
        raise RecordInvalid("the prompt must end with a user turn")
    check_conversation(prompt + chosen[:1])
    if chosen == rejected:
        raise RecordInvalid("chosen and rejected answers are identical")
    return fmt, {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def normalize_any(obj: Any) -> tuple[str, str, Any]:
    """(kind, format, normalised record) of a chat or preference record; kind is 'chat' or 'preference'."""
    if is_preference_record(obj):
        fmt, pref = normalize_preference(obj)
        return "preference", fmt, pref
    fmt, messages = normalize_record(obj)
    return "chat", fmt, messages


def load_preferences(path: Path) -> list[Preference]:
    """All valid preference records of a file, as prompt/chosen/rejected messages (invalid ones skipped)."""
    result = []
    for rec in read_records(path):
        if rec.error is None and is_preference_record(rec.obj):
            try:
                result.append(normalize_preference(rec.obj)[1])
            except RecordInvalid:
                continue
    return result


def load_conversations(path: Path) -> list[list[Message]]:
    """All valid conversations of a file, normalised (invalid records are skipped)."""
    result = []
    for rec in read_records(path):
        if rec.error is None:
            try:
                result.append(normalize_record(rec.obj)[1])
            except RecordInvalid:
                continue
    return result


def _percentile(values: list[int], q: float) -> float:
    """Linear-interpolated percentile of sorted `values`."""
    if len(values) == 1:
        return float(values[0])
    pos = (len(values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def histogram(ordered: list[int], bins: int = 20) -> list[HistogramBin]:
    """Equal-width integer bins over sorted lengths (fewer bins when the range is narrow)."""
    lo, hi = ordered[0], ordered[-1]
    width = max(1, -(-(hi - lo + 1) // bins))  # ceil, so `bins` bins of `width` cover [lo, hi]
    counts = Counter((n - lo) // width for n in ordered)
    n_bins = (hi - lo) // width + 1
    return [HistogramBin(start=lo + i * width, end=lo + (i + 1) * width, count=counts.get(i, 0)) for i in range(n_bins)]


def length_stats(lengths: list[int], max_length: int) -> LengthStats | None:
    """Summarise token lengths; None when there are none."""
    if not lengths:
        return None
    ordered = sorted(lengths)
    return LengthStats(
        min=ordered[0],
        mean=round(statistics.fmean(ordered), 2),
        median=float(statistics.median(ordered)),
        p95=round(_percentile(ordered, 0.95), 2),
        max=ordered[-1],
        max_length=max_length,
        over_max_length=sum(1 for n in ordered if n > max_length),
        histogram=histogram(ordered),
    )


def _same_kind(kind: str | None, found: str, fmt: str, record: Any, records: list[Any], formats: Counter[str]) -> str:
    """Keep a record of the file's kind (set by its first valid record); a record of the other kind is invalid."""
    if kind is not None and found != kind:
        raise RecordInvalid(f"a {found} record in a {kind} file: one file holds chat or preference records, not both")
    formats[fmt] += 1
    records.append(record)
    return found


def validate_records(
    path: Path, max_length: int, tokenizer_path: Path | None, limit: int, progress: Any
) -> ValidateResponse | None:
    """Check every record of a file and measure token lengths with the tokenizer's chat template.

    Runs in a validation worker process (see _ValidationPool). `progress` gets [record, stage] as it goes, so a
    validation stopped at its deadline can say where. None when there are records to measure but no tokenizer.
    """
    formats: Counter[str] = Counter()
    errors: list[RecordError] = []
    invalid = 0
    total = 0
    kind: str | None = None
    records: list[Any] = []
    first_line: dict[str, int] = {}
    duplicates: list[DuplicateRecord] = []
    duplicate_count = 0
    for rec in read_records(path):
        total += 1
        progress[0] = total
        reason = rec.error
        if reason is None:
            try:
                kind = _same_kind(kind, *normalize_any(rec.obj), records, formats)
                key = conversation_key(records[-1])
                if key in first_line:
                    duplicate_count += 1
                    if len(duplicates) < limit:
                        duplicates.append(DuplicateRecord(line=rec.line, duplicate_of=first_line[key]))
                else:
                    first_line[key] = rec.line
                continue
            except RecordInvalid as exc:
                reason = str(exc)
        invalid += 1
        if len(errors) < limit:
            errors.append(RecordError(line=rec.line, reason=reason))
    stats = None
    if records:
        if tokenizer_path is None:
            return None
        progress[1] = 1  # VALIDATE_STAGES[1]
        tokenizer = models.load_tokenizer(tokenizer_path)
        lengths: list[int] = []
        for start in range(0, len(records), TOKENIZE_CHUNK):
            progress[0] = start + 1
            chunk = records[start : start + TOKENIZE_CHUNK]
            if kind == "preference":  # the longer of the two answers
                lengths += [
                    max(len(models.chat_token_ids(tokenizer, p["prompt"] + p[side])) for side in ("chosen", "rejected"))
                    for p in chunk
                ]
                continue
            texts = [models.render_chat(tokenizer, conv) for conv in chunk]
            # One batched call per chunk (the Rust tokenizer encodes the batch on several threads).
            lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        stats = length_stats(lengths, max_length)
    return ValidateResponse(
        file_path=str(path),
        valid=total > 0 and invalid == 0,
        total=total,
        valid_count=total - invalid,
        invalid_count=invalid,
        formats=dict(formats),
        errors=errors,
        errors_truncated=invalid > len(errors),
        duplicate_count=duplicate_count,
        duplicates=duplicates,
        token_stats=stats,
        kind=kind,
    )


# -- validation in a worker process -------------------------------------------------------------------------------

VALIDATE_STAGES = ("reading records", "measuring token lengths")
KEEP_WORKER_AFTER_MB = 16.0  # a worker that read a larger file is not reused: its heap stays large
WORKER_JOBS = 200  # a worker is replaced after this many validations
IDLE_WORKERS = 2  # workers kept waiting for the next validation
WORKER_START_SECONDS = 120.0  # how long a new worker may take to be ready (not counted in a validation's time)
# What a validation worker needs, imported once into the fork server so that starting a worker costs a fork: the
# app module (`python main.py` runs it as __main__, and every worker runs its top level again as __mp_main__:
# with its imports loaded that is quick), this module, and what loading a tokenizer imports (transformers resolves
# the model's config class on the first load). Modules that are not there are skipped.
FORKSERVER_PRELOAD = [
    "main",
    "service.data",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.auto.configuration_auto",
    "transformers.activations",
    "transformers.core_model_loading",
    "transformers.tokenization_utils_tokenizers",
]


def _validation_worker(conn: Any, progress: Any, tokenizer_path: Path | None = None) -> None:
    """A worker's loop: validate each job it is sent and send back the reply, until the server closes the pipe.

    It loads `tokenizer_path` (the one the last validation used) before it says it is ready, so that a validation's
    time is spent on its file.

    Replies: ("ok", ValidateResponse | None), ("error", the AppError raised) or ("crash", what went wrong).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then ends its workers
    if tokenizer_path is not None:
        try:
            models.load_tokenizer(tokenizer_path)  # cached for the validations to come
        except Exception:  # noqa: BLE001 - a validation that needs it reports the error
            pass
    conn.send(("ready",))
    while True:
        try:
            path, max_length, tokenizer, limit = conn.recv()
        except (EOFError, OSError):
            return
        progress[0], progress[1] = 0, 0
        reply: tuple[Any, ...]
        try:
            reply = ("ok", validate_records(path, max_length, tokenizer, limit, progress))
        except AppError as exc:
            reply = ("error", exc)
        except Exception as exc:  # noqa: BLE001 - reported to the server, which answers a 500
            reply = ("crash", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


@dataclass
class _Worker:
    """One validation worker process, its pipe and its shared progress counters [record, stage]."""

    proc: Any
    conn: Any
    progress: Any
    jobs: int = 0

    def stop(self) -> None:
        """End the worker now (it may be in the middle of a validation) and close its pipe."""
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class _ValidationPool:
    """Runs validations in worker processes, each killed when its validation runs past the deadline.

    Validating one huge record is a single long parse and tokenizer call: no deadline check can run inside it, and
    it holds the GIL for seconds (building the token lists), which stalls the server's event loop. In a worker
    process the deadline is a kill, and the server's threads never wait on it. Workers are started from a fork
    server (a clean process, never the threaded server itself) and reused while they stay small, so the tokenizer
    they load is cached across validations.
    """

    def __init__(self) -> None:
        """No workers until the first validation."""
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._ctx: Any = None
        self._warming = False
        self._tokenizer: Path | None = None  # the tokenizer the last validation used: new workers load it first

    def prewarm(self, model: Path) -> None:
        """Start the fork server and one idle worker in the background (once), so the first validation needn't wait.

        The worker loads the tokenizer of `model` (the default base model) ahead of time.
        """
        with self._lock:
            if self._warming:
                return
            self._warming = True

        def warm() -> None:
            try:
                with self._lock:
                    self._tokenizer = self._tokenizer or models.tokenizer_dir(model)
            except AppError:
                pass  # no default model to measure with: the worker starts without a tokenizer
            try:
                self._give(self._take(), keep=True)
            except Exception:  # the first validation starts a worker itself (and reports why it cannot)
                log.warning("could not start a validation worker ahead of time", exc_info=True)

        threading.Thread(target=warm, name="validate-prewarm", daemon=True).start()

    def _context(self) -> Any:
        """The forkserver context, its fork server started (with its preload) and holding no API keys."""
        with self._lock:
            if self._ctx is None:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
                with secrets_hidden():  # the fork server and every worker it forks inherit this environment
                    forkserver.ensure_running()
                self._ctx = ctx
            return self._ctx

    def _take(self) -> _Worker:
        """An idle worker that is still alive, or a new one."""
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.is_alive():
                    return worker
                worker.stop()
        ctx = self._context()
        parent, child = ctx.Pipe()
        progress = ctx.RawArray("q", 2)
        with self._lock:
            args = (child, progress, self._tokenizer)
        proc = ctx.Process(target=_validation_worker, args=args, name="wintrain-validate", daemon=True)
        proc.start()
        child.close()
        worker = _Worker(proc, parent, progress)
        try:  # the worker's start (the fork, the main module's top level) is not part of any validation's time
            if parent.poll(WORKER_START_SECONDS) and parent.recv() == ("ready",):
                return worker
        except (EOFError, OSError):
            pass
        worker.stop()
        raise RuntimeError(f"a validation worker did not start (exit code {proc.exitcode})")

    def _give(self, worker: _Worker, keep: bool) -> None:
        """Keep a worker for the next validation, or end it."""
        with self._lock:
            if keep and worker.jobs < WORKER_JOBS and len(self._idle) < IDLE_WORKERS:
                self._idle.append(worker)
                return
        worker.stop()

    def run(self, job: tuple[Any, ...], seconds: float, keep: bool = True) -> tuple[Any, ...]:
        """The worker's reply to `job`, or ("timeout", record, stage) once `seconds` have passed (the worker killed).

        The clock starts once a ready worker holds the job: starting the fork server (once per server) or a worker
        does not count.
        """
        if job[2] is not None:
            with self._lock:
                self._tokenizer = job[2]
        worker = self._take()
        try:
            worker.conn.send(job)
            if not worker.conn.poll(seconds):
                record, stage = int(worker.progress[0]), int(worker.progress[1])
                worker.stop()
                return "timeout", record, stage
            reply = worker.conn.recv()
        except (EOFError, OSError):
            worker.stop()
            return "crash", f"the worker exited (code {worker.proc.exitcode})"
        except BaseException:
            worker.stop()
            raise
        worker.jobs += 1
        self._give(worker, keep)
        return reply


_VALIDATORS = _ValidationPool()


def _lock_beside(output: Path, name: str) -> int:
    """Open (creating it) the hidden lock file beside an output folder: a plain file, never followed if a link."""
    output.parent.mkdir(parents=True, exist_ok=True)
    path = output.parent / f".{output.name}{PROCESS_LOCK_SUFFIX}"
    flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO won't hang
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
            raise
        fd = -1
    if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd >= 0:
        os.close(fd)
    raise ConflictError(
        f"output_dir '{name}' cannot be locked: '{path.name}' beside it is not a plain file this service can open "
        "(a link or something else is there). Remove it, or choose another output_dir.",
        details={"output_dir": name, "lock_file": path.name},
    )


MAX_NAME_BYTES = 255  # the longest file name (UTF-8 bytes) of the usual file systems (ext4, XFS, btrfs, NTFS)


def upload_name(filename: str) -> str:
    """An uploaded file's name without folders; 422 for an empty, hidden or over-long one."""
    name = Path(filename or "").name
    if not name or name in {".", ".."}:
        raise InvalidInputError("The uploaded file needs a file name.")
    if name.startswith("."):  # hidden names are the service's own (temp files, output markers)
        raise InvalidInputError(
            f"'{name}' starts with '.'; uploaded file names must not be hidden.", details={"filename": name}
        )
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise InvalidInputError(
            f"The file name is {size} bytes long (UTF-8); at most {MAX_NAME_BYTES} are accepted. Rename the file.",
            details={"filename_bytes": size, "max_bytes": MAX_NAME_BYTES},
        )
    return name


class UploadWriter:
    """An upload being written to a hidden temporary file in its target's folder, refused past the size cap."""

    def __init__(self, target: Path, max_mb: int) -> None:
        """Create the temporary file (a unique name: concurrent uploads of one name never share a file)."""
        self.target = target
        self.max_mb = max_mb
        self.size = 0
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=target.parent)
        self.tmp = Path(tmp_name)
        try:
            os.chmod(fd, default_dir_mode() & 0o666)  # mkstemp's 0600 would make the upload private
            self.out = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, chunk: bytes) -> None:
        """Append content; 413 (and nothing written) once the upload would pass data.max_upload_mb."""
        self.size += len(chunk)
        if self.size > self.max_mb * 1024 * 1024:
            raise PayloadTooLargeError(
                f"The upload exceeds the {self.max_mb} MB limit (data.max_upload_mb).",
                param="file",
                details={"max_upload_mb": self.max_mb},
            )
        self.out.write(chunk)

    def close(self) -> None:
        """Flush and close the temporary file."""
        self.out.close()

    def discard(self) -> None:
        """Close and remove the temporary file (what was published under the target name stays)."""
        try:
            self.out.close()
        except OSError:
            pass  # a full disk fails the final flush too; the file goes all the same
        self.tmp.unlink(missing_ok=True)


class DataService:
    """Validate, process and store chat datasets inside the configured roots."""

    def __init__(self, settings: Settings, store: "TaskStore | None" = None) -> None:
        """Bind to the settings (roots, limits, default model) and the task store (to name trained models)."""
        self.settings = settings
        self._summaries: dict[Path, tuple[tuple[int, int], tuple[int, int, Counter[str]]]] = {}
        self._lock = threading.Lock()
        self._delete_lock = threading.Lock()
        self._processing: set[str] = set()  # output folders a process call is writing now (guarded by _lock)
        self.store = store
        _VALIDATORS.prewarm(settings.base_model_path())

    def _model(self, model: str | None) -> Path:
        """The model whose tokenizer measures lengths: a base, a train task id or a fine-tuned name."""
        if self.store is None:
            return models.resolve_model(model, self.settings)
        return models.resolve_model_ref(model, self.settings, self.store)

    def resolve_input(self, raw: str) -> Path:
        """Resolve a client file path inside the roots and require that it exists."""
        path = resolve_in_roots(raw, self.settings.data_dir, self.settings)
        if not path.is_file():
            raise NotFoundError(f"File '{raw}' does not exist.", details={"path": raw})
        return path

    def validate(self, file_path: str, max_length: int | None = None, model: str | None = None) -> ValidateResponse:
        """Check every record of a file and measure token lengths with the model's chat template."""
        path = self.resolve_input(file_path)
        limits = self.settings.data
        size_mb = path.stat().st_size / (1024 * 1024)
        if size_mb > limits.max_validate_mb:
            raise InvalidInputError(
                f"'{file_path}' is {size_mb:.1f} MB; /api/data/validate reads at most {limits.max_validate_mb} MB "
                "(data.max_validate_mb). Split the file, or validate a sample of it.",
                details={"size_mb": round(size_mb, 1), "max_validate_mb": limits.max_validate_mb},
            )
        max_length = max_length or self.settings.train.max_length
        try:  # resolved here (the task store lives in this process); an error counts only if a record needs it
            tokenizer_path: Path | None = models.tokenizer_dir(self._model(model))
            model_error: AppError | None = None
        except AppError as exc:
            tokenizer_path, model_error = None, exc
        job = (path, max_length, tokenizer_path, limits.max_errors_reported)
        seconds = limits.validate_timeout_seconds
        reply = _VALIDATORS.run(job, seconds, keep=size_mb <= KEEP_WORKER_AFTER_MB)
        if reply[0] == "timeout":
            record, stage = reply[1], VALIDATE_STAGES[reply[2]]
            raise InvalidInputError(
                f"Validating '{file_path}' took longer than {seconds:g} s "
                f"(data.validate_timeout_seconds); it stopped while {stage}, at record {record}. "
                "Split the file, or validate a sample of it.",
                details={"timeout_seconds": seconds, "stage": stage, "record": record},
            )
        if reply[0] == "error":
            raise reply[1]
        if reply[0] == "crash":
            raise RuntimeError(f"validating '{file_path}' failed in the validation worker: {reply[1]}")
        if reply[1] is None:  # records to measure, and the model to measure them with did not resolve
            raise model_error or NotFoundError(f"No tokenizer to measure '{file_path}' with.")
        return reply[1]

    def process(self, req: ProcessRequest) -> ProcessResponse:
        """Normalise valid records to messages JSONL, drop duplicates, and write a seeded split."""
        paths = [self.resolve_input(raw) for raw in req.inputs()]
        out_dir = resolve_output(req.output_dir, self.settings.data_dir, self.settings)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConflictError(
                f"output_dir '{req.output_dir}' is a file, not a folder.", details={"output_dir": req.output_dir}
            )
        with self._output_lock(out_dir, req.output_dir):  # a concurrent call into this folder gets a 409
            return self._process(req, paths, out_dir)

    @contextmanager
    def _output_lock(self, out_dir: Path, name: str) -> Iterator[None]:
        """Hold `out_dir` for one process call; a concurrent call into it (here or on another server) gets a 409.

        A set of busy folders covers this server's threads; an flock on a hidden lock file beside the folder (never
        inside it: the folder is replaced whole) covers servers that share the data dir.
        """
        key = str(out_dir)
        busy = ConflictError(
            f"Another /api/data/process call is writing to output_dir '{name}' now; try again once it has finished.",
            details={"output_dir": name},
        )
        with self._lock:
            if key in self._processing:
                raise busy
            self._processing.add(key)
        try:
            fd = _lock_beside(out_dir, name)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise busy from None
            try:
                yield
            finally:
                os.close(fd)  # releases the flock
        finally:
            with self._lock:
                self._processing.discard(key)

    def _process(self, req: ProcessRequest, paths: list[Path], out_dir: Path) -> ProcessResponse:
        """Process into `out_dir` while holding its lock: the splits and the marker are published together."""
        check_replaceable(out_dir, PROCESS_KIND, req.output_dir)
        targets = {name: out_dir / f"{name}.jsonl" for name in SPLIT_NAMES}
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing and not req.overwrite:
            raise ConflictError(
                'Split files already exist in output_dir; pass "overwrite": true to replace them.',
                details={"existing": existing},
            )
        total = invalid = duplicates = 0
        seen: dict[str, int] = {}
        dropped: list[DuplicateRecord] = []
        kept: list[Any] = []
        kind: str | None = None
        for rec in (rec for path in paths for rec in read_records(path)):  # merged in order
            total += 1
            if rec.error is not None:
                invalid += 1
                continue
            try:
                found, _, record = normalize_any(rec.obj)
                if kind is not None and found != kind:
                    raise RecordInvalid("mixed kinds")
            except RecordInvalid:
                invalid += 1
                continue
            kind = found
            key = conversation_key(record)
            if key in seen:
                duplicates += 1
                if len(dropped) < self.settings.data.max_errors_reported:
                    dropped.append(DuplicateRecord(line=rec.line, duplicate_of=seen[key]))
                continue
            seen[key] = rec.line
            kept.append(record)
        if not kept:
            raise InvalidInputError(
                f"'{', '.join(req.inputs())}' has no valid records to split; run /api/data/validate to see why.",
                details={"total": total, "invalid": invalid},
            )
        cfg = req.split_config
        if cfg.shuffle:
            random.Random(cfg.seed).shuffle(kept)
        n = len(kept)
        n_train = round(n * cfg.train_ratio)
        n_val = min(round(n * cfg.val_ratio), n - n_train)
        parts = {"train": kept[:n_train], "val": kept[n_train : n_train + n_val], "test": kept[n_train + n_val :]}
        # The three splits go into a fresh folder (mkdtemp: a new name only this process can enter, and each split
        # created exclusively, so nothing planted is written through), which then replaces the output folder whole,
        # marker included: a reader sees the earlier splits or these, never a mix of two calls.
        staging = fresh_dir(out_dir)
        try:
            splits = {}
            for name, records in parts.items():
                with (staging / targets[name].name).open("x", encoding="utf-8") as fh:
                    for record in records:
                        # Chat records become {"messages": [...]}; preference records TRL's prompt/chosen/rejected.
                        row = record if kind == "preference" else {"messages": record}
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                splits[name] = SplitFile(path=str(targets[name]), count=len(records))
            publish(staging, out_dir, PROCESS_KIND, uuid.uuid4().hex)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after a publish; left over after an error
        return ProcessResponse(
            input_file=str(paths[0]),
            input_files=[str(p) for p in paths],
            output_dir=str(out_dir),
            total=total,
            kept=n,
            invalid_dropped=invalid,
            duplicates_dropped=duplicates,
            duplicates=dropped,
            splits=splits,
        )

    def begin_upload(self, filename: str, overwrite: bool | None = None) -> UploadWriter:
        """Check an upload's name, then open its temporary file beside its target (uploads/NAME).

        With `overwrite` known to be off, a taken name is refused before any content is read; finish_upload
        checks again in any case (the form field may come after the file).
        """
        name = upload_name(filename)
        target = resolve_client_path(
            f"{UPLOAD_DIR}/{name}", self.settings.data_dir, [self.settings.data_dir], self.settings.private_paths
        )
        if overwrite is False and target.exists():
            raise self._taken(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        return UploadWriter(target, self.settings.data.max_upload_mb)

    def finish_upload(self, upload: UploadWriter, overwrite: bool = False) -> UploadResponse:
        """Publish a fully received upload under uploads/ (replacing a file only with overwrite) and mark it."""
        target = upload.target
        try:
            upload.close()
            if overwrite:
                upload.tmp.replace(target)
            else:
                try:  # a hard link never replaces: of two concurrent uploads of one name, exactly one wins
                    os.link(upload.tmp, target)
                except FileExistsError:
                    raise self._taken(target) from None
            marker = target.parent / UPLOAD_MARKERS / target.name
            marker.parent.mkdir(exist_ok=True)
            marker.touch()  # DELETE removes only files that came this way
        finally:
            upload.discard()
        return UploadResponse(file_path=str(target), size_bytes=upload.size)

    @staticmethod
    def _taken(target: Path) -> ConflictError:
        """The 409 for an upload whose name is taken."""
        return ConflictError(
            f"'{target.name}' already exists in {UPLOAD_DIR}/; pass overwrite=true to replace it.",
            details={"file_path": str(target)},
        )

    # -- dataset tools -------------------------------------------------------------------------------------

    def _summary(self, path: Path, stat: os.stat_result) -> tuple[int, int, Counter[str]]:
        """(records, valid records, formats) of a file, cached until its size or mtime changes."""
        key = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._summaries.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        records = valid = 0
        formats: Counter[str] = Counter()
        for rec in read_records(path):
            records += 1
            if rec.error is None:
                try:
                    formats[normalize_record(rec.obj)[0]] += 1
                    valid += 1
                except RecordInvalid:
                    pass
        with self._lock:
            self._summaries[path] = (key, (records, valid, formats))
        return records, valid, formats

    def list_files(self, kind: str | None = None) -> DataFileList:
        """Uploaded and processed dataset files under the data dir, newest first."""
        root = self.settings.data_dir
        private = {p.resolve() for p in self.settings.private_paths}
        private_ids = file_ids(private)
        items = []
        for path in root.rglob("*") if root.is_dir() else []:
            rel = path.relative_to(root)
            if rel.parts[0] in NOT_DATASETS or any(p.startswith(".") for p in rel.parts):
                continue  # task logs, and half-written uploads (.name.part) or staging files
            if path.resolve() in private or file_ids([path]) & private_ids:
                continue  # the task database (under any name) is never opened as a dataset
            if path.suffix not in DATASET_SUFFIXES or path.is_symlink() or not path.is_file():
                continue
            uploaded = rel.parts[0] == UPLOAD_DIR and len(rel.parts) == 2
            file_kind = "upload" if uploaded and (path.parent / UPLOAD_MARKERS / path.name).is_file() else "processed"
            if kind and file_kind != kind:
                continue
            try:
                stat = path.stat()
                records, valid, formats = self._summary(path, stat)
            except OSError:
                continue  # deleted while we looked
            items.append(
                DataFile(
                    file_path=rel.as_posix(),
                    kind=file_kind,
                    size_bytes=stat.st_size,
                    records=records,
                    valid_records=valid,
                    format=formats.most_common(1)[0][0] if formats else None,
                    formats=dict(formats),
                    modified_at=datetime.fromtimestamp(stat.st_mtime, UTC),
                )
            )
        items.sort(key=lambda f: (f.modified_at, f.file_path), reverse=True)
        return DataFileList(items=items, total=len(items))

    def preview(self, file_path: str, offset: int, limit: int) -> PreviewResponse:
        """Records offset..offset+limit of a file, normalised to messages (or with the reason they are unusable)."""
        path = self.resolve_input(file_path)
        items: list[PreviewRecord] = []
        more = False
        for index, rec in enumerate(read_records(path)):
            if index < offset:
                continue
            if len(items) == limit:
                more = True
                break
            if rec.error is not None:
                items.append(PreviewRecord(line=rec.line, error=rec.error))
                continue
            try:
                fmt, messages = normalize_record(rec.obj)
                items.append(PreviewRecord(line=rec.line, format=fmt, messages=messages))
            except RecordInvalid as exc:
                items.append(PreviewRecord(line=rec.line, error=str(exc)))
        return PreviewResponse(
            file_path=str(path), offset=offset, limit=limit, items=items, next_offset=offset + limit if more else None
        )

    def delete_upload(self, file_path: str) -> DeleteResponse:
        """Delete a file the client uploaded (uploads/NAME); nothing else, each file once, none a task still reads."""
        uploads = (self.settings.data_dir / UPLOAD_DIR).resolve()
        raw = file_path.strip()
        name = raw.removeprefix(f"{UPLOAD_DIR}/")
        if not name or "/" in name or "\\" in name or name in {".", ".."} or name.startswith("."):
            raise InvalidInputError(
                f"'{file_path}' is not an uploaded file: give its name, or uploads/<name>.",
                details={"file_path": file_path},
            )
        target = resolve_client_path(name, uploads, [uploads], self.settings.private_paths)
        busy = self._paths_in_use().get(str(target))
        if busy:
            raise ConflictError(
                f"Task {busy} still reads '{name}'; delete it once the task has ended.",
                details={"file_path": file_path, "task_id": busy},
            )
        with self._delete_lock:  # concurrent deletes of one file: one succeeds, the rest find it gone (404)
            return self._delete(target, name, file_path, uploads)

    def _paths_in_use(self) -> dict[str, str]:
        """The dataset files queued, running or paused tasks read (a paused task reads them again when resumed)."""
        if self.store is None:
            return {}
        statuses = (TaskStatus.queued, TaskStatus.running, TaskStatus.paused)
        return paths_in_use([task for status in statuses for task in self.store.with_status(status)])

    def _delete(self, target: Path, name: str, file_path: str, uploads: Path) -> DeleteResponse:
        """Remove an upload and its marker (the caller holds the delete lock)."""
        try:
            info = target.lstat()
        except FileNotFoundError:
            raise NotFoundError(f"No uploaded file '{name}'.", details={"file_path": file_path}) from None
        marker = uploads / UPLOAD_MARKERS / name
        if not target.is_file() or target.is_symlink() or not marker.is_file():
            raise ForbiddenPathError(
                f"'{name}' was not sent through /api/data/upload; only uploads can be deleted.",
                details={"file_path": file_path},
            )
        try:
            target.unlink()  # atomic: of concurrent deletes exactly one succeeds, the others see it gone
        except FileNotFoundError:
            raise NotFoundError(f"No uploaded file '{name}'.", details={"file_path": file_path}) from None
        marker.unlink(missing_ok=True)
        with self._lock:
            self._summaries.pop(target, None)
        return DeleteResponse(file_path=f"{UPLOAD_DIR}/{name}", deleted=True, size_bytes=info.st_size)


def paths_in_use(tasks: list[Any]) -> dict[str, str]:
    """The dataset files active tasks read (their resolved dataset paths), each with one task id."""
    used: dict[str, str] = {}
    for task in tasks:
        resolved = (task.request or {}).get("resolved") or {}
        paths = [*(resolved.get("dataset_paths") or []), resolved.get("dataset_path")]
        paths.append(resolved.get("eval_dataset_path"))
        for stage in resolved.get("stages") or []:
            paths += (stage or {}).get("dataset_paths") or []
        for path in paths:
            if path:
                used.setdefault(str(path), task.id)
    return used
