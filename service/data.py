"""Dataset parsing, validation, normalisation and splitting for chat data."""

import json
import random
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from entity.data import (
    LengthStats,
    ProcessRequest,
    ProcessResponse,
    RecordError,
    SplitFile,
    UploadResponse,
    ValidateResponse,
)
from service import models
from util.errors import ConflictError, InvalidInputError, NotFoundError
from util.paths import resolve_client_path
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


def read_records(path: Path) -> Iterator[ParsedRecord]:
    """Yield records from a JSON array file or a JSONL file, reporting bad JSON per line."""
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            yield ParsedRecord(exc.lineno, error=f"bad JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
            return
        for i, obj in enumerate(data, start=1):
            yield ParsedRecord(i, obj)
        return
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield ParsedRecord(lineno, json.loads(line))
            except json.JSONDecodeError as exc:
                yield ParsedRecord(lineno, error=f"bad JSON: {exc.msg} (column {exc.colno})")


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
        limit = self.settings.data.max_errors_reported
        max_length = max_length or self.settings.train.max_length
        formats: Counter[str] = Counter()
        errors: list[RecordError] = []
        invalid = 0
        total = 0
        kind: str | None = None
        records: list[Any] = []
        for rec in read_records(path):
            total += 1
            reason = rec.error
            if reason is None:
                try:
                    kind = _same_kind(kind, *normalize_any(rec.obj), records, formats)
                    continue
                except RecordInvalid as exc:
                    reason = str(exc)
            invalid += 1
            if len(errors) < limit:
                errors.append(RecordError(line=rec.line, reason=reason))
        stats = None
        if records:
            tokenizer = models.load_tokenizer(models.tokenizer_dir(self._model(model)))
            if kind == "preference":
                lengths = [
                    max(len(models.chat_token_ids(tokenizer, p["prompt"] + p[side])) for side in ("chosen", "rejected"))
                    for p in records
                ]
            else:
                lengths = [len(models.chat_token_ids(tokenizer, conv)) for conv in records]
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
            token_stats=stats,
            kind=kind,
        )

    def process(self, req: ProcessRequest) -> ProcessResponse:
        """Normalise valid records to messages JSONL, drop duplicates, and write a seeded split."""
        path = self.resolve_input(req.input_file)
        out_dir = resolve_client_path(req.output_dir, self.settings.data_dir, self.settings.roots)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConflictError(
                f"output_dir '{req.output_dir}' is a file, not a folder.", details={"output_dir": str(out_dir)}
            )
        targets = {name: out_dir / f"{name}.jsonl" for name in SPLIT_NAMES}
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing and not req.overwrite:
            raise ConflictError(
                'Split files already exist in output_dir; pass "overwrite": true to replace them.',
                details={"existing": existing},
            )
        total = invalid = duplicates = 0
        seen: set[str] = set()
        kept: list[Any] = []
        kind: str | None = None
        for rec in read_records(path):
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
            key = json.dumps(record, ensure_ascii=False, sort_keys=True)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            kept.append(record)
        if not kept:
            raise InvalidInputError(
                f"'{req.input_file}' has no valid records to split; run /api/data/validate to see why.",
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
            input_file=str(path),
            output_dir=str(out_dir),
            total=total,
            kept=n,
            invalid_dropped=invalid,
            duplicates_dropped=duplicates,
            splits=splits,
        )

    def upload(self, filename: str, stream: BinaryIO, overwrite: bool = False) -> UploadResponse:
        """Store an uploaded file under the data dir, refusing oversize files and silent overwrites."""
        name = Path(filename or "").name
        if not name or name in {".", ".."}:
            raise InvalidInputError("The uploaded file needs a file name.")
        target = resolve_client_path(f"{UPLOAD_DIR}/{name}", self.settings.data_dir, [self.settings.data_dir])
        if target.exists() and not overwrite:
            raise ConflictError(
                f"'{target.name}' already exists in {UPLOAD_DIR}/; pass overwrite=true to replace it.",
                details={"file_path": str(target)},
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        limit = self.settings.data.max_upload_mb * 1024 * 1024
        tmp = target.with_name(f".{target.name}.part")
        size = 0
        try:
            with tmp.open("wb") as out:
                while chunk := stream.read(1024 * 1024):
                    size += len(chunk)
                    if size > limit:
                        raise InvalidInputError(f"The upload exceeds the {self.settings.data.max_upload_mb} MB limit.")
                    out.write(chunk)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return UploadResponse(file_path=str(target), size_bytes=size)
