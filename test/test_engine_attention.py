"""The engine's varlen paged attention and its graph buckets (CPU: the per-request reference of the CUDA kernel)."""

import pytest
import torch

from conftest import TINY_NAME
from service.engine import EngineConfig, SamplingParams, attention, buckets
from service.engine.sampling import EngineLogitsArgs, EngineSampler, _f32_bits
from service.models import ModelCache, render_chat

QUESTIONS = ["Say hello.", "Name a colour.", "Count to three, please.", "What is a dog?", "Tell me a long story."]


def test_reference_is_bottom_right_causal_per_sequence():
    torch.manual_seed(0)
    lens_q, lens_k = [3, 1, 0, 4], [5, 6, 0, 4]  # new tokens at the end of each request's keys; one empty (padding)
    heads, kv_heads, dim = 4, 2, 8
    q = torch.randn(sum(lens_q), heads, dim)
    k, v = (torch.randn(sum(lens_k), kv_heads, dim) for _ in range(2))
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    out = attention.varlen_attention(q, k, v, cu(lens_q), cu(lens_k), dim**-0.5)
    # Dense check, one query at a time: query j of a request sees its keys up to past + j.
    qs, ks = 0, 0
    for nq, nk in zip(lens_q, lens_k, strict=True):
        for j in range(nq):
            seen = nk - nq + j + 1
            kk = k[ks : ks + seen].repeat_interleave(heads // kv_heads, dim=1)
            vv = v[ks : ks + seen].repeat_interleave(heads // kv_heads, dim=1)
            weights = torch.softmax(torch.einsum("hd,khd->hk", q[qs + j], kk) * dim**-0.5, dim=-1)
            torch.testing.assert_close(out[qs + j], torch.einsum("hk,khd->hd", weights, vv))
        qs, ks = qs + nq, ks + nk


def test_buckets_are_powers_of_two_within_limits():
    assert buckets.pow2_at_least(1, 64, 8192) == 64
    assert buckets.pow2_at_least(65, 64, 8192) == 128
    assert buckets.pow2_at_least(9000, 64, 8192) == 8192
    assert buckets.pow2_at_least(5000, 4096, 6000) == 6000  # capped at what the cache can hold
    assert buckets.buckets(64, 512) == [64, 128, 256, 512]
    assert buckets.buckets(4096, 6000) == [4096, 6000]
    # Every padded size is one of the buckets, so warm-up captures every graph a step can use.
    for value in range(1, 600):
        assert buckets.pow2_at_least(value, 64, 512) in buckets.buckets(64, 512)


def _prompt(loaded, text: str) -> list[int]:
    """Token ids of one user turn under the chat template."""
    rendered = render_chat(loaded.tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    return loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def two_engines(tiny_model_root):
    """The tiny model twice: one engine on the library's SDPA path, one on the varlen path; small steps (chunked)."""
    caches = []
    for choice in ("sdpa", "varlen"):
        config = EngineConfig(max_running=8, max_waiting=8, max_batch_tokens=24, attention=choice)
        caches.append(ModelCache(1, config))
    loaded = [c.get(tiny_model_root / "base" / TINY_NAME) for c in caches]
    yield loaded
    for c in caches:
        c.close()


def test_varlen_engine_answers_equal_the_sdpa_engine(two_engines, monkeypatch):
    sdpa, varlen = two_engines
    calls = []
    reference = attention.varlen_reference
    monkeypatch.setattr(attention, "varlen_reference", lambda *a: calls.append(1) or reference(*a))
    assert varlen.model.config._attn_implementation == attention.NAME
    assert sdpa.model.config._attn_implementation != attention.NAME
    prompts = [_prompt(sdpa, q) for q in QUESTIONS]
    assert max(len(p) for p in prompts) > 24  # prompts are prefilled in chunks: queries attend to cached keys too
    params = [SamplingParams(max_tokens=12, top_logprobs=2) for _ in prompts]
    want = sdpa.engine.generate(prompts, params)
    got = varlen.engine.generate(prompts, params)
    for a, b in zip(want, got, strict=True):
        assert b.token_ids == a.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=1e-4)
    assert len(calls) >= 12 * 2  # every step, every layer of the varlen engine ran the varlen function
    alone = varlen.engine.generate(prompts[:1], params[:1])[0]
    assert alone.token_ids == got[0].token_ids


def test_padded_bucketed_steps_give_the_same_answers(two_engines):
    """The step shapes CUDA graphs use (padding tokens, empty padding requests, trash KV reads), forced on CPU."""
    sdpa, varlen = two_engines
    processor = varlen.engine.manager.batch_processor
    processor.model_runner.pad_inputs = True
    buckets.install(processor, min_q=4, min_kv=16)
    try:
        prompts = [_prompt(sdpa, q) for q in QUESTIONS]
        params = [SamplingParams(max_tokens=10) for _ in prompts]
        want = sdpa.engine.generate(prompts, params)
        got = varlen.engine.generate(prompts, params)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        keys = set(processor.inputs_and_outputs.graphs._storage)  # no graphs on CPU: check the padded sizes instead
        assert not keys
        pad = processor.model_runner.maybe_pad_inputs
        assert pad(5, 0, False) == (8, 0) and pad(3, 17, False) == (4, 32) and pad(30, 3, False) == (24, 16)
        # The start-up warm-up runs every bucket's step (here eagerly: CPU has no graphs), then frees the cache.
        free = processor.cache.pool.num_free_sectors
        modes = []
        buckets.warm_up(processor, varlen.model, min_q=4, min_kv=16, kv_max=64, set_mode=modes.append)
        assert modes == [False, True, False]
        assert processor.cache.pool.num_free_sectors == processor.cache.num_sectors >= free  # all given back
        assert varlen.engine.generate(prompts[:2], params[:2])[1].token_ids == want[1].token_ids
    finally:
        processor.model_runner.pad_inputs = False


def test_closing_the_engine_restores_the_models_attention(two_engines):
    varlen = two_engines[1]
    engine = varlen.engine
    engine.close()
    assert varlen.model.config._attn_implementation != attention.NAME
    engine.start()  # the module fixture's cache closes it again at the end
    assert varlen.model.config._attn_implementation == attention.NAME


def test_greedy_only_sampler_graph_gives_the_full_graphs_greedy_answer():
    """With graphs keyed by mode, an all-greedy step skips the sort and noise; its tokens and logprobs are the same."""
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 50)
    args = EngineLogitsArgs()
    storage = torch.zeros((5, 8), dtype=torch.int32)
    args.fill_defaults(storage[:, :1])
    storage[:] = storage[:, :1]
    storage[0] = _f32_bits([0.0] * 8)  # temperature 0 everywhere: greedy rows
    args.current_args = storage
    outputs = []
    for full in (True, False):
        sampler = EngineSampler(args, 8, torch.device("cpu"), graphs=True)
        sampler.graphs_keyed_by_mode = True
        args.force_full, args.needs = full, dict.fromkeys(("sampling", "nucleus", "top"), False)
        assert args.full_step() is full
        out = torch.zeros((2, 8), dtype=torch.int32)
        sampler(logits, out)
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])
    assert outputs[0][0, :6].tolist() == logits[0].argmax(-1).tolist()
    args.force_full = False


def test_sliding_window_models_keep_sdpa():
    from transformers import MistralConfig, Qwen2Config

    assert attention.full_attention_only(Qwen2Config(num_hidden_layers=2))
    assert not attention.full_attention_only(MistralConfig(num_hidden_layers=2, sliding_window=4096))
