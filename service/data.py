"""Dataset parsing, validation, normalisation and splitting for chat data."""

import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

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
from util.errors import ConflictError, ForbiddenPathError, InvalidInputError, NotFoundError
from util.files import check_replaceable, default_dir_mode, write_marker
from util.paths import resolve_client_path, resolve_output
from util.settings import Settings

if TYPE_CHECKING:
    from service.tasks import TaskStore

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


class _Deadline:
    """The time budget of one validation (data.validate_timeout_seconds)."""

    def __init__(self, seconds: float, file_path: str) -> None:
        """Start the clock."""
        self.seconds, self.file_path = seconds, file_path
        self.end = time.monotonic() + seconds

    def check(self, record: int, stage: str = "reading records") -> None:
        """Raise a clear 422 once the budget is spent."""
        if time.monotonic() > self.end:
            raise InvalidInputError(
                f"Validating '{self.file_path}' took longer than {self.seconds:g} s "
                f"(data.validate_timeout_seconds); it stopped while {stage}, at record {record}. "
                "Split the file, or validate a sample of it.",
                details={"timeout_seconds": self.seconds, "stage": stage, "record": record},
            )


def _same_kind(kind: str | None, found: str, fmt: str, record: Any, records: list[Any], formats: Counter[str]) -> str:
    """Keep a record of the file's kind (set by its first valid record); a record of the other kind is invalid."""
    if kind is not None and found != kind:
        raise RecordInvalid(f"a {found} record in a {kind} file: one file holds chat or preference records, not both")
    formats[fmt] += 1
    records.append(record)
    return found


class DataService:
    """Validate, process and store chat datasets inside the configured roots."""

    def __init__(self, settings: Settings, store: "TaskStore | None" = None) -> None:
        """Bind to the settings (roots, limits, default model) and the task store (to name trained models)."""
        self.settings = settings
        self._summaries: dict[Path, tuple[tuple[int, int], tuple[int, int, Counter[str]]]] = {}
        self._lock = threading.Lock()
        self._delete_lock = threading.Lock()
        self.store = store

    def _model(self, model: str | None) -> Path:
        """The model whose tokenizer measures lengths: a base, a train task id or a fine-tuned name."""
        if self.store is None:
            return models.resolve_model(model, self.settings)
        return models.resolve_model_ref(model, self.settings, self.store)

    def resolve_input(self, raw: str) -> Path:
        """Resolve a client file path inside the roots and require that it exists."""
        path = resolve_client_path(raw, self.settings.data_dir, self.settings.roots)
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
        deadline = _Deadline(limits.validate_timeout_seconds, file_path)
        limit = limits.max_errors_reported
        max_length = max_length or self.settings.train.max_length
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
            if total % 1000 == 0:
                deadline.check(total)
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
            tokenizer = models.load_tokenizer(models.tokenizer_dir(self._model(model)))
            lengths: list[int] = []
            for start in range(0, len(records), TOKENIZE_CHUNK):
                deadline.check(start + 1, "measuring token lengths")
                chunk = records[start : start + TOKENIZE_CHUNK]
                if kind == "preference":  # the longer of the two answers
                    lengths += [
                        max(
                            len(models.chat_token_ids(tokenizer, p["prompt"] + p[side]))
                            for side in ("chosen", "rejected")
                        )
                        for p in chunk
                    ]
                    continue
                texts = [models.render_chat(tokenizer, conv) for conv in chunk]
                # One batched call per chunk: the Rust tokenizer releases the GIL, so other requests keep running.
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

    def process(self, req: ProcessRequest) -> ProcessResponse:
        """Normalise valid records to messages JSONL, drop duplicates, and write a seeded split."""
        paths = [self.resolve_input(raw) for raw in req.inputs()]
        out_dir = resolve_output(req.output_dir, self.settings.data_dir, self.settings)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConflictError(
                f"output_dir '{req.output_dir}' is a file, not a folder.", details={"output_dir": req.output_dir}
            )
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
        out_dir.mkdir(parents=True, exist_ok=True)
        write_marker(out_dir, PROCESS_KIND, uuid.uuid4().hex)
        splits = {}
        for name, records in parts.items():
            tmp = targets[name].with_suffix(".jsonl.tmp")
            with tmp.open("w", encoding="utf-8") as fh:
                for record in records:
                    # Chat records become {"messages": [...]}; preference records TRL's prompt/chosen/rejected.
                    row = record if kind == "preference" else {"messages": record}
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            tmp.replace(targets[name])  # atomic: a reader never sees a half-written split
            splits[name] = SplitFile(path=str(targets[name]), count=len(records))
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

    def upload(self, filename: str, stream: BinaryIO, overwrite: bool = False) -> UploadResponse:
        """Store an uploaded file under the data dir, refusing oversize files and silent overwrites."""
        name = Path(filename or "").name
        if not name or name in {".", ".."}:
            raise InvalidInputError("The uploaded file needs a file name.")
        if name.startswith("."):  # hidden names are the service's own (temp files, output markers)
            raise InvalidInputError(
                f"'{name}' starts with '.'; uploaded file names must not be hidden.", details={"filename": name}
            )
        target = resolve_client_path(f"{UPLOAD_DIR}/{name}", self.settings.data_dir, [self.settings.data_dir])
        if target.exists() and not overwrite:
            raise ConflictError(
                f"'{target.name}' already exists in {UPLOAD_DIR}/; pass overwrite=true to replace it.",
                details={"file_path": str(target)},
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        limit = self.settings.data.max_upload_mb * 1024 * 1024
        # A unique temporary name: concurrent uploads of one name never write into each other's file.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        os.chmod(fd, default_dir_mode() & 0o666)  # mkstemp's 0600 would make the upload private
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(1024 * 1024):
                    size += len(chunk)
                    if size > limit:
                        raise InvalidInputError(f"The upload exceeds the {self.settings.data.max_upload_mb} MB limit.")
                    out.write(chunk)
            if overwrite:
                tmp.replace(target)
            else:
                try:  # a hard link never replaces: of two concurrent uploads of one name, exactly one wins
                    os.link(tmp, target)
                except FileExistsError:
                    raise ConflictError(
                        f"'{target.name}' already exists in {UPLOAD_DIR}/; pass overwrite=true to replace it.",
                        details={"file_path": str(target)},
                    ) from None
            marker = target.parent / UPLOAD_MARKERS / target.name
            marker.parent.mkdir(exist_ok=True)
            marker.touch()  # DELETE removes only files that came this way
        finally:
            tmp.unlink(missing_ok=True)
        return UploadResponse(file_path=str(target), size_bytes=size)

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
        items = []
        for path in root.rglob("*") if root.is_dir() else []:
            rel = path.relative_to(root)
            if rel.parts[0] in NOT_DATASETS or any(p.startswith(".") for p in rel.parts):
                continue  # task logs, and half-written uploads (.name.part) or staging files
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
        target = resolve_client_path(name, uploads, [uploads])
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
