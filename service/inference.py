"""Inference: chat, streaming, batches and the model list, all on each loaded model's continuous-batching engine."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from entity.inference import BatchItem, BatchResponse, ChatRequest, ChatResponse, ItemError, Usage
from entity.task import TaskKind, TaskStatus
from service import models
from service.engine import Completion, Delta, SamplingParams, TextAssembler
from service.engine.engine import RequestStream
from service.models import LoadedModel, ModelCache
from service.tasks import TaskStore
from util.errors import AppError, InvalidInputError, validation_message
from util.settings import Settings

__all__ = ["InferenceService", "Prepared", "TextAssembler"]

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated chat request bound to its loaded model and prompt tokens."""

    request: ChatRequest
    model_name: str
    loaded: LoadedModel
    prompt_ids: list[int]
    max_new_tokens: int
    top_logprobs: int = 0

    @property
    def params(self) -> SamplingParams:
        """The engine's sampling parameters of this request."""
        req = self.request
        return SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=list(req.stop or []),
            top_logprobs=self.top_logprobs,
            adapter=self.loaded.adapter,
        )


class InferenceService:
    """Serves chat on cached models through their engines: one request, a stream, or a batch."""

    def __init__(self, settings: Settings, store: TaskStore, cache: ModelCache) -> None:
        """Bind to settings, the task store (train task ids as models) and the model cache."""
        self.settings = settings
        self.store = store
        self.cache = cache
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0, "generate_calls": 0}

    @property
    def stats(self) -> dict[str, int]:
        """Request outcomes plus the engines' counters (decode steps, tokens, running and waiting requests)."""
        totals = {"decode_steps": 0, "generated_tokens": 0, "running": 0, "waiting": 0, "rejected": 0}
        # LoRA adapters routed on shared bases: resident now, loads, evictions, steps mixing adapters.
        totals.update(adapters=0, adapter_loads=0, adapter_evictions=0, mixed_steps=0)
        for loaded in self.cache.loaded_models():
            if loaded.engine is not None:
                for key, value in loaded.engine.counters().items():
                    if key in totals:
                        totals[key] += value
        # "active"/"queued" keep their earlier meaning: generating now / admitted but not yet generating.
        return {**self._counts, **totals, "active": totals["running"], "queued": totals["waiting"]}

    def close(self) -> None:
        """Stop every engine (the lifespan's shutdown)."""
        self.cache.close()

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
    def _count(self, key: str, delta: int = 1) -> None:
        """Adjust a request-outcome counter shown by /health."""
        self._counts[key] += delta

    @staticmethod
    def _response(row: Prepared, done: Completion, started: float) -> ChatResponse:
        """Build the answer of one row from its finished engine request."""
        return ChatResponse(
            model=row.model_name,
            content=done.text,
            finish_reason="stop" if done.finish_reason == "stop" else "length",
            usage=Usage(prompt_tokens=len(row.prompt_ids), completion_tokens=len(done.token_ids)),
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def complete(self, row: Prepared) -> Completion:
        """Run one prepared request to its end on the engine (text, tokens, logprobs)."""
        deltas: list[Delta] = []
        async for delta in self.deltas(row):
            deltas.append(delta)
        last = deltas[-1]
        if last.error:
            raise RuntimeError(last.error)
        return Completion(
            text="".join(d.text for d in deltas),
            token_ids=[t for d in deltas for t in d.token_ids],
            logprobs=[v for d in deltas for v in d.logprobs],
            top_logprobs=[v for d in deltas for v in d.top_logprobs],
            finish_reason=last.finish_reason or "length",
            prompt_tokens=len(row.prompt_ids),
        )

    def deltas(self, row: Prepared) -> AsyncIterator[Delta]:
        """Admit one request now (429 when the engine is full) and return its deltas, counted in /health."""
        return self._counted(row.loaded.engine.open_stream(row.prompt_ids, row.params))

    async def _counted(self, stream: RequestStream) -> AsyncIterator[Delta]:
        """Pass deltas through, counting the outcome; leaving early cancels the request."""
        finished = False
        try:
            async for delta in stream:
                if delta.error:
                    self._count("failed")
                    finished = True
                elif delta.finish_reason is not None:
                    self._count("completed")
                    finished = True
                yield delta
        finally:
            stream.close()
            if not finished:
                self._count("cancelled")

    async def chat(self, req: ChatRequest) -> ChatResponse:
        """Answer one chat request."""
        started = time.perf_counter()
        row = await self.prepare_async(req)
        return self._response(row, await self.complete(row), started)

    def stream(self, row: Prepared) -> AsyncIterator[dict[str, Any]]:
        """Admit the request now (429 when full); its events: {"type": "delta"|"done"|"error", ...}."""
        return self._events(row, self.deltas(row), time.perf_counter())

    async def _events(
        self, row: Prepared, deltas: AsyncIterator[Delta], started: float
    ) -> AsyncIterator[dict[str, Any]]:
        """Events as tokens are generated; the generation stops when the consumer leaves."""
        first_token_ms: float | None = None
        completion_tokens = 0
        try:
            async for delta in deltas:
                if delta.token_ids and first_token_ms is None:
                    first_token_ms = round((time.perf_counter() - started) * 1000, 1)
                completion_tokens += len(delta.token_ids)
                if delta.error:
                    yield {"type": "error", "message": delta.error}
                    return
                if delta.text:
                    yield {"type": "delta", "content": delta.text}
                if delta.finish_reason is not None:
                    yield {
                        "type": "done",
                        "finish_reason": "stop" if delta.finish_reason == "stop" else "length",
                        "usage": {"prompt_tokens": len(row.prompt_ids), "completion_tokens": completion_tokens},
                        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                        "time_to_first_token_ms": first_token_ms,
                    }
        except Exception as exc:
            log.exception("generation failed mid-stream")
            yield {"type": "error", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]  # the consumer left: cancel at the next step

    def answer_many(
        self, requests: list[ChatRequest], batch_size: int | None = None, path: Path | None = None
    ) -> list[ChatResponse]:
        """Blocking: answer in order; all requests join the engine's running batch (batch_size is the engine's)."""
        started = time.perf_counter()
        rows = [self.prepare(r, path) for r in requests]
        answers: dict[int, ChatResponse] = {}
        for indices in _by_engine(dict(enumerate(rows))):
            done = self._generate([rows[i] for i in indices])
            answers.update({i: self._response(rows[i], d, started) for i, d in zip(indices, done, strict=True)})
        return [answers[i] for i in range(len(rows))]

    def _generate(self, rows: list[Prepared]) -> list[Completion]:
        """Blocking: rows of one model through its engine at once."""
        self._count("generate_calls")
        done = rows[0].loaded.engine.generate([r.prompt_ids for r in rows], [r.params for r in rows])
        for d in done:
            self._count("failed" if d.error else "completed")
        return done

    async def batch(self, raw: list[dict[str, Any]]) -> BatchResponse:
        """Answer many requests; those of one model run in its engine together, whatever their settings."""
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
        for indices in _by_engine(prepared):
            rows = [prepared[i] for i in indices]
            try:
                outputs = await asyncio.to_thread(self._generate, rows)
            except Exception as exc:
                log.exception("batched generation failed")
                for i in indices:
                    items[i].error = ItemError(type="generation_error", message=str(exc), status_code=500)
                continue
            calls += 1
            for i, row, done in zip(indices, rows, outputs, strict=True):
                if done.error:
                    items[i].error = ItemError(type="generation_error", message=done.error, status_code=500)
                else:
                    items[i].result = self._response(row, done, started)
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


def _by_engine(rows: dict[int, Prepared]) -> list[list[int]]:
    """Indices of rows grouped by the engine (loaded model) that serves them, in order."""
    groups: dict[int, list[int]] = {}
    for i, row in rows.items():
        groups.setdefault(id(row.loaded), []).append(i)
    return list(groups.values())
