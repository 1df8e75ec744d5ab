"""Inference API: chat, SSE streaming, batching, the OpenAI-compatible routes, the model cache, bad input."""

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from conftest import TINY_NAME, add_task, start_server, stop_server
from entity.task import TaskStatus
from service.inference import TextAssembler

HELLO = [{"role": "user", "content": "Say hello to the team."}]


def _chat(client, **body):
    payload = {"messages": HELLO, "temperature": 0, "max_tokens": 12}
    payload.update(body)
    return client.post("/api/inference/chat", json=payload)


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """Parse `event:` / `data:` lines into (event, data) pairs."""
    event = "message"
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            yield event, json.loads(line.split(":", 1)[1].strip())
            event = "message"


def test_chat_greedy_answer_and_usage(client):
    r = _chat(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == TINY_NAME
    assert isinstance(body["content"], str)
    assert body["finish_reason"] in {"stop", "length"}
    assert body["usage"]["prompt_tokens"] > 5
    assert 1 <= body["usage"]["completion_tokens"] <= 12
    assert body["latency_ms"] > 0
    # Greedy is deterministic; a random tiny model rarely ends early, so 12 tokens means "length".
    assert _chat(client).json()["content"] == body["content"]
    if body["usage"]["completion_tokens"] == 12:
        assert body["finish_reason"] == "length"


def test_seed_makes_sampling_reproducible(client):
    a = _chat(client, temperature=1.0, seed=7, max_tokens=16).json()["content"]
    b = _chat(client, temperature=1.0, seed=7, max_tokens=16).json()["content"]
    c = _chat(client, temperature=1.0, seed=8, max_tokens=16).json()["content"]
    assert a == b
    assert a != c


def test_model_loads_once_and_cache_is_lru(client, settings, adapter_dir):
    for _ in range(3):
        assert _chat(client, max_tokens=2).status_code == 200
    inference = client.get("/health").json()["inference"]
    assert inference["model_loads"] == 1
    assert inference["cached_models"] == 1
    # A LoRA output is routed on its base's engine: the base weights are not loaded (or copied) again.
    assert _chat(client, model="outputs/lora-out", max_tokens=2).status_code == 200
    assert _chat(client, max_tokens=2).status_code == 200
    assert client.get("/health").json()["inference"]["model_loads"] == 1
    keys = client.app.state.model_cache.keys()
    assert (str(settings.base_model_path()), str(adapter_dir), "float32", "cpu") in keys


def test_trained_task_id_serves_its_model(client, adapter_dir):
    task_id = add_task(client, TaskStatus.succeeded, str(adapter_dir))
    by_id = _chat(client, model=task_id)
    assert by_id.status_code == 200, by_id.text
    assert by_id.json()["model"] == task_id
    # The adapter changes the answer: it is really applied (routed per token on the base).
    assert by_id.json()["content"] == _chat(client, model="outputs/lora-out").json()["content"]
    assert by_id.json()["content"] != _chat(client).json()["content"]
    assert task_id in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_stop_string_ends_the_answer(client):
    full = _chat(client, max_tokens=24).json()
    text = full["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string in {text!r}"
    cut = _chat(client, max_tokens=24, stop=[stop]).json()
    assert cut["finish_reason"] == "stop"
    assert cut["content"] == text[: text.index(stop)]
    assert cut["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]


def test_text_assembler_holds_back_possible_stop_prefixes(settings):
    from service.models import load_tokenizer

    tok = load_tokenizer(settings.base_model_path())
    ids = tok("Hello world, END here", add_special_tokens=False)["input_ids"]
    asm = TextAssembler(tok, ["END"], {tok.eos_token_id})
    pieces = [asm.add([i]) for i in ids] + [asm.finish()]
    assert "".join(pieces) == "Hello world, "
    assert asm.finish_reason == "stop"


def test_stream_sends_pieces_then_done_matching_chat(client):
    plain = _chat(client, max_tokens=20).json()
    with client.stream(
        "POST", "/api/inference/chat/stream", json={"messages": HELLO, "temperature": 0, "max_tokens": 20}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(_sse_events(r.iter_lines()))
    deltas = [d["content"] for e, d in events if e == "delta"]
    assert len(deltas) > 1
    assert "".join(deltas) == plain["content"]
    kind, done = events[-1]
    assert kind == "done"
    assert done["finish_reason"] == plain["finish_reason"]
    assert done["usage"] == plain["usage"]
    assert done["time_to_first_token_ms"] <= done["latency_ms"]


def test_stream_error_mid_generation_becomes_error_event(client):
    assert _chat(client, max_tokens=1).status_code == 200
    loaded = client.app.state.model_cache.get(client.app.state.settings.base_model_path())
    original = loaded.model.forward
    calls = {"n": 0}

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("device lost")
        return original(*args, **kwargs)

    loaded.model.forward = failing_forward
    try:
        with client.stream(
            "POST", "/api/inference/chat/stream", json={"messages": HELLO, "temperature": 0, "max_tokens": 50}
        ) as r:
            events = list(_sse_events(r.iter_lines()))
    finally:
        loaded.model.forward = original
    assert events[-1][0] == "error"
    assert "device lost" in events[-1][1]["message"]
    assert "done" not in [e for e, _ in events]
    assert client.get("/health").json()["inference"]["failed"] == 1
    # The failed step stopped the engine's loop; the next request starts a fresh one.
    assert _chat(client, max_tokens=3).status_code == 200


def test_batch_is_one_generate_call_in_order_with_per_item_errors(client):
    prompts = ["Name a colour.", "Count to three.", "What is a dog?"]
    good = [{"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 8} for p in prompts]
    requests = [good[0], {"messages": []}, good[1], {"model": "no-such-model", "messages": HELLO}, good[2]]
    before = client.get("/health").json()["inference"]["generate_calls"]
    r = client.post("/api/inference/batch", json={"requests": requests})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generate_calls"] == 1
    assert client.get("/health").json()["inference"]["generate_calls"] - before == 1
    results = body["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3, 4]
    assert results[1]["error"]["status_code"] == 422 and results[1]["result"] is None
    assert results[3]["error"]["status_code"] == 404
    # Padded batched greedy decoding gives each prompt the answer it gets alone.
    for i, req in zip((0, 2, 4), good, strict=True):
        alone = client.post("/api/inference/chat", json=req).json()
        assert results[i]["result"]["content"] == alone["content"]
        assert results[i]["result"]["usage"] == alone["usage"]


def test_batch_mixes_sampling_settings_in_one_engine_call(client):
    requests = [
        {"messages": HELLO, "temperature": 0, "max_tokens": 3},
        {"messages": HELLO, "temperature": 0.9, "seed": 1, "max_tokens": 3},
        {"messages": HELLO, "temperature": 0, "max_tokens": 5},
    ]
    body = client.post("/api/inference/batch", json={"requests": requests}).json()
    assert body["generate_calls"] == 1
    used = [x["result"]["usage"]["completion_tokens"] for x in body["results"]]
    assert all(1 <= u <= n for u, n in zip(used, (3, 3, 5), strict=True))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 100000}, "limit"),
        ({"messages": HELLO, "temperature": -1}, "temperature"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
        ({"messages": [{"role": "user", "content": "word " * 1500}]}, "context"),
    ],
)
def test_bad_input_is_422(client, body, fragment):
    for route in ("/api/inference/chat", "/api/inference/chat/stream"):
        r = client.post(route, json=body)
        assert r.status_code == 422, r.text
        assert fragment in r.json()["error"]["message"]


def test_unknown_and_unfinished_models(client, settings):
    assert _chat(client, model="nothing-here").status_code == 404
    assert _chat(client, model="0" * 32).status_code == 404
    failed = add_task(client, TaskStatus.failed, None)
    r = _chat(client, model=failed)
    assert r.status_code == 409
    assert "failed" in r.json()["error"]["message"]
    assert _chat(client, model="/etc").status_code == 403
    assert client.post("/api/inference/batch", json={"requests": []}).status_code == 422


# -- a real server: the openai client, disconnects, and /health during generation ------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_root) -> Iterator[str]:
    """A real uvicorn server on loopback serving the tiny model."""
    extra = {"inference": {"max_concurrent_generations": 1}}
    url, proc = start_server(tmp_path_factory.mktemp("inference_server"), tiny_model_root, extra)
    yield url
    stop_server(proc)


def test_openai_client_plain_and_streaming(server):
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert TINY_NAME in [m.id for m in oai.models.list().data]
    reply = oai.chat.completions.create(model=TINY_NAME, messages=HELLO, max_tokens=10, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        oai.chat.completions.create(
            model=TINY_NAME,
            messages=HELLO,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=HELLO)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model=TINY_NAME, messages=[])


def test_stream_arrives_incrementally_and_disconnect_stops_generation(server):
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 900}
    before = httpx.get(f"{server}/health").json()["inference"]
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server}/api/inference/chat/stream", json=body) as r:
        events = _sse_events(r.iter_lines())  # keep a reference: a collected iterator closes the stream
        kind, first = next(events)
        assert kind == "delta" and first["content"]
        # The first piece is here while the generation still runs: delivery is incremental.
        during = httpx.get(f"{server}/health", timeout=5)
        assert during.elapsed.total_seconds() < 2  # the event loop is free while generating
        assert during.json()["inference"]["active"] == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = httpx.get(f"{server}/health").json()["inference"]
        if after["active"] == 0:
            break
        time.sleep(0.1)
    assert after["active"] == 0
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]


def test_generation_limit_queues_the_rest(server):
    import concurrent.futures

    stream_body = {"messages": HELLO, "temperature": 0, "max_tokens": 900}
    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool,
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server}/api/inference/chat/stream", json=stream_body) as r,
    ):
        events = _sse_events(r.iter_lines())  # keep a reference: a collected iterator closes the stream
        assert next(events)[0] == "delta"
        chat = {"messages": HELLO, "max_tokens": 4}
        chats = [pool.submit(httpx.post, f"{server}/api/inference/chat", json=chat, timeout=60) for _ in range(3)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = httpx.get(f"{server}/health").json()["inference"]
            if state["queued"] == 3:
                break
            time.sleep(0.05)
        # max_concurrent_generations is 1 on this server: the stream runs, the three chats wait.
        assert (state["active"], state["queued"]) == (1, 3)
    answers = [c.result() for c in chats]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert httpx.get(f"{server}/health").json()["inference"]["queued"] == 0
