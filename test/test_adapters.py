"""LoRA adapters routed per token on one copy of the base weights (service/engine/lora.py), on the tiny model."""

import concurrent.futures
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import TINY_NAME
from service.engine import EngineConfig, SamplingParams
from service.models import ModelCache, render_chat
from util.errors import InvalidInputError, OverloadedError

# Long enough (with the chat template) to fill whole KV pages, so prefix sharing would kick in between requests.
LONG = "Please answer briefly and clearly, thinking about every word you use in the answer. " * 2
QUESTIONS = [LONG + "Say hello.", LONG + "Name a colour.", "Why?"]


def _make_adapter(out: Path, base: Path, seed: int, **lora: object) -> Path:
    """Save a random (non-zero B) LoRA adapter of the tiny base."""
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora)  # type: ignore[arg-type]
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_path(tiny_model_root: Path) -> Path:
    """The tiny base model folder."""
    return tiny_model_root / "base" / TINY_NAME


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, base_path: Path) -> list[Path]:
    """Four adapters that differ in rank, alpha and target modules."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        _make_adapter(root / "a", base_path, 1, r=4, target_modules="all-linear"),
        _make_adapter(root / "b", base_path, 2, r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"]),
        _make_adapter(root / "c", base_path, 3, r=2, lora_alpha=4, use_rslora=True, target_modules=["o_proj"]),
        _make_adapter(root / "d", base_path, 4, r=6, target_modules=["gate_proj", "up_proj", "k_proj"]),
    ]


def _prompt(tokenizer, text: str) -> list[int]:
    """Token ids of one user turn under the chat template."""
    rendered = render_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_base_and_two_adapters_in_one_batch_equal_each_alone_and_the_merged_copy(base_path, adapters):
    cache = ModelCache(2, EngineConfig(max_running=16, max_waiting=16))
    merged_cache = ModelCache(1, EngineConfig(max_running=4, max_waiting=4), share_adapters=False)
    try:
        base = cache.get(base_path)
        views = [cache.get(path) for path in adapters[:2]]
        for view in views:  # one copy of the weights, one engine
            assert view.model is base.model and view.engine is base.engine and view.adapter is not None
        assert cache.loads == 1
        engine = base.engine
        prompts = [_prompt(base.tokenizer, q) for q in QUESTIONS]
        assert len(prompts[0]) > 64  # two KV pages on CPU: a shared prefix would be reused if allowed
        routes = [None, str(adapters[0]), str(adapters[1])]
        rows = [(p, a) for a in routes for p in prompts]
        before = engine.counters()
        together = engine.generate([p for p, _ in rows], [SamplingParams(max_tokens=10, adapter=a) for _, a in rows])
        after = engine.counters()
        tokens = sum(len(d.token_ids) for d in together)
        assert after["decode_steps"] - before["decode_steps"] <= tokens / 3  # they shared steps
        assert after["mixed_steps"] > before["mixed_steps"]  # steps held base and adapter tokens together
        for (prompt, adapter), answer in zip(rows, together, strict=True):
            alone = engine.generate([prompt], [SamplingParams(max_tokens=10, adapter=adapter)])[0]
            assert alone.token_ids == answer.token_ids, adapter
        by_route = [[d.token_ids for d in together[i * 3 : i * 3 + 3]] for i in range(3)]
        assert by_route[0] != by_route[1] and by_route[0] != by_route[2] and by_route[1] != by_route[2]
        # The old path: each adapter merged into its own copy of the base.
        for i, path in enumerate(adapters[:2]):
            merged = merged_cache.get(path)
            assert merged.adapter is None and merged.model is not base.model
            done = merged.engine.generate(prompts, [SamplingParams(max_tokens=10) for _ in prompts])
            assert [d.token_ids for d in done] == by_route[i + 1]
            merged_cache.close()
        assert engine.counters()["in_flight"] == 0
    finally:
        cache.close()
        merged_cache.close()


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind some tensors."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def test_memory_of_base_plus_three_adapters_is_base_plus_their_lora_weights(base_path, adapters):
    from service.engine.lora import read_adapter

    cache = ModelCache(1, EngineConfig(max_running=4, max_waiting=4))
    try:
        base = cache.get(base_path)
        params = list(base.model.parameters()) + list(base.model.buffers())
        base_bytes = _unique_bytes(params)
        sizes = [read_adapter(path, base.model).nbytes for path in adapters[:3]]
        for path in adapters[:3]:
            assert cache.get(path).model is base.model
        assert cache.loads == 1 and len(base.engine.lora.loaded()) == 3
        total = _unique_bytes(params + base.engine.lora.tensors())
        lora_bytes = total - base_bytes
        assert sum(sizes) <= lora_bytes <= 1.2 * sum(sizes) + 4096  # + the int32 column owners
        assert total < 1.1 * base_bytes < 2 * base_bytes
    finally:
        cache.close()


def test_lru_eviction_is_bounded_and_an_evicted_adapter_reloads_with_the_same_answers(base_path, adapters):
    cache = ModelCache(1, EngineConfig(max_running=4, max_waiting=4, max_adapters=2))
    try:
        base = cache.get(base_path)
        prompt = _prompt(base.tokenizer, QUESTIONS[0])
        first = {}
        for path in adapters:
            view = cache.get(path)
            first[path] = view.engine.generate([prompt], [SamplingParams(max_tokens=8, adapter=view.adapter)])[0]
            assert len(base.engine.lora.loaded()) <= 2
        assert base.engine.lora.loaded() == [str(adapters[2]), str(adapters[3])]
        assert base.engine.counters()["adapter_evictions"] == 2
        for path in adapters[:2]:  # evicted: reloaded into the freed columns
            view = cache.get(path)
            again = view.engine.generate([prompt], [SamplingParams(max_tokens=8, adapter=view.adapter)])[0]
            assert again.token_ids == first[path].token_ids
        assert len(base.engine.lora.loaded()) == 2
    finally:
        cache.close()


def test_a_new_adapter_while_every_slot_is_busy_is_429_then_loads_once_one_is_free(base_path, adapters):
    cache = ModelCache(1, EngineConfig(max_running=4, max_waiting=4, max_adapters=1))
    try:
        base = cache.get(base_path)
        engine = base.engine
        prompt = _prompt(base.tokenizer, "Hello")
        busy = engine.submit(prompt, SamplingParams(max_tokens=900, adapter=str(adapters[0])), lambda out: None)
        with pytest.raises(OverloadedError, match="max_adapters"):
            engine.generate([prompt], [SamplingParams(max_tokens=2, adapter=str(adapters[1]))])
        assert engine.lora.loaded() == [str(adapters[0])] and engine.counters()["in_flight"] == 1
        engine.release(busy, cancel=True)
        done = engine.generate([prompt], [SamplingParams(max_tokens=2, adapter=str(adapters[1]))])
        assert len(done[0].token_ids) == 2 and engine.lora.loaded() == [str(adapters[1])]
    finally:
        cache.close()


def test_adapters_it_cannot_route_are_served_merged_and_a_misfit_is_422(base_path, adapters, tmp_path):
    dora = _make_adapter(tmp_path / "dora", base_path, 5, r=4, target_modules=["q_proj"], use_dora=True)
    cache = ModelCache(2, EngineConfig(max_running=4, max_waiting=4))
    try:
        base = cache.get(base_path)
        served = cache.get(dora)
        assert served.adapter is None and served.model is not base.model  # merged, on its own engine
        assert cache.get(dora) is served and cache.loads == 2
        # An adapter whose shapes do not fit the base it names.
        other = tmp_path / "other-base"
        config = AutoModelForCausalLM.from_pretrained(str(base_path)).config
        config.hidden_size, config.intermediate_size = 32, 64
        AutoModelForCausalLM.from_config(config).save_pretrained(other)
        misfit = _make_adapter(tmp_path / "misfit", other, 6, r=2, target_modules=["q_proj"])
        cfg = (misfit / "adapter_config.json").read_text().replace(str(other), str(base_path))
        (misfit / "adapter_config.json").write_text(cfg)
        with pytest.raises(InvalidInputError, match="do not fit"):
            cache.get(misfit)
    finally:
        cache.close()


def test_8_concurrent_chats_over_4_adapters_with_2_slots_are_200_or_429_and_right(settings, adapters):
    from fastapi.testclient import TestClient

    from main import create_app

    settings.inference.max_adapters = 2
    served = []
    for path in adapters:  # inside the server's model dir, on the base as the server names it
        out = settings.model_dir / "outputs" / path.name
        shutil.copytree(path, out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(settings.base_model_path())
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        served.append(f"outputs/{path.name}")
    bodies = [
        {"model": served[i % 4], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
        for i in range(8)
    ]
    with TestClient(create_app(settings)) as client:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda b: client.post("/api/inference/chat", json=b), bodies))
        assert {r.status_code for r in replies} <= {200, 429}, [r.text for r in replies]
        assert any(r.status_code == 200 for r in replies)
        for r in replies:
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "overloaded"
        engine = client.app.state.model_cache.get(settings.model_dir / served[0]).engine
        assert len(engine.lora.loaded()) <= 2 and client.app.state.model_cache.loads == 1
        alone = {}  # one request at a time always gets a slot (the least recently used adapter is evicted)
        for body in bodies[:4]:
            r = client.post("/api/inference/chat", json=body)
            assert r.status_code == 200, r.text
            alone[body["model"]] = r.json()["content"]
        for body, r in zip(bodies, replies, strict=True):  # each answer is its adapter's, whatever ran beside it
            if r.status_code == 200:
                assert r.json()["content"] == alone[body["model"]]
        health = client.get("/health").json()["inference"]
        assert health["model_loads"] == 1 and 1 <= health["adapters"] <= 2
        loads, evictions = health["adapter_loads"], health["adapter_evictions"]
        assert loads >= 4 and evictions == loads - health["adapters"]


def test_evicting_a_base_drops_its_adapters_and_they_come_back_with_it(base_path, adapters, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(base_path, other)
    cache = ModelCache(1, EngineConfig(max_running=4, max_waiting=4))
    try:
        view = cache.get(adapters[0])
        assert len(cache.keys()) == 2 and cache.loads == 1
        cache.get(other)  # cache_size 1: the base (and so its adapter) is evicted
        assert len(cache.keys()) == 1 and not cache._views
        again = cache.get(adapters[0])
        assert again is not view and again.engine is not view.engine and cache.loads == 3
        prompt = _prompt(again.tokenizer, "Hi")
        done = again.engine.generate([prompt], [SamplingParams(max_tokens=4, adapter=again.adapter)])
        assert len(done[0].token_ids) == 4 and again.engine.lora.loaded() == [str(adapters[0])]
    finally:
        cache.close()


def test_loading_an_adapter_while_another_decodes_leaves_the_running_answer_unchanged(base_path, adapters):
    import threading

    cache = ModelCache(1, EngineConfig(max_running=4, max_waiting=4))
    try:
        first = cache.get(adapters[0])
        engine = first.engine
        prompt = _prompt(first.tokenizer, QUESTIONS[1])
        params = SamplingParams(max_tokens=200, adapter=first.adapter)
        alone = engine.generate([prompt], [params])[0].token_ids
        assert len(alone) > 50
        seen: list = []
        finished = threading.Event()

        def sink(out) -> None:
            seen.append(out)
            if out.is_finished() or out.error:
                finished.set()

        rid = engine.submit(prompt, params, sink)
        while not seen:  # decoding has started
            finished.wait(0.001)
        second = cache.get(adapters[3])  # new hooked layers and grown stacks while the first request decodes
        other = engine.generate([prompt], [SamplingParams(max_tokens=5, adapter=second.adapter)])[0]
        progress = len(seen[-1].generated_tokens)
        assert len(other.token_ids) == 5 and progress < len(alone)  # both ran while the first was mid-answer
        assert finished.wait(60)
        engine.release(rid, cancel=False)
        assert not seen[-1].error
        assert list(seen[-1].generated_tokens) == alone
    finally:
        cache.close()


def test_broken_adapter_files_are_422_over_http_and_the_server_keeps_serving(client, adapter_dir, settings):
    broken = settings.model_dir / "outputs" / "broken"
    shutil.copytree(adapter_dir, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    empty = settings.model_dir / "outputs" / "empty"
    shutil.copytree(adapter_dir, empty)
    (empty / "adapter_model.safetensors").unlink()
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    for name, words in (("broken", "unreadable weights"), ("empty", "no adapter_model")):
        r = client.post("/api/inference/chat", json={**body, "model": f"outputs/{name}"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["type"] == "invalid_input" and words in r.json()["error"]["message"]
    good = client.post("/api/inference/chat", json={**body, "model": "outputs/lora-out"})
    assert good.status_code == 200 and client.get("/health").json()["inference"]["adapters"] == 1
