"""split: persona choice, example shape, grouping, determinism, leakage accounting."""

from __future__ import annotations

from collections import Counter

import pytest

from qlora_pipeline.data.splitting import (chat_messages, conversation_examples, resolve_persona,
                                           split_examples, to_turns)
from qlora_pipeline.errors import PipelineError


def conv(cid, *messages, meta=None):
    return {"id": cid, "messages": [{"speaker": s, "text": t, "time": None} for s, t in messages], "meta": meta or {}}


def corpus(n=60):
    """n two-person conversations; 'p' is the most active speaker."""
    out = []
    for i in range(n):
        other = f"u{i % 7}"
        out.append(conv(f"c{i:03d}", (other, f"hello {i}"), ("p", f"hi there {i}"), ("p", f"how are you {i}"),
                        (other, f"fine, and you {i}?"), ("p", f"great {i}, thanks")))
    return out


def test_auto_persona_is_the_most_active_speaker():
    assert resolve_persona(corpus(), "auto", "x") == "p"


def test_auto_persona_honours_a_declared_persona():
    convs = [conv("a", ("user", "q1"), ("assistant", "a1"), meta={"persona": "assistant"}),
             conv("b", ("user", "q2"), ("user", "q3"), ("assistant", "a2"), meta={"persona": "assistant"})]
    assert resolve_persona(convs, "auto", "x") == "assistant"


def test_unknown_persona_names_the_key_and_suggests_ids():
    with pytest.raises(PipelineError, match=r"split\.persona: speaker 'zed' does not occur in data/clean.*p \(\d+ messages\)"):
        resolve_persona(corpus(), "zed", "data/clean/conversations.jsonl")


def test_turns_merge_consecutive_messages():
    turns = to_turns(conv("c", ("a", "x"), ("a", "y"), ("b", "z"))["messages"])
    assert turns == [{"speaker": "a", "text": "x\ny"}, {"speaker": "b", "text": "z"}]


def test_chat_messages_start_with_user_and_alternate():
    turns = [{"speaker": "p", "text": "mine"}, {"speaker": "a", "text": "1"}, {"speaker": "b", "text": "2"},
             {"speaker": "p", "text": "3"}]
    assert chat_messages(turns, "p") == [{"role": "user", "content": "1\n2"}, {"role": "assistant", "content": "3"}]


def test_examples_have_context_roles_system_prompt_and_target(params_factory):
    cfg = params_factory({"split.context_turns": 2, "split.system_prompt": "Be you."}).split
    examples = conversation_examples(corpus(1)[0], cfg, "p", Counter())
    assert [ex["target"] for ex in examples] == ["hi there 0\nhow are you 0", "great 0, thanks"]
    assert examples[1]["messages"][0] == {"role": "system", "content": "Be you."}
    # context_turns=2: the turn before the target and the one before that, trimmed to start with user
    assert examples[1]["messages"][1:] == [{"role": "user", "content": "fine, and you 0?"}]
    assert examples[0]["messages"][1:] == [{"role": "user", "content": "hello 0"}]
    assert examples[0]["id"] == "c000:1" and examples[0]["conversation_id"] == "c000"


def test_all_persona_makes_every_turn_a_target(params_factory):
    cfg = params_factory({"split.persona": "all"}).split
    examples = conversation_examples(corpus(1)[0], cfg, "all", Counter())
    assert [ex["speaker"] for ex in examples] == ["p", "u0", "p"]
    assert examples[1]["messages"][-1] == {"role": "user", "content": "hi there 0\nhow are you 0"}


def test_split_is_grouped_by_conversation(params_factory):
    splits, metrics = split_examples(corpus(), params_factory({"split.max_examples.train": None}).split, 1, "x")
    owners = {name: {ex["conversation_id"] for ex in rows} for name, rows in splits.items()}
    assert not owners["train"] & owners["val"] and not owners["train"] & owners["test"]
    assert not owners["val"] & owners["test"]
    assert metrics["train"]["conversations"] == 48 and metrics["val"]["conversations"] == 6
    assert sum(metrics[n]["examples"] for n in ("train", "val", "test")) == 60 * 2


def test_same_seed_same_split_other_seed_other_split(params_factory):
    cfg = params_factory().split
    first, _ = split_examples(corpus(), cfg, 7, "x")
    again, _ = split_examples(corpus(), cfg, 7, "x")
    other, _ = split_examples(corpus(), cfg, 8, "x")
    assert first == again
    assert first["test"] != other["test"]


def test_caps_are_seeded_samples(params_factory):
    cfg = params_factory({"split.max_examples.train": 10}).split
    splits, metrics = split_examples(corpus(), cfg, 3, "x")
    assert metrics["train"]["examples"] == 10 and metrics["train"]["examples_before_cap"] == 96


def test_leakage_metric_counts_verbatim_test_targets_in_train(params_factory):
    convs = corpus()
    for c in convs:  # the same long reply everywhere: every test target of that kind leaks
        c["messages"][-1]["text"] = "that sounds like a wonderful plan to me"
    _, metrics = split_examples(convs, params_factory().split, 1, "x")
    assert metrics["test_targets_in_train"] == metrics["test"]["conversations"]
    assert metrics["test_long_targets_in_train"] == metrics["test_targets_in_train"]
    assert 0 < metrics["test_targets_in_train_share"] <= 0.5


def test_too_little_data_for_a_train_split(params_factory):
    with pytest.raises(PipelineError, match=r"only 4 conversation\(s\) have persona replies; not enough for a "
                                            r"train split\. Add data, lower split.ratios.val/test, or choose "
                                            r"another split.persona$"):
        split_examples(corpus(4), params_factory({"split.ratios.train": 0.02, "split.ratios.val": 0.49,
                                                  "split.ratios.test": 0.49}).split, 1, "x")
    # every reply skipped by a key: the message names it (it named only the ratios and the persona)
    with pytest.raises(PipelineError) as err:
        split_examples(corpus(4), params_factory({"split.min_target_chars": 100000}).split, 1, "x")
    assert "only 0 conversation(s) have persona replies" in str(err.value)
    assert "Persona replies skipped: " in str(err.value) and " target too short (split.min_target_chars)" in str(
        err.value) and str(err.value).endswith(", or change a key named above")
