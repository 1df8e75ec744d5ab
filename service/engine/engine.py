"""One continuous-batching engine per loaded model, on transformers' ContinuousBatchingManager (paged KV cache).

The manager's thread owns the cache and the scheduler; every request joins the running batch at the next step with
its own sampling parameters, max_tokens and stop strings, and leaves it when it finishes, hits a stop string, or its
consumer goes away. Outputs are routed per request id straight from the manager's thread to each consumer.
"""

import asyncio
import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.engine import attention, buckets
from service.engine.lora import LoraRouter
from service.engine.sampling import TOP_LOGPROBS_MAX, EngineLogitsArgs, EngineSampler
from service.engine.text import TextAssembler
from util.errors import OverloadedError

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """How an engine batches: limits, cache size and the CUDA fast paths."""

    max_running: int = 64  # requests decoded together in one step
    max_waiting: int = 256  # requests admitted beyond max_running; more get 429 (unbounded for internal batches)
    max_batch_tokens: int | None = None  # tokens per step (prefill chunks + decodes); None = the library's choice
    num_blocks: int | None = None  # KV-cache pages; None = sized from free memory (GPU) or a small default (CPU)
    cuda_graphs: bool | None = None  # None = on with CUDA (7x faster per step with sdpa on an H100), off on CPU
    memory_fraction: float = 0.25  # of free GPU memory for the paged KV cache (training tasks share the GPU)
    graph_kv_padding: int | None = None  # smallest KV-read bucket of captured graphs (tokens); None = 4096
    attention: str | None = None  # "varlen" (PyTorch's flash varlen kernel) or "sdpa"; None = varlen on CUDA only
    retry_after_s: int = 1
    max_adapters: int = 8  # LoRA adapters resident on one model's engine (LRU beyond; see lora.py)

    @classmethod
    def from_settings(cls, inference: Any) -> "EngineConfig":
        """The engine settings of the `inference` config section."""
        return cls(
            max_running=inference.max_concurrent_generations,
            max_waiting=inference.max_waiting,
            max_batch_tokens=inference.max_batch_tokens,
            num_blocks=inference.kv_cache_blocks,
            cuda_graphs=inference.cuda_graphs,
            graph_kv_padding=inference.graph_kv_padding,
            memory_fraction=inference.kv_cache_memory,
            max_adapters=getattr(inference, "max_adapters", 8),
            attention=getattr(inference, "engine_attention", None),
        )


@dataclass
class SamplingParams:
    """One request's generation settings."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or below): no cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0
    adapter: str | None = None  # a LoRA adapter folder routed on this engine's base (lora.py); None = the base
    stop_token_ids: list[int] | None = None  # this request's end tokens; None = the engine's (the model's EOS)


@dataclass
class Delta:
    """What one engine step added to a request: text, tokens, their logprobs; finish_reason once it is over."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Completion:
    """A finished request."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str
    prompt_tokens: int
    first_token_s: float | None = None
    error: str | None = None


class _Direct:
    """Stands in for an event loop in the manager's output router: runs callbacks at once, in its thread."""

    @staticmethod
    def call_soon_threadsafe(fn: Callable[..., Any], *args: Any) -> None:
        """Call now."""
        fn(*args)


class _Tracker:
    """Turns one request's cumulative outputs into deltas: new tokens, text (stop strings applied), logprobs."""

    def __init__(self, engine: "Engine", rid: str, prompt_len: int, params: SamplingParams) -> None:
        """Start with nothing generated."""
        self.engine, self.rid, self.prompt_len, self.params = engine, rid, prompt_len, params
        eos = engine.eos_ids if params.stop_token_ids is None else set(params.stop_token_ids)
        self.asm = TextAssembler(engine.tokenizer, list(params.stop), eos)
        self.seen = 0
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.started = time.perf_counter()
        self.first_token_s: float | None = None

    def feed(self, out: Any) -> Delta:
        """Consume one GenerationOutput (cumulative) and return what is new."""
        if out.error:
            return Delta("", [], [], [], finish_reason="error", error=out.error)
        tokens = out.generated_tokens[self.seen :]
        lps = list(out.logprobs[self.seen :])
        self.seen = len(out.generated_tokens)
        if tokens and self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        before = len(self.asm.ids)
        text = self.asm.add(tokens)
        kept = len(self.asm.ids) - before  # tokens after a stop string are dropped
        tokens, lps = tokens[:kept], lps[:kept]
        tops = self.engine.take_top_logprobs(self.rid, kept) if self.params.top_logprobs else []
        self.logprobs += lps
        self.top += tops
        finish = None
        if self.asm.stopped_by:
            finish = "stop"
        elif out.is_finished():
            text += self.asm.finish()
            finish = self.asm.finish_reason
        return Delta(text, tokens, lps, tops, finish)

    def completion(self, text: str, finish: str, error: str | None = None) -> Completion:
        """The finished request."""
        return Completion(
            text, list(self.asm.ids), self.logprobs, self.top, finish, self.prompt_len, self.first_token_s, error
        )


class Engine:
    """Continuous batching for one model: add requests any time, stream or collect their tokens, cancel them."""

    _ids = itertools.count()

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int], config: EngineConfig) -> None:
        """Create (not yet start) the manager for a loaded model."""
        self.model, self.tokenizer, self.eos_ids, self.config = model, tokenizer, set(eos_ids), config
        self.stats: dict[str, int] = {"decode_steps": 0, "generated_tokens": 0, "requests": 0, "rejected": 0}
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._tops: dict[str, list[list[tuple[int, float]]]] = {}
        self.manager: Any = None
        self.sampler: EngineSampler | None = None
        self.lora = LoraRouter(model, config.max_adapters)  # adapters sharing this model's base weights
        self._original_attention: str | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Build the paged cache and the batch processor, hook in our sampler, warm up (CUDA graphs) and start."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        cfg = self.config
        on_cuda = self.model.device.type == "cuda"
        varlen = self._use_varlen_attention(on_cuda)
        cb = ContinuousBatchingConfig(
            max_requests_per_batch=cfg.max_running,
            max_batch_tokens=cfg.max_batch_tokens or (None if on_cuda else 256),
            num_blocks=cfg.num_blocks or (None if on_cuda else 64),
            page_size=256 if on_cuda else 32,
            return_logprobs=True,
            use_async_batching=False,  # the top-logprob buffers are read after each step
            use_cuda_graph=cfg.cuda_graphs if cfg.cuda_graphs is not None else (True if on_cuda else None),
            kv_padding_interval_size=0 if varlen else cfg.graph_kv_padding or 0,
            allow_block_sharing=True,
            max_memory_percent=cfg.memory_fraction if on_cuda else None,
        )
        gen = GenerationConfig(
            do_sample=False, max_new_tokens=256, eos_token_id=sorted(self.eos_ids) or -1, pad_token_id=0
        )
        self.manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        # Our per-request arguments replace the library's (global) logits processors.
        self.logits_args = EngineLogitsArgs()
        self.manager.logit_processor = self.logits_args
        self.manager.continuous_batching_config.return_logprobs = True
        self.manager.batch_processor = processor = self.manager._create_batch_processor()
        runner = processor.model_runner
        runner.logit_processor = self.logits_args
        processor.logit_processor = self.logits_args
        graphs = any(self.manager.continuous_batching_config.use_cuda_graph or ())
        self.sampler = EngineSampler(self.logits_args, processor.cache.max_batch_tokens + 1, self.model.device, graphs)
        runner._sample = self.sampler
        original_update = processor.update_batch

        def update_batch() -> None:
            self._after_step(processor)
            original_update()

        processor.update_batch = update_batch
        self.lora.attach(processor)
        if varlen and graphs:
            buckets.install(processor, min_kv=cfg.graph_kv_padding or buckets.MIN_KV, mode=self.logits_args.full_step)
            self.sampler.graphs_keyed_by_mode = True
        if on_cuda:
            started = time.perf_counter()
            self.manager.warmup()
            if varlen and graphs:
                buckets.warm_up(
                    processor, self.model, min_kv=cfg.graph_kv_padding or buckets.MIN_KV, set_mode=self._warm_mode
                )
            log.info("engine warm-up (CUDA graphs) took %.1f s", time.perf_counter() - started)
        # The manager's own start() makes a non-daemon thread, which would keep a finished worker process alive.
        self.manager.background_thread_status.clear()
        self.manager._generation_thread = threading.Thread(
            target=self.manager._run_generation_loop, name="engine", daemon=True
        )
        self.manager._generation_thread.start()

    def _warm_mode(self, full: bool) -> None:
        """Make the warm-up's steps capture the full (True) or greedy-only (False) sampler graphs."""
        self.logits_args.force_full = full
        self.logits_args.needs = dict.fromkeys(("sampling", "nucleus", "top"), full)

    def _use_varlen_attention(self, on_cuda: bool) -> bool:
        """Switch the model to the varlen paged attention where configured (default: on CUDA); False = keep SDPA."""
        full_only = attention.full_attention_only(self.model.config)
        auto = "varlen" if on_cuda and attention.available("cuda") and full_only else "sdpa"
        choice = self.config.attention or auto
        if choice not in ("varlen", "sdpa"):
            raise ValueError(f"unknown engine attention {choice!r}: use 'varlen' or 'sdpa'")
        if choice == "varlen" and not full_only:
            log.warning("varlen engine attention covers full-attention models only; this one has windows: SDPA")
            choice = "sdpa"
        if choice == "sdpa":
            return False
        attention.register()
        current = self.model.config._attn_implementation
        if current != attention.NAME:
            self._original_attention = current
            self.model.config._attn_implementation = attention.NAME
        return True

    def _ensure_running(self) -> None:
        """Restart the manager if a failed step stopped it (its requests were failed with the error)."""
        with self._lock:
            if self.manager is not None and self.manager.is_running():
                return
            if self.manager is not None:
                log.warning("the generation engine stopped after an error; starting a fresh one")
                self.manager = None
            self.start()

    def close(self) -> None:
        """Stop the manager thread (requests still running are failed)."""
        if self.manager is not None:
            try:
                self.manager.stop(block=True, timeout=10, hard_stop=True)
            except Exception:  # pragma: no cover - shutting down anyway
                log.exception("engine stop failed")
            self.manager = None
        if self._original_attention is not None:  # the model may be trained or used on its own again
            self.model.config._attn_implementation = self._original_attention
            self._original_attention = None

    def drain_and_close(self, timeout: float = 600.0) -> None:
        """Wait (up to `timeout` s) for the admitted requests to finish, then stop."""
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.2)
        self.close()

    def _after_step(self, processor: Any) -> None:
        """Count the step and its tokens; keep top logprobs of the requests that asked for them (manager thread)."""
        io = processor.inputs_and_outputs
        rows = [fs.state for fs in io.requests_in_batch if fs.has_new_token]
        self.stats["decode_steps"] += 1
        self.stats["generated_tokens"] += len(rows)
        wanted = [(i, s) for i, s in enumerate(rows) if s.logit_processor_kwargs.get("top_logprobs", 0) > 0]
        if not wanted or self.sampler is None:
            return
        n = len(rows)
        ids, values = self.sampler.top_ids[:n].tolist(), self.sampler.top_values[:n].tolist()
        for i, state in wanted:
            k = state.logit_processor_kwargs["top_logprobs"]
            self._tops.setdefault(state.request_id, []).append(list(zip(ids[i][:k], values[i][:k], strict=True)))

    def take_top_logprobs(self, rid: str, count: int) -> list[list[tuple[int, float]]]:
        """Pop the top logprobs of a request's next `count` tokens."""
        with self._lock:
            got = self._tops.get(rid, [])
            taken, self._tops[rid] = got[:count], got[count:]
        return taken

    # -- requests ----------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Decode steps, generated tokens, and requests running and waiting (for /health)."""
        running = waiting = 0
        processor = self.manager.batch_processor if self.manager is not None else None
        if processor is not None:
            running = len(processor.scheduler.active_requests)
            waiting = len(processor.scheduler.waiting_requests) + self.manager.input_queue.qsize()
        counts = {**self.stats, **self.lora.stats, "adapters": len(self.lora.loaded())}
        return {**counts, "running": running, "waiting": waiting, "in_flight": len(self._inflight)}

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Any], None], bounded: bool = True
    ) -> str:
        """Add a request whose outputs go to `sink` (called in the manager thread); 429 beyond the waiting bound."""
        self._ensure_running()
        limit = self.config.max_running + self.config.max_waiting
        rid = f"r{next(self._ids)}"
        self.lora.bind(rid, params.adapter)
        with self._lock:
            if bounded and len(self._inflight) >= limit:
                self.lora.unbind(rid)
                self.stats["rejected"] += 1
                raise OverloadedError(
                    f"The server is at capacity ({self.config.max_running} running, {self.config.max_waiting} "
                    "waiting); retry shortly.",
                    retry_after=self.config.retry_after_s,
                )
            self._inflight.add(rid)
            self.stats["requests"] += 1
        kwargs: dict[str, Any] = {
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "top_k": max(0, int(params.top_k)),
            # An unseeded request gets a fresh random seed: sampling stays per-request either way.
            "seed": int(params.seed if params.seed is not None else random.getrandbits(31)),
        }
        if params.top_logprobs:
            kwargs["top_logprobs"] = min(int(params.top_logprobs), TOP_LOGPROBS_MAX)
        router = self.manager.output_router
        with router._lock:
            router.result_handlers[rid] = (sink, _Direct)
        eos = self.eos_ids if params.stop_token_ids is None else set(params.stop_token_ids)
        self.manager.add_request(
            list(prompt_ids),
            request_id=rid,
            max_new_tokens=params.max_tokens,
            streaming=True,
            eos_token_id=sorted(eos) or -1,
            **kwargs,
        )
        return rid

    def release(self, rid: str, cancel: bool) -> None:
        """Forget a request; cancel it in the manager if it may still be running."""
        with self._lock:
            self._inflight.discard(rid)
            self._tops.pop(rid, None)
        self.lora.unbind(rid)
        if self.manager is not None:
            router = self.manager.output_router
            with router._lock:
                router.result_handlers.pop(rid, None)
            if cancel:
                self.manager.cancel_request(rid)

    def open_stream(self, prompt_ids: list[int], params: SamplingParams, bounded: bool = True) -> "RequestStream":
        """Admit one request now (429 beyond the bound) and return the async iterator of its deltas."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        rid = self.submit(prompt_ids, params, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out), bounded)
        return RequestStream(self, rid, outputs, _Tracker(self, rid, len(prompt_ids), params))

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Blocking (call from a worker thread): run all prompts through the running batch, answers in order."""
        outputs: queue.Queue[tuple[int, Any]] = queue.Queue()
        rids: list[str] = []
        trackers: list[_Tracker] = []
        results: dict[int, Completion] = {}
        texts: dict[int, str] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                rid = self.submit(prompt, p, lambda out, i=i: outputs.put((i, out)), bounded=False)
                rids.append(rid)
                trackers.append(_Tracker(self, rid, len(prompt), p))
            while len(results) < len(prompts):
                try:
                    i, out = outputs.get(timeout=1.0)
                except queue.Empty:
                    if self.manager is None or not self.manager.is_running():
                        raise RuntimeError("The generation engine stopped.") from None
                    continue
                if i in results:
                    continue
                delta = trackers[i].feed(out)
                texts[i] = texts.get(i, "") + delta.text
                if delta.finish_reason is not None:
                    results[i] = trackers[i].completion(texts[i], delta.finish_reason, delta.error)
                    self.release(rids[i], cancel=delta.finish_reason == "stop" and not out.is_finished())
        finally:
            for i, rid in enumerate(rids):
                if i not in results:
                    self.release(rid, cancel=True)
        return [results[i] for i in range(len(prompts))]


class RequestStream:
    """The deltas of one admitted request; closing it early (client gone) cancels the request in the engine."""

    def __init__(self, engine: Engine, rid: str, outputs: "asyncio.Queue[Any]", tracker: _Tracker) -> None:
        """Follow request `rid`, whose outputs arrive on `outputs`."""
        self.engine, self.rid, self.outputs, self.tracker = engine, rid, outputs, tracker
        self.done = False

    def __aiter__(self) -> "RequestStream":
        """Iterate over deltas."""
        return self

    async def __anext__(self) -> Delta:
        """The next step's delta; StopAsyncIteration after the final one."""
        if self.done:
            raise StopAsyncIteration
        try:
            out = await self.outputs.get()
        except BaseException:
            self.close()
            raise
        while not self.outputs.empty():  # outputs are cumulative: the latest covers those queued before it
            out = self.outputs.get_nowait()
        delta = self.tracker.feed(out)
        if delta.finish_reason is not None:
            # A stop string ends the answer before the engine knows: cancel the rest of its generation.
            self._release(cancel=not out.is_finished() and not out.error)
        return delta

    def _release(self, cancel: bool) -> None:
        """Leave the engine (once)."""
        if not self.done:
            self.done = True
            self.engine.release(self.rid, cancel)

    def close(self) -> None:
        """Stop following the request and cancel it if it still runs."""
        self._release(cancel=True)

    async def aclose(self) -> None:
        """Async close, for `contextlib.aclosing` and async-generator style callers."""
        self.close()

    def __del__(self) -> None:
        """A stream dropped without being read to the end still frees its slot."""
        self.close()
