"""OpenAI-compatible routes: GET /v1/models and POST /v1/chat/completions (plain and streaming)."""

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from controller.deps import FineTuningServiceDep, InferenceServiceDep
from controller.openapi import error_responses
from entity import examples
from entity.fine_tuning import ModelList
from entity.inference import (
    OpenAIAssistantMessage,
    OpenAIChatCompletion,
    OpenAIChatRequest,
    OpenAIChoice,
    OpenAIUsage,
)
from util.errors import InvalidInputError, validation_message

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList, summary="List models (OpenAI)")
def list_models(service: InferenceServiceDep, fine_tuning: FineTuningServiceDep) -> ModelList:
    """Models a request can name: base models, fine-tuned models (ft:...) and other succeeded train tasks (by id)."""
    return ModelList(data=fine_tuning.model_list(service.served_models()))


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> str:
    """One chat.completion.chunk as JSON."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return json.dumps(
        {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    )


async def _openai_stream(
    events: AsyncIterator[dict[str, Any]], cid: str, model: str, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    """Service events as OpenAI chunks, ending with `data: [DONE]`; a failure becomes an error data event."""
    created = int(time.time())
    yield ServerSentEvent(data=_chunk(cid, created, model, {"role": "assistant", "content": ""}, None))
    async for event in events:
        if event["type"] == "delta":
            yield ServerSentEvent(data=_chunk(cid, created, model, {"content": event["content"]}, None))
        elif event["type"] == "done":
            yield ServerSentEvent(data=_chunk(cid, created, model, {}, event["finish_reason"]))
            if include_usage:
                usage = event["usage"]
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
                yield ServerSentEvent(data=json.dumps({**body, "choices": [], "usage": usage}))
        else:
            error = {"message": event["message"], "type": "server_error", "param": None, "code": "generation_error"}
            yield ServerSentEvent(data=json.dumps({"error": error}))
            return
    yield ServerSentEvent(data="[DONE]")


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
    | error_responses(403, 404, 409, 422),
)
async def chat_completions(
    req: Annotated[OpenAIChatRequest, Body(openapi_examples=examples.OPENAI_CHAT)], service: InferenceServiceDep
) -> OpenAIChatCompletion | EventSourceResponse:
    """OpenAI's chat completions, so the official `openai` client works against this server."""
    try:
        chat = req.to_chat(service.settings.models.base_model)
    except ValidationError as exc:
        raise InvalidInputError(validation_message(exc.errors())) from exc
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
        prepared = await service.prepare_async(chat)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(_openai_stream(service.stream(prepared), cid, req.model, include_usage), ping=15)
    result = await service.chat(chat)
    usage = result.usage
    return OpenAIChatCompletion(
        id=cid,
        created=int(time.time()),
        model=req.model,
        choices=[
            OpenAIChoice(message=OpenAIAssistantMessage(content=result.content), finish_reason=result.finish_reason)
        ],
        usage=OpenAIUsage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.prompt_tokens + usage.completion_tokens,
        ),
    )
