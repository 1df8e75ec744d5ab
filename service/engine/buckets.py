"""CUDA-graph shape buckets for the varlen attention path, all captured when the engine starts.

The library pads each step's query tokens to a fixed interval and its KV reads to a 16k interval, and keys its
graphs on (query tokens, KV read, max key length per request): new keys appear while serving and each costs a
capture in the middle of a request. With `service.engine.attention` the kernel reads its lengths from the padded
shapes alone, so the max key length can leave the key, and both remaining sizes are padded to powers of two: a few
dozen graphs cover every step, and `warm_up` captures them before the first request.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

MIN_Q = 64  # smallest query bucket: below it the step costs the same (weights dominate), so fewer graphs
MIN_KV = 4096  # smallest non-zero KV-read bucket (tokens gathered from the paged cache per layer)
WARM_KV_MAX = 131072  # largest KV-read bucket captured at start (256 requests of 512 tokens); larger ones on demand


def pow2_at_least(value: int, floor: int, cap: int) -> int:
    """The smallest power of two >= max(value, floor), capped at `cap`."""
    size = max(1, floor)
    while size < value:
        size *= 2
    return max(min(size, cap), min(value, cap))


def buckets(floor: int, cap: int) -> list[int]:
    """Every bucket size pow2_at_least can return for values in [1, cap]."""
    sizes, size = [], max(1, floor)
    while size < cap:
        sizes.append(size)
        size *= 2
    return [*sizes, cap]


def install(processor: Any, min_q: int = MIN_Q, min_kv: int = MIN_KV, mode: Callable[[], bool] | None = None) -> None:
    """Pad steps to power-of-two (query, KV read) buckets and key the step's graphs on those sizes (and `mode()`).

    `mode`, where given, tells steps whose sampler graphs differ apart (the engine's greedy-only vs full sampling).
    """
    runner, cache, io = processor.model_runner, processor.cache, processor.inputs_and_outputs
    max_q, max_kv = cache.max_batch_tokens, cache.max_tokens_read

    def maybe_pad_inputs(num_q_tokens: int, max_kv_read: int, use_decode_fast_path: bool) -> tuple[int, int]:
        """Power-of-two buckets; a step that reads no cache stays at 0 (the cache's write-only path)."""
        if not runner.pad_inputs:
            return num_q_tokens, max_kv_read
        kv = 0 if max_kv_read == 0 else pow2_at_least(max_kv_read, min_kv, max_kv)
        return pow2_at_least(num_q_tokens, min_q, max_q), kv

    def graph_key() -> tuple[int, ...]:
        """The padded sizes: everything else a graph depends on is read from tensors at replay."""
        return (io.num_q_tokens, io.max_kv_read, int(mode()) if mode is not None else 0)

    runner.maybe_pad_inputs = maybe_pad_inputs
    io._get_graph_key = graph_key


def warm_up(
    processor: Any,
    model: Any,
    min_q: int = MIN_Q,
    min_kv: int = MIN_KV,
    kv_max: int = WARM_KV_MAX,
    set_mode: Callable[[bool], None] | None = None,
) -> int:
    """Capture the graph of every (query, KV read) bucket up to `kv_max` cached tokens; returns the graph count.

    With `set_mode`, each bucket is captured twice, after set_mode(False) and set_mode(True); it ends on False.
    """
    runner, cache = processor.model_runner, processor.cache
    started = time.perf_counter()
    q_sizes = buckets(min_q, cache.max_batch_tokens)
    kv_sizes = [0, *buckets(min_kv, min(kv_max, cache.max_tokens_read))]
    modes = [False, True] if set_mode is not None else [False]
    with torch.no_grad():  # as the library's own warm-up: captured steps must not record autograd state
        for full in modes:
            if set_mode is not None:
                set_mode(full)
            for q in q_sizes:
                for kv in kv_sizes:
                    runner.run_one_warmup(model=model, num_q_tokens=q, max_kv_read=kv)
    if set_mode is not None:
        set_mode(False)
    cache.reset()  # warm-up requests pulled sectors into the allocators: give them back
    count = len(processor.inputs_and_outputs.graphs._storage)
    wanted = len(modes) * len(q_sizes) * len(kv_sizes)
    if runner.use_cuda_graph_varlen and count < wanted:  # the library logs each failure
        log.warning("only %d of %d step graphs captured at start: the rest are captured while serving", count, wanted)
    log.info("%d step graphs (%d query x %d KV buckets) after %.1f s of warm-up", count, len(q_sizes), len(kv_sizes),
             time.perf_counter() - started)  # fmt: skip
    return count
