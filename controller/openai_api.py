"""OpenAI-compatible routes: GET /v1/models and POST /v1/chat/completions (plain and streaming)."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from controller.deps import FineTuningServiceDep, InferenceServiceDep
from controller.openapi import error_responses
from entity import examples
from entity.fine_tuning import ModelList
from entity.inference import (
    OpenAIChatCompletion,
    OpenAIChatRequest,
)
from service.engine import Delta
from service.inference import Prepared
from util.errors import InvalidInputError, InvalidOutputError, validation_message

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList, summary="List models (OpenAI)")
def list_models(service: InferenceServiceDep, fine_tuning: FineTuningServiceDep) -> ModelList:
    """Models a request can name: base models, fine-tuned models (ft:...) and other succeeded train tasks (by id)."""
    return ModelList(data=fine_tuning.model_list(service.served_models()))


def _chunk(cid: str, created: int, model: str, index: int, delta: dict[str, Any], finish: str | None, lp: Any) -> str:
    """One chat.completion.chunk as JSON."""
    choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
    return json.dumps(
        {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    )


def _logprobs(row: Prepared, token_ids: list[int], values: list[float], tops: list[Any]) -> dict[str, Any]:
    """OpenAI's logprobs object for some generated tokens (end-of-sequence tokens left out)."""
    tok = row.loaded.tokenizer

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tok.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for i, (token_id, value) in enumerate(zip(token_ids, values, strict=False)):
        if token_id in row.loaded.eos_token_ids:
            continue
        top = tops[i] if i < len(tops) else []
        content.append({**entry(token_id, value), "top_logprobs": [entry(t, v) for t, v in top]})
    return {"content": content, "refusal": None}


def _check_json(text: str) -> str | None:
    """Why `text` is not one JSON object, or None when it is."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"the model's answer is not valid JSON ({exc})"
    return None if isinstance(value, dict) else "the model's answer is JSON but not an object"


async def _openai_stream(
    choices: list[tuple[Prepared, AsyncIterator[Delta]]], cid: str, req: OpenAIChatRequest
) -> AsyncIterator[ServerSentEvent]:
    """Engine deltas of every choice as OpenAI chunks, ending with `data: [DONE]`; a failure is an error event."""
    created, model = int(time.time()), req.model
    merged: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()

    async def pump(index: int, deltas: AsyncIterator[Delta]) -> None:
        try:
            async for delta in deltas:
                await merged.put((index, delta))
        except Exception as exc:  # noqa: BLE001  # the engine failed: report it on this choice, as an event
            await merged.put((index, Delta("", [], [], [], "error", f"{type(exc).__name__}: {exc}")))
        finally:
            await merged.put((index, None))

    for index in range(len(choices)):
        yield ServerSentEvent(data=_chunk(cid, created, model, index, {"role": "assistant", "content": ""}, None, None))
    tasks = [asyncio.create_task(pump(i, deltas)) for i, (_, deltas) in enumerate(choices)]
    texts = [""] * len(choices)
    usage = {"prompt_tokens": len(choices[0][0].prompt_ids), "completion_tokens": 0}
    open_choices = len(choices)
    try:
        while open_choices:
            index, delta = await merged.get()
            if delta is None:
                open_choices -= 1
                continue
            row = choices[index][0]
            if delta.error:
                error = {"message": delta.error, "type": "server_error", "param": None, "code": "generation_error"}
                yield ServerSentEvent(data=json.dumps({"error": error}))
                return
            usage["completion_tokens"] += len(delta.token_ids)
            texts[index] += delta.text
            lp = _logprobs(row, delta.token_ids, delta.logprobs, delta.top_logprobs) if req.logprobs else None
            if delta.text or (lp and lp["content"]):
                body = {"content": delta.text}
                yield ServerSentEvent(data=_chunk(cid, created, model, index, body, None, lp))
            if delta.finish_reason is not None:
                problem = _check_json(texts[index]) if req.wants_json else None
                if problem:
                    error = {"message": f"response_format json_object: {problem}", "type": "invalid_output"}
                    yield ServerSentEvent(data=json.dumps({"error": {**error, "param": None, "code": None}}))
                    return
                finish = "stop" if delta.finish_reason == "stop" else "length"
                yield ServerSentEvent(data=_chunk(cid, created, model, index, {}, finish, None))
        if req.stream_options and req.stream_options.include_usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
            yield ServerSentEvent(data=json.dumps({**body, "choices": [], "usage": usage}))
        yield ServerSentEvent(data="[DONE]")
    finally:
        for task in tasks:
            task.cancel()
        for _, deltas in choices:
            await deltas.aclose()  # type: ignore[attr-defined]  # a client that left cancels its requests


@router.post(
    "/chat/completions",
    response_model=None,
    summary="Create a chat completion (OpenAI)",
    responses={
        200: {
            "model": OpenAIChatCompletion,
            "description": "A chat.completion; with `stream`, `chat.completion.chunk` SSE events ending with [DONE].",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }
    | error_responses(403, 404, 409, 422, 429),
)
async def chat_completions(
    req: Annotated[OpenAIChatRequest, Body(openapi_examples=examples.OPENAI_CHAT)], service: InferenceServiceDep
) -> dict[str, Any] | EventSourceResponse:
    """OpenAI's chat completions, so the official `openai` client works against this server."""
    try:
        chat = req.to_chat(service.settings.models.base_model)
    except ValidationError as exc:
        raise InvalidInputError(validation_message(exc.errors())) from exc
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    first = await service.prepare_async(chat)
    first.top_logprobs = (req.top_logprobs or 0) if req.logprobs else 0
    rows = [first] + [
        replace(first, request=chat.model_copy(update={"seed": None if chat.seed is None else chat.seed + i}))
        for i in range(1, req.n)
    ]
    if req.stream:
        opened: list[AsyncIterator[Delta]] = []
        try:
            for row in rows:  # admit every choice now, so a full server answers 429 before the stream starts
                opened.append(service.deltas(row))
        except Exception:
            for deltas in opened:
                await deltas.aclose()  # type: ignore[attr-defined]
            raise
        return EventSourceResponse(_openai_stream(list(zip(rows, opened, strict=True)), cid, req), ping=15)
    done = await asyncio.gather(*(service.complete(row) for row in rows))
    choices = []
    for index, (row, result) in enumerate(zip(rows, done, strict=True)):
        if req.wants_json and (problem := _check_json(result.text)):
            raise InvalidOutputError(
                f"response_format json_object: {problem}.", details={"choice": index, "content": result.text}
            )
        lp = _logprobs(row, result.token_ids, result.logprobs, result.top_logprobs) if req.logprobs else None
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": lp,
                "finish_reason": "stop" if result.finish_reason == "stop" else "length",
            }
        )
    completion_tokens = sum(len(r.token_ids) for r in done)
    usage = {
        "prompt_tokens": len(first.prompt_ids),
        "completion_tokens": completion_tokens,
        "total_tokens": len(first.prompt_ids) + completion_tokens,
    }
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage,
    }
