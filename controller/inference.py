"""Inference routes: chat, chat over SSE, and batched chat."""

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body
from sse_starlette import EventSourceResponse, ServerSentEvent

from controller.deps import InferenceServiceDep
from controller.openapi import error_responses
from entity import examples
from entity.inference import BatchRequest, BatchResponse, ChatRequest, ChatResponse

router = APIRouter(prefix="/api/inference", tags=["inference"])


@router.post(
    "/chat", response_model=ChatResponse, summary="Chat: one answer", responses=error_responses(403, 404, 409, 422)
)
async def chat(
    req: Annotated[ChatRequest, Body(openapi_examples=examples.CHAT)], service: InferenceServiceDep
) -> ChatResponse:
    """Answer a conversation with the base model, a trained task's model, or a model folder."""
    return await service.chat(req)


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[ServerSentEvent]:
    """Map service events to SSE: `delta` pieces, then `done` (finish_reason, usage) or `error`."""
    async for event in events:
        kind = event.pop("type")
        yield ServerSentEvent(data=json.dumps(event), event=kind)


@router.post(
    "/chat/stream",
    response_class=EventSourceResponse,
    summary="Chat: stream the answer (SSE)",
    responses=error_responses(403, 404, 409, 422),
)
async def chat_stream(
    req: Annotated[ChatRequest, Body(openapi_examples=examples.CHAT)], service: InferenceServiceDep
) -> EventSourceResponse:
    """Stream the answer over SSE as it is generated; leaving the stream stops the generation."""
    prepared = await service.prepare_async(req)  # bad input fails here with a status code, not mid-stream
    return EventSourceResponse(_sse(service.stream(prepared)), ping=15)


@router.post(
    "/batch", response_model=BatchResponse, summary="Chat: many requests batched", responses=error_responses(422)
)
async def batch(
    req: Annotated[BatchRequest, Body(openapi_examples=examples.BATCH)], service: InferenceServiceDep
) -> BatchResponse:
    """Answer many requests in order; each bad item gets its own error entry."""
    return await service.batch(req.requests)
