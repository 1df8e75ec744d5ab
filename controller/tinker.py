"""Tinker-compatible API (/api/v1/...): the official `tinker` SDK's routes over our run service.

The request and response bodies are the `tinker` package's own pydantic types and protobuf messages.
"""

import asyncio
import io
import secrets
import tarfile
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from tinker import types as tt

from controller.auth import check_key
from controller.openapi import error_responses, json_body
from service.tinker.api import TinkerRequestFailed, TinkerService
from service.tinker.proto import decode_forward_backward, encode_forward_backward_output, encode_sample_response
from util.errors import InvalidInputError, NotFoundError, PayloadTooLargeError, validation_message

PROTO = "application/x-protobuf"
# The codes of the routes that create a run (or a sampling session's base run), queue work on one, look one up.
CREATE_ERRORS = error_responses(403, 404, 409, 429)
QUEUE_ERRORS = error_responses(404, 409, 429)
LOOKUP_ERRORS = error_responses(404)
CANCEL_ERRORS = error_responses(404, 409)
PROTO_BODY: dict[str, Any] = {  # openapi_extra of the routes that read the SDK's protobuf ForwardBackwardRequest
    "requestBody": {
        "required": True,
        "description": "A tinker ForwardBackwardRequest protobuf message (with Content-Encoding: zstd, compressed).",
        "content": {PROTO: {"schema": {"type": "string", "format": "binary"}}},
    }
}
M = TypeVar("M", bound=BaseModel)
_bearer = HTTPBearer(auto_error=False, scheme_name="TinkerBearer")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="TinkerApiKey")


def require_tinker_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008 - FastAPI's idiom
    header_key: str | None = Depends(_header),
) -> None:
    """Our API keys, as the SDK sends them (X-API-Key), with or without the SDK's `tml-` prefix."""
    given = header_key or (credentials.credentials if credentials is not None else None)
    check_key(given, request.app.state.api_key_digests, tinker=True)


def get_tinker(request: Request) -> TinkerService:
    """The Tinker front end's service."""
    return request.app.state.tinker_service


TinkerDep = Annotated[TinkerService, Depends(get_tinker)]
router = APIRouter(prefix="/api/v1", tags=["tinker"], dependencies=[Depends(require_tinker_key)])
files_router = APIRouter(prefix="/api/v1", tags=["tinker"])  # signed URLs: the signature is the credential


async def _body(request: Request, model: type[M]) -> M:
    """Parse a JSON body into one of the SDK's request types (422 with the field problems otherwise)."""
    try:
        data = await request.json()
    except ValueError:
        raise InvalidInputError("The request body is not valid JSON.") from None
    except RecursionError:  # controller/guard.py refuses deep bodies first; this is the backstop
        raise InvalidInputError("The request body is nested too deeply.") from None
    try:
        return model.model_validate(data, strict=True)  # numbers are numbers: "5" and true are refused
    except ValidationError as exc:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        raise InvalidInputError(validation_message(errors), details=errors) from None


def _future(request_id: str, model_id: str | None = None) -> dict[str, Any]:
    """An UntypedAPIFuture."""
    return {"request_id": request_id, "model_id": model_id}


# -- service ---------------------------------------------------------------------------------------------
@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness, as the SDK's health_check expects."""
    return {"status": "ok"}


@router.get("/get_server_capabilities")
def capabilities(tinker: TinkerDep) -> dict[str, Any]:
    """The base models this server trains and samples."""
    return tinker.capabilities()


@router.post("/client/config")
def client_config() -> dict[str, Any]:
    """Feature flags: plain API-key auth, httpx transport, one fwd/bwd chunk at a time, no zstd needed."""
    return tt.ClientConfigResponse(
        pjwt_auth_enabled=False,
        use_pyqwest_transport=False,
        parallel_fwdbwd_chunks=False,
        proto_compress_fwdbwd=False,
        sample_use_retrieve_futures=True,  # one long poll per sampling session, not one per sample
    ).model_dump()


@router.post("/client/dynamic_config")
def client_dynamic_config() -> dict[str, Any]:
    """Periodically refreshed flags (the defaults)."""
    return tt.ClientDynamicConfigResponse().model_dump()


@router.post("/create_session", openapi_extra=json_body(tt.CreateSessionRequest, "Tinker"))
async def create_session(request: Request) -> dict[str, Any]:
    """A session id; model ids are `<session>:train:<n>`."""
    await _body(request, tt.CreateSessionRequest)
    return {"type": "create_session", "session_id": secrets.token_hex(8)}


@router.post("/session_heartbeat", openapi_extra=json_body(tt.SessionHeartbeatRequest, "Tinker"))
async def session_heartbeat(request: Request) -> dict[str, str]:
    """Keep-alive; runs here pause on their own idle TTL, so a heartbeat only has to be answered."""
    await _body(request, tt.SessionHeartbeatRequest)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str) -> dict[str, Any]:
    """Session end (its runs stay until deleted or idle)."""
    return {}


@router.post("/telemetry")
def telemetry() -> dict[str, str]:
    """SDK telemetry is accepted and dropped."""
    return {"status": "accepted"}


# -- models ----------------------------------------------------------------------------------------------
@router.post("/create_model", openapi_extra=json_body(tt.CreateModelRequest, "Tinker"), responses=CREATE_ERRORS)
async def create_model(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Create a LoRA training model (a run); the future resolves when its worker is ready."""
    req = await _body(request, tt.CreateModelRequest)
    return _future(await asyncio.to_thread(tinker.create_model, req))


@router.post("/get_info", openapi_extra=json_body(tt.GetInfoRequest, "Tinker"), responses=LOOKUP_ERRORS)
async def get_info(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """A model's base model, LoRA rank and tokenizer."""
    req = await _body(request, tt.GetInfoRequest)
    return await asyncio.to_thread(tinker.info, req.model_id)


class WeightsInfoRequest(BaseModel):
    """Body of weights_info: a tinker:// checkpoint path."""

    tinker_path: str


@router.post("/weights_info", openapi_extra=json_body(WeightsInfoRequest, "Tinker"), responses=LOOKUP_ERRORS)
async def weights_info(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """What a checkpoint needs to be loaded."""
    req = await _body(request, WeightsInfoRequest)
    return await asyncio.to_thread(tinker.weights_info, req.tinker_path)


# -- training --------------------------------------------------------------------------------------------
async def _proto_body(request: Request) -> bytes:
    """The raw protobuf body, zstd-decompressed (to at most server.max_body_mb) when the SDK compressed it."""
    body = await request.body()
    if request.headers.get("content-encoding", "").lower() == "zstd":
        max_mb = request.app.state.settings.server.max_body_mb
        body = await asyncio.to_thread(inflate_zstd, body, max_mb)
    return body


def inflate_zstd(body: bytes, max_mb: int) -> bytes:
    """Decompress a zstd body as a stream, refusing with 413 once the output passes `max_mb` MiB.

    One-shot decompression trusts the frame's declared size: 16 KB that declares 512 MB allocates 512 MB first.
    """
    import zstandard

    limit = max_mb * 1024 * 1024
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            while chunk := reader.read(min(1 << 20, limit + 1 - len(out))):
                out += chunk
                if len(out) > limit:
                    raise PayloadTooLargeError(
                        f"The zstd body decompresses to more than the {max_mb} MB limit (server.max_body_mb).",
                        details={"max_body_mb": max_mb},
                    )
    except zstandard.ZstdError as exc:
        raise InvalidInputError(f"The zstd body cannot be decompressed: {exc}") from exc
    return bytes(out)


@router.post("/forward_backward", openapi_extra=PROTO_BODY, responses=QUEUE_ERRORS)
async def forward_backward(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Queue a forward (forward_only) or forward/backward pass with one of Tinker's losses."""
    req = decode_forward_backward(await _proto_body(request))
    return _future(await asyncio.to_thread(tinker.forward_backward, req), req["model_id"])


@router.post("/forward", openapi_extra=PROTO_BODY, responses=QUEUE_ERRORS)
async def forward(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """A forward pass (same protobuf body as forward_backward): per-token logprobs and the loss, no gradients."""
    req = decode_forward_backward(await _proto_body(request))
    req["forward_only"] = True
    return _future(await asyncio.to_thread(tinker.forward_backward, req), req["model_id"])


@router.post("/optim_step", openapi_extra=json_body(tt.OptimStepRequest, "Tinker"), responses=QUEUE_ERRORS)
async def optim_step(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Queue an Adam step on the gradients accumulated so far."""
    req = await _body(request, tt.OptimStepRequest)
    return _future(await asyncio.to_thread(tinker.optim_step, req), req.model_id)


@router.post("/save_weights", openapi_extra=json_body(tt.SaveWeightsRequest, "Tinker"), responses=QUEUE_ERRORS)
async def save_weights(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Save adapter and Adam state: tinker://<model>/weights/<name>."""
    req = await _body(request, tt.SaveWeightsRequest)
    job = await asyncio.to_thread(tinker.save, req.model_id, "weights", req.path, req.overwrite)
    return _future(job, req.model_id)


@router.post(
    "/save_weights_for_sampler",
    openapi_extra=json_body(tt.SaveWeightsForSamplerRequest, "Tinker"),
    responses=QUEUE_ERRORS,
)
async def save_weights_for_sampler(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Save a sampler snapshot: named (tinker://<model>/sampler_weights/<name>) or for a new sampling session."""
    req = await _body(request, tt.SaveWeightsForSamplerRequest)
    return _future(await asyncio.to_thread(tinker.save, req.model_id, "sampler_weights", req.path), req.model_id)


@router.post(
    "/save_weights_external", openapi_extra=json_body(tt.SaveWeightsExternalRequest, "Tinker"), responses=QUEUE_ERRORS
)
async def save_weights_external(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Save a PEFT adapter folder for download: tinker://<model>/external_weights/<name>."""
    req = await _body(request, tt.SaveWeightsExternalRequest)
    if req.age_encryption_recipients:
        raise InvalidInputError("Encrypted (age) exports are not supported.")
    job = await asyncio.to_thread(tinker.save, req.model_id, "external_weights", req.path)
    return _future(job, req.model_id)


@router.post("/load_weights", openapi_extra=json_body(tt.LoadWeightsRequest, "Tinker"), responses=CREATE_ERRORS)
async def load_weights(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Load a checkpoint into a model, or create a model from it (with or without its Adam state)."""
    req = await _body(request, tt.LoadWeightsRequest)
    return _future(await asyncio.to_thread(tinker.load_weights, req))


# -- sampling --------------------------------------------------------------------------------------------
@router.post(
    "/create_sampling_session",
    openapi_extra=json_body(tt.CreateSamplingSessionRequest, "Tinker"),
    responses=CREATE_ERRORS,
)
async def create_sampling_session(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """A sampling session on a sampler checkpoint or a base model."""
    req = await _body(request, tt.CreateSamplingSessionRequest)
    sid = await asyncio.to_thread(tinker.sampling_session, req.model_path, req.base_model)
    return {"type": "create_sampling_session", "sampling_session_id": sid}


@router.get("/samplers/{sampling_session_id}")
def get_sampler(sampling_session_id: str, tinker: TinkerDep) -> dict[str, Any]:
    """What a sampling session samples."""
    return tinker.sampler_info(sampling_session_id)


@router.post("/asample", openapi_extra=json_body(tt.SampleRequest, "Tinker"), responses=CREATE_ERRORS)
async def asample(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Queue sampling num_samples continuations of a token prompt."""
    req = await _body(request, tt.SampleRequest)
    request_id = await asyncio.to_thread(tinker.sample, req)
    return {**_future(request_id), "sample_sequence_ids": [f"{request_id}:{i}" for i in range(req.num_samples)]}


# -- futures ---------------------------------------------------------------------------------------------
@router.post("/retrieve_future", openapi_extra=json_body(tt.FutureRetrieveRequest, "Tinker"), responses=LOOKUP_ERRORS)
async def retrieve_future(request: Request, tinker: TinkerDep) -> Response:
    """A future's result (protobuf for forward_backward and sample), try_again while pending, or its error."""
    req = await _body(request, tt.FutureRetrieveRequest)
    try:
        kind, result = await tinker.retrieve(req.request_id)
    except TinkerRequestFailed as exc:
        return JSONResponse({"error": exc.message, "category": "user"})
    if kind == "proto-fwdbwd":
        return Response(encode_forward_backward_output(result), media_type=PROTO)
    if kind == "proto-sample":
        payload, topk = result
        return Response(encode_sample_response(payload, topk), media_type=PROTO)
    return JSONResponse(jsonable(result))


def jsonable(value: Any) -> Any:
    """JSON-ready data (datetimes as ISO strings)."""
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)


@router.post("/retrieve_futures", openapi_extra=json_body(tt.FuturesRetrieveRequest, "Tinker"), responses=LOOKUP_ERRORS)
async def retrieve_futures(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """A sampling session's completed requests since the cursor (long-polls while there are none)."""
    req = await _body(request, tt.FuturesRetrieveRequest)
    return await tinker.retrieve_many(req)


@router.post("/cancel_future", openapi_extra=json_body(tt.FutureRetrieveRequest, "Tinker"), responses=CANCEL_ERRORS)
async def cancel_future(request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Cancel a queued request (its future then fails as cancelled); a running or finished one answers 409."""
    req = await _body(request, tt.FutureRetrieveRequest)
    await asyncio.to_thread(tinker.cancel, req.request_id)
    return {}


# -- REST: training runs, checkpoints, downloads ---------------------------------------------------------
@router.get("/training_runs")
def training_runs(
    tinker: TinkerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Training runs, newest first."""
    return jsonable(tinker.training_runs(limit, offset))


@router.get("/training_runs/{run_id}")
def training_run(run_id: str, tinker: TinkerDep) -> dict[str, Any]:
    """One training run."""
    return jsonable(tinker.training_run(tinker.run(run_id)))


@router.get("/training_runs/{run_id}/checkpoints")
def run_checkpoints(run_id: str, tinker: TinkerDep) -> dict[str, Any]:
    """A run's checkpoints (training, sampler, external)."""
    tinker.run(run_id)
    return jsonable({"checkpoints": tinker.checkpoints(run_id)})


@router.get("/checkpoints")
def user_checkpoints(
    tinker: TinkerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Every run's checkpoints, newest first."""
    cps = tinker.checkpoints()
    cursor = {"offset": offset, "limit": limit, "total_count": len(cps)}
    return jsonable({"checkpoints": cps[offset : offset + limit], "cursor": cursor})


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(run_id: str, checkpoint_id: str, request: Request, tinker: TinkerDep) -> dict[str, Any]:
    """Signed download URLs, one per file of the checkpoint's PEFT folder."""
    base = str(request.base_url).rstrip("/")
    return jsonable(tinker.external_urls(run_id, checkpoint_id, base))


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
def checkpoint_ttl(run_id: str, checkpoint_id: str, tinker: TinkerDep) -> dict[str, Any]:
    """Checkpoints here do not expire; a TTL is accepted for an existing checkpoint."""
    tinker.resolve(f"tinker://{run_id}/{checkpoint_id}")
    return {}


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive")
def checkpoint_archive(run_id: str, checkpoint_id: str, tinker: TinkerDep) -> StreamingResponse:
    """The checkpoint's PEFT folder (adapter, config, tokenizer) as a tar.gz that PEFT loads once extracted."""
    files = tinker.weight_files(run_id, checkpoint_id)
    _, folder = tinker.resolve(f"tinker://{run_id}/{checkpoint_id}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.relative_to(folder).as_posix())
    name = checkpoint_id.replace("/", "-")
    headers = {"Content-Disposition": f'attachment; filename="{name}.tar.gz"'}
    return StreamingResponse(iter([buffer.getvalue()]), media_type="application/gzip", headers=headers)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", status_code=204)
def delete_checkpoint(run_id: str, checkpoint_id: str, tinker: TinkerDep) -> Response:
    """Delete a checkpoint."""
    tinker.delete_checkpoint(run_id, checkpoint_id)
    return Response(status_code=204)


@files_router.get("/files/{token}")
def download_file(token: str, request: Request) -> FileResponse:
    """A file of a checkpoint, by a signed, expiring token from external_weights_urls."""
    tinker: TinkerService = request.app.state.tinker_service
    return FileResponse(tinker.open_token(token))


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
def unknown(rest: str) -> None:
    """Routes of the hosted Tinker service that this server does not offer."""
    raise NotFoundError(
        f"/api/v1/{rest} is not offered by this Tinker-compatible server.", details={"route": f"/api/v1/{rest}"}
    )
