"""The OpenAI-compatible server on localhost: the real openai client, SSE, errors, API key, runtime adapters, batching."""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import re
import shutil
import socket
import subprocess
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package itself uses
import pytest

from conftest import BIN, pipeline_env
from qlora_pipeline.config import ChatConfig
from qlora_pipeline.launching import free_port
from qlora_pipeline.serving import server
from qlora_pipeline.serving.engine import Engine, Job, Sampling
from qlora_pipeline.serving.models import AdapterSpec, load_persona_model
from qlora_pipeline.serving.prompts import prompt_ids, with_system_prompt
from qlora_pipeline.serving.server import Settings, create_app

pytestmark = pytest.mark.slow

DEFAULTS = ChatConfig(temperature=0.0, top_k=0, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=8)
KEY = "test-key-123"


@contextlib.contextmanager
def serving(app):
    """``app`` on 127.0.0.1 in a thread of this process; stopped when the block ends."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def persona(small_base, small_adapters):
    """alice and bob over `small_base`: what these tests hold the server to (its replies are the engine's, its
    errors, limits and streams) is the same on any Llama of the real tokenizer, at a nineteenth of the work."""
    return load_persona_model(small_base, [AdapterSpec("alice", str(small_adapters["alice"])),
                                           AdapterSpec("bob", str(small_adapters["bob"]))])


@pytest.fixture(scope="module")
def roots(tmp_path_factory, small_adapters):
    """An adapter root holding carol, and a folder outside it holding a copy too."""
    top = tmp_path_factory.mktemp("roots")
    shutil.copytree(small_adapters["carol"], top / "allowed" / "carol")
    shutil.copytree(small_adapters["carol"], top / "outside" / "carol")
    (top / "allowed" / "sneaky").symlink_to(top / "outside" / "carol")
    (top / "allowed" / "linked").mkdir()  # a real folder inside, its files links out of the root
    for file in (top / "outside" / "carol").iterdir():
        (top / "allowed" / "linked" / file.name).symlink_to(file)
    return top


@pytest.fixture(scope="module")
def engine(persona):
    engine = Engine(persona, DEFAULTS, max_batch_size=8).start()
    yield engine
    engine.stop()


# choose-decoding's pick for carol's weights: a runtime-loaded carol decodes by it, a greedy request too (the length
# decay from its first token ends the reply at once)
CAROL_SHOWN = {"temperature": 0.5, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2}
CAROL_CHOSEN = {**CAROL_SHOWN, "exponential_decay_length_penalty": [0, 50.0]}


@pytest.fixture(scope="module")
def url(persona, engine, roots):
    from qlora_pipeline.modeling.adapters import adapter_digest

    report = roots / "decoding.json"
    digest = adapter_digest(roots / "allowed" / "carol")
    report.write_text(json.dumps({"chosen": CAROL_CHOSEN, "adapter_sha256": digest}))
    settings = Settings(DEFAULTS, allow_runtime_adapters=True, adapter_roots=[roots / "allowed"],
                        max_tokens_limit=64, max_body_bytes=200_000, body_timeout=2.0, decoding_file=report)
    with serving(create_app(persona, engine, settings)) as base_url:
        yield base_url


def expected(persona, name: str, text: str, tokens: int = 8, defaults=DEFAULTS) -> tuple[str, int]:
    """The greedy reply generated in-process, alone: what the server must return."""
    ids = prompt_ids(persona.tokenizer, with_system_prompt([{"role": "user", "content": text}],
                                                           persona.system_prompt(name)))
    completion = Engine(persona, defaults).run_batch([Job(ids, persona.peft_name(name), tokens, Sampling(0.0))])[0]
    return completion.text, len(ids)


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of Prometheus text (``name{labels} value``), 0 if absent."""
    pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def answered(url: str, model: str, status: int) -> float:
    """How many completion requests for ``model`` the server at ``url`` counts as answered ``status``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return metric(text, "qlora_pipeline:requests_total", f'model="{model}",status="{status}"')


def client(url, key="unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_lists_models_and_chats(url, persona):
    models = client(url).models.list().data
    assert [m.id for m in models] == ["base", "alice", "bob"]
    assert [getattr(m, "parent", None) for m in models] == [None, "base", "base"]
    reply = client(url).chat.completions.create(model="alice", messages=[{"role": "user", "content": "hey, what's up?"}],
                                                max_tokens=8, temperature=0)
    text, prompt_tokens = expected(persona, "alice", "hey, what's up?")
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.model == "alice" and reply.id.startswith("chatcmpl-")


def test_openai_client_streams_the_same_reply_with_usage(url, persona):
    stream = client(url).chat.completions.create(
        model="bob", messages=[{"role": "user", "content": "any plans tonight?"}], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(persona, "bob", "any plans tonight?")[0]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # streamed, not one piece
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_sse_wire_format_ends_with_done(url):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("body, status, code, param", [
    ({"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "model"),
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "invalid_value",
     "temperature"),
    ({"model": "alice", "messages": []}, 400, "invalid_value", "messages"),
    ({"model": "alice", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "messages.0.role"),
    # a value no member of a union takes: named where the member the client meant refused it (was messages.0.content)
    ({"model": "alice", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "invalid_value",
     "messages.0.content.0.text"),
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", 5]}, 400, "invalid_value",
     "stop.1"),
    # n choices decode side by side: more than the engine's rows at once (max_batch_size 8) cannot
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "invalid_value", "n"),
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "invalid_value", "n"),
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "invalid_value",
     "max_tokens"),
    # the field the client sent, where OpenAI's newer name was used
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 65}, 400,
     "invalid_value", "max_completion_tokens"),
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "invalid_value", "stop"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_value", "model"),
    # as OpenAI refuses them (an empty list of parts generated from an empty turn; a number was taken as user)
    ({"model": "alice", "messages": [{"role": "user", "content": []}]}, 400, "invalid_value", "messages.0.content"),
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "user": 5}, 400, "invalid_value", "user"),
    # keys that would change the answer, which this server does not do: refused, not ignored
    *[({"model": "alice", "messages": [{"role": "user", "content": "hi"}], key: value}, 400, "unsupported_value", key)
      for key, value in (("response_format", {"type": "json_object"}),
                         ("tool_choice", "auto"), ("functions", [{"name": "f"}]),
                         ("function_call", {"name": "f"}))],
    # OpenAI's rules: top_logprobs up to 20, and only with logprobs on
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400,
     "invalid_value", "top_logprobs"),
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "invalid_value",
     "top_logprobs"),
    *[({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "top_k": k}, 400, "invalid_value", "top_k")
      for k in (-2, 1 << 70)],  # past int64: no 500 from the sampler
    *[({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "logit_bias": bias}, 400, "invalid_value",
       "logit_bias") for bias in ({"hello": 1}, {"-3": 1}, {"99999999": 1}, {"42": 100.5}, {"42": -101},
                                  {str(i): 1 for i in range(301)}, {"1" * 4301: 1})],  # past int(): was a 500
    # OpenAI's types, strictly: a number in a string, a boolean for a number, a float for a count (were taken)
    *[({"model": "alice", "messages": [{"role": "user", "content": "hi"}], key: value}, 400, "invalid_value", key)
      for key, value in (("max_tokens", "4"), ("n", 1.0), ("temperature", True), ("stream", "yes"), ("seed", "1"))],
    ({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     400, "invalid_value", "stream_options"),  # OpenAI's rule: only with stream: true
])
def test_errors_come_in_openai_shape(url, body, status, code, param):
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"


def day_reply(url, **extra) -> str:
    """alice's reply to one fixed message, with the request's other keys ``extra``; the request must succeed."""
    body = {"model": "alice", "messages": [{"role": "user", "content": "tell me about your day"}], **extra}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_top_k_is_applied_and_the_off_values_of_unsupported_keys_pass(url):
    def reply(**extra):
        return day_reply(url, max_tokens=12, **extra)

    greedy = reply(temperature=0)
    # top_k 1 leaves one candidate: a hot, seeded draw is the greedy reply (it was ignored, and the draw wandered)
    assert reply(temperature=1.5, top_k=1, seed=3) == greedy
    assert {reply(temperature=1.5, top_k=-1, seed=s) for s in range(3)} != {greedy}  # -1: off, as vLLM's clients mean
    assert reply(temperature=0, logit_bias={}, response_format={"type": "text"}, tool_choice="none", logprobs=False,
                 top_k=0) == greedy


def test_a_temperature_near_zero_is_greedy(url):
    """1e-38 overflowed the scores to infinities and NaN, and the reply was a quote or an end token."""
    greedy = day_reply(url, max_tokens=8, temperature=0)
    assert day_reply(url, max_tokens=8, temperature=1e-38, seed=1) == greedy
    assert day_reply(url, max_tokens=8, temperature=1e-6, seed=2) == greedy


def test_logit_bias_bans_and_forces_tokens(url, persona):
    def reply(**extra):
        return day_reply(url, max_tokens=6, temperature=0, **extra)

    greedy, tokenizer = reply(), persona.tokenizer
    # its first token banned: each token the reply's text begins with, as the text encoded again may join the
    # model's first two tokens into one
    first = [i for i in range(len(tokenizer)) if (text := tokenizer.decode([i])) and greedy.startswith(text)]
    assert 0 < len(first) < 20 and reply(logit_bias={str(i): -100 for i in first}) != greedy
    forced = tokenizer.encode("zebra", add_special_tokens=False)[0]
    assert reply(logit_bias={str(forced): 100}).startswith(tokenizer.decode([forced]))
    assert reply(logit_bias={str(forced): 0}) == greedy  # a zero bias changes nothing


def test_prompt_longer_than_the_context_is_refused(url, persona):
    long = "hello " * (persona.context_length + 10)  # one token each: under the body cap, over the context
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": "alice", "messages": [{"role": "user", "content": long}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_bad_json_and_oversized_bodies(url):
    response = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    for route in ("chat/completions", "load_lora_adapter"):  # no body at all: was "body: Field required"
        for headers in ({}, {"content-type": "application/json"}):
            empty = httpx.post(f"{url}/v1/{route}", timeout=30, headers=headers).json()["error"]
            assert empty["code"] == "invalid_json"
            assert "must be a JSON object, sent with Content-Type" in empty["message"]
    response = httpx.post(f"{url}/v1/chat/completions", content=b"x" * 300_000, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    # streamed in chunks, no length declared: the limit is found while the route reads the body (was 400 invalid_json)
    response = httpx.post(f"{url}/v1/chat/completions", content=(b"x" * 50_000 for _ in range(6)), timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large", response.text
    assert "--max-body-bytes" in response.json()["error"]["message"]
    # a compressed body: gzip's was read as JSON and called not valid JSON, brotli's the same
    body = json.dumps({"model": "alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    for coding, content in (("gzip", gzip.compress(body)), ("br", b"\x8b\x02\x80"), ("GZIP, identity", body)):
        response = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=30,
                              headers={"content-type": "application/json", "content-encoding": coding})
        error = response.json()["error"]
        assert response.status_code == 415 and error["code"] == "unsupported_content_encoding", response.text
        assert coding in error["message"] and "without a Content-Encoding header" in error["message"]
    response = httpx.post(f"{url}/v1/chat/completions", content=gzip.compress(body), timeout=30,
                          headers=[("content-type", "application/json"), ("content-encoding", "gzip"),
                                   ("content-encoding", "identity")])  # the last header alone says identity
    assert response.status_code == 415 and "'gzip, identity'" in response.json()["error"]["message"], response.text
    for coding in ("identity", "Identity"):  # no coding at all, as RFC 9110 names it
        response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=60,
                              headers={"content-type": "application/json", "content-encoding": coding})
        assert response.status_code == 200, response.text
    assert httpx.get(f"{url}/v1/nothing", timeout=30).json()["error"]["code"] == "not_found"


def test_runtime_load_and_unload_with_path_checks(url, roots, persona):
    def post(route, body):
        return httpx.post(f"{url}/v1/{route}", json=body, timeout=120)

    outside = post("load_lora_adapter", {"lora_name": "carol", "lora_path": str(roots / "outside" / "carol")})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "path_not_allowed"
    traversal = post("load_lora_adapter", {"lora_name": "carol",
                                           "lora_path": str(roots / "allowed" / ".." / "outside" / "carol")})
    assert traversal.status_code == 403
    # Every other user's home alike (an unknown one was 400 "no such user", a known one 403: which users exist)
    for home in ("~root/models", "~nobody-of-this-name/models"):
        refused = post("load_lora_adapter", {"lora_name": "carol", "lora_path": home})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "path_not_allowed", refused.text
    loop = roots / "allowed" / "loop"
    loop.symlink_to(loop)
    try:  # the path the client sent, not where it lies on the server
        for sent in (str(loop), str(roots / "allowed" / ("x" * 300))):
            unusable = post("load_lora_adapter", {"lora_name": "carol", "lora_path": sent})
            assert unusable.status_code == 400 and "is not a usable path" in unusable.json()["error"]["message"]
            assert str(roots) not in unusable.json()["error"]["message"].replace(sent[:200], ""), unusable.text
    finally:
        loop.unlink()
    link = post("load_lora_adapter", {"lora_name": "carol", "lora_path": str(roots / "allowed" / "sneaky")})
    assert link.status_code == 403  # a link inside the root pointing out of it
    linked = post("load_lora_adapter", {"lora_name": "carol", "lora_path": str(roots / "allowed" / "linked")})
    assert linked.status_code == 403 and "adapter_config.json" in linked.json()["error"]["message"]  # was 200
    for reserved in ("base", "BASE", "unknown"):  # "BASE" loaded beside base; "unknown" is /metrics' other models
        assert post("load_lora_adapter", {"lora_name": reserved, "lora_path": str(roots / "allowed" / "carol")}
                    ).status_code == 400
    loaded = post("load_lora_adapter", {"lora_name": "carol", "lora_path": str(roots / "allowed" / "carol")})
    assert loaded.status_code == 200, loaded.text
    try:
        models = client(url).models.list().data
        assert [m.id for m in models] == ["base", "alice", "bob", "carol"]
        decoding = {m.id: {k: m.model_dump()["default_decoding"][k] for k in CAROL_SHOWN} for m in models}
        assert decoding["carol"] == CAROL_SHOWN  # its own choice, found for its weights as it was loaded
        assert decoding["alice"] == decoding["base"] == {k: getattr(DEFAULTS, k) for k in CAROL_SHOWN}
        assert str(roots) not in json.dumps([m.model_dump() for m in models])  # no server path in the list
        reply = client(url).chat.completions.create(model="carol", messages=[{"role": "user", "content": "hi there"}],
                                                    max_tokens=8, temperature=0)
        own = expected(persona, "carol", "hi there", defaults=DEFAULTS.model_copy(update=CAROL_CHOSEN))[0]
        assert reply.choices[0].message.content == own != expected(persona, "carol", "hi there")[0]
        again = post("load_lora_adapter", {"lora_name": "carol", "lora_path": str(roots / "allowed" / "carol")})
        assert again.status_code == 409
    finally:
        assert post("unload_lora_adapter", {"lora_name": "carol"}).status_code == 200
    assert [m.id for m in client(url).models.list().data] == ["base", "alice", "bob"]
    gone = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                      json={"model": "carol", "messages": [{"role": "user", "content": "hi"}]})
    assert gone.status_code == 404
    assert post("unload_lora_adapter", {"lora_name": "carol"}).status_code == 404


def test_an_unload_while_requests_run_fails_none_of_the_other_models_requests(url, roots, persona):
    # Unloading while a batch ran answered 500 to every row of the batch, other models' rows too (KeyError in the
    # forward's adapter lookup); the unloaded model's own rows now hear 404 model_not_found.
    def post(route, body):
        return httpx.post(f"{url}/v1/{route}", json=body, timeout=120)

    assert post("load_lora_adapter", {"lora_name": "carol", "lora_path": str(roots / "allowed" / "carol")}
                ).status_code == 200
    answers: dict[str, list[httpx.Response]] = {}

    def ask(model: str) -> None:
        answers.setdefault(model, []).append(post("chat/completions", {
            "model": model, "max_tokens": 64, "temperature": 1.0, "seed": 7,
            "messages": [{"role": "user", "content": "tell me about your week"}]}))

    try:
        threads = [threading.Thread(target=ask, args=(model,)) for model in ("base", "alice", "carol") * 2]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # the six are in the batch
    finally:
        assert post("unload_lora_adapter", {"lora_name": "carol"}).status_code == 200
    for thread in threads:
        thread.join()
    for model in ("base", "alice"):
        assert [r.status_code for r in answers[model]] == [200, 200], [r.text for r in answers[model]]
    for response in answers["carol"]:  # finished before the unload, or told it was unloaded
        assert response.status_code == 200 or (response.status_code == 404 and response.json()["error"]["code"]
                                               == "model_not_found"), response.text


def test_a_body_that_stops_coming_is_answered_408(url):
    """A client that sent its headers and part of its body, then waited, held its connection as long as it liked."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"mo")
        started, answer = time.monotonic(), b""
        while chunk := raw.recv(65536):  # to the end: the connection is closed after the answer
            answer += chunk
    text = answer.decode()
    assert text.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in text, text
    assert "connection: close" in text.lower()
    assert time.monotonic() - started < 20


def test_every_completion_request_is_counted_by_the_status_it_got(url, monkeypatch):
    """Refusals before the route ran (a body not JSON, a bad field, one too large) were never counted."""
    count = functools.partial(answered, url)
    before = {key: count(*key) for key in (("unknown", 400), ("unknown", 413), ("alice", 200), ("alice", 400))}
    post = functools.partial(httpx.post, f"{url}/v1/chat/completions", timeout=60)
    assert post(content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert post(json={"model": "alice", "messages": []}).status_code == 400
    assert post(content=b"x" * 300_000, headers={"content-type": "application/json"}).status_code == 413
    assert post(json={"model": "alice", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}
                ).status_code == 400
    assert post(json={"model": "alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                ).status_code == 200
    after = {key: count(*key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("unknown", 400): 2, ("unknown", 413): 1, ("alice", 200): 1, ("alice", 400): 1}
    # a fault of ours is answered 500 by Starlette outside the counting middleware: counted 500, not "client gone"
    faults, gone = count("alice", 500), count("alice", 499)

    def broken(*args):
        raise RuntimeError("a fault of ours")

    monkeypatch.setattr(server, "build_jobs", broken)
    fault = post(json={"model": "alice", "messages": [{"role": "user", "content": "hi"}]})
    assert fault.status_code == 500 and fault.json()["error"]["type"] == "server_error"
    assert count("alice", 500) == faults + 1 and count("alice", 499) == gone


def test_a_client_that_leaves_before_its_answer_stops_its_rows_and_is_counted_499(url, persona, engine):
    """A request whose client closed the connection decoded on to its limit, holding a place in the batch, and was
    counted as answered 200."""
    gone = functools.partial(answered, url, "alice", 499)
    before, generated = gone(), engine.stats.generated_tokens
    body = {"model": "alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64,
            "logit_bias": {str(persona.tokenizer.convert_tokens_to_ids("<|im_end|>")): -100}}
    with persona.lock:  # the engine waits, so the request is in flight when its client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.5))
        deadline = time.monotonic() + 30
        while gone() == before and time.monotonic() < deadline:
            time.sleep(0.1)
    assert gone() == before + 1
    running = metric(httpx.get(f"{url}/metrics", timeout=30).text, "qlora_pipeline:num_requests_running")
    assert running == 0  # its place given back: kept, places ran out until every request got 429
    deadline = time.monotonic() + 30
    while engine.core.rows or engine.core.waiting:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert engine.stats.generated_tokens - generated < 64  # stopped, not decoded to its limit


def test_runtime_loads_stop_at_max_adapters_and_an_unloaded_adapter_leaves_no_metrics(persona, engine, roots):
    """Any client could load adapters without end (21 MB each, every load slower), and each name loaded, used and
    unloaded kept its series in /metrics."""
    carol = {"lora_name": "carol", "lora_path": str(roots / "allowed" / "carol")}
    for limit in (2, 3):  # alice and bob are loaded
        settings = Settings(DEFAULTS, allow_runtime_adapters=True, adapter_roots=[roots / "allowed"],
                            max_adapters=limit)
        with serving(create_app(persona, engine, settings)) as base:
            loaded = httpx.post(f"{base}/v1/load_lora_adapter", json=carol, timeout=120)
            if limit == 2:
                assert loaded.status_code == 409, loaded.text
                assert loaded.json()["error"]["code"] == "adapter_limit_reached"
                assert "--max-adapters 2" in loaded.json()["error"]["message"]
                continue
            assert loaded.status_code == 200, loaded.text
            try:
                chat = {"model": "carol", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
                assert httpx.post(f"{base}/v1/chat/completions", timeout=60, json=chat).status_code == 200
                assert 'model="carol"' in httpx.get(f"{base}/metrics", timeout=30).text
            finally:
                assert httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "carol"},
                                  timeout=60).status_code == 200
            text = httpx.get(f"{base}/metrics", timeout=30).text
            assert 'model="carol"' not in text


def test_a_stream_its_client_leaves_is_counted_499_and_one_read_to_its_end_200(url, persona):
    """A stream left midway was counted 200 (its status line had gone out), where docs/serving.md says 499."""
    count = functools.partial(answered, url, "alice")
    body = {"model": "alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True,
            "logit_bias": {str(persona.tokenizer.convert_tokens_to_ids("<|im_end|>")): -100}}
    gone, served = count(499), count(200)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for number, _ in enumerate(response.iter_lines()):
            if number == 2:
                break
        persona.lock.acquire()  # the engine waits: the small model's reply cannot end before its client is gone
    try:  # the client walked away mid-reply
        deadline = time.monotonic() + 30
        while count(499) == gone and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        persona.lock.release()
    assert (count(499), count(200)) == (gone + 1, served)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60) as response:
        assert [line for line in response.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    assert (count(499), count(200)) == (gone + 1, served + 1)


def test_routes_an_openai_client_and_a_load_balancer_expect(url):
    assert client(url).models.retrieve("alice").id == "alice"  # the OpenAI client's models.retrieve
    missing = httpx.get(f"{url}/v1/models/nobody", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.head(f"{url}/health", timeout=30).status_code == 200
    assert httpx.head(f"{url}/v1/models", timeout=30).status_code == 200
    wrong = httpx.put(f"{url}/v1/chat/completions", timeout=30)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    base = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "base"}, timeout=30)
    assert base.status_code == 400 and base.json()["error"]["code"] == "invalid_value"
    form = httpx.post(f"{url}/v1/chat/completions", data={"model": "alice"}, timeout=30)
    assert form.status_code == 400 and "Content-Type: application/json" in form.json()["error"]["message"]
    # null is OpenAI's default; a message's text parts are joined by a line break, as vLLM joins them
    assert day_reply(url, max_tokens=4, stream=None) == day_reply(url, max_tokens=4)
    joined = {"model": "alice", "max_tokens": 4, "messages": [{"role": "user", "content": "tell me\nabout your day"}]}
    parts = {**joined, "messages": [{"role": "user", "content": [{"type": "text", "text": "tell me"},
                                                                 {"type": "text", "text": "about your day"}]}]}
    answers = [httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json() for body in (joined, parts)]
    assert answers[0]["usage"] == answers[1]["usage"]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]


def test_metrics_label_only_the_models_served(url):
    for name in ("z" * 1000, "y" * 1000):
        missing = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": name, "messages": [{"role": "user", "content": "hi"}]})
        assert missing.status_code == 404 and len(missing.content) < 600  # the name was sent back whole
    text = httpx.get(f"{url}/metrics", timeout=30).text
    assert "z" * 1000 not in text and "y" * 1000 not in text  # a label per name grew memory without bound
    assert re.search(r'^qlora_pipeline:requests_total\{model="unknown",status="404"\} [2-9]', text, re.M), text


def test_concurrent_clients_over_several_adapters_are_batched(url, persona, engine, monkeypatch):
    prompts = [("alice", "how was work?"), ("bob", "seen any good movies?"), ("base", "what's for dinner?"),
               ("alice", "do you like hiking?"), ("bob", "coffee or tea?"), ("base", "where do you live?")]
    before = engine.stats.as_dict()
    results: dict[int, str] = {}

    def ask(index, name, text):
        reply = client(url).chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                                    max_tokens=8, temperature=0)
        results[index] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, *pair)) for i, pair in enumerate(prompts)]
    submitted: list[int] = []
    submit = engine.core.submit_together
    monkeypatch.setattr(engine.core, "submit_together", lambda items: (submitted.append(len(items)), submit(items)))
    with persona.lock:  # the engine waits before its first forward until all six have arrived, however slowly
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while sum(submitted) < len(prompts):
            assert time.monotonic() < deadline, submitted
            time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == len(prompts)
    assert [results[i] for i in range(len(prompts))] == [expected(persona, *pair)[0] for pair in prompts]
    after = engine.stats.as_dict()
    steps, rows = after["decode_steps"] - before["decode_steps"], after["row_steps"] - before["row_steps"]
    # Every request ran 8 tokens (1 from its prefill, 7 decode steps): alone they would take 6 x 7 steps.
    assert rows == len(prompts) * 7 and steps < rows, (steps, rows)  # arrived together, decoded together


def test_n_choices_are_the_replies_of_their_seeds_alone_from_one_prefill(url, engine):
    """Choice i of a seeded request is the reply a request with seed + i gets alone; the prompt is prefilled once for
    all of them, the usage counts it once and every choice's tokens, and a stream names each chunk's choice."""
    body = {"model": "alice", "messages": [{"role": "user", "content": "tell me about your week"}],
            "max_tokens": 10, "temperature": 1.0, "top_p": 0.95, "seed": 11}
    alone = [client(url).chat.completions.create(**{**body, "seed": 11 + i}) for i in range(3)]
    assert len({reply.choices[0].message.content for reply in alone}) > 1  # the seeds draw different replies
    before = engine.stats.as_dict()
    together = client(url).chat.completions.create(**body, n=3)
    after = engine.stats.as_dict()
    assert [choice.index for choice in together.choices] == [0, 1, 2]
    assert [c.message.content for c in together.choices] == [reply.choices[0].message.content for reply in alone]
    assert [c.finish_reason for c in together.choices] == [reply.choices[0].finish_reason for reply in alone]
    assert after["prefill_rows"] - before["prefill_rows"] == 1  # one prompt run through the model
    assert after["shared_prefills"] - before["shared_prefills"] == 2  # the other two choices copied its keys
    assert together.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert together.usage.completion_tokens == sum(reply.usage.completion_tokens for reply in alone)
    assert together.usage.total_tokens == together.usage.prompt_tokens + together.usage.completion_tokens

    stream = client(url).chat.completions.create(**body, n=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts, finishes = {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert texts == {i: c.message.content for i, c in enumerate(together.choices)}
    assert finishes == {i: [c.finish_reason] for i, c in enumerate(together.choices)}
    assert chunks[-1].choices == [] and chunks[-1].usage == together.usage

    greedy = client(url).chat.completions.create(**{**body, "temperature": 0}, n=2)  # greedy: the same reply twice
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_logprobs_are_the_models_own_and_cover_the_text_streamed_or_not(url, persona):
    """Each token's log-probability under the model's raw distribution (before temperature, as vLLM reports them), with
    the likeliest tokens beside it; the tokens spell the reply, a stream carries them with the text they make, and a
    stop string's cut drops the tokens it cut."""
    import torch

    message = "hey, how was your weekend?"
    body = {"model": "base", "messages": [{"role": "user", "content": message}], "max_tokens": 10, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    reply = client(url).chat.completions.create(**body)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens - (choice.finish_reason == "stop")  # the end token: none
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert [top.logprob for top in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                      reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0 and bytes(entry.bytes) == entry.token.encode()
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob)  # greedy

    # The first token's, from the model itself (no engine): raw log-softmax, untouched by the request's temperature.
    ids = prompt_ids(persona.tokenizer, with_system_prompt([{"role": "user", "content": message}],
                                                           persona.system_prompt("base")))
    with torch.no_grad(), persona.using("base") as model:
        raw = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    values, top_ids = raw.topk(3)
    hot = client(url).chat.completions.create(**{**body, "temperature": 1.7, "seed": 5, "max_tokens": 1})
    for sent in (content[0], hot.choices[0].logprobs.content[0]):
        assert [t.token for t in sent.top_logprobs] == [persona.tokenizer.decode([int(i)]) for i in top_ids]
        assert [t.logprob for t in sent.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)

    stream = client(url).chat.completions.create(**body, stream=True)
    pieces = [c.choices[0] for c in stream if c.choices and c.choices[0].delta.content]
    assert [entry for piece in pieces for entry in piece.logprobs.content] == content
    assert all("".join(e.token for e in piece.logprobs.content) == piece.delta.content for piece in pieces)

    words = choice.message.content.split()
    assert len(words) >= 3, choice.message.content
    cut = client(url).chat.completions.create(**body, stop=[words[2]])
    kept = cut.choices[0].logprobs.content
    assert cut.choices[0].message.content == choice.message.content[:choice.message.content.index(words[2])]
    assert kept == content[:len(kept)] and cut.choices[0].message.content.startswith("".join(e.token for e in kept))
    assert len(kept) < len(content)

    both = client(url).chat.completions.create(**{**body, "top_logprobs": 0}, n=2)
    assert [[e.token for e in c.logprobs.content] for c in both.choices] == [[e.token for e in content]] * 2
    assert all(e.top_logprobs == [] for c in both.choices for e in c.logprobs.content)
    assert client(url).chat.completions.create(**{**body, "logprobs": False, "top_logprobs": None}
                                               ).choices[0].logprobs is None

    # Tokens that add no text (a special token the reply's text skips) keep their logprobs in a stream too: they
    # come with the choice's last chunk.
    start = persona.tokenizer.convert_tokens_to_ids("<|im_start|>")
    silent = {**body, "max_tokens": 3, "logit_bias": {str(start): 100}}
    whole = client(url).chat.completions.create(**silent).choices[0]
    assert whole.message.content == "" and [e.token for e in whole.logprobs.content] == ["<|im_start|>"] * 3
    streamed = [c.choices[0] for c in client(url).chat.completions.create(**silent, stream=True) if c.choices]
    assert [e for piece in streamed if piece.logprobs for e in piece.logprobs.content] == whole.logprobs.content
    assert streamed[-1].finish_reason == "length" and streamed[-1].logprobs.content == whole.logprobs.content


def test_a_characters_parts_carry_its_own_bytes_so_joined_they_give_it_back(url, persona):
    """OpenAI's ``bytes``: a character split over tokens shows each part as U+FFFD, and the parts' bytes joined are
    the character's UTF-8 (they were U+FFFD's own bytes, as vLLM sends them). SmolLM2's byte-level tokens here, and
    a byte-fallback tokenizer of Llama 2's kind beside."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from qlora_pipeline.modeling.engine import TokenLogprob
    from qlora_pipeline.serving.server import logprobs_body

    tokenizer = persona.tokenizer
    for text in ("🤗", "ありがとう", "I'm 中 and é 😀👍"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        body = logprobs_body(tokenizer, [TokenLogprob(i, -0.5, ((i, -0.5),)) for i in ids])
        assert b"".join(bytes(e["bytes"]) for e in body["content"]) == text.encode(), text
        assert b"".join(bytes(t["bytes"]) for e in body["content"] for t in e["top_logprobs"]) == text.encode()
        assert [e["token"] for e in body["content"]] == [tokenizer.decode([i]) for i in ids]  # as vLLM shows them
    assert "\ufffd" in tokenizer.decode(tokenizer("🤗", add_special_tokens=False)["input_ids"][:1])  # parts, tested

    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "<0xE4>": 3, "<0xB8>": 4, "<0xAD>": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    fallback = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    body = logprobs_body(fallback, [TokenLogprob(i, -0.5) for i in (2, 3, 4, 5)])
    assert [e["token"] for e in body["content"]] == ["a", "\ufffd", "\ufffd", "\ufffd"]
    assert [e["bytes"] for e in body["content"]] == [[0x61], [0xE4], [0xB8], [0xAD]]  # "a中"

    # Through the API: the emoji's first part forced as the reply's one token.
    first = tokenizer("🤗", add_special_tokens=False)["input_ids"][0]
    reply = client(url).chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=1, temperature=0, logprobs=True,
                                                logit_bias={str(first): 100})
    (entry,) = reply.choices[0].logprobs.content
    part = bytes(entry.bytes)
    assert entry.token == "\ufffd" and 0 < len(part) < 4 and part == "🤗".encode()[:len(part)]


def test_a_streamed_reply_is_timed_as_a_whole_one_is(url):
    """Time to first token and per output token are observed for streams too (they were for whole replies only)."""
    def counts() -> tuple[float, ...]:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return tuple(metric(text, f"qlora_pipeline:{name}_count") for name in (
            "time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"))

    before = counts()
    body = {"model": "bob", "messages": [{"role": "user", "content": "any plans tonight?"}], "max_tokens": 6,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200 and [line for line in response.iter_lines() if line][-1] == "data: [DONE]"
    time.sleep(0.5)  # the stream's end is recorded as the response closes
    assert [after - was for after, was in zip(counts(), before)] == [1, 1, 1]


def test_runtime_adapters_off_and_the_api_key(persona, engine, roots):
    settings = Settings(DEFAULTS, api_key=KEY, adapter_roots=[roots / "allowed"])
    with serving(create_app(persona, engine, settings)) as url:
        assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}  # no key needed, no names either
        assert httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()["models"] == [
            "base", "alice", "bob"]
        # the key is checked before the body is read: a client without it hears 401, not what its JSON lacks
        unread = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30,
                            headers={"content-type": "application/json"})
        assert unread.status_code == 401 and unread.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/", timeout=30).status_code == 200  # the chat page, which asks for the key
        missing = httpx.get(f"{url}/v1/models", timeout=30)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        assert [m.id for m in client(url, KEY).models.list().data] == ["base", "alice", "bob"]
        import openai

        with pytest.raises(openai.AuthenticationError):
            client(url, "nope").chat.completions.create(model="alice", messages=[{"role": "user", "content": "hi"}])
        off = httpx.post(f"{url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                         json={"lora_name": "carol", "lora_path": str(roots / "allowed" / "carol")})
        assert off.status_code == 403 and off.json()["error"]["code"] == "runtime_adapters_disabled"


def test_the_serve_command_listens_on_localhost_with_a_key_from_the_environment(small_base, small_adapters,
                                                                                tmp_path):
    port = free_port()
    env = {**pipeline_env(), "QLORA_PIPELINE_API_KEY": KEY}
    # `timeout`: the server stops by itself even if this test dies before its cleanup.
    proc = subprocess.Popen(["timeout", "300", str(BIN / "qlora-pipeline"), "serve", "--base", str(small_base),
                             "--adapter", f"alice={small_adapters['alice']}", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
        reply = client(f"http://127.0.0.1:{port}", KEY).chat.completions.create(
            model="alice", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].message.content.strip() and 1 <= reply.usage.completion_tokens <= 4
        assert reply.choices[0].finish_reason in ("stop", "length")
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if listening:  # where ss exists: bound to the loopback address only (4th column: the local address)
            assert [line.split()[3] for line in listening.splitlines()] == [f"127.0.0.1:{port}"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_bad_adapter_clearly(small_base, tmp_path):
    proc = subprocess.run([str(BIN / "qlora-pipeline"), "serve", "--base", str(small_base),
                           "--adapter", f"ghost={tmp_path / 'ghost'}"], cwd=tmp_path, env=pipeline_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "ghost" in proc.stderr and "no such adapter folder" in proc.stderr


def test_serve_refuses_an_empty_key(tmp_path):
    """--api-key '' served with no key at all, without a word; refused before the model loads."""
    for key in ("", " key "):
        proc = subprocess.run([str(BIN / "qlora-pipeline"), "serve", "--base", str(tmp_path / "nowhere"),
                               "--api-key", key, "--port", str(free_port())], cwd=tmp_path, env=pipeline_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "--api-key: empty, or with spaces around it" in proc.stderr, proc.stderr
