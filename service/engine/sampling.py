"""Per-request sampling inside transformers' continuous-batching step: temperature, top_p, top_k, seed, logprobs.

The library samples every row of a batch the same way from one global RNG. We hook in at its two extension points
instead of falling back to one generate() per request:
- `EngineLogitsArgs` (a `ContinuousBatchingLogitsProcessorList`) writes each row's parameters into the step's
  static argument tensor and leaves the logits untouched;
- `engine_sample` replaces the model runner's sampling step: it reads those rows and samples each token by the
  Gumbel-max trick with noise hashed from (request seed, position, token id). A seeded answer is therefore the same
  alone or in any batch, and everything stays tensor ops (CUDA-graph friendly, no per-row Python).
Logprobs are of the model's raw distribution (log_softmax of the logits), as a teacher-forced forward gives them.
"""

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList
from transformers.generation.logits_process import LogitsProcessorList

# Rows of the argument tensor: temperature (f32 bits), top_p (f32 bits), seed, position, top_k (int32; 0 = off).
ARG_ROWS = 5
TOP_LOGPROBS_MAX = 20  # OpenAI's limit for top_logprobs

_MASK31 = (1 << 31) - 1


def _f32_bits(values: list[float]) -> torch.Tensor:
    """Floats as their int32 bit pattern (the argument tensor is int32)."""
    return torch.tensor(values, dtype=torch.float32).view(torch.int32)


class EngineLogitsArgs(ContinuousBatchingLogitsProcessorList):
    """Fills the per-row sampling arguments of each step; the logits themselves pass through unchanged."""

    def __init__(self) -> None:
        """No classic processors: all per-request work happens in `engine_sample`."""
        super().__init__(LogitsProcessorList(), per_request_processors=False)
        self.tensors_required = ARG_ROWS
        self.needs = {"sampling": True, "nucleus": True, "top": True}
        self.force_full = False  # warm-up: capture the full sampler whatever the step's rows ask
        self.supported_keys = {"temperature": float, "top_p": float, "seed": int, "top_logprobs": int, "top_k": int}
        self.ignored_keys = set()
        self.do_processing = True

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        """Greedy, no nucleus cut, seed 0, position 0."""
        int32_tensor.zero_()
        int32_tensor[1].copy_(_f32_bits([1.0]).to(int32_tensor.device))

    def prepare_tensor_args(self, requests_in_batch: list[Any], arg_storage: torch.Tensor) -> torch.Tensor:
        """Write one column per request that gets a new token this step, in the order of the logits rows."""
        rows = [r.state for r in requests_in_batch if r.has_new_token]
        if not rows:
            return arg_storage
        kw = [s.logit_processor_kwargs for s in rows]
        n = len(rows)
        # What this step needs; the sampler skips the rest where it may branch (no CUDA graph being replayed).
        self.needs = {
            "sampling": any(float(k.get("temperature", 0.0)) > 0 for k in kw),
            "nucleus": any(float(k.get("top_p", 1.0)) < 1 or int(k.get("top_k", 0)) > 0 for k in kw),
            "top": any(int(k.get("top_logprobs", 0)) > 0 for k in kw),
        }
        arg_storage[0, :n] = _f32_bits([float(k.get("temperature", 0.0)) for k in kw]).to(arg_storage.device)
        arg_storage[1, :n] = _f32_bits([float(k.get("top_p", 1.0)) for k in kw]).to(arg_storage.device)
        # position_offset already counts this step's tokens, so it names the position of the token being sampled.
        cols = [[int(k.get("seed", 0)) & _MASK31 for k in kw], [s.position_offset & _MASK31 for s in rows]]
        cols.append([max(0, int(k.get("top_k", 0))) for k in kw])
        arg_storage[2:5, :n] = torch.tensor(cols, dtype=torch.int32).to(arg_storage.device)
        return arg_storage

    def full_step(self) -> bool:
        """Whether this step needs more than greedy argmax and raw logprobs (sampling, top_p/top_k, top logprobs)."""
        return self.force_full or any(self.needs.values())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, logits_processor_args: torch.Tensor) -> Any:
        """Keep the step's arguments for the sampler; return the raw scores."""
        self.current_args = logits_processor_args
        return scores


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64's finaliser) with logical shifts on torch's signed int64."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape [rows, vocab], a pure function of (seed, position, token id)."""
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    key = _mix(seed.to(torch.int64) * 1_000_003 + position.to(torch.int64))
    bits = _mix(key.unsqueeze(1) * 0x9E3779B9 + ids.unsqueeze(0))
    u = (((bits >> 40) & ((1 << 24) - 1)).to(torch.float32) + 0.5) / float(1 << 24)  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


def sample_rows(
    logits: torch.Tensor, args: torch.Tensor, sampling: bool = True, nucleus: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next token, its raw logprob and the raw log-softmax of each row of `logits` [rows, vocab].

    `sampling=False` / `nucleus=False` skip work no row needs (only where the step is not a replayed CUDA graph).
    """
    n = logits.shape[0]
    temperature = args[0, :n].view(torch.float32)
    top_p = args[1, :n].view(torch.float32)
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    if sampling:
        greedy = temperature <= 0
        scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
        if nucleus:
            # Keep the smallest set of most likely tokens whose probability reaches top_p (the first always stays),
            # and at most top_k of them where a row sets top_k.
            sorted_scores, order = torch.sort(scaled, dim=-1, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
            top_k = args[4, :n].unsqueeze(1)
            rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
            drop_sorted = drop_sorted | ((top_k > 0) & (rank >= top_k))
            scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
        noisy = scaled + gumbel_noise(args[2, :n], args[3, :n], logits.shape[1])
        tokens = torch.where(greedy, tokens, noisy.argmax(dim=-1))
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1), logprobs


class EngineSampler:
    """Replaces a ModelRunner's `_sample`: per-row sampling, raw logprobs, and the top logprobs of each row."""

    def __init__(self, logits_args: EngineLogitsArgs, max_rows: int, device: torch.device, graphs: bool) -> None:
        """Allocate static buffers for the top logprobs of up to `max_rows` rows; `graphs`: steps are replayed."""
        self.logits_args = logits_args
        self.graphs = graphs
        self.graphs_keyed_by_mode = False  # True: greedy and full steps replay graphs of their own (see buckets.py)
        self.top_ids = torch.zeros((max_rows, TOP_LOGPROBS_MAX), dtype=torch.int64, device=device)
        self.top_values = torch.zeros((max_rows, TOP_LOGPROBS_MAX), dtype=torch.float32, device=device)

    def __call__(self, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        """Sample from `scores` [1, rows, vocab] into output_ids[0] (tokens) and output_ids[1] (logprob bits)."""
        logits = scores[0]
        if not self.graphs:
            needs = self.logits_args.needs
        else:  # a replayed graph cannot branch: either everything, or (in its own graph) greedy alone
            full = self.logits_args.full_step() or not self.graphs_keyed_by_mode
            needs = dict.fromkeys(("sampling", "nucleus", "top"), full)
        tokens, chosen, logprobs = sample_rows(
            logits, self.logits_args.current_args, needs["sampling"], needs["nucleus"]
        )
        n = tokens.shape[0]
        if needs["top"]:
            values, ids = torch.topk(logprobs, min(TOP_LOGPROBS_MAX, logprobs.shape[1]), dim=-1)
            self.top_values[:n, : values.shape[1]].copy_(values)
            self.top_ids[:n, : ids.shape[1]].copy_(ids)
        output_ids[0, :n].copy_(tokens)
        output_ids[1, :n].copy_(chosen.view(torch.int32))
