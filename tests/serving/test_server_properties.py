"""Property tests of every route of serve, over the real server (uvicorn on 127.0.0.1, over `small_base`).

Any JSON (any nesting, any numbers, NaN and huge integers), any field value in the shape of the
app's own request models, any text (lone surrogates, NULs, bidi and combining marks), any bytes and
any Authorization header: never a 5xx, every error in OpenAI's shape, the server healthy after.
Derandomized and bounded, so they run the same way in `make test`.
"""

from __future__ import annotations

import json
import ssl

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_pipeline.serving.server import Settings, create_app

from test_server import DEFAULTS, KEY, serving
from test_server import engine, persona, roots, url  # noqa: F401 - the module's fixtures

pytestmark = pytest.mark.slow

PROPERTY = settings(derandomize=True, deadline=None, max_examples=120, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

ODD = ["\x00", "\u202e", "\u200f", "\u0301", "\ufeff", "\U0001f600", "\ud800", "\udcff", "\udfff", "\r\n", "\\", '"']
chars = st.one_of(st.characters(), st.sampled_from(ODD), st.integers(0xD800, 0xDFFF).map(chr))
texts = st.lists(chars, max_size=24).map("".join)
numbers = st.one_of(st.integers(-(2 ** 100), 2 ** 100), st.sampled_from([2 ** 80, 2 ** 64, 2 ** 63, -(2 ** 63) - 1]),
                    st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), numbers, texts),
                           lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
                           max_leaves=12)
roles = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), texts)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, json_values)}),
    st.fixed_dictionaries({"role": roles, "content": st.lists(st.fixed_dictionaries(
        {"type": st.one_of(st.just("text"), texts), "text": st.one_of(texts, json_values)}), max_size=3)}),
    json_values), max_size=3)
small = st.one_of(st.integers(-3, 6), numbers, json_values)
completion_bodies = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from(["alice", "bob", "base", "nobody", ""]), texts, json_values),
    "messages": st.one_of(messages, json_values),
    "max_tokens": small, "max_completion_tokens": small, "temperature": small, "top_p": small, "seed": small,
    "stop": st.one_of(texts, st.lists(texts, max_size=5), json_values), "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "n": small, "presence_penalty": small, "frequency_penalty": small, "logprobs": json_values, "tools": json_values,
    "top_k": small, "top_logprobs": small, "tool_choice": json_values, "functions": json_values,
    "function_call": json_values, "response_format": st.one_of(st.fixed_dictionaries({"type": texts}), json_values),
    "logit_bias": st.one_of(st.dictionaries(st.one_of(st.integers(-5, 60000).map(str), texts), small, max_size=4),
                            json_values),
    "user": texts}))
# The module's server serves alice and bob to the other tests: they are not unloaded here.
adapter_bodies = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "lora_name": st.one_of(st.sampled_from(["carol", "zed", "../x", ""]), texts, json_values).filter(
        lambda name: name not in ("alice", "bob")),
    "lora_path": st.one_of(st.sampled_from(["carol", "/etc", "../outside/carol", "sneaky"]), texts, json_values)}))


def as_json(value) -> bytes:
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        assert {"param", "code"} <= error.keys()


# One TLS context for every client here: each new httpx.Client otherwise loads the CA bundle again (25 ms, about
# 13 s of CPU over this module's ~500 requests), although every request goes to plain http on 127.0.0.1. Each
# request still gets a client, and so a connection, of its own.
TLS = ssl.create_default_context()


def post(url: str, route: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    with httpx.Client(timeout=120, verify=TLS) as http:
        with http.stream("POST", url + route, content=content,
                         headers={"Content-Type": "application/json", **(headers or {})}) as response:
            body = response.read()  # a stream is read to its end: an error inside it counts too
    if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert not any('"error"' in e and '"server_error"' in e for e in events), events
    return response


@PROPERTY
@given(body=completion_bodies)
def test_any_completion_request_gets_an_answer_or_a_4xx_in_openai_shape(url, body):
    check(post(url, "/v1/chat/completions", as_json(body)))


@settings(PROPERTY, max_examples=40)
@given(model=st.sampled_from(["alice", "bob", "base"]), text=texts.filter(str.strip),
       max_tokens=st.integers(1, 4), temperature=st.floats(0, 2), top_p=st.floats(0.01, 1),
       seed=st.one_of(st.none(), st.integers(-(2 ** 63), 2 ** 64 - 1)), stream=st.booleans(),
       stop=st.lists(texts.filter(bool), max_size=4))
def test_a_well_formed_request_with_any_text_and_values_is_answered(url, model, text, max_tokens, temperature, top_p,
                                                                    seed, stream, stop):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed, "stream": stream, "stop": stop}
    response = post(url, "/v1/chat/completions", as_json(body))
    check(response)
    surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in text + "".join(stop))
    assert response.status_code == (400 if surrogate else 200), response.text[:300]


@PROPERTY
@given(route=st.sampled_from(["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]), body=adapter_bodies)
def test_any_adapter_request_gets_an_answer_or_a_4xx_in_openai_shape(url, route, body):
    response = post(url, route, as_json(body))
    check(response)
    if route == "/v1/load_lora_adapter" and response.status_code == 200:  # leave the server as it was
        check(post(url, "/v1/unload_lora_adapter", as_json({"lora_name": body["lora_name"]})))


@PROPERTY
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
                              "/v1/models", "/health", "/", "/metrics", "/nowhere"]),
       raw=st.one_of(st.binary(max_size=300), st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n),
                     st.integers(1, 20000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
                     texts.map(lambda t: ('{"model": "alice", "messages": [{"role": "user", "content": '
                                          + json.dumps(t) + "}]}").encode("utf-8", "surrogatepass"))))
def test_any_bytes_on_any_route_never_cost_a_5xx(url, route, raw):
    check(post(url, route, raw))


# Any value HTTP allows in a header (no control characters, no surrounding blanks): a request that is
# not HTTP at all is refused by uvicorn's parser with its own 400 before the app sees it.
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
                        max_size=40).map(str.strip)


@PROPERTY
@given(value=st.one_of(header_values, st.just(f"Bearer {KEY}"), st.just(f"bearer  {KEY}"), st.just(KEY)),
       name=st.sampled_from(["Authorization", "authorization", "Content-Type", "X-Anything"]))
def test_any_header_on_a_keyed_server_gets_200_or_401(keyed, value, name):
    with httpx.Client(timeout=60, verify=TLS) as http:
        response = http.get(keyed + "/v1/models", headers={name: value.encode("latin-1")})
    check(response)
    scheme, _, given_key = value.partition(" ")
    expected = name.lower() == "authorization" and scheme.lower() == "bearer" and given_key.strip() == KEY
    assert response.status_code == (200 if expected else 401)


@pytest.fixture(scope="module")
def keyed(persona, engine):  # noqa: F811
    with serving(create_app(persona, engine, Settings(DEFAULTS, api_key=KEY))) as base_url:
        yield base_url


@pytest.mark.parametrize("body, param", [
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 80}, "seed"),
    ({"model": "alice", "messages": [{"role": "user", "content": "hi\u0000 \udcff ok"}]}, "messages.0.content"),
])
def test_the_three_reported_requests_are_4xx(url, body, param):
    response = post(url, "/v1/chat/completions", as_json(body))
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    if param == "messages.0.content":
        assert "lone surrogate (U+DCFF" in response.json()["error"]["message"]


def test_a_body_nested_5000_deep_is_a_400_in_openai_shape(url):
    response = post(url, "/v1/chat/completions", b"[" * 5000 + b"]" * 5000)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_the_server_is_healthy_after_all_of_it(url):
    with httpx.Client(timeout=120) as http:
        assert http.get(url + "/health").json()["status"] == "ok"
        reply = http.post(url + "/v1/chat/completions", json={"model": "alice", "max_tokens": 4,
                                                              "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
