"""A training run's worker process: `python -m service.run_worker --run-id ID`.

It loads the base model with a LoRA adapter and an AdamW optimizer once, then executes the run's jobs in
order (forward_backward, optim_step, sample, save_state, load_state). Idle past the TTL, or told to stop
by the server, it saves its state and pauses; the run resumes from that state on its next call.
"""

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from entity.runs import ChatExample, ForwardBackwardRequest, OptimStepRequest, RunRow, RunStatus, SampleRequest
from service import losses, models
from service.db import Patient
from service.engine import Engine, EngineConfig, SamplingParams
from service.runs import RUN_STATE_KIND, RunStore, adopt_legacy_state, checkpoint_dir
from service.tasks import make_engine
from service.train.fused_lora import fuse_lora_layers
from service.worker import Terminated, format_error, start_worker_process
from util.files import fresh_dir, publish, read_json, write_json
from util.settings import Settings

log = logging.getLogger(__name__)

AUTOSAVE = "autosave"
SAMPLER_DIR, EPHEMERAL, KEEP_SNAPSHOTS = "sampler_weights", "ephemeral-", 3  # Tinker's unnamed sampler saves
IDLE_BACKOFF_AFTER = 5.0  # seconds without a job before polling slows down
IDLE_POLL = 0.25
STORE_OUTAGE_SECONDS = 600.0  # a database outage this long is waited out: the run's weights live only in this process
SAMPLE_KINDS = frozenset({"sample", "sample_tokens"})  # jobs that only read the weights: batched together
MAX_SAMPLE_BATCH = 256  # sampling jobs claimed at once (each up to 64 rows; the engine runs 64 rows at a time)
ENGINE_MAX_RUNNING = 64
SAMPLE_LINGER_SECONDS, SAMPLE_LINGER_ROUNDS = 0.03, 5  # wait for the rest of a burst of sampling calls


class JobError(Exception):
    """A job's input could not be used; the job fails, the run carries on."""


@dataclass
class SampleWork:
    """One sampling job as engine rows: each prompt num_samples times, a SamplingParams per row, and its answer.

    `answer` turns the rows' outputs (grouped per prompt) into the job's result; it runs while the job's weights
    (`adapter`: None for the current weights, "base", or a snapshot folder) are still in place.
    """

    adapter: str | None
    prompts: list[list[int]]
    num_samples: int
    params: list[SamplingParams]
    answer: Callable[[list[list[dict[str, Any]]]], dict[str, Any]]


def _one(results: list[dict[str, Any] | Exception]) -> dict[str, Any]:
    """The single result of a one-job batch (raising its error)."""
    if isinstance(results[0], Exception):
        raise results[0]
    return results[0]


class RunState:
    """The model with its LoRA, the tokenizer and the optimizer of one run."""

    def __init__(self, run: RunRow, settings: Settings) -> None:
        """Load the base model and attach a fresh LoRA, or restore a saved state."""
        from peft import LoraConfig, PeftModel, get_peft_model

        self.run = run
        self.settings = settings
        self.device, self.dtype = models.pick_device()
        base_path = Path(run.base_path)
        self.tokenizer = models.load_tokenizer(models.tokenizer_dir(base_path))
        base = models.load_causal_lm(base_path, self.dtype, self.device)
        torch.manual_seed(run.seed)
        if run.resume_from:
            models.check_model_sources(Path(run.resume_from), settings)  # its files may have changed since create
            self.model = PeftModel.from_pretrained(base, run.resume_from, is_trainable=True)
        else:
            lora = run.lora
            config = LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                target_modules=lora["target_modules"],
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.params:  # adapter weights and their Adam moments stay in fp32 on a bf16 base
            p.data = p.data.float()
        fuse_lora_layers(self.model)  # bf16 adapter matmuls on a bf16 base, no extra passes (training's path)
        fused = self.device == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=fused)
        self.steps = run.steps
        self._engine: Engine | None = None
        self._engine_blocks = 0
        self._keep_engine = True
        self.engine_calls = self.engine_starts = 0
        self.last_batch: dict[str, int] = {}
        if run.resume_from and run.resume_optimizer and (Path(run.resume_from) / "optimizer.pt").is_file():
            self._load_optimizer(Path(run.resume_from) / "optimizer.pt")

    # -- primitives -------------------------------------------------------------------------------------
    def forward_backward(self, req: ForwardBackwardRequest) -> dict[str, Any]:
        """Accumulate gradients of the weighted cross-entropy; return the loss, token count and per-example losses."""
        rows = [self._tokens(ex) for ex in req.examples]
        width = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        targets = torch.zeros((len(rows), width), dtype=torch.long)
        weights = torch.zeros((len(rows), width), dtype=torch.float32)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (inp, tgt, w) in enumerate(rows):
            n = len(inp)
            ids[i, :n], targets[i, :n], weights[i, :n], mask[i, :n] = (
                torch.tensor(inp), torch.tensor(tgt), torch.tensor(w), 1
            )  # fmt: skip
        ids, targets, weights, mask = (t.to(self.device) for t in (ids, targets, weights, mask))
        total = weights.sum()
        if float(total) <= 0:
            raise JobError("every weight is zero: there is nothing to learn from")
        self.model.train()
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        nll = nll.view(len(rows), width) * weights
        loss = nll.sum() / total
        loss.backward()
        per_example = (nll.sum(1) / weights.sum(1).clamp_min(1e-12)).tolist()
        return {"loss": float(loss), "num_tokens": float(total), "per_example_loss": per_example}

    def _tokens(self, ex: Any) -> tuple[list[int], list[int], list[float]]:
        """(input_ids, target_ids, weights) of an example; a conversation is weighted on assistant tokens."""
        if isinstance(ex, ChatExample):
            enc = models.tokenize_with_assistant_mask(self.tokenizer, [m.model_dump() for m in ex.messages])
            ids, mask = enc["input_ids"], enc["assistant_masks"]
            if len(ids) < 2:
                raise JobError("a conversation example is too short to predict anything")
            return ids[:-1], ids[1:], [float(m) for m in mask[1:]]
        return ex.input_ids, ex.target_ids, ex.weights or [1.0] * len(ex.input_ids)

    def optim_step(self, req: OptimStepRequest) -> dict[str, Any]:
        """One AdamW step on the accumulated gradients, then clear them."""
        if all(p.grad is None for p in self.params):
            raise JobError("there are no accumulated gradients: call forward_backward first")
        for group in self.optimizer.param_groups:
            group.update(lr=req.learning_rate, betas=(req.beta1, req.beta2), eps=req.eps, weight_decay=req.weight_decay)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if req.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, req.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"step": self.steps, "grad_norm": float(norm)}

    def plan_sample(self, req: SampleRequest) -> "SampleWork":
        """/v1/runs sample with the current weights: texts, token ids and their log-probabilities (at temperature 1)."""
        if req.prompts is not None:
            prompts = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in req.prompts]
        else:
            conversations = [[m.model_dump() for m in conv] for conv in req.messages or []]
            prompts = [
                self.tokenizer(models.render_chat(self.tokenizer, c, True), add_special_tokens=False)["input_ids"]
                for c in conversations
            ]
        if any(not p for p in prompts):
            raise JobError("a prompt is empty")
        params = self._row_params(
            len(prompts), req.num_samples, req.max_tokens, req.temperature, req.top_p, -1, req.seed, None, None
        )

        def answer(generated: list[list[dict[str, Any]]]) -> dict[str, Any]:
            results: list[dict[str, Any]] = []
            for prompt, samples in zip(prompts, generated, strict=True):
                results.append(
                    {
                        "prompt_tokens": len(prompt),
                        "samples": [
                            {
                                "text": self.tokenizer.decode(s["tokens"], skip_special_tokens=True),
                                "tokens": s["tokens"],
                                "logprobs": [round(x, 6) for x in s["logprobs"]],
                                "finish_reason": "stop" if s["stop_reason"] == "stop" else "length",
                            }
                            for s in samples
                        ],
                    }
                )
            return {"results": results, "step": self.steps}

        return SampleWork(None, prompts, req.num_samples, params, answer)

    def sample(self, req: SampleRequest) -> dict[str, Any]:
        """Sample with the current weights (one job on its own; the worker batches queued ones via sample_batch)."""
        return _one(self.sample_batch([self.plan_sample(req)]))

    def loss_step(self, request: dict[str, Any]) -> dict[str, Any]:
        """Tinker's forward / forward_backward: per-token target logprobs and one of its losses (summed)."""
        fn = losses.LOSSES.get(request["loss_fn"])
        if fn is None:
            raise JobError(f"unknown loss_fn '{request['loss_fn']}'")
        config = request.get("config") or {}
        forward_only = bool(request.get("forward_only"))
        data = request["data"]
        width = max(len(d["tokens"]) for d in data)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(data), width), pad, dtype=torch.long)
        targets = torch.zeros((len(data), width), dtype=torch.long)
        mask = torch.zeros((len(data), width), dtype=torch.long)
        for i, d in enumerate(data):
            n = len(d["tokens"])
            ids[i, :n] = torch.tensor(d["tokens"])
            targets[i, :n] = torch.tensor([int(t) for t in d["inputs"]["target_tokens"]])
            mask[i, :n] = 1
        ids, targets, mask = ids.to(self.device), targets.to(self.device), mask.to(self.device)
        self.model.train()
        with torch.set_grad_enabled(not forward_only):
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            logp = logp.view(len(data), width)
            total = torch.zeros((), device=self.device)
            outputs = []
            for i, d in enumerate(data):
                n = len(d["tokens"])
                inputs = {
                    k: torch.tensor(v, dtype=torch.float32, device=self.device)
                    for k, v in d["inputs"].items()
                    if k != "target_tokens"
                }
                try:
                    elementwise = fn(logp[i, :n], inputs, config)
                except (KeyError, losses.LossInputError) as exc:
                    raise JobError(f"data[{i}]: {exc}") from exc
                total = total + elementwise.sum()
                lp, el = logp[i, :n].detach().cpu().tolist(), elementwise.detach().cpu().tolist()
                outputs.append({"logprobs": lp, "elementwise_loss": el})
            if not forward_only:
                total.backward()
        return {"outputs": outputs, "metrics": {"loss:sum": float(total)}}

    def sample_tokens(self, request: dict[str, Any]) -> dict[str, Any]:
        """Tinker's sample on token ids (one job on its own; the worker batches queued ones via sample_batch)."""
        return _one(self.sample_batch([self.plan_sample_tokens(request)]))

    def plan_sample_tokens(self, request: dict[str, Any]) -> "SampleWork":
        """Tinker's sample: num_samples continuations of one token prompt, on a snapshot's weights when named.

        The adapter is a saved snapshot's, the bare base's, or the current one; prompt logprobs and their top-k
        are added when asked.
        """
        prompt: list[int] = request["prompt"]
        params = request.get("params") or {}
        n = int(request.get("num_samples", 1))
        stop = params.get("stop")
        stop_ids: list[int] | None = None  # None: the model's end tokens
        stop_strings: list[str] | None = None
        if isinstance(stop, str):
            stop_strings = [stop]
        elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
            stop_strings = list(stop)
        elif isinstance(stop, list):  # token ids; [] disables every stop token, EOS included
            stop_ids = [int(s) for s in stop]
        rows = self._row_params(
            1,
            n,
            int(params.get("max_tokens") or 64),
            float(params.get("temperature", 1.0)),
            float(params.get("top_p", 1.0)),
            int(params.get("top_k", -1)),
            params.get("seed"),
            stop_ids,
            stop_strings,
        )
        topk = int(request.get("topk_prompt_logprobs") or 0)

        def answer(generated: list[list[dict[str, Any]]]) -> dict[str, Any]:
            out: dict[str, Any] = {"sequences": generated[0]}
            if request.get("prompt_logprobs") or topk:  # runs while the sampled adapter is still in place
                out.update(self.prompt_logprobs(prompt, topk, request.get("prompt_logprobs_last_n")))
            return out

        return SampleWork(request.get("adapter_path") or None, [prompt], n, rows, answer)

    @staticmethod
    def _row_params(
        prompts: int,
        num_samples: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        stop_ids: list[int] | None,
        stop_strings: list[str] | None,
    ) -> list[SamplingParams]:
        """One SamplingParams per engine row (prompt-major, num_samples rows per prompt)."""
        return [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=max(0, top_k),
                seed=None if seed is None else int(seed) + j,  # each sample of a seeded call its own stream
                stop=list(stop_strings or []),
                stop_token_ids=stop_ids,
            )
            for _ in range(prompts)
            for j in range(num_samples)
        ]

    def sample_batch(self, works: list["SampleWork"]) -> list[dict[str, Any] | Exception]:
        """Run several sampling jobs: one engine call per adapter snapshot among them; a result or error each.

        Jobs on the same weights (the usual case: an RL step's rollouts all name one sampler snapshot) share one
        engine call, so their rows decode together in the same batch.
        """
        out: list[dict[str, Any] | Exception] = [JobError("not run")] * len(works)
        groups: dict[str | None, list[int]] = {}
        for i, work in enumerate(works):
            groups.setdefault(work.adapter, []).append(i)
        for adapter, members in groups.items():
            try:
                with self._weights(adapter):
                    rows = [p for i in members for p in works[i].prompts for _ in range(works[i].num_samples)]
                    params = [p for i in members for p in works[i].params]
                    done = self._generate(rows, params)
                    self.last_batch = {"engine_call": self.engine_calls, "jobs": len(works), "rows": len(rows)}
                    offset = 0
                    for i in members:
                        work = works[i]
                        size = len(work.prompts) * work.num_samples
                        mine = done[offset : offset + size]
                        offset += size
                        per_prompt = [mine[k : k + work.num_samples] for k in range(0, size, work.num_samples)]
                        try:
                            out[i] = {**work.answer(per_prompt), "batch": dict(self.last_batch)}
                        except (JobError, ValueError) as exc:
                            out[i] = exc
                        except Exception as exc:  # noqa: BLE001 - this job fails, the others keep their answers
                            out[i] = JobError(format_error(exc))
            except Exception as exc:  # noqa: BLE001 - the group's jobs fail with the reason; the run carries on
                for i in members:
                    out[i] = exc if isinstance(exc, (JobError, ValueError)) else JobError(format_error(exc))
        return out

    @contextmanager
    def _weights(self, adapter: str | None) -> Iterator[None]:
        """The current weights (None), the bare base ("base": every LoRA B at zero) or a saved snapshot, swapped in."""
        if not adapter:
            yield
            return
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        current = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        if adapter == "base":
            snapshot = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in current.items()}
        else:
            try:
                snapshot = load_file(str(Path(adapter) / "adapter_model.safetensors"), device=self.device)
            except FileNotFoundError:
                raise JobError("the sampler snapshot is gone (it was deleted or pruned)") from None
        try:
            set_peft_model_state_dict(self.model, snapshot)
            yield
        finally:
            set_peft_model_state_dict(self.model, current)
            for p in self.params:
                p.data = p.data.float()

    def prompt_logprobs(self, prompt: list[int], topk: int, last_n: int | None) -> dict[str, Any]:
        """Teacher-forced logprobs of the prompt's tokens (None for the first, and before the last n)."""
        ids = torch.tensor([prompt], device=self.device)
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits.float()[0]
        logp_all = logits.log_softmax(-1)
        scores = logp_all[:-1].gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).cpu().tolist()
        first_scored = 1 if last_n is None else max(1, len(prompt) - int(last_n))
        values: list[float | None] = [None] * len(prompt)
        for i in range(first_scored, len(prompt)):
            values[i] = scores[i - 1]
        result: dict[str, Any] = {"prompt_logprobs": values}
        if topk:
            top = logp_all[:-1].topk(min(topk, logp_all.shape[-1]), dim=-1)
            rows: list[list[list[float]] | None] = [None] * len(prompt)
            for i in range(first_scored, len(prompt)):
                pairs = zip(top.indices[i - 1].tolist(), top.values[i - 1].tolist(), strict=True)
                rows[i] = [[int(t), float(v)] for t, v in pairs]
            result["topk_prompt_logprobs"] = rows
        return result

    def _generate(self, rows: list[list[int]], params: list[SamplingParams]) -> list[dict[str, Any]]:
        """One engine call for all rows: per row a dict of tokens, logprobs (raw distribution) and stop_reason."""
        engine = self._engine_for(rows, params)
        self.model.eval()
        self.engine_calls += 1
        try:
            done = engine.generate(rows, params)
        finally:
            if not self._keep_engine:
                self.close_engine()
        failed = next((d.error for d in done if d.error), None)
        if failed:
            raise JobError(f"sampling failed: {failed}")
        return [
            {
                "tokens": d.token_ids,
                "logprobs": [float(x) for x in d.logprobs],
                "stop_reason": "stop" if d.finish_reason == "stop" else "length",
            }
            for d in done
        ]

    def _engine_for(self, rows: list[list[int]], params: list[SamplingParams]) -> Engine:
        """The run's engine, kept between calls (no start-up per call), rebuilt larger when a batch needs more cache.

        Its KV cache holds ENGINE_MAX_RUNNING rows as long as the longest seen (not a share of a whole 80 GB GPU):
        the run's training keeps the rest of the memory. CUDA graphs stay off: optim_step and snapshot swaps rewrite the
        adapter weights between calls, and uncaptured steps always read the weights as they are now.
        """
        page = 256 if self.device == "cuda" else 32
        longest = max(-(-(len(r) + p.max_tokens) // page) for r, p in zip(rows, params, strict=True))
        # Room for a full batch of the longest rows so far: only a longer row than any before rebuilds the engine.
        blocks = longest * ENGINE_MAX_RUNNING + 2
        engine = self._engine
        if engine is not None and engine.manager is not None and self._engine_blocks >= blocks:
            return engine
        self.close_engine()
        config = EngineConfig(max_running=ENGINE_MAX_RUNNING, num_blocks=blocks, cuda_graphs=False)
        engine = Engine(self.model, self.tokenizer, models.eos_ids(self.model, self.tokenizer), config)
        attn = self.model.config._attn_implementation
        engine.start()
        # An engine that had to switch the model's attention (eager -> paged) must not stay: training shares the model.
        self._keep_engine = self.model.config._attn_implementation == attn
        self._engine, self._engine_blocks = engine, blocks
        self.engine_starts += 1
        return engine

    def close_engine(self) -> None:
        """Stop the run's engine (its KV cache is freed)."""
        if self._engine is not None:
            self._engine.close()
        self._engine, self._engine_blocks = None, 0

    def save_state(self, path: Path) -> dict[str, Any]:
        """Save the adapter (a PEFT folder with the tokenizer) and the optimizer state, atomically."""
        adopt_legacy_state(path, self.run.id)
        staging = fresh_dir(path)
        try:
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            meta = {"run_id": self.run.id, "step": self.steps, "base_model": self.run.base_path, "lora": self.run.lora}
            write_json(staging / "run_state.json", meta)
            publish(staging, path, RUN_STATE_KIND, self.run.id, step=self.steps)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return {"path": str(path), "step": self.steps}

    def load_state(self, path: Path, with_optimizer: bool) -> dict[str, Any]:
        """Load a saved adapter's weights (and optimizer state) into this run."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(path / "adapter_model.safetensors"), device=self.device)
        result = set_peft_model_state_dict(self.model, weights)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise JobError(f"the saved adapter does not fit this run: unexpected {unexpected[:3]}")
        for p in self.params:
            p.data = p.data.float()
        self.optimizer.zero_grad(set_to_none=True)
        if with_optimizer:
            self._load_optimizer(path / "optimizer.pt")
        meta_file = path / "run_state.json"
        if meta_file.is_file():
            try:
                self.steps = int(read_json(meta_file).get("step", self.steps))
            except (OSError, ValueError, TypeError):
                raise JobError(f"'{path.name}' has an unreadable run_state.json") from None
        return {"path": str(path), "with_optimizer": with_optimizer, "step": self.steps}

    def _load_optimizer(self, file: Path) -> None:
        """Restore AdamW state saved by save_state."""
        self.optimizer.load_state_dict(torch.load(file, map_location=self.device, weights_only=True))


def execute(state: RunState, store: RunStore, kind: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run one job on the run's state."""
    if kind == "forward_backward":
        return state.forward_backward(ForwardBackwardRequest.model_validate(request))
    if kind == "optim_step":
        result = state.optim_step(OptimStepRequest.model_validate(request))
        store.set_run(state.run.id, steps=state.steps)
        return result
    if kind == "sample":
        return state.sample(SampleRequest.model_validate(request))
    if kind == "loss_step":
        return state.loss_step(request)
    if kind == "sample_tokens":
        return state.sample_tokens(request)
    if kind == "save_state":
        result = state.save_state(Path(request["path"]))
        rel = Path(request["path"]).relative_to(state.settings.model_dir).as_posix()
        store.add_checkpoint(state.run.id, request["name"], rel, state.steps)
        if request.get("session"):
            prune_session_snapshots(state, store)
        return {**result, "path": rel, "name": request["name"]}
    if kind == "load_state":
        result = state.load_state(Path(request["path"]), request["with_optimizer"])
        store.set_run(state.run.id, steps=state.steps)
        return result
    raise JobError(f"unknown job kind '{kind}'")


def prune_session_snapshots(state: RunState, store: RunStore) -> None:
    """Keep a run's newest KEEP_SNAPSHOTS unnamed sampler snapshots (one per RL iteration would pile up).

    Jobs run in order, so every sample queued before this save has already used the older snapshots.
    """
    snapshots = [c for c in store.checkpoints(state.run.id) if c.name.startswith(f"{SAMPLER_DIR}/{EPHEMERAL}")]
    for old in snapshots[KEEP_SNAPSHOTS:]:
        shutil.rmtree(state.settings.model_dir / old.path, ignore_errors=True)
        store.delete_checkpoint(state.run.id, old.name)


def pause(state: RunState, store: RunStore, why: str) -> None:
    """Save the run's state and mark it paused; its next call restarts a worker from that state.

    Gradients accumulated but not yet applied are not part of a saved state, so they are dropped.
    """
    path = checkpoint_dir(state.settings, state.run.id, AUTOSAVE)
    state.save_state(path)
    store.add_checkpoint(state.run.id, AUTOSAVE, path.relative_to(state.settings.model_dir).as_posix(), state.steps)
    store.move_run(
        state.run.id,
        RunStatus.paused,
        (RunStatus.ready,),
        resume_from=str(path),
        resume_optimizer=1,
        pending_grads=0,
        pid=None,
    )
    log.info("run %s paused (%s); state saved to %s", state.run.id, why, path)


def serve(settings: Settings, run_id: str) -> int:
    """Load the run, then execute its jobs until it is deleted, stopped, or idle past the TTL."""
    store = cast(RunStore, Patient(RunStore(make_engine(settings.database_url)), STORE_OUTAGE_SECONDS))
    run = store.get_run(run_id)
    try:
        state = RunState(run, settings)
    except Exception as exc:  # noqa: BLE001 - a run that cannot load fails with the reason
        store.move_run(run_id, RunStatus.failed, (RunStatus.starting,), error=format_error(exc), pid=None)
        store.fail_unfinished(run_id, f"run failed to start: {type(exc).__name__}: {exc}")
        return 1
    device = f"{state.device} ({state.dtype})"
    if not store.move_run(run_id, RunStatus.ready, (RunStatus.starting,), device=device, pid=os.getpid()):
        return 0  # deleted while loading
    idle_since = time.monotonic()
    running: dict[str, Any] = {}  # claimed jobs not yet finished
    try:
        while True:
            jobs = store.claim_batch(run_id, SAMPLE_KINDS, MAX_SAMPLE_BATCH)
            if not jobs:
                if store.get_run(run_id).status != RunStatus.ready:
                    return 0  # deleted (or failed) by the server
                quiet = time.monotonic() - idle_since
                if quiet > settings.runs.idle_ttl_seconds:
                    state.close_engine()
                    pause(state, store, "idle")
                    return 0
                # Poll fast while a client is busy with the run, more slowly once it has been quiet a while.
                time.sleep(settings.runs.poll_interval if quiet < IDLE_BACKOFF_AFTER else IDLE_POLL)
                continue
            running = {job.id: job for job in jobs}
            if jobs[0].kind in SAMPLE_KINDS:
                linger_for_samples(store, run_id, jobs, running)
                run_samples(state, store, jobs, running)
            else:
                run_job(state, store, jobs[0])
            running = {}
            idle_since = time.monotonic()
    except Terminated:
        for job_id in running:
            store.finish_job(job_id, error="interrupted: the run's worker was stopped")
        state.close_engine()
        if store.get_run(run_id).status == RunStatus.ready:  # server shutdown: keep the state for later
            pause(state, store, "server stopped")
        return 0


def linger_for_samples(store: RunStore, run_id: str, jobs: list[Any], running: dict[str, Any]) -> None:
    """Add to a claimed batch the sampling jobs arriving right behind it (a client's burst of concurrent calls).

    A decode step costs about the same for 3 rows as for 64, so waiting a few ms for the rest of a burst beats
    running it as several engine calls. Stops as soon as a wait brings nothing new, or a non-sampling job is next.
    """
    for _ in range(SAMPLE_LINGER_ROUNDS):
        room = MAX_SAMPLE_BATCH - len(jobs)
        if room <= 0:
            break
        time.sleep(SAMPLE_LINGER_SECONDS)
        got = store.claim_batch(run_id, SAMPLE_KINDS, room, only_batchable=True)
        if not got:
            break
        jobs += got
        running.update((job.id, job) for job in got)  # so a stop now still answers them


def run_job(state: RunState, store: RunStore, job: Any) -> None:
    """Execute one job and record its result or error."""
    try:
        result = execute(state, store, job.kind, job.request)
        store.finish_job(job.id, result=result)
    except (JobError, ValueError) as exc:
        store.finish_job(job.id, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one failed job (e.g. out of memory) leaves the run usable
        state.optimizer.zero_grad(set_to_none=True)
        store.finish_job(job.id, error=format_error(exc))


def run_samples(state: RunState, store: RunStore, jobs: list[Any], running: dict[str, Any]) -> None:
    """Execute consecutive sampling jobs together (one engine call per weight snapshot); each gets its own answer."""
    started = time.perf_counter()
    planned: list[tuple[Any, SampleWork]] = []
    for job in jobs:
        try:
            if job.kind == "sample":
                work = state.plan_sample(SampleRequest.model_validate(job.request))
            else:
                work = state.plan_sample_tokens(job.request)
            planned.append((job, work))
        except (JobError, ValueError, KeyError, TypeError) as exc:
            store.finish_job(job.id, error=str(exc))
            running.pop(job.id, None)
    results = state.sample_batch([work for _, work in planned]) if planned else []
    for (job, _), result in zip(planned, results, strict=True):
        if isinstance(result, Exception):
            store.finish_job(job.id, error=str(result))
        else:
            store.finish_job(job.id, result=result)
        running.pop(job.id, None)
    rows = sum(len(w.prompts) * w.num_samples for _, w in planned)
    log.info(
        "sampled %d job(s), %d rows, in %.2f s (engine calls so far: %d, engine starts: %d)",
        len(jobs), rows, time.perf_counter() - started, state.engine_calls, state.engine_starts,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the settings the server passed, and serve the run."""
    parser = argparse.ArgumentParser(description="Serve one training run.")
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    return serve(start_worker_process(), args.run_id)  # SIGTERM unwinds to serve, which saves what should survive


if __name__ == "__main__":
    sys.exit(main())
