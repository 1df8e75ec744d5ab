"""Inference: chat, streaming, true batched generation and the model list, on the shared model cache."""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError

from entity.inference import BatchItem, BatchResponse, ChatRequest, ChatResponse, ItemError, Usage
from entity.task import TaskKind, TaskStatus
from service import models
from service.models import LoadedModel, ModelCache
from service.tasks import TaskStore
from util.errors import AppError, InvalidInputError, validation_message
from util.settings import Settings

log = logging.getLogger(__name__)

_END = object()


@dataclass
class Prepared:
    """A validated chat request bound to its loaded model and prompt tokens."""

    request: ChatRequest
    model_name: str
    loaded: LoadedModel
    prompt_ids: list[int]
    max_new_tokens: int

    @property
    def sampling_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one generate() call."""
        greedy = self.request.temperature == 0
        return (
            id(self.loaded),
            greedy,
            None if greedy else self.request.temperature,
            None if greedy else self.request.top_p,
            None if greedy else self.request.seed,
        )


@dataclass
class TextAssembler:
    """Turns generated token ids into text pieces, holding back text that may start a stop string."""

    tokenizer: Any
    stops: list[str]
    eos_ids: set[int]
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    stopped_by: str | None = None  # "eos" or "stop" once the answer is complete

    def add(self, token_ids: list[int]) -> str:
        """Take new tokens and return the text that is now safe to send."""
        for tok in token_ids:
            if self.stopped_by:
                break
            self.ids.append(tok)
            if tok in self.eos_ids:
                self.stopped_by = "eos"
        text = self._text()
        if text.endswith("\ufffd") and not self.stopped_by:
            return ""  # half of a multi-byte character: wait for the rest
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped_by = "stop"
            end = cut
        elif self.stopped_by:
            end = len(text)
        else:
            end = max(self.sent, len(text) - max((len(s) for s in self.stops), default=1) + 1)
        piece, self.sent = text[self.sent : end], max(self.sent, end)
        return piece

    def finish(self) -> str:
        """The rest of the text once generation is over."""
        text = self._text()
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped_by = "stop"
        end = len(text) if cut is None else cut
        piece, self.sent = text[self.sent : end], max(self.sent, end)
        return piece

    @property
    def finish_reason(self) -> str:
        """'stop' for an end-of-sequence token or a stop string, else 'length'."""
        return "stop" if self.stopped_by else "length"

    def _text(self) -> str:
        """The decoded answer so far, without special tokens."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _stop_at(self, text: str) -> int | None:
        """Where the earliest stop string starts, if any occurs."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None


class _QueueStreamer:
    """A generate() streamer that hands each step's new tokens to an asyncio queue (skips the prompt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        """Bind to the event loop that consumes the tokens."""
        self.loop = loop
        self.queue = queue
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        """Called by generate() with the prompt first, then with each new token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        """Generation ended (normally)."""


def _stopping_criteria(loaded: LoadedModel, rows: list[Prepared], prompt_len: int, cancel: threading.Event) -> Any:
    """Per-row stop: the client went away (all rows), or a row's own stop string appeared."""
    import torch
    from transformers import StoppingCriteria

    stops = [r.request.stop or [] for r in rows]
    window = max((len(s) for row in stops for s in row), default=0) + 8

    class RowStops(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
            done = torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)
            if cancel.is_set() or not any(stops):
                return done
            for i, row_stops in enumerate(stops):
                if row_stops:
                    tail = loaded.tokenizer.decode(input_ids[i, prompt_len:][-window:], skip_special_tokens=True)
                    done[i] = any(s in tail for s in row_stops)
            return done

    return RowStops()


class InferenceService:
    """Serves chat on cached models: one request, a stream, or a batch sharing generate() calls."""

    def __init__(self, settings: Settings, store: TaskStore, cache: ModelCache) -> None:
        """Bind to settings, the task store (train task ids as models) and the model cache."""
        self.settings = settings
        self.store = store
        self.cache = cache
        limit = settings.inference.max_concurrent_generations
        self._slots = asyncio.Semaphore(limit)
        # Compiled CUDA graphs (static KV cache) belong to the thread that captured them: use one thread then.
        workers = 1 if settings.inference.static_kv_cache else limit
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate")
        self._rng_lock = threading.Lock()  # sampling uses torch's global RNG; a seed must not be disturbed
        self._stats_lock = threading.Lock()
        self.stats = {"queued": 0, "active": 0, "completed": 0, "cancelled": 0, "failed": 0, "generate_calls": 0}

    def close(self) -> None:
        """Stop taking generation work; running generations end on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- request preparation ------------------------------------------------------------------
    def prepare(self, req: ChatRequest, path: Path | None = None) -> Prepared:
        """Resolve (unless `path` is already resolved) and load the model, render the prompt, check limits."""
        limit = self.settings.inference.max_tokens_limit
        if req.max_tokens is not None and req.max_tokens > limit:
            raise InvalidInputError(
                f"max_tokens {req.max_tokens} is above this server's limit of {limit}.",
                details={"max_tokens": req.max_tokens, "limit": limit},
            )
        path = path or models.resolve_model_ref(req.model, self.settings, self.store)
        loaded = self.cache.get(path)
        messages = [m.model_dump() for m in req.messages]
        try:
            text = models.render_chat(loaded.tokenizer, messages, add_generation_prompt=True)
        except Exception as exc:
            raise InvalidInputError(f"The chat template rejected these messages: {exc}") from exc
        prompt_ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = loaded.context_length - len(prompt_ids)
        if room < 1:
            raise InvalidInputError(
                f"The prompt is {len(prompt_ids)} tokens; the model's context is {loaded.context_length} tokens.",
                details={"prompt_tokens": len(prompt_ids), "context_length": loaded.context_length},
            )
        wanted = req.max_tokens or self.settings.inference.default_max_tokens
        return Prepared(req, req.model or self.settings.models.base_model, loaded, prompt_ids, min(wanted, room))

    async def prepare_async(self, req: ChatRequest) -> Prepared:
        """prepare() off the event loop (loading a model can take seconds)."""
        return await asyncio.to_thread(self.prepare, req)

    # -- generation ---------------------------------------------------------------------------
    def _generate(
        self, rows: list[Prepared], cancel: threading.Event | None = None, streamer: Any = None
    ) -> list[list[int]]:
        """One generate() call for rows sharing a model and sampling settings; new token ids per row."""
        import torch
        from transformers import GenerationConfig

        loaded, first = rows[0].loaded, rows[0].request
        pad_id = loaded.tokenizer.pad_token_id
        input_ids, mask = models.left_pad([r.prompt_ids for r in rows], pad_id, loaded.device)
        width = input_ids.shape[1]
        greedy = first.temperature == 0
        config = GenerationConfig(
            # A long prompt next to a long answer must still fit the context; such rows end with "length".
            max_new_tokens=min(max(r.max_new_tokens for r in rows), loaded.context_length - width),
            do_sample=not greedy,
            temperature=None if greedy else first.temperature,
            top_p=None if greedy else first.top_p,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=sorted(loaded.eos_token_ids),
        )
        kwargs: dict[str, Any] = {
            "past_key_values": self._static_cache(loaded, width + config.max_new_tokens),
            "input_ids": input_ids,
            "attention_mask": mask,
            "generation_config": config,
            "stopping_criteria": [_stopping_criteria(loaded, rows, width, cancel or threading.Event())],
            "streamer": streamer,
        }
        with self._stats_lock:
            self.stats["generate_calls"] += 1
        with torch.inference_mode(), self._rng_lock if not greedy else contextlib.nullcontext():
            if not greedy and first.seed is not None:
                torch.manual_seed(first.seed)
            out = loaded.model.generate(**kwargs)
        new = out[:, width:].tolist()
        return [ids[: r.max_new_tokens] for ids, r in zip(new, rows, strict=True)]

    def _static_cache(self, loaded: LoadedModel, length: int) -> Any:
        """A StaticCache (which makes generate() compile the decode step) when enabled on CUDA, else None."""
        if not (self.settings.inference.static_kv_cache and loaded.device == "cuda"):
            return None
        from transformers import StaticCache

        # Round the length up to a power of two so a few compiled shapes serve every request.
        bucket = max(256, 1 << (length - 1).bit_length())
        return StaticCache(config=loaded.model.config, max_cache_len=min(bucket, loaded.context_length))

    def _respond(self, row: Prepared, ids: list[int], started: float) -> ChatResponse:
        """Build the answer of one row from its generated tokens."""
        asm = TextAssembler(row.loaded.tokenizer, row.request.stop or [], row.loaded.eos_token_ids)
        # With stop strings, feed token by token so the count stops at the token that completed one.
        chunks = [[t] for t in ids] if asm.stops else [ids]
        content = "".join(asm.add(chunk) for chunk in chunks if not asm.stopped_by) + asm.finish()
        return ChatResponse(
            model=row.model_name,
            content=content,
            finish_reason=asm.finish_reason,
            usage=Usage(prompt_tokens=len(row.prompt_ids), completion_tokens=len(asm.ids)),
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    def _count(self, key: str, delta: int = 1) -> None:
        """Adjust a counter of the stats shown by /health."""
        with self._stats_lock:
            self.stats[key] += delta

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Wait (counted as queued) for one of the max_concurrent_generations slots."""
        self._count("queued")
        try:
            await self._slots.acquire()
        finally:
            self._count("queued", -1)
        try:
            yield
        finally:
            self._slots.release()

    async def _run_slot(self, fn: Callable[[], Any]) -> Any:
        """Run blocking generation in a thread once a generation slot is free."""
        async with self._slot():
            self._count("active")
            try:
                return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
            except BaseException:
                self._count("failed")
                raise
            finally:
                self._count("active", -1)

    def answer_many(self, requests: list[ChatRequest], batch_size: int, path: Path | None = None) -> list[ChatResponse]:
        """Blocking: answer in order, same-setting requests sharing generate() calls of batch_size rows."""
        started = time.perf_counter()
        rows = [self.prepare(r, path) for r in requests]
        answers: dict[int, ChatResponse] = {}
        for indices in group_rows(dict(enumerate(rows))):
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                outputs = self._generate([rows[i] for i in chunk])
                answers.update({i: self._respond(rows[i], ids, started) for i, ids in zip(chunk, outputs, strict=True)})
        return [answers[i] for i in range(len(rows))]

    async def chat(self, req: ChatRequest) -> ChatResponse:
        """Answer one chat request."""
        started = time.perf_counter()
        row = await self.prepare_async(req)
        ids = (await self._run_slot(lambda: self._generate([row])))[0]
        self._count("completed")
        return self._respond(row, ids, started)

    async def stream(self, row: Prepared) -> AsyncIterator[dict[str, Any]]:
        """Yield {"type": "delta"|"done"|"error", ...} as tokens are generated; stop when the consumer leaves."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        asm = TextAssembler(row.loaded.tokenizer, row.request.stop or [], row.loaded.eos_token_ids)
        first_token_ms: float | None = None

        def work() -> list[int]:
            try:
                return self._generate([row], cancel, _QueueStreamer(loop, queue))[0]
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        async with self._slot():
            self._count("active")
            future = loop.run_in_executor(self._executor, work)
            finished = False
            try:
                while (item := await queue.get()) is not _END:
                    if first_token_ms is None:
                        first_token_ms = round((time.perf_counter() - started) * 1000, 1)
                    if asm.stopped_by:
                        cancel.set()  # a stop string ended the answer; no need to generate further
                        continue
                    piece = asm.add(item)
                    if piece:
                        yield {"type": "delta", "content": piece}
                try:
                    await future
                except Exception as exc:
                    log.exception("generation failed mid-stream")
                    self._count("failed")
                    finished = True
                    yield {"type": "error", "message": f"{type(exc).__name__}: {exc}"}
                    return
                tail = asm.finish()
                if tail:
                    yield {"type": "delta", "content": tail}
                finished = True
                self._count("completed")
                yield {
                    "type": "done",
                    "finish_reason": asm.finish_reason,
                    "usage": {"prompt_tokens": len(row.prompt_ids), "completion_tokens": len(asm.ids)},
                    "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                    "time_to_first_token_ms": first_token_ms,
                }
            finally:
                if not finished:
                    self._count("cancelled")
                cancel.set()  # the client left (or we are done): stop generating at the next token
                # Hold the slot until the GPU work has really stopped, even while being cancelled.
                with anyio.CancelScope(shield=True), anyio.move_on_after(60), contextlib.suppress(Exception):
                    await future
                self._count("active", -1)

    async def batch(self, raw: list[dict[str, Any]]) -> BatchResponse:
        """Answer many requests; those sharing a model and sampling settings share one generate() call."""
        started = time.perf_counter()
        limit = self.settings.inference.max_batch_size
        if len(raw) > limit:
            raise InvalidInputError(
                f"A batch holds at most {limit} requests; got {len(raw)}.", details={"limit": limit}
            )
        items = [BatchItem(index=i) for i in range(len(raw))]
        prepared: dict[int, Prepared] = {}
        for i, body in enumerate(raw):
            try:
                prepared[i] = await self.prepare_async(ChatRequest.model_validate(body))
            except ValidationError as exc:
                items[i].error = ItemError(
                    type="validation_error", message=validation_message(exc.errors()), status_code=422
                )
            except AppError as exc:
                items[i].error = ItemError(type=exc.error_type, message=exc.message, status_code=exc.status_code)
        calls = 0
        for indices in group_rows(prepared):
            rows = [prepared[i] for i in indices]
            try:
                outputs = await self._run_slot(lambda rows=rows: self._generate(rows))
            except Exception as exc:
                log.exception("batched generation failed")
                for i in indices:
                    items[i].error = ItemError(type="generation_error", message=str(exc), status_code=500)
                continue
            calls += 1
            self._count("completed", len(rows))
            for i, row, ids in zip(indices, rows, outputs, strict=True):
                items[i].result = self._respond(row, ids, started)
        latency = round((time.perf_counter() - started) * 1000, 1)
        return BatchResponse(results=items, generate_calls=calls, latency_ms=latency)

    # -- model list ---------------------------------------------------------------------------
    def served_models(self) -> list[tuple[str, Path, float]]:
        """(id, folder, created time) of every model a request can name: base models and succeeded train tasks."""
        found: list[tuple[str, Path, float]] = []
        base_dir = self.settings.model_dir / "base"
        default = self.settings.base_model_path()
        if models.is_model_dir(default):
            found.append((self.settings.models.base_model, default, default.stat().st_mtime))
        if base_dir.is_dir():
            for path in sorted(base_dir.iterdir()):
                if models.is_model_dir(path) and path.resolve() != default.resolve():
                    found.append((path.name, path, path.stat().st_mtime))
        rows, _ = self.store.page(TaskStatus.succeeded, TaskKind.train, limit=500)
        for task in rows:
            out = Path(task.output_dir or "")
            if models.is_model_dir(out):
                created = (task.finished_at or task.created_at).timestamp()
                found.append((task.id, out, created))
        return found


def group_rows(rows: dict[int, Prepared]) -> list[list[int]]:
    """Indices of rows that can share one generate() call (same model and sampling settings), in order."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, row in rows.items():
        groups.setdefault(row.sampling_key, []).append(i)
    return list(groups.values())
