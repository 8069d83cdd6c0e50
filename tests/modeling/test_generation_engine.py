"""The generation engine on a small random 4-bit Llama (`small_base`) with three adapters: generate()'s tokens,
continuous batching, sharing."""

from __future__ import annotations

import threading
import time
from typing import Callable

import pytest
import torch

from qlora_pipeline.modeling.engine import (GREEDY, IDLE_CACHE_POSITIONS, PREFILL_OVERHEAD_TOKENS, Engine, Request,
                                           SlotCache, chat_prompt_ids, prefill_chunks, prefill_overhead)
from qlora_pipeline.modeling.sampling import RowDecoding
from qlora_pipeline.serving.models import AdapterSpec, load_persona_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = ["hey, how was your weekend?", "do you like dogs or cats more?", "what are you cooking tonight?",
           "any plans for the summer?", "ok"]


@pytest.fixture(scope="module")
def persona(small_base, small_adapters):
    specs = [AdapterSpec(name, str(path)) for name, path in small_adapters.items()]
    return load_persona_model(small_base, specs)


@pytest.fixture(scope="module")
def prompt_ids(persona):
    return chat_prompt_ids(persona.tokenizer, [[{"role": "user", "content": text}] for text in PROMPTS])


def engine_for(persona, **kwargs) -> Engine:
    return Engine(persona.model, persona.tokenizer, persona.row_adapters, lock=persona.lock,
                  autocast=persona.autocast, **kwargs)


def generate_alone(persona, ids: list[int], adapter: str | None, tokens: int, **kwargs) -> list[int]:
    """``model.generate`` on one prompt, the adapter set the PEFT way (or switched off for the base)."""
    return generate_batch(persona, [ids], adapter, tokens, **kwargs)[0]


def generate_batch(persona, prompts: list[list[int]], adapter: str | None, tokens: int, **kwargs) -> list[list[int]]:
    """``model.generate`` on prompts of one adapter at once, left-padded: each one's new tokens up to its end token.

    The references for many rows in one call instead of one call each (generate() at batch 1 was most
    of this module's time). In float32 a row's greedy tokens do not depend on the rows beside it (the
    engine's own mixed batches rest on the same) nor on its left padding, but for one thing: the
    repetition controls see the pad token (id 0, ``<|endoftext|>``) among a padded row's tokens, which
    only matters where a reply would use it. Each test checks its most padded rows against generate()
    on that prompt alone (``assert_alone``).
    """
    model, tokenizer = persona.model, persona.tokenizer
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    context = model.disable_adapter() if adapter is None else _active(model, adapter)
    with context, torch.no_grad(), persona.autocast():
        output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **kwargs)
    rows = [row[width:].tolist() for row in output]
    return [new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new for new in rows]


def references(persona, requests: list[Request], arguments: dict[RowDecoding, dict] | None = None
               ) -> list[list[int]]:
    """generate()'s tokens for each request: one batched call per adapter and decoding, each row cut to its own
    limit (greedy tokens do not depend on how many come after). ``arguments``: generate()'s keyword
    arguments for a request's decoding; plain greedy needs none."""
    arguments = arguments or {}
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        assert request.decoding == GREEDY or request.decoding in arguments, f"no arguments for {request.decoding}"
        groups.setdefault((request.adapter, request.decoding), []).append(index)
    out: list[list[int]] = [[] for _ in requests]
    for (adapter, decoding), members in groups.items():
        tokens = max(requests[i].max_new_tokens for i in members)
        made = generate_batch(persona, [requests[i].prompt_ids for i in members], adapter, tokens,
                              **arguments.get(decoding, {}))
        for i, new in zip(members, made):
            out[i] = new[: requests[i].max_new_tokens]
    return out


def assert_alone(persona, requests: list[Request], results: list, index: int,
                 arguments: dict[RowDecoding, dict] | None = None) -> None:
    """Row ``index`` of an engine run gives generate()'s tokens on its prompt alone, unpadded."""
    request = requests[index]
    alone = generate_alone(persona, request.prompt_ids, request.adapter, request.max_new_tokens,
                           **(arguments or {}).get(request.decoding, {}))
    assert results[index].token_ids == alone, (request.adapter, request.decoding)


class _active:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.model.set_adapter(self.name)

    def __exit__(self, *exc):
        return False


def test_greedy_rows_give_generates_tokens_for_every_adapter_in_mixed_continuous_batches(persona, prompt_ids):
    adapters = [None, "alice", "bob", "carol"]
    requests = [Request(ids, adapter, max_new_tokens=6 + 3 * (i % 4)) for adapter in adapters
                for i, ids in enumerate(prompt_ids)]
    # Batches of 3 out of 20 rows of uneven limits: rows keep leaving and joining mixed batches.
    engine = engine_for(persona, max_batch_size=3)
    results = engine.run(requests)
    expected = references(persona, requests)
    for request, result, tokens in zip(requests, results, expected):
        assert result.token_ids == tokens, request.adapter
    # and generate()'s on the prompt alone: "ok", one token, seven of padding in the batched reference
    for adapter in adapters:
        assert_alone(persona, requests, results, requests.index(
            next(r for r in requests if r.adapter == adapter and r.prompt_ids == prompt_ids[4])))
    by_adapter = {adapter: [r.text for q, r in zip(requests, results) if q.adapter == adapter] for adapter in adapters}
    assert len({tuple(texts) for texts in by_adapter.values()}) == 4  # every adapter changes the replies
    assert engine.stats.prefills > 1 and engine.stats.decode_steps > 0


def test_greedy_rows_with_repetition_controls_give_generates_tokens(persona, prompt_ids):
    decoding = RowDecoding(repetition_penalty=1.3, no_repeat_ngram_size=2)
    controlled = [Request(ids, adapter, decoding, max_new_tokens=16) for adapter in (None, "alice")
                  for ids in prompt_ids[:2]]
    plain = [Request(ids, adapter, max_new_tokens=16) for adapter in (None, "alice") for ids in prompt_ids[:2]]
    results = engine_for(persona, max_batch_size=3).run(controlled + plain)  # mixed with rows without them
    arguments = {decoding: {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}}
    expected = references(persona, controlled + plain, arguments)
    for result, tokens in zip(results, expected):
        assert result.token_ids == tokens
    assert_alone(persona, controlled + plain, results, 2, arguments)  # alice's first prompt: padded by one
    # the controls did change some replies: the test would pass vacuously otherwise
    assert [r.token_ids for r in results[:4]] != [r.token_ids for r in results[4:]]


def test_greedy_rows_with_a_length_decay_give_generates_tokens_and_end_sooner(persona, prompt_ids):
    decoding = RowDecoding(repetition_penalty=1.2, exponential_decay_length_penalty=(2, 1.6))
    decayed = [Request(ids, adapter, decoding, max_new_tokens=24) for adapter in (None, "bob") for ids in prompt_ids]
    plain = [Request(ids, adapter, RowDecoding(repetition_penalty=1.2), max_new_tokens=24) for adapter in (None, "bob")
             for ids in prompt_ids]
    results = engine_for(persona, max_batch_size=4).run(decayed + plain)
    arguments = {decoding: {"repetition_penalty": 1.2, "exponential_decay_length_penalty": (2, 1.6)},
                 RowDecoding(repetition_penalty=1.2): {"repetition_penalty": 1.2}}
    expected = references(persona, decayed + plain, arguments)
    for result, tokens in zip(results, expected):
        assert result.token_ids == tokens
    for index in (9, 14):  # "ok" for bob under the decay, and for the base without it: the most padded
        assert_alone(persona, decayed + plain, results, index, arguments)
    ended = [sum(r.finish_reason == "stop" for r in part) for part in (results[:10], results[10:])]
    lengths = [sum(r.completion_tokens for r in part) for part in (results[:10], results[10:])]
    assert ended[0] > ended[1] and lengths[0] < lengths[1], (ended, lengths)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_under_bfloat16_autocast_the_cache_and_head_are_cast_once_and_no_token_changes(persona, prompt_ids,
                                                                                       monkeypatch):
    """What a bfloat16 machine runs, on any machine: autocast casts a frozen weight, and attention's keys and
    values, again at every call; the engine keeps them cast instead, which must change no token against the
    engine that let autocast cast. (Against generate, a bfloat16 row may part on a near-tie: another cache
    layout is another sum order, as another batch shape is.)"""
    requests = [Request(ids, adapter, max_new_tokens=10) for ids in prompt_ids[:3] for adapter in (None, "alice")]
    # two more rows of a prompt and adapter already there: they copy its keys and values from the cache
    requests += [Request(prompt_ids[0], "alice", RowDecoding(temperature=0.9), max_new_tokens=10, seed=seed)
                 for seed in (1, 2)]

    def run() -> tuple[Engine, list[list[int]]]:
        engine = Engine(persona.model, persona.tokenizer, persona.row_adapters, lock=persona.lock,
                        autocast=bf16_autocast, max_batch_size=4)
        return engine, [r.token_ids for r in engine.run(requests)]

    engine, cast_once = run()
    # every path the cache has: the workload's shared prefix written into each prefill, rows copied to followers
    assert engine.stats.shared_prefix_tokens > 0 and engine.stats.shared_prefills >= 1
    assert {k.dtype for k in engine.cache.keys} == {v.dtype for v in engine.cache.values} == {torch.bfloat16}
    assert engine._head_cast[1] is not None and engine._head_cast[1].dtype == torch.bfloat16

    monkeypatch.setattr(SlotCache, "stored_dtype", staticmethod(lambda states: states.dtype))
    monkeypatch.setattr(Engine, "_head_weight_cast", lambda self, head, device: None)
    before, cast_every_call = run()
    assert {k.dtype for k in before.cache.keys} == {torch.float32}  # the path before: autocast cast them
    assert cast_once == cast_every_call


def test_the_heads_cast_weight_is_reused_until_the_weight_changes(persona):
    engine = engine_for(persona)
    head = engine._parts[1]
    hidden = torch.randn(3, head.in_features)
    with bf16_autocast():
        first = engine._head_weight_cast(head, "cpu")
        assert first is not None and first.dtype == torch.bfloat16
        assert engine._head_weight_cast(head, "cpu") is first
        assert torch.equal(engine._head(hidden), head(hidden).float())  # what autocast's own linear gives
    assert engine._head_weight_cast(head, "cpu") is None  # no autocast: the head runs as it is
    original = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.mul_(2)
        with bf16_autocast():
            assert torch.equal(engine._head_weight_cast(head, "cpu"), head.weight.detach().to(torch.bfloat16))
            assert torch.equal(engine._head(hidden), head(hidden).float())
    finally:
        with torch.no_grad():
            head.weight.copy_(original)


def test_no_decode_step_is_spent_on_a_finished_row(persona, prompt_ids):
    """Each row is in exactly as many decode steps as tokens it took after its first (which the prefill gives)."""
    requests = [Request(ids, adapter, max_new_tokens=limit) for ids in prompt_ids
                for adapter, limit in ((None, 3), ("bob", 17), ("carol", 1))]
    engine = engine_for(persona, max_batch_size=4)
    results = engine.run(requests)
    assert engine.stats.row_steps == sum(r.completion_tokens - 1 for r in results)
    assert [r.completion_tokens for r in results if r.finish_reason == "length"] and all(
        r.completion_tokens <= q.max_new_tokens for q, r in zip(requests, results))
    assert engine.stats.row_steps < engine.stats.decode_steps * 4  # the batch was not always full: rows left


def test_rows_sharing_an_adapter_and_a_prompt_are_prefilled_once(persona, prompt_ids):
    sampled = RowDecoding(temperature=0.9, top_p=0.95)
    requests = [Request(prompt_ids[0], "alice", max_new_tokens=8),
                Request(prompt_ids[0], "alice", sampled, max_new_tokens=8, seed=1),
                Request(prompt_ids[0], "alice", sampled, max_new_tokens=8, seed=2),
                Request(prompt_ids[0], None, max_new_tokens=8),  # another adapter: its own prefill
                Request(prompt_ids[1], "alice", max_new_tokens=8)]
    engine = engine_for(persona)
    shared = engine.run(requests)
    assert engine.stats.prefill_rows == 3 and engine.stats.shared_prefills == 2
    alone = [engine_for(persona).run([request])[0] for request in requests]
    assert [r.token_ids for r in shared] == [r.token_ids for r in alone]
    assert shared[1].token_ids != shared[2].token_ids  # two seeds, two samples


def _cost(widths: list[int], runs: list[range], overhead: int) -> int:
    return sum(len(run) * widths[run.stop - 1] + overhead for run in runs)


def test_prefill_chunks_cut_where_padding_costs_more_than_a_forward_and_never_pass_the_limit():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        widths = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 9)))
        limit, overhead = rng.choice([40, 120, 400]), rng.choice([0, 8, 48])
        runs = prefill_chunks(widths, limit, overhead)
        assert [i for run in runs for i in run] == list(range(len(widths)))  # every row once, in order
        assert all(len(run) == 1 or len(run) * widths[run.stop - 1] <= limit for run in runs)
        best = None  # every way of cutting the sorted rows into runs that fit
        for cuts in itertools.product((False, True), repeat=len(widths) - 1):
            edges = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), len(widths)]
            candidate = [range(a, b) for a, b in zip(edges, edges[1:])]
            if all(len(r) == 1 or len(r) * widths[r.stop - 1] <= limit for r in candidate):
                cost = _cost(widths, candidate, overhead)
                best = cost if best is None else min(best, cost)
        assert _cost(widths, runs, overhead) == best, (widths, limit, overhead)
    # Short prompts and long ones: one forward each, not the short ones padded to the long ones' width.
    assert prefill_chunks([10] * 8 + [100] * 4, 2048, 48) == [range(0, 8), range(8, 12)]
    assert prefill_chunks([10] * 8 + [100] * 4, 2048, 10 ** 6) == [range(0, 12)]  # a forward costlier than padding
    assert prefill_chunks([3000, 3000], 2048, 48) == [range(0, 1), range(1, 2)]  # wider than the limit: alone
    # A forward costs more tokens' work where a token costs less: in 16 bits (AMX, GPUs). The measured values.
    assert prefill_overhead(torch.bfloat16) == prefill_overhead(torch.float16) == 256
    assert prefill_overhead(torch.float32) == 48


def test_prompts_of_two_lengths_are_prefilled_apart_and_give_the_same_tokens(persona):
    """Four short prompts and four long ones: two forwards, neither padded to the other's width (whatever the
    dtype: padding the short ones costs more than the larger of the forward's costs)."""
    words = max(PREFILL_OVERHEAD_TOKENS.values()) // 4 + 32  # a word a token at least: 32 x 4 tokens of margin
    texts = ["hi", "yo", "hey", "sup"] + [f"{word} " * words for word in ("tell", "me", "more", "now")]
    prompts = chat_prompt_ids(persona.tokenizer, [[{"role": "user", "content": text}] for text in texts])
    requests = [Request(ids, None, max_new_tokens=4) for ids in prompts]
    engine = engine_for(persona, max_batch_size=8)
    together = engine.run(requests)
    shared = engine.stats.shared_prefix_tokens // len(requests)  # the template's opening, run once beforehand
    widths = [len(ids) - shared for ids in prompts]
    assert engine.stats.prefills == 2, (prefill_overhead(engine._compute_dtype), widths)
    assert engine.stats.prefill_padded_tokens == 4 * max(widths[:4]) + 4 * max(widths[4:]) < 8 * max(widths)
    alone = [engine_for(persona).run([request])[0] for request in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_a_seeded_row_gives_the_same_tokens_whatever_it_is_batched_with(persona, prompt_ids):
    request = Request(prompt_ids[2], "carol", RowDecoding(temperature=1.0, top_k=40), max_new_tokens=10, seed=7)
    alone = engine_for(persona).run([request])[0].token_ids
    crowd = [Request(ids, adapter, RowDecoding(temperature=0.8), max_new_tokens=4 + i, seed=i)
             for i, (ids, adapter) in enumerate(zip(prompt_ids, ["alice", None, "bob", "alice", None]))]
    together = engine_for(persona, max_batch_size=3).run([*crowd[:2], request, *crowd[2:]])[2].token_ids
    assert alone == together


def test_stop_strings_token_limits_and_streaming(persona, prompt_ids):
    full = engine_for(persona).run([Request(prompt_ids[0], "alice", max_new_tokens=16)])[0]
    stop = full.text.split()[2]
    pieces: list[str] = []
    stopped, limited = engine_for(persona).run([
        Request(prompt_ids[0], "alice", max_new_tokens=16, stop=(stop,), on_text=pieces.append),
        Request(prompt_ids[1], "bob", max_new_tokens=5)])
    assert stopped.finish_reason == "stop" and stop not in stopped.text and full.text.startswith(stopped.text)
    assert "".join(pieces) == stopped.text
    assert limited.finish_reason == "length" and limited.completion_tokens == 5 and len(limited.token_ids) == 5


def collect(count: int) -> tuple[dict, threading.Event, Callable]:
    """Results by key, an event set once ``count`` have come, and ``finish(key)``: the callback that keeps one."""
    results: dict = {}
    done = threading.Event()

    def finish(key):
        def on_done(result):
            results[key] = result
            if len(results) == count:
                done.set()
        return on_done
    return results, done, finish


def test_the_engine_thread_admits_requests_as_they_come_and_drops_cancelled_ones(persona, prompt_ids):
    engine = engine_for(persona, max_batch_size=4, admit_fraction=0.0).start()
    try:
        results, done, finish = collect(3)
        cancelled = threading.Event()
        cancelled.set()

        engine.submit(Request(prompt_ids[0], "alice", max_new_tokens=12), finish("first"))
        engine.submit(Request(prompt_ids[1], None, max_new_tokens=12, cancelled=cancelled), finish("gone"))
        engine.submit(Request(prompt_ids[2], "nobody", max_new_tokens=4), finish("unknown"))
        assert done.wait(120)
        assert results["first"].token_ids == generate_alone(persona, prompt_ids[0], "alice", 12)
        assert results["gone"].finish_reason == "cancelled" and results["gone"].completion_tokens == 0
        assert results["unknown"].finish_reason == "error" and "nobody" in results["unknown"].error
    finally:
        engine.stop()


def test_a_prompt_longer_than_a_prefill_is_prefilled_a_chunk_a_step_while_the_others_decode(persona, prompt_ids):
    """In one forward, a 7,000-token prompt held every other row of a server for 25 s. Chunked, each long prompt's
    greedy reply is still generate()'s, two long prompts take their turns, and a second choice of one shares its
    prefill."""
    longs = chat_prompt_ids(persona.tokenizer, [[{"role": "user", "content": f"{word} " * 150}]
                                                for word in ("hello there", "good night")])
    engine = engine_for(persona, max_batch_size=4, admit_fraction=0.0, prefill_tokens=64)
    events: list[str] = []
    part, step = engine._prefill_part, engine._decode_step
    engine._prefill_part = lambda *args: (events.append("chunk"), part(*args))[1]
    engine._decode_step = lambda: (events.append("decode"), step())[1]
    engine.start()
    try:
        results, done, keep = collect(4)

        engine.submit_together([(Request(prompt_ids[0], "alice", max_new_tokens=40), keep("short"), print),
                                (Request(longs[0], "alice", max_new_tokens=6), keep("long"), print),
                                (Request(longs[0], "alice", max_new_tokens=6), keep("twin"), print),
                                (Request(longs[1], None, max_new_tokens=6), keep("other"), print)])
        assert done.wait(120)
    finally:
        engine.stop()
    assert all(len(ids) > 4 * 64 for ids in longs)
    first, last = events.index("chunk"), len(events) - 1 - events[::-1].index("chunk")
    chunks = events.count("chunk")
    assert chunks >= 2 * 4 and events[first:last].count("decode") >= chunks - 2  # the short row decoded between
    assert results["short"].token_ids == generate_alone(persona, prompt_ids[0], "alice", 40)
    assert results["long"].token_ids == generate_alone(persona, longs[0], "alice", 6)
    assert results["other"].token_ids == generate_alone(persona, longs[1], None, 6)
    assert results["long"].prompt_tokens == len(longs[0])
    assert results["twin"].token_ids == results["long"].token_ids  # a second choice: the prefill's keys copied
    # A stage's whole workload waits for no one: its long prompts keep one forward each, admitted together.
    events.clear()
    assert [r.token_ids for r in engine.run([Request(ids, "alice", max_new_tokens=6) for ids in longs])] == [
        generate_alone(persona, ids, "alice", 6) for ids in longs]
    assert "chunk" not in events


def test_a_long_prompt_cancelled_between_its_chunks_stops_there(persona):
    """Its client gone after the first chunk: no more chunks, no token, and the engine free for the next request."""
    long = chat_prompt_ids(persona.tokenizer, [[{"role": "user", "content": "hello there " * 150}]])[0]
    engine = engine_for(persona, max_batch_size=4, admit_fraction=0.0, prefill_tokens=64)
    cancel, chunks = threading.Event(), []
    part = engine._prefill_part

    def part_then_cancel(*args):
        chunks.append(args[2])
        part(*args)
        cancel.set()

    engine._prefill_part = part_then_cancel
    engine.start()
    try:
        got, done = [], threading.Event()
        engine.submit(Request(long, "alice", max_new_tokens=6, cancelled=cancel), lambda r: (got.append(r), done.set()))
        assert done.wait(120)
        assert got[0].finish_reason == "cancelled" and got[0].completion_tokens == 0 and chunks == [0]
        done.clear()
        engine.submit(Request(long[-40:], "alice", max_new_tokens=3), lambda r: (got.append(r), done.set()))
        assert done.wait(120) and got[1].finish_reason in ("stop", "length")
    finally:
        engine.stop()


def test_an_idle_engine_lets_a_long_prompts_cache_go_and_answers_the_same_after(persona, prompt_ids):
    """The cache grows every slot to the longest row; a server that took one long prompt held it for its life. Let go
    once idle a while, not at once: a client asking for long replies one after another paid a new cache each."""
    engine = engine_for(persona, max_batch_size=4, admit_fraction=0.0)
    # IDLE_RELEASE_SECONDS, 10, in a server; 3 here: the check that the cache is kept comes after this thread wakes
    engine.idle_release_seconds = 3.0
    engine.start()
    long_prompt = chat_prompt_ids(persona.tokenizer, [[{"role": "user", "content": "hello " * 1500}]])[0]
    try:
        def reply(ids: list[int]):
            done = threading.Event()
            got = []
            engine.submit(Request(ids, "alice", max_new_tokens=6), lambda result: (got.append(result), done.set()))
            assert done.wait(120)
            return got[0]

        short = reply(prompt_ids[0])
        assert 0 < engine.cache.capacity <= IDLE_CACHE_POSITIONS  # a short prompt's cache is kept for the next
        kept = engine.cache
        assert reply(prompt_ids[1]).completion_tokens and engine.cache is kept
        assert reply(long_prompt).completion_tokens
        assert engine.cache.capacity > IDLE_CACHE_POSITIONS  # kept a while: the next request may be as long
        deadline = time.monotonic() + 30
        while engine.cache.capacity > IDLE_CACHE_POSITIONS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.cache.capacity == 0 and engine.cache.keys == []
        assert reply(prompt_ids[0]).token_ids == short.token_ids
    finally:
        engine.stop()


def test_a_callback_that_raises_ends_its_own_row_and_never_the_engine(persona, prompt_ids):
    """A consumer that fails (a server's event loop closed, a stream gone) costs its own request only: the
    rows batched with it give their tokens, and the engine's thread serves the requests after it."""
    def broken_stream(delta):
        raise RuntimeError("the client went away")

    streamed = Request(prompt_ids[0], "alice", max_new_tokens=8, on_text=broken_stream)
    beside = Request(prompt_ids[1], "alice", max_new_tokens=8)
    broken, kept = engine_for(persona, max_batch_size=4).run([streamed, beside])
    assert broken.finish_reason == "error" and "the client went away" in broken.error
    assert kept.finish_reason in ("stop", "length") and kept.token_ids == generate_alone(persona, prompt_ids[1], "alice", 8)

    engine = engine_for(persona, max_batch_size=4, admit_fraction=0.0).start()
    stopped = []
    try:
        answered = threading.Event()
        results = {}

        def raises(value):
            raise RuntimeError("Event loop is closed")

        def keep(result):
            results["after"] = result
            answered.set()

        engine.submit(Request(prompt_ids[2], None, max_new_tokens=4), raises)
        engine.submit(Request(prompt_ids[3], "bob", max_new_tokens=4), raises)
        engine.submit(Request(prompt_ids[4], None, max_new_tokens=4), keep)
        assert answered.wait(120), "the engine's thread died with the first callback"
        assert results["after"].token_ids == generate_alone(persona, prompt_ids[4], None, 4)
        assert engine._thread is not None and engine._thread.is_alive()
        # Stopped with two requests in flight: the first one's on_error raises, the second still hears.
        engine.submit(Request(prompt_ids[0], "alice", max_new_tokens=40), keep, on_error=raises)
        engine.submit(Request(prompt_ids[1], "bob", max_new_tokens=40), keep, on_error=stopped.append)
    finally:
        engine.stop()
    assert len(stopped) == 1 and "stopped" in str(stopped[0])


def test_a_scored_continuation_gives_the_models_own_loss_in_the_prompts_prefill(persona, prompt_ids):
    """score_ids: the reference reply's NLL, teacher forced in the prompt's prefill, equals a plain forward's."""
    reference = persona.tokenizer("sounds great, count me in", add_special_tokens=False)["input_ids"] + [
        persona.tokenizer.eos_token_id]
    requests = [Request(prompt_ids[0], "alice", max_new_tokens=6, score_ids=reference),
                Request(prompt_ids[0], "alice", RowDecoding(temperature=1.0), max_new_tokens=6, seed=3),
                Request(prompt_ids[1], None, max_new_tokens=6, score_ids=reference[:3]),
                Request(prompt_ids[2], "bob", max_new_tokens=6)]
    engine = engine_for(persona)
    results = engine.run(requests)
    assert engine.stats.prefill_rows == 3  # the scored row and its sampled sibling: one forward
    for request, result in zip(requests, results):
        if not request.score_ids:
            assert result.score is None
            continue
        ids = torch.tensor([list(request.prompt_ids) + list(request.score_ids)])
        labels = torch.full_like(ids, -100)
        labels[0, len(request.prompt_ids):] = torch.tensor(request.score_ids)
        model = persona.model
        context = model.disable_adapter() if request.adapter is None else _active(model, request.adapter)
        with context, torch.no_grad(), persona.autocast():
            loss = model(input_ids=ids, labels=labels).loss
        nll, count = result.score
        assert count == len(request.score_ids) and nll / count == pytest.approx(loss.item(), rel=1e-4)
    # scoring does not change what is generated
    assert results[0].token_ids == engine_for(persona).run([Request(prompt_ids[0], "alice", max_new_tokens=6)])[0].token_ids


def test_each_tokens_logprob_is_the_models_own_at_its_step_and_changes_no_token(persona, prompt_ids):
    """Request.logprobs: every generated token's log-probability and the k likeliest, equal to a plain teacher-forced
    forward's raw log-softmax at that position (decode steps and a shared prefill alike); asking changes no token.

    Held to a forward of the base: this module's adapters are chaotic (updates twice the base weights' norm), where
    float32 summation order alone moves a logit by 0.16 (conftest's trained_size_adapters)."""
    sampled = RowDecoding(temperature=1.3, top_p=0.9, repetition_penalty=1.2)
    requests = [Request(prompt_ids[0], None, max_new_tokens=8, logprobs=3),
                Request(prompt_ids[0], None, sampled, max_new_tokens=8, seed=4, logprobs=0),  # shares the prefill
                Request(prompt_ids[1], "alice", max_new_tokens=8),
                Request(prompt_ids[3], "bob", sampled, max_new_tokens=8, seed=5, logprobs=2)]
    results = engine_for(persona).run(requests)
    plain = engine_for(persona).run([Request(r.prompt_ids, r.adapter, r.decoding, r.max_new_tokens, r.seed)
                                     for r in requests])
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]
    assert results[2].logprobs is None
    for request, result in zip(requests, results):
        if request.logprobs is None:
            continue
        assert [entry.token_id for entry in result.logprobs] == result.token_ids
        for entry in result.logprobs:
            values = [value for _, value in entry.top]
            assert len(entry.top) == request.logprobs and values == sorted(values, reverse=True)
            assert entry.logprob <= 0 and all(value >= entry.logprob or token != entry.token_id
                                              for token, value in entry.top)
        if request.adapter is not None:
            continue
        ids = torch.tensor([list(request.prompt_ids) + result.token_ids])
        with persona.model.disable_adapter(), torch.no_grad(), persona.autocast():
            raw = torch.log_softmax(persona.model(input_ids=ids).logits[0].float(), dim=-1)
        steps = raw[len(request.prompt_ids) - 1: -1]  # the distribution each generated token was drawn at
        picked = steps.gather(1, torch.tensor(result.token_ids).view(-1, 1)).squeeze(1)
        assert [entry.logprob for entry in result.logprobs] == pytest.approx(picked.tolist(), abs=1e-4)
        values, top_ids = steps.topk(request.logprobs, dim=-1)
        assert [[t for t, _ in entry.top] for entry in result.logprobs] == top_ids.tolist()
        assert [v for entry in result.logprobs for _, v in entry.top] == pytest.approx(values.flatten().tolist(),
                                                                                        abs=1e-4)


def test_a_characters_byte_tokens_keep_their_logprobs_with_a_byte_fallback_tokenizer():
    """Llama-2's kind of tokenizer decodes each byte of an unfinished character as its own U+FFFD: where a token's text
    ends falls back when the character completes ("a", "a\ufffd", "a\ufffd\ufffd", "a中"). The logprobs of all four
    tokens are the reply's, streamed with the text they make."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from qlora_pipeline.modeling.engine import TokenLogprob, _Row

    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "<0xE4>": 3, "<0xB8>": 4, "<0xAD>": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    assert [tokenizer.decode([2, 3, 4, 5][:n]) for n in (1, 2, 3, 4)] == ["a", "a\ufffd", "a\ufffd\ufffd", "a中"]
    streamed: list[tuple[str, list[int]]] = []
    pending: list[TokenLogprob] = []
    row = _Row(0, Request([2], None, max_new_tokens=8, logprobs=0, on_logprobs=pending.extend,
                          on_text=lambda text: streamed.append((text, [e.token_id for e in pending]))
                          or pending.clear()), tokenizer, frozenset({1}))
    for token in (2, 3, 4, 5, 1):
        row.next_logprob = TokenLogprob(token, -0.5)
        row.accept(token)
    result = row.result()
    assert result.text == "a中" and [entry.token_id for entry in result.logprobs] == [2, 3, 4, 5]
    assert "".join(text for text, _ in streamed) == "a中"
    assert [token for _, tokens in streamed for token in tokens] == [2, 3, 4, 5]


def test_logprobs_of_a_vocabulary_smaller_than_k_and_of_nan_logits_are_given_not_raised():
    """k past the vocabulary gives every token; a NaN logit (a broken model) is floored as -inf is: JSON has neither."""
    from types import SimpleNamespace

    from qlora_pipeline.modeling.engine import LOGPROB_FLOOR, _note_logprobs

    rows = [SimpleNamespace(request=SimpleNamespace(logprobs=20), next_logprob=None),
            SimpleNamespace(request=SimpleNamespace(logprobs=None), next_logprob=None)]
    logits = torch.tensor([[2.0, 1.0, float("-inf"), float("nan"), 0.0], [0.0] * 5])
    _note_logprobs(rows, logits, [0, 1], torch.tensor([3, 0]))
    entry = rows[0].next_logprob
    assert entry.token_id == 3 and entry.logprob == LOGPROB_FLOOR and len(entry.top) == 5
    assert all(value == LOGPROB_FLOOR or value <= 0 for _, value in entry.top) and rows[1].next_logprob is None
