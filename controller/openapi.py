"""The OpenAPI contract's shared pieces: the error schema, per-route error responses, tags, summaries.

Every operation documents each status code it can answer (schemathesis' status_code_conformance holds the server
to that). A route lists its own codes with `responses=error_responses(...)`; install_openapi adds the ones that
come from the server as a whole rather than from the route, by what the operation takes:
- every operation: 413 (a body over server.max_body_mb, refused by the request guard whatever the route), 422
  (invalid input: parameters, or a body nested too deeply), 500, 503 (the task store is down);
- one with a request body: 400 (a body that cannot be parsed) and 415 (a media type the route does not read);
- one with a path parameter: 404 (no such task, run, job, file or model);
- one that writes (POST, PUT, PATCH, DELETE): 507 (the server's disk is full).
401 comes from the routers that need an API key (main.py). Routes that read their body themselves (the Tinker
routes, the YAML-or-JSON train request) document it with json_body / body_schema, so the body is fuzzed too.
"""

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
    400: "Bad request: a body that cannot be parsed.",
    401: "A missing or wrong API key (only when API keys are configured).",
    403: "A path outside the allowed roots.",
    404: "A task, file or model that does not exist.",
    409: "A conflict with the current state: an existing output without overwrite, a task in the wrong state.",
    413: "A body over its size limit (server.max_body_mb; uploads: data.max_upload_mb).",
    415: "A body in a media type the route does not read.",
    422: "Invalid input: the message names each field at fault.",
    429: "A limit is reached; retry later.",
    500: "An unexpected server fault: the message names the exception's type; the server log has the details.",
    503: "The task store (database) is not answering; retry after the Retry-After seconds.",
    507: "The server's disk is full; free space on the server, then retry.",
}

ERROR_EXAMPLES: dict[int, tuple[str, str]] = {
    400: ("http_error", "There was an error parsing the body"),
    401: ("authentication_error", "An API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."),
    403: ("forbidden_path", "The path '../etc' resolves outside the allowed roots."),
    404: ("not_found", "No task with id '0123456789abcdef0123456789abcdef'."),
    409: ("conflict", "The output folder is not empty; pass overwrite to replace it."),
    413: ("payload_too_large", "The request body exceeds the 64 MB limit (server.max_body_mb)."),
    415: ("unsupported_media_type", "Send the train request as application/json or application/yaml, not text/csv."),
    422: ("validation_error", "config: give max_steps or num_train_epochs, not both"),
    429: ("too_many_runs", "2 runs are live (runs.max_runs); delete one or retry later."),
    500: ("internal_error", "Internal server error (RuntimeError); the server log has the details."),
    503: (
        "store_unavailable",
        "The task store (database) is not answering; it may be down or restarting. Retry in 5 s.",
    ),
    507: ("insufficient_storage", "The server's disk is full (no space left on device); free disk space, then retry."),
}

# The codes install_openapi adds to operations by what they take (see the module docstring).
ANY_OPERATION = (413, 422, 500, 503)
WITH_BODY = (400, 415)
WITH_PATH_PARAMETER = (404,)
WRITING = (507,)
WRITE_METHODS = {"post", "put", "patch", "delete"}


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


# Models of bodies that routes read themselves (so FastAPI does not know them): component name -> (model, prefix).
_BODY_MODELS: dict[str, tuple[type[BaseModel], str]] = {}


def body_schema(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """A $ref to `model`'s schema (named prefix + class name, its nested models likewise), added by install_openapi."""
    name = prefix + model.__name__
    _BODY_MODELS[name] = (model, prefix)
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(model: type[BaseModel], prefix: str = "", description: str | None = None) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body that the route parses itself into `model`."""
    body: dict[str, Any] = {"required": True, "content": {"application/json": {"schema": body_schema(model, prefix)}}}
    if description:
        body["description"] = description
    return {"requestBody": body}


def _add_body_models(schema: dict[str, Any]) -> None:
    """Put the body_schema models, and the models they nest, into the document's components."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, (model, prefix) in _BODY_MODELS.items():
        if name in components:
            continue
        doc = model.model_json_schema(ref_template=f"#/components/schemas/{prefix}{{model}}")
        for def_name, definition in doc.pop("$defs", {}).items():
            components.setdefault(prefix + def_name, definition)
        components[name] = doc


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
    """Fill missing summaries from docstrings; document self-read bodies and every error code (in the house shape)."""
    for route in _api_routes(app.routes):
        if not route.summary and route.description:
            route.summary = route.description.strip().splitlines()[0].rstrip(".")
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The generated document, completed.

        FastAPI's `{"detail": ...}` 422s become `{"error": {...}}`, each operation gets the codes every operation
        of its kind can answer (see the module docstring), and the self-read bodies' models join the components.
        """
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        _add_body_models(schema)
        error_ref = _error_ref(schema)
        for ops in schema.get("paths", {}).values():
            for method, op in ops.items():
                responses = op.setdefault("responses", {})
                resp = responses.get("422")
                if resp and "HTTPValidationError" in str(resp):
                    resp.update(_documented(422, error_ref))
                for code in _server_codes(method, op):
                    responses.setdefault(str(code), _documented(code, error_ref))
                op["responses"] = dict(sorted(responses.items()))
        components = schema.get("components", {}).get("schemas", {})
        if "HTTPValidationError" not in str(schema.get("paths")):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _server_codes(method: str, op: dict[str, Any]) -> list[int]:
    """The codes an operation can answer whatever its route says (see the module docstring)."""
    codes = list(ANY_OPERATION)
    if "requestBody" in op:
        codes += WITH_BODY
    if any(p.get("in") == "path" for p in op.get("parameters", [])):
        codes += WITH_PATH_PARAMETER
    if method in WRITE_METHODS:
        codes += WRITING
    return sorted(codes)


def _documented(code: int, error_ref: dict[str, str]) -> dict[str, Any]:
    """One response entry of the house error shape, with its description and example."""
    type_, message = ERROR_EXAMPLES[code]
    example = {"error": {"type": type_, "message": message, "details": None}}
    return {
        "description": ERROR_DESCRIPTIONS[code],
        "content": {"application/json": {"schema": error_ref, "example": example}},
    }


def _error_ref(schema: dict[str, Any]) -> dict[str, str]:
    """A $ref to ErrorResponse, adding the schema to the components if no route declared it yet."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorResponse" not in components:
        components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(components["ErrorResponse"].pop("$defs", {}))
    return {"$ref": "#/components/schemas/ErrorResponse"}
