"""/v1/chat/completions options through the real `openai` client: each works (asserted) or gets a 422 naming it."""

import math
from collections.abc import Iterator

import openai
import pytest

from conftest import TINY_NAME, start_server, stop_server

HELLO = [{"role": "user", "content": "Say hello to the team."}]


@pytest.fixture(scope="module")
def oai(tmp_path_factory, tiny_model_root) -> Iterator[openai.OpenAI]:
    """An OpenAI client on a live server (uvicorn on loopback) serving the tiny model."""
    url, proc = start_server(tmp_path_factory.mktemp("oai_server"), tiny_model_root)
    try:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    finally:
        stop_server(proc)


def test_logprobs_and_top_logprobs_plain_and_streamed(oai):
    reply = oai.chat.completions.create(
        model=TINY_NAME, messages=HELLO, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy picks the most likely token
        assert math.isclose(item.top_logprobs[0].logprob, item.logprob, abs_tol=1e-5)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
        assert bytes(item.bytes).decode("utf-8") == item.token
    plain = oai.chat.completions.create(model=TINY_NAME, messages=HELLO, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None

    chunks = oai.chat.completions.create(
        model=TINY_NAME, messages=HELLO, max_tokens=8, temperature=0, logprobs=True, stream=True
    )
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-5) for a, b in zip(streamed, content, strict=True))


def test_n_choices_plain_and_streamed(oai):
    sampled = oai.chat.completions.create(model=TINY_NAME, messages=HELLO, max_tokens=10, temperature=1.0, seed=5, n=3)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1  # each choice is sampled on its own
    again = oai.chat.completions.create(model=TINY_NAME, messages=HELLO, max_tokens=10, temperature=1.0, seed=5, n=3)
    assert [c.message.content for c in again.choices] == texts
    assert sampled.usage.completion_tokens == 30

    chunks = oai.chat.completions.create(
        model=TINY_NAME, messages=HELLO, max_tokens=10, temperature=1.0, seed=5, n=3, stream=True
    )
    streamed = ["", "", ""]
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == texts and finished == {0, 1, 2}


def test_penalties_other_than_zero_are_refused_by_name(oai):
    ok = oai.chat.completions.create(
        model=TINY_NAME, messages=HELLO, max_tokens=2, presence_penalty=0, frequency_penalty=0
    )
    assert ok.choices[0].finish_reason in {"stop", "length"}
    for option in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(openai.UnprocessableEntityError, match=option):
            oai.chat.completions.create(model=TINY_NAME, messages=HELLO, max_tokens=2, **{option: 0.5})


def test_response_format_json_object_instructs_and_checks(oai):
    plain = oai.chat.completions.create(model=TINY_NAME, messages=HELLO, max_tokens=4, temperature=0)
    text = oai.chat.completions.create(
        model=TINY_NAME, messages=HELLO, max_tokens=4, temperature=0, response_format={"type": "text"}
    )
    assert text.choices[0].message.content == plain.choices[0].message.content
    # A random tiny model cannot write JSON: the answer fails the parse check with a clear error, never a 200.
    with pytest.raises(openai.UnprocessableEntityError, match="not valid JSON") as caught:
        oai.chat.completions.create(
            model=TINY_NAME, messages=HELLO, max_tokens=4, temperature=0, response_format={"type": "json_object"}
        )
    assert caught.value.body["type"] == "invalid_output"
    with pytest.raises(openai.APIError, match="json_object"):
        list(
            oai.chat.completions.create(
                model=TINY_NAME,
                messages=HELLO,
                max_tokens=4,
                temperature=0,
                response_format={"type": "json_object"},
                stream=True,
            )
        )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "json_schema"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"extra_body": {"guided_regex": "a+"}}, "guided_regex"),
    ],
)
def test_unimplemented_options_get_422_naming_them(oai, options, named):
    with pytest.raises(openai.UnprocessableEntityError, match=named):
        oai.chat.completions.create(model=TINY_NAME, messages=HELLO, max_tokens=2, **options)
