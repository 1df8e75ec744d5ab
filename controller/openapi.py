"""The OpenAPI contract's shared pieces: the error schema, per-route error responses, tags, summaries."""

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """What went wrong, in a form a client can act on."""

    type: str = Field(..., description="A stable machine-readable kind, e.g. not_found, conflict, validation_error.")
    message: str = Field(..., description="A readable explanation, naming the field or value at fault.")
    details: Any = Field(None, description="Structured extra information (e.g. the validation errors), or null.")
    code: str | None = Field(None, description="Under /v1 only: the same as type, as OpenAI's clients expect.")
    param: str | None = Field(None, description="Under /v1 only: always null (OpenAI's field).")


class ErrorResponse(BaseModel):
    """The single error shape of every route."""

    error: ErrorBody


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Bad request.",
    401: "A missing or wrong API key (only when API keys are configured).",
    403: "A path outside the allowed roots.",
    404: "A task, file or model that does not exist.",
    409: "A conflict with the current state: an existing output without overwrite, a task in the wrong state.",
    415: "A body in a media type the route does not read.",
    422: "Invalid input: the message names each field at fault.",
    429: "A limit is reached; retry later.",
}

ERROR_EXAMPLES: dict[int, tuple[str, str]] = {
    400: ("bad_request", "The request could not be read."),
    401: ("authentication_error", "An API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."),
    403: ("forbidden_path", "The path '../etc' resolves outside the allowed roots."),
    404: ("not_found", "No task with id '0123456789abcdef0123456789abcdef'."),
    409: ("conflict", "The output folder is not empty; pass overwrite to replace it."),
    415: ("unsupported_media_type", "Send the train request as application/json or application/yaml, not text/csv."),
    422: ("validation_error", "config: give max_steps or num_train_epochs, not both"),
    429: ("too_many_runs", "2 runs are live (runs.max_runs); delete one or retry later."),
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries documenting each status code with the {"error": {...}} schema."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        type_, message = ERROR_EXAMPLES[code]
        out[code] = {
            "model": ErrorResponse,
            "description": ERROR_DESCRIPTIONS[code],
            "content": {
                "application/json": {"example": {"error": {"type": type_, "message": message, "details": None}}}
            },
        }
    return out


TAGS: list[dict[str, str]] = [
    {"name": "health", "description": "Liveness, version, device, job and inference counters; open without a key."},
    {
        "name": "data",
        "description": "Upload chat datasets, validate them (formats, per-line errors, duplicates, token lengths), "
        "then normalise them to messages JSONL and split into train/val/test. Relative paths resolve under the "
        "data dir.",
    },
    {
        "name": "train",
        "description": "Start fine-tuning tasks (full SFT with `trl`, or `lora`), follow their progress, logs and "
        "live events, list and cancel tasks of every kind.",
    },
    {
        "name": "inference",
        "description": "Chat with a base model, a succeeded train task or a model folder: one answer, a stream "
        "over SSE, or a batch.",
    },
    {
        "name": "openai",
        "description": "OpenAI-compatible `/v1/models` and `/v1/chat/completions`, for the unmodified `openai` client.",
    },
    {
        "name": "eval",
        "description": "Evaluate a model on held-back chat records: loss, perplexity, accuracy, BLEU, ROUGE-L, "
        "optionally against a second model; or evalscope's general_qa/general_mcq.",
    },
    {
        "name": "export",
        "description": "Verified exports as tasks: ONNX (checked in onnxruntime), merged LoRA weights, and tar.gz "
        "archives with download.",
    },
    {
        "name": "runs",
        "description": "The low-level (Tinker-style) training API: a run keeps a model and a LoRA in memory; "
        "forward_backward, optim_step, sample, save_state and load_state are ordered jobs.",
    },
    {
        "name": "openai fine-tuning",
        "description": "OpenAI's files and fine-tuning jobs API (the official `openai` package works unmodified): "
        "upload validated training files, run supervised or DPO jobs as train tasks, follow their events and "
        "checkpoints, pause, resume or cancel them, and manage the fine-tuned models.",
    },
    {
        "name": "tasks",
        "description": "A task's output files: list them and download one (paths stay inside the task's folder).",
    },
    {
        "name": "tinker",
        "description": "The Tinker wire protocol under /api/v1, so the official `tinker` SDK and tinker-cookbook's "
        "loops train here: sessions, LoRA training clients, forward_backward, optim_step, futures, sampling, "
        "checkpoints and their downloads. Keys work raw or with the SDK's `tml-` prefix.",
    },
]


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, also those of included routers (FastAPI keeps an included router as one entry)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from _api_routes(route.original_router.routes)


def install_openapi(app: FastAPI) -> None:
    """Fill missing summaries from docstrings and document FastAPI's own 422s with the house error schema."""
    for route in _api_routes(app.routes):
        if not route.summary and route.description:
            route.summary = route.description.strip().splitlines()[0].rstrip(".")
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The generated document, with every `{"detail": ...}` 422 replaced by `{"error": {...}}`."""
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        error_ref = None
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                resp = op.get("responses", {}).get("422")
                if resp and "HTTPValidationError" in str(resp):
                    error_ref = error_ref or _error_ref(schema)
                    resp.update(error_responses(422)[422] | {"content": {"application/json": {"schema": error_ref}}})
                    resp.pop("model", None)
        components = schema.get("components", {}).get("schemas", {})
        if "HTTPValidationError" not in str(schema.get("paths")):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_ref(schema: dict[str, Any]) -> dict[str, str]:
    """A $ref to ErrorResponse, adding the schema to the components if no route declared it yet."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorResponse" not in components:
        components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(components["ErrorResponse"].pop("$defs", {}))
    return {"$ref": "#/components/schemas/ErrorResponse"}
