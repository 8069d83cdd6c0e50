"""On-topic: a reply's pointwise mutual information with its own context, scored by the real 4-bit base."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qlora_pipeline import topicality
from qlora_pipeline.data.sources import chitchat_path

N = 32


def test_mismatched_contexts_are_seeded_distinct_and_never_the_own():
    others = topicality.mismatched_contexts(10, 3, seed=7)
    assert others.shape == (10, 3)
    assert all(i not in row and len(set(row)) == 3 for i, row in enumerate(others.tolist()))
    assert (others == topicality.mismatched_contexts(10, 3, seed=7)).all()
    assert (others != topicality.mismatched_contexts(10, 3, seed=8)).any()
    assert topicality.mismatched_contexts(3, 5, seed=0).shape == (3, 2)  # no more than the others there are


def test_pmi_and_context_match_from_log_likelihoods():
    own = np.array([-2.0, -5.0, -3.0])
    other = np.log(np.array([[0.5, 0.5], [0.1, 0.3], [np.exp(-3.0), np.exp(-3.0)]]))
    scores = topicality.from_log_likelihoods(own, other)
    assert scores["pmi"] == pytest.approx([-2.0 - np.log(0.5), -5.0 - np.log(0.03) / 2, 0.0])
    assert scores["context_match"].tolist() == [0.0, 0.0, 0.0]  # a tie is no match
    assert topicality.from_log_likelihoods(np.array([-1.0]), np.array([[-1.5, -4.0]]))["context_match"][0] == 1.0


@pytest.fixture(scope="module")
def real_turns() -> tuple[list[list[dict]], list[str]]:
    """The first N chitchat conversations: the turns before a reply (its context) and the reply."""
    conversations = [c for c in json.loads(chitchat_path().read_text()).values() if len(c["messages"]) >= 4][:N]
    contexts, replies = [], []
    for conversation in conversations:
        turns = [" ".join(m["text"] for m in block) for block in conversation["messages"]][:4]
        roles = ["user" if (len(turns) - 1 - t) % 2 else "assistant" for t in range(len(turns))]
        contexts.append([{"role": role, "content": text} for role, text in zip(roles[:-1], turns[:-1])])
        replies.append(turns[-1])
    return contexts, replies


def test_packed_log_likelihoods_equal_whole_sequence_scoring(tiny_llama):
    """Replies packed after one prompt, each masked from the others, give each reply's own log-likelihood:
    in one row, and spread over several rows (a pack budget that fits one or two replies)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline import evaluation

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    context = [{"role": "user", "content": "did you watch the match last night?"}]
    replies = ["yes", "no, I was stuck at work until ten", "we won three to one, great game honestly"]
    from qlora_pipeline.modeling.engine import chat_prompt_ids

    prompt = chat_prompt_ids(tokenizer, [context])[0]
    continuations = topicality.reply_ids(tokenizer, replies, 40)
    packed = topicality.continuation_log_likelihoods(model, prompt, continuations)
    spread = topicality.continuation_log_likelihoods(model, prompt, continuations, max_tokens=len(prompt) + 12)
    assert topicality._packs(len(prompt), [len(c) for c in continuations], len(prompt) + 12) == [[0, 1], [2]]
    nll, _ = evaluation.reference_nll(model, tokenizer, [{"messages": context, "target": r} for r in replies], 256, 8)
    assert packed == pytest.approx(-nll, abs=1e-3)
    assert spread == pytest.approx(-nll, abs=1e-3)


def test_real_replies_score_far_above_their_shuffles_and_a_constant_reply_near_zero(quantized_base, real_turns):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.modeling.inference import dequantize_for_inference

    model = AutoModelForCausalLM.from_pretrained(quantized_base)
    dequantize_for_inference(model)  # as evaluate runs it: the same outputs, faster on a CPU
    tokenizer = AutoTokenizer.from_pretrained(quantized_base)
    contexts, replies = real_turns
    shuffled = replies[1:] + replies[:1]  # every reply after another conversation's context
    others = topicality.mismatched_contexts(N, 3, seed=0)
    scores = topicality.on_topic(model, tokenizer, contexts, {"real": [replies], "shuffled": [shuffled],
                                                              "ok": [["ok"] * N]}, others, 256, 40)
    real, wrong, constant = (scores[name] for name in ("real", "shuffled", "ok"))
    assert real["pmi"].mean() > 3.0 and real["pmi"].mean() > wrong["pmi"].mean() + 3.0, (real, wrong)
    assert real["context_match"].mean() >= 0.6 > 0.25 + 0.1 > wrong["context_match"].mean()  # chance: 1/4
    assert abs(constant["pmi"].mean()) < 0.1 * real["pmi"].mean(), constant
