"""The Tinker protocol over the run service: model ids, tinker:// paths, futures and sampling sessions.

A Tinker model is one of our runs (its id is the model id the SDK derives, `<session>:train:<n>`); each
Tinker call becomes a job on that run, executed in order by the run's worker. A future's request id names
the job (`<kind>.<job id>`), so retrieving it needs no state beyond the run store and survives restarts.
Sampling sessions are stateless too: the id encodes the tinker:// path (or base model) it samples.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tinker import types as tt

from entity.runs import CreateRunRequest, JobStatus, LoraSpec, OptimStepRequest, RunRow, RunStatus
from service import losses, models
from service.runs import TERMINAL_JOB, RunService
from util.errors import AppError, ConflictError, InvalidInputError, NotFoundError
from util.settings import Settings

FUTURE_WAIT_SECONDS = 20.0  # a retrieve_future long-polls this long before answering try_again
URL_TTL_SECONDS = 3600
BASE_SESSION = "base"
ATTN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]
UNEMBED_MODULES = ["lm_head"]
CHECKPOINT_KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


class TinkerRequestFailed(AppError):
    """A job failed; retrieve_future answers it in Tinker's RequestFailedResponse shape."""

    status_code = 200
    error_type = "request_failed"


def _b64(data: bytes) -> str:
    """URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    """Inverse of _b64."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """(run id, kind folder, name) of `tinker://<run>/<weights|sampler_weights|external_weights>/<name>`."""
    try:
        parsed = tt.ParsedCheckpointTinkerPath.from_tinker_path(path)
    except ValueError as exc:
        raise InvalidInputError(
            f"'{path}' is not a tinker path (tinker://<run>/<weights|sampler_weights|external_weights>/<name>)."
        ) from exc
    kind, name = parsed.checkpoint_id.split("/", 1)
    _check_name(name)
    return parsed.training_run_id, kind, name


CLONE_BLOCK = 1_000_000_000  # a cloned SamplingClient's seq_ids start at clone * CLONE_BLOCK (the SDK's scheme)


def session_tag(sampling_session_id: str, cloned_sampler_id: int) -> str:
    """The tag of a sampling session's (or one of its clones') sample jobs."""
    return f"{sampling_session_id}#{int(cloned_sampler_id)}"


SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def model_id_of(session_id: str, model_seq_id: int) -> str:
    """The model id the SDK derives, `<session>:train:<n>`; the session id must be a safe token (it names folders)."""
    if not SESSION_ID.match(session_id) or model_seq_id < 0:
        raise InvalidInputError(
            "session_id must be 1-40 letters, digits, '_' or '-' (as create_session returns), "
            "and model_seq_id a non-negative integer."
        )
    return f"{session_id}:train:{model_seq_id}"


def _check_name(name: str) -> str:
    """A checkpoint name is one safe path segment."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or len(name) > 64:
        raise InvalidInputError(f"'{name}' is not a valid checkpoint name (one path segment, at most 64 characters).")
    return name


class TinkerService:
    """The Tinker-compatible front end's logic; every model operation goes through the RunService."""

    def __init__(self, settings: Settings, runs: RunService) -> None:
        """Share the run service; a random secret signs download URLs for this server's lifetime."""
        self.settings = settings
        self.runs = runs
        self._secret = secrets.token_bytes(32)

    # -- models and paths -------------------------------------------------------------------------------
    def capabilities(self) -> dict[str, Any]:
        """The base models under model/base (trainable and sampleable)."""
        base = self.settings.model_dir / "base"
        names = sorted(p.name for p in base.iterdir() if models.is_model_dir(p)) if base.is_dir() else []
        return {"supported_models": [{"model_name": n, "trainable": True, "sampleable": True} for n in names]}

    def run(self, model_id: str) -> RunRow:
        """The run behind a Tinker model id (404 with Tinker's wording when unknown)."""
        try:
            return self.runs.store.get_run(model_id)
        except NotFoundError:
            raise NotFoundError(f"Model '{model_id}' does not exist.", details={"model_id": model_id}) from None

    def checkpoint_path(self, run_id: str, kind: str, name: str) -> Path:
        """Where a Tinker checkpoint of a run lives in the model store."""
        return self.settings.model_dir / "runs" / run_id / kind / _check_name(name)

    def resolve(self, tinker_path: str) -> tuple[RunRow, Path]:
        """The run and folder of an existing tinker:// checkpoint (404 when either is missing)."""
        run_id, kind, name = parse_tinker_path(tinker_path)
        run = self.run(run_id)
        path = self.checkpoint_path(run_id, kind, name)
        if not models.is_adapter_dir(path):
            raise NotFoundError(f"Checkpoint '{tinker_path}' does not exist.", details={"path": tinker_path})
        return run, path

    def create_model(self, req: tt.CreateModelRequest) -> str:
        """Start a run for a new LoRA model; the future resolves once its worker has loaded it."""
        lora = req.lora_config or tt.LoraConfig(rank=32)
        targets = (
            (ATTN_MODULES if lora.train_attn else [])
            + (MLP_MODULES if lora.train_mlp else [])
            + (UNEMBED_MODULES if lora.train_unembed else [])
        )
        if not targets:
            raise InvalidInputError("At least one of train_mlp, train_attn or train_unembed must be true.")
        if lora.rank < 1 or lora.rank > 1024:
            raise InvalidInputError(f"LoRA rank must be between 1 and 1024, got {lora.rank}.")
        model_id = model_id_of(req.session_id, req.model_seq_id)
        spec = LoraSpec(r=lora.rank, alpha=32, target_modules=targets)
        create = CreateRunRequest(base_model=req.base_model, lora=spec, seed=lora.seed or 0)
        self.runs.create(create, run_id=model_id)
        return f"create_model.{_b64(model_id.encode())}"

    def load_weights(self, req: tt.LoadWeightsRequest) -> str:
        """Load a checkpoint: into an existing model, or as a new model (create-via-load) with or without Adam state."""
        run, path = self.resolve(req.path)
        if req.session_id is not None:
            if req.model_seq_id is None:
                raise InvalidInputError("load_weights with session_id needs model_seq_id.")
            model_id = model_id_of(req.session_id, req.model_seq_id)
            rel = path.relative_to(self.settings.model_dir).as_posix()
            create = CreateRunRequest(from_state=rel, with_optimizer=req.optimizer, seed=run.seed)
            if req.optimizer and not (path / "optimizer.pt").is_file():
                raise InvalidInputError(f"'{req.path}' has no optimizer state; load it without the optimizer.")
            self.runs.create(create, run_id=model_id)
            return f"load_create.{_b64(json.dumps([model_id, req.path]).encode())}"
        if req.model_id is None:
            raise InvalidInputError("load_weights needs model_id, or session_id and model_seq_id.")
        target = self.run(req.model_id)
        if req.optimizer and not (path / "optimizer.pt").is_file():
            raise InvalidInputError(f"'{req.path}' has no optimizer state; load it without the optimizer.")
        if path.joinpath("adapter_config.json").is_file():
            cfg = models.adapter_config(path)
            if cfg.get("r") != target.lora.get("r"):
                have, want = cfg.get("r"), target.lora.get("r")
                raise ConflictError(f"'{req.path}' has LoRA rank {have}; this model's is {want}.")
        job = self.runs.submit(
            target.id, "load_state", {"path": str(path), "with_optimizer": req.optimizer, "tinker_path": req.path}
        )
        return f"load_weights.{job.id}"

    def info(self, model_id: str) -> dict[str, Any]:
        """get_info: base model, LoRA rank and the tokenizer (a folder the client can load when local)."""
        run = self.run(model_id)
        return {
            "type": "get_info",
            "model_id": run.id,
            "model_data": {
                "arch": "llama",
                "model_name": run.base_model,
                "tokenizer_id": str(models.tokenizer_dir(Path(run.base_path))),
            },
            "is_lora": True,
            "lora_rank": run.lora.get("r"),
            "model_name": run.base_model,
        }

    def weights_info(self, tinker_path: str) -> dict[str, Any]:
        """weights_info: what a checkpoint needs to be loaded."""
        run, path = self.resolve(tinker_path)
        cfg = models.adapter_config(path)
        targets = set(cfg.get("target_modules") or [])
        return {
            "base_model": run.base_model,
            "is_lora": True,
            "lora_rank": cfg.get("r"),
            "train_attn": bool(targets & set(ATTN_MODULES)),
            "train_mlp": bool(targets & set(MLP_MODULES)),
            "train_unembed": bool(targets & set(UNEMBED_MODULES)),
        }

    # -- training ---------------------------------------------------------------------------------------
    def forward_backward(self, req: dict[str, Any]) -> str:
        """Check a decoded forward(_backward) request against its loss and the vocabulary, then queue it."""
        run = self.run(req["model_id"])
        loss_fn = req["loss_fn"]
        if loss_fn in losses.UNSUPPORTED:
            raise InvalidInputError(f"loss_fn '{loss_fn}' is not supported: {losses.UNSUPPORTED[loss_fn]}.")
        if loss_fn not in losses.LOSSES:
            raise InvalidInputError(
                f"Unknown loss_fn '{loss_fn}'; supported: {', '.join(losses.LOSSES)}.",
                details={"loss_fn": loss_fn, "supported": list(losses.LOSSES)},
            )
        if not req["data"]:
            raise InvalidInputError("forward_backward needs at least one datum.")
        required = losses.REQUIRED_INPUTS[loss_fn]
        for i, datum in enumerate(req["data"]):
            n = len(datum["tokens"])
            if n == 0:
                raise InvalidInputError(f"data[{i}] has an empty model_input.")
            bad = [t for t in datum["tokens"] if not 0 <= t < run.vocab_size]
            missing = [k for k in required if k not in datum["inputs"]]
            if missing:
                raise InvalidInputError(f"data[{i}]: loss_fn '{loss_fn}' needs loss_fn_inputs {missing}.")
            unknown = sorted(set(datum["inputs"]) - losses.KNOWN_INPUTS)
            if unknown:
                raise InvalidInputError(f"data[{i}]: unknown loss_fn_inputs {unknown}.")
            for key, values in datum["inputs"].items():
                if len(values) != n:
                    raise InvalidInputError(
                        f"data[{i}]: loss_fn_inputs['{key}'] has {len(values)} values but model_input has {n} tokens.",
                        details={"datum": i, "input": key},
                    )
            bad += [int(t) for t in datum["inputs"]["target_tokens"] if not 0 <= int(t) < run.vocab_size]
            if bad:
                raise InvalidInputError(
                    f"data[{i}] has token ids outside the vocabulary [0, {run.vocab_size}): {bad[:5]}",
                    details={"datum": i, "vocab_size": run.vocab_size},
                )
        request = {k: req[k] for k in ("loss_fn", "config", "forward_only", "data")}
        job = self.runs.submit(run.id, "loss_step", request, grads=not req["forward_only"])
        return f"forward_backward.{job.id}"

    def optim_step(self, req: tt.OptimStepRequest) -> str:
        """Queue an Adam step (AdamParams: lr, betas, eps, weight decay, grad clip norm where 0 means none)."""
        run = self.run(req.model_id)
        params = req.optim_params
        if not isinstance(params, tt.AdamParams):
            raise InvalidInputError("Only Adam optimizer steps (AdamParams) are supported.")
        try:
            step = OptimStepRequest(
                learning_rate=params.learning_rate,
                beta1=params.beta1,
                beta2=params.beta2,
                eps=params.eps,
                weight_decay=params.weight_decay,
                max_grad_norm=params.grad_clip_norm if params.grad_clip_norm > 0 else None,
            )
        except ValueError as exc:
            raise InvalidInputError(f"Invalid AdamParams: {exc}") from exc
        job = self.runs.submit_optim_step(run.id, step)
        return f"optim_step.{job.id}"

    def save(self, model_id: str, kind: str, name: str | None, overwrite: bool = True) -> str:
        """Queue saving a run's adapter (and Adam state) as a tinker:// checkpoint of `kind`."""
        run = self.run(model_id)
        session = not name  # save_weights_and_get_sampling_client: an unnamed snapshot for one sampling session
        name = _check_name(name) if name else f"ephemeral-{uuid.uuid4().hex[:12]}"
        path = self.checkpoint_path(run.id, kind, name)
        if path.exists() and not overwrite:
            raise ConflictError(f"Checkpoint 'tinker://{run.id}/{kind}/{name}' exists; save under another name.")
        tinker_path = f"tinker://{run.id}/{kind}/{name}"
        request = {"name": f"{kind}/{name}", "path": str(path), "tinker_path": tinker_path, "session": session}
        job = self.runs.submit(run.id, "save_state", request)
        return f"save_{kind}.{job.id}"

    # -- sampling ---------------------------------------------------------------------------------------
    def sampling_session(self, model_path: str | None, base_model: str | None) -> str:
        """A stateless sampling session id for a sampler checkpoint (or a base model)."""
        if model_path:
            self.resolve(model_path)
            return "ss_" + _b64(model_path.encode())
        if not base_model:
            raise InvalidInputError("A sampling session needs model_path or base_model.")
        models.resolve_model(base_model, self.settings)
        return "ss_" + _b64(f"{BASE_SESSION}:{base_model}".encode())

    def _session_target(self, session_id: str) -> tuple[str | None, str | None]:
        """(tinker path, base model) a sampling session id names."""
        if not session_id.startswith("ss_"):
            raise NotFoundError(f"Sampling session '{session_id}' does not exist.")
        try:
            target = _unb64(session_id[3:]).decode()
        except ValueError:
            raise NotFoundError(f"Sampling session '{session_id}' does not exist.") from None
        if target.startswith(f"{BASE_SESSION}:"):
            return None, target.split(":", 1)[1]
        return target, None

    def sampler_info(self, session_id: str) -> dict[str, Any]:
        """get_sampler: the base model and checkpoint a session samples."""
        path, base = self._session_target(session_id)
        if path:
            run, _ = self.resolve(path)
            base = run.base_model
        return {"sampler_id": session_id, "base_model": base, "model_path": path}

    def _base_run(self, base_model: str) -> RunRow:
        """A run on `base_model` to sample the bare base with (its LoRA switched off); started if none is."""
        base_path = models.resolve_model(base_model, self.settings).resolve()
        usable = (RunStatus.starting, RunStatus.ready, RunStatus.paused)
        for run in self.runs.store.runs(usable):
            if Path(run.base_path).resolve() == base_path:
                return run
        spec = LoraSpec(r=1, alpha=1, target_modules=ATTN_MODULES)
        return self.runs.create(CreateRunRequest(base_model=base_model, lora=spec))

    def sample(self, req: tt.SampleRequest) -> str:
        """Queue sampling: from a sampler checkpoint on its run, or from the base model."""
        path, base = req.model_path, req.base_model
        if req.sampling_session_id:
            path, base = self._session_target(req.sampling_session_id)
        if path:
            run, folder = self.resolve(path)
            adapter = str(folder)
        elif base:
            run, adapter = self._base_run(base), "base"
        else:
            raise InvalidInputError("sample needs sampling_session_id, model_path or base_model.")
        tokens: list[int] = []
        for chunk in req.prompt.chunks:
            if not isinstance(chunk, tt.EncodedTextChunk):
                raise InvalidInputError("Only token (encoded_text) prompt chunks are supported.")
            tokens.extend(int(t) for t in chunk.tokens)
        if not tokens:
            raise InvalidInputError("The prompt is empty.")
        bad = [t for t in tokens if not 0 <= t < run.vocab_size]
        if bad:
            raise InvalidInputError(f"The prompt has token ids outside the vocabulary [0, {run.vocab_size}): {bad[:5]}")
        p = req.sampling_params
        if not 1 <= req.num_samples <= 64:
            raise InvalidInputError(f"num_samples must be between 1 and 64, got {req.num_samples}.")
        if p.max_tokens is not None and not 1 <= p.max_tokens <= 4096:
            raise InvalidInputError(f"max_tokens must be between 1 and 4096, got {p.max_tokens}.")
        if p.temperature < 0 or not 0 < p.top_p <= 1:
            raise InvalidInputError("temperature must be >= 0 and top_p in (0, 1].")
        if req.topk_prompt_logprobs < 0 or req.topk_prompt_logprobs > 100:
            raise InvalidInputError("topk_prompt_logprobs must be between 0 and 100.")
        last_n = req.prompt_logprobs_last_n
        if last_n is not None and not 1 <= last_n <= len(tokens) - 1:
            raise InvalidInputError(f"prompt_logprobs_last_n must be between 1 and {len(tokens) - 1}.")
        request = {
            "prompt": tokens,
            "num_samples": req.num_samples,
            "params": {
                "max_tokens": p.max_tokens or 64,
                "temperature": p.temperature,
                "top_p": p.top_p,
                "top_k": p.top_k,
                "seed": p.seed,
                "stop": list(p.stop) if isinstance(p.stop, (list, tuple)) else p.stop,
            },
            "adapter_path": adapter,
            "prompt_logprobs": bool(req.prompt_logprobs),
            "topk_prompt_logprobs": req.topk_prompt_logprobs,
            "prompt_logprobs_last_n": last_n,
        }
        if req.sampling_session_id:  # retrieve_futures polls a (session, cloned sampler) pair's completions
            request["tag"] = session_tag(req.sampling_session_id, (req.seq_id or 0) // CLONE_BLOCK)
        job = self.runs.submit(run.id, "sample_tokens", request)
        return f"sample.{job.id}.{req.topk_prompt_logprobs}"

    # -- futures ----------------------------------------------------------------------------------------
    async def retrieve(self, request_id: str, wait: float = FUTURE_WAIT_SECONDS) -> tuple[str, Any]:
        """("json", dict) or ("proto-fwdbwd" | "proto-sample", result) for a future, long-polling while pending.

        A pending future answers ("json", try_again); a failed one raises TinkerRequestFailed.
        """
        kind, _, rest = request_id.partition(".")
        if kind in ("create_model", "load_create"):
            return "json", await self._retrieve_creation(kind, rest, request_id, wait)
        job_id, _, extra = rest.partition(".")
        try:
            job = await self.runs.wait_job(job_id, wait)
        except NotFoundError:
            raise NotFoundError(f"Future '{request_id}' does not exist.", details={"request_id": request_id}) from None
        if job.status not in TERMINAL_JOB:
            return "json", {"type": "try_again", "request_id": request_id, "queue_state": "active"}
        if job.status == JobStatus.failed:
            raise TinkerRequestFailed(job.error or "the request failed")
        result = job.result or {}
        if kind == "forward_backward":
            return "proto-fwdbwd", result
        if kind == "sample":
            return "proto-sample", (result, int(extra or 0))
        if kind == "optim_step":
            return "json", {"metrics": {"optim/grad_norm": result.get("grad_norm", 0.0)}, "type": "optim_step"}
        if kind == "load_weights":
            return "json", {"type": "load_weights", "path": job.request.get("tinker_path"), "model_id": job.run_id}
        if kind == "save_weights":
            return "json", {"type": "save_weights", "path": job.request["tinker_path"]}
        if kind == "save_external_weights":
            size = sum(f.stat().st_size for f in Path(job.request["path"]).rglob("*") if f.is_file())
            return "json", {"type": "save_weights_external", "path": job.request["tinker_path"], "size_bytes": size}
        if kind == "save_sampler_weights":
            path = job.request["tinker_path"]
            out: dict[str, Any] = {"type": "save_weights_for_sampler", "path": path}
            if job.request.get("session"):
                out = {"type": "save_weights_for_sampler", "sampling_session_id": "ss_" + _b64(path.encode())}
            return "json", out
        raise NotFoundError(f"Future '{request_id}' does not exist.", details={"request_id": request_id})

    async def retrieve_many(self, req: tt.FuturesRetrieveRequest) -> dict[str, Any]:
        """retrieve_futures: the session's sample requests that finished or failed after `prev_cursor`.

        The cursor is a job sequence number below which every request of the session is complete, so nothing
        is lost; a request that completed out of order (a cancelled one) may be reported twice, which the SDK's
        poller tolerates. Long-polls up to `timeout` seconds (the server's default when unset) for news.
        """
        target = req.target
        self._session_target(target.sampling_session_id)
        tag = session_tag(target.sampling_session_id, target.cloned_sampler_id)
        wait = FUTURE_WAIT_SECONDS if req.timeout is None else max(0.0, min(float(req.timeout), FUTURE_WAIT_SECONDS))
        deadline = time.monotonic() + wait
        while True:
            jobs = await asyncio.to_thread(self.runs.store.tagged_jobs, "sample_tokens", tag, req.prev_cursor)
            cursor, completions, prefix = req.prev_cursor, [], True
            for job in jobs:
                if job.status not in TERMINAL_JOB:
                    prefix = False
                    continue
                request_id = f"sample.{job.id}.{int(job.request.get('topk_prompt_logprobs') or 0)}"
                state = "finished" if job.status == JobStatus.completed else "failed"
                completions.append({"state": state, "request_id": request_id})
                if prefix:
                    cursor = job.seq
            if completions or time.monotonic() >= deadline:
                return {"completions": completions, "cursor": cursor}
            await asyncio.sleep(self.settings.runs.poll_interval * 5)

    def cancel(self, request_id: str) -> None:
        """Cancel a queued request: its job leaves the run's queue and its future answers failed ("cancelled").

        A running job is not interrupted (the worker cannot stop a GPU step midway): that is a 409, as is a
        finished one; model creation cannot be cancelled (delete the run instead).
        """
        kind, _, rest = request_id.partition(".")
        if kind in ("create_model", "load_create"):
            raise ConflictError("Model creation cannot be cancelled; delete the training run instead.")
        job_id = rest.partition(".")[0]
        try:
            self.runs.store.cancel_job(job_id, f"cancelled: request '{request_id}' was cancelled before it ran")
        except NotFoundError:
            raise NotFoundError(f"Future '{request_id}' does not exist.", details={"request_id": request_id}) from None

    async def _retrieve_creation(self, kind: str, rest: str, request_id: str, wait: float) -> dict[str, Any]:
        """A create_model / create-via-load future: resolved once the run's worker is ready."""
        try:
            decoded = _unb64(rest).decode()
            model_id, path = (decoded, None) if kind == "create_model" else tuple(json.loads(decoded))
        except ValueError:
            raise NotFoundError(f"Future '{request_id}' does not exist.") from None
        deadline = time.monotonic() + wait
        while True:
            run = self.run(model_id)
            if run.status in (RunStatus.ready, RunStatus.paused):
                if kind == "create_model":
                    return {"type": "create_model", "model_id": run.id}
                return {"type": "load_weights", "model_id": run.id, "path": path}
            if run.status in (RunStatus.failed, RunStatus.deleted):
                raise TinkerRequestFailed(f"model '{model_id}' could not start: {run.error or run.status}")
            if time.monotonic() >= deadline:
                return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
            await asyncio.sleep(0.1)

    # -- REST: runs, checkpoints, downloads ---------------------------------------------------------------
    def training_run(self, run: RunRow) -> dict[str, Any]:
        """A run as Tinker's TrainingRun."""
        cps = self.checkpoints(run.id)
        training = [c for c in cps if c["checkpoint_type"] == "training"]
        sampler = [c for c in cps if c["checkpoint_type"] == "sampler"]
        return {
            "training_run_id": run.id,
            "base_model": run.base_model,
            "model_owner": "local",
            "is_lora": True,
            "corrupted": run.status == RunStatus.failed,
            "lora_rank": run.lora.get("r"),
            "last_request_time": run.last_used_at,
            "last_checkpoint": training[0] if training else None,
            "last_sampler_checkpoint": sampler[0] if sampler else None,
        }

    def training_runs(self, limit: int, offset: int) -> dict[str, Any]:
        """Every run, newest first, one page."""
        runs = self.runs.store.runs()
        page = runs[offset : offset + limit]
        return {
            "training_runs": [self.training_run(r) for r in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
        }

    def checkpoints(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Tinker checkpoints (training, sampler and external weights), newest first."""
        out = []
        for row in self.runs.store.checkpoints(run_id):
            kind, _, name = row.name.partition("/")
            if kind not in CHECKPOINT_KINDS or not name:
                continue
            folder = self.settings.model_dir / row.path
            if not folder.is_dir():
                continue
            created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
            out.append(
                {
                    "checkpoint_id": row.name,
                    "checkpoint_type": CHECKPOINT_KINDS[kind],
                    "time": created,
                    "tinker_path": f"tinker://{row.run_id}/{row.name}",
                    "size_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
                }
            )
        return out

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        """Delete a checkpoint's folder and record."""
        self.run(run_id)
        kind, _, name = checkpoint_id.partition("/")
        if kind not in CHECKPOINT_KINDS:
            raise InvalidInputError(f"'{checkpoint_id}' is not a checkpoint id (<weights|sampler_weights|...>/<name>).")
        folder = self.checkpoint_path(run_id, kind, name)
        found = self.runs.store.delete_checkpoint(run_id, checkpoint_id)
        if not found and not folder.exists():
            raise NotFoundError(f"Checkpoint 'tinker://{run_id}/{checkpoint_id}' does not exist.")
        shutil.rmtree(folder, ignore_errors=True)

    def _sign(self, rel: str, expires: int) -> str:
        """An HMAC over a file path and expiry."""
        return _b64(hmac.new(self._secret, f"{rel}\n{expires}".encode(), hashlib.sha256).digest())

    def file_token(self, file: Path) -> str:
        """A signed, expiring token that lets an unauthenticated GET fetch one file of the model store."""
        rel = file.relative_to(self.settings.model_dir).as_posix()
        expires = int(time.time()) + URL_TTL_SECONDS
        return _b64(json.dumps([rel, expires]).encode()) + "." + self._sign(rel, expires)

    def open_token(self, token: str) -> Path:
        """The file a token names, if its signature holds and it has not expired (404 otherwise)."""
        try:
            body, sig = token.split(".", 1)
            rel, expires = json.loads(_unb64(body))
        except (ValueError, TypeError):
            raise NotFoundError("The download link is not valid.") from None
        if not hmac.compare_digest(sig, self._sign(rel, int(expires))) or time.time() > int(expires):
            raise NotFoundError("The download link is not valid or has expired.")
        path = (self.settings.model_dir / rel).resolve()
        if not path.is_file() or not path.is_relative_to(self.settings.model_dir.resolve()):
            raise NotFoundError("The file of this download link is gone.")
        return path

    def weight_files(self, run_id: str, checkpoint_id: str) -> list[Path]:
        """The PEFT files of a checkpoint (adapter and tokenizer; not the optimizer state)."""
        if checkpoint_id.partition("/")[0] not in CHECKPOINT_KINDS:
            raise InvalidInputError(f"'{checkpoint_id}' is not a checkpoint id.")
        _, folder = self.resolve(f"tinker://{run_id}/{checkpoint_id}")
        return sorted(f for f in folder.rglob("*") if f.is_file() and f.name not in ("optimizer.pt",))

    def external_urls(self, run_id: str, checkpoint_id: str, base_url: str) -> dict[str, Any]:
        """Signed URLs, one per file, as get_external_weights_urls answers."""
        _, folder = self.resolve(f"tinker://{run_id}/{checkpoint_id}")
        urls = {
            f.relative_to(folder).as_posix(): f"{base_url}/api/v1/files/{self.file_token(f)}"
            for f in self.weight_files(run_id, checkpoint_id)
        }
        expires = datetime.fromtimestamp(time.time() + URL_TTL_SECONDS, tz=UTC)
        return {"urls": urls, "expires": expires}
