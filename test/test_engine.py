"""The continuous-batching engine on the tiny model: shared steps, per-request settings, cancel, logprobs, 429."""

import asyncio
import concurrent.futures
import threading

import httpx
import pytest
import torch

from conftest import TINY_NAME, start_server, stop_server
from service.engine import EngineConfig, SamplingParams
from service.models import ModelCache, render_chat

QUESTIONS = ["Say hello.", "Name a colour.", "Count to three, please.", "What is a dog?", "Why?", "Tell me a story."]


@pytest.fixture(scope="module")
def loaded(tiny_model_root):
    """The tiny model with a running engine (8 requests per step)."""
    cache = ModelCache(1, EngineConfig(max_running=8, max_waiting=8))
    model = cache.get(tiny_model_root / "base" / TINY_NAME)
    yield model
    cache.close()


def _prompt(loaded, text: str) -> list[int]:
    """Token ids of one user turn under the chat template."""
    rendered = render_chat(loaded.tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    return loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_concurrent_requests_share_decode_steps(loaded):
    engine = loaded.engine
    before = engine.counters()
    prompts = [_prompt(loaded, q) for q in QUESTIONS]
    done = engine.generate(prompts, [SamplingParams(max_tokens=16) for _ in prompts])
    after = engine.counters()
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = sum(len(d.token_ids) for d in done)
    assert after["generated_tokens"] - before["generated_tokens"] == tokens
    assert tokens >= 6 * 8
    assert steps <= tokens / 3, (steps, tokens)  # alone, each token would be a step of its own
    assert (after["running"], after["waiting"], after["in_flight"]) == (0, 0, 0)


def test_greedy_answers_equal_each_request_alone(loaded):
    engine = loaded.engine
    prompts = [_prompt(loaded, q) for q in QUESTIONS]
    together = engine.generate(prompts, [SamplingParams(max_tokens=12) for _ in prompts])
    for prompt, answer in zip(prompts, together, strict=True):
        alone = engine.generate([prompt], [SamplingParams(max_tokens=12)])[0]
        assert alone.token_ids == answer.token_ids  # equal tokens (fp32 on CPU: bit-equal in practice)
        assert alone.text == answer.text


def test_seeded_sampling_is_reproducible_alone_or_batched(loaded):
    engine = loaded.engine
    prompts = [_prompt(loaded, q) for q in QUESTIONS[:3]]
    params = [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7 + i) for i in range(3)]
    first = engine.generate(prompts, params)
    again = engine.generate(prompts, params)
    alone = engine.generate(prompts[1:2], params[1:2])[0]
    assert [d.token_ids for d in first] == [d.token_ids for d in again]
    assert alone.token_ids == first[1].token_ids
    other = engine.generate(prompts[1:2], [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99)])[0]
    assert other.token_ids != first[1].token_ids
    greedy = engine.generate(prompts[1:2], [SamplingParams(max_tokens=16)])[0]
    assert greedy.token_ids != first[1].token_ids  # sampling really samples


def test_stop_strings_and_max_tokens_per_request(loaded):
    engine = loaded.engine
    prompts = [_prompt(loaded, q) for q in QUESTIONS[:3]]
    reference = engine.generate([prompts[2]], [SamplingParams(max_tokens=20)])[0]
    words = reference.text.split()
    assert len(words) > 3, reference.text
    stop = words[len(words) // 2]
    params = [SamplingParams(max_tokens=5), SamplingParams(max_tokens=14), SamplingParams(max_tokens=20, stop=[stop])]
    short, longer, stopped = engine.generate(prompts, params)
    assert len(short.token_ids) == 5 and short.finish_reason == "length"
    assert len(longer.token_ids) == 14 and longer.finish_reason == "length"
    assert stopped.finish_reason == "stop"
    assert stopped.text == reference.text[: reference.text.find(stop)]
    assert stop not in stopped.text
    assert len(stopped.token_ids) < 20


def test_logprobs_match_a_teacher_forced_forward(loaded):
    engine = loaded.engine
    prompt = _prompt(loaded, QUESTIONS[0])
    for params in (SamplingParams(max_tokens=10, top_logprobs=3), SamplingParams(max_tokens=10, temperature=0.8)):
        done = engine.generate([prompt, _prompt(loaded, QUESTIONS[1])], [params, params])[0]
        ids = torch.tensor([prompt + done.token_ids])
        with torch.no_grad():
            logits = loaded.model(ids).logits[0].float()
        forced = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
        expected = forced.gather(1, torch.tensor(done.token_ids).unsqueeze(1)).squeeze(1)
        assert torch.allclose(torch.tensor(done.logprobs), expected, atol=1e-4)
        if params.top_logprobs:
            assert len(done.top_logprobs) == len(done.token_ids)
            for row, top in zip(forced, done.top_logprobs, strict=True):
                best = torch.topk(row, 3)
                assert [t for t, _ in top] == best.indices.tolist()
                assert torch.allclose(torch.tensor([v for _, v in top]), best.values, atol=1e-4)


def test_cancelling_one_stream_frees_its_slot_and_the_others_finish(loaded):
    engine = loaded.engine
    prompts = [_prompt(loaded, q) for q in QUESTIONS[:3]]

    async def scenario() -> tuple[list[int], dict[str, int]]:
        streams = [engine.open_stream(p, SamplingParams(max_tokens=40)) for p in prompts]
        await streams[0].__anext__()
        streams[0].close()  # the client went away after its first token

        async def drain(stream) -> int:
            return sum([len(d.token_ids) async for d in stream])

        counts = await asyncio.gather(*(drain(s) for s in streams[1:]))
        return counts, engine.counters()

    counts, state = asyncio.run(scenario())
    assert counts == [40, 40]
    assert (state["running"], state["in_flight"]) == (0, 0)


def test_adapters_in_one_batch_equal_each_alone(client, adapter_dir, settings):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    other = settings.model_dir / "outputs" / "lora-two"
    get_peft_model(AutoModelForCausalLM.from_pretrained(settings.base_model_path()), lora).save_pretrained(other)
    items = [
        {"model": str(path), "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 8}
        for path in (adapter_dir, other)
        for q in QUESTIONS[:2]
    ]
    body = client.post("/api/inference/batch", json={"requests": items}).json()
    answers = [x["result"]["content"] for x in body["results"]]
    alone = [client.post("/api/inference/chat", json=item).json()["content"] for item in items]
    assert answers == alone
    assert answers[:2] != answers[2:]  # the two adapters really differ


def test_waiting_queue_is_bounded_with_429_under_8_concurrent_requests(tmp_path, tiny_model_root):
    extra = {"inference": {"max_concurrent_generations": 2, "max_waiting": 2}}
    url, proc = start_server(tmp_path, tiny_model_root, extra)
    body = {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 900}
    gate = threading.Barrier(8)
    release = threading.Event()

    def one() -> tuple[int, str | None]:
        with httpx.Client(timeout=60) as http:
            gate.wait()
            with http.stream("POST", f"{url}/api/inference/chat/stream", json=body) as r:
                status, retry = r.status_code, r.headers.get("retry-after")
                if status == 200:
                    lines = r.iter_lines()  # keep a reference: a collected iterator closes the stream
                    next(lines)  # admitted and generating: hold the slot until all eight have answers
                    release.wait(30)
                else:
                    r.read()
                    assert r.json()["error"]["type"] == "overloaded"
                return status, retry

    try:
        httpx.post(f"{url}/api/inference/chat", json={**body, "max_tokens": 1}, timeout=60)  # load the model
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one) for _ in range(8)]
            for _ in range(200):
                if sum(f.done() for f in futures) >= 4:
                    break
                threading.Event().wait(0.05)
            state = httpx.get(f"{url}/health").json()["inference"]
            release.set()
            results = [f.result() for f in futures]
        assert sorted(s for s, _ in results) == [200] * 4 + [429] * 4, str((results, state))
        assert all(retry == "1" for s, retry in results if s == 429)
        assert state["rejected"] == 4
        assert state["running"] + state["waiting"] == 4
    finally:
        release.set()
        stop_server(proc)
