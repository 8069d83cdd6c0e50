"""The style judge separates speakers with distinct habits, and only those; the distances behave."""

from __future__ import annotations

import random

import pytest

from qlora_pipeline import fidelity

TOPICS = ["the game last night", "work tomorrow", "that new movie", "dinner", "the weekend", "my sister",
          "the beach", "school", "the concert", "coffee", "my dog", "the weather"]


def casual(rng: random.Random) -> str:
    """A speaker who types in lower case, laughs and trails off."""
    return rng.choice(["lol ", "haha ", "omg ", ""]) + rng.choice(["yeah ", "nah ", "idk ", ""]) + \
        f"{rng.choice(TOPICS)} was {rng.choice(['kinda', 'sooo', 'lowkey'])} {rng.choice(['fun', 'weird', 'ok'])}" + \
        rng.choice(["", " lol", " haha", "..."])


def formal(rng: random.Random) -> str:
    """A speaker who writes full sentences with capitals and punctuation."""
    return f"{rng.choice(['Honestly,', 'Well,', 'I think', 'Actually,'])} {rng.choice(TOPICS)} was " \
           f"{rng.choice(['rather', 'quite', 'very'])} {rng.choice(['enjoyable', 'interesting', 'pleasant'])}" + \
           rng.choice([".", "!", ". What about you?"])


def mixed(rng: random.Random) -> str:
    return casual(rng) if rng.random() < 0.5 else formal(rng)


def rows(persona, other, n: int, seed: int) -> list[dict]:
    """Split rows as the split stage writes them: the persona answers, the other speaker is the user."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": other(rng)}, {"role": "assistant", "content": persona(rng)},
                          {"role": "user", "content": other(rng)}], "target": persona(rng)} for _ in range(n)]


def judged(persona, other) -> dict:
    texts, labels = fidelity.judge_examples(rows(persona, other, 300, seed=1))
    judge = fidelity.train_judge(texts, labels, seed=0)
    held_texts, held_labels = fidelity.judge_examples(rows(persona, other, 150, seed=2))
    return fidelity.judge_quality(judge, held_texts, held_labels)


def test_the_judge_separates_two_speakers_with_distinct_habits():
    quality = judged(casual, formal)
    assert quality["auc"] > 0.95 and quality["accuracy"] > 0.9, quality


def test_the_judge_cannot_separate_two_speakers_from_one_distribution():
    quality = judged(mixed, mixed)
    assert 0.35 < quality["auc"] < 0.65, quality


def test_judge_examples_label_each_text_once_and_drop_ambiguous_ones():
    split = [{"messages": [{"role": "system", "content": "be you"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hey"}], "target": "sup"},
             {"messages": [{"role": "user", "content": "hey"}], "target": "hey lol"}]
    texts, labels = fidelity.judge_examples(split)
    assert dict(zip(texts, labels)) == {"sup": 1, "hi": 0, "hey lol": 1}  # "hey": both sides wrote it


def test_persona_score_follows_the_voice():
    texts, labels = fidelity.judge_examples(rows(casual, formal, 300, seed=1))
    judge = fidelity.train_judge(texts, labels, seed=0)
    rng = random.Random(5)
    assert fidelity.persona_probabilities(judge, [casual(rng) for _ in range(50)]).mean() > 0.8
    assert fidelity.persona_probabilities(judge, [formal(rng) for _ in range(50)]).mean() < 0.2


def test_distances_are_zero_for_the_same_replies_and_grow_with_difference():
    rng = random.Random(0)
    a = [casual(rng) for _ in range(200)]
    assert fidelity.length_distance(a, a) == 0 and fidelity.unigram_divergence(a, a) == 0
    b = [formal(rng) for _ in range(200)]
    assert fidelity.unigram_divergence(a, b) > 0.3
    assert fidelity.habit_distance(a, b)["lowercase_start"] > 0.8
    assert fidelity.length_distance(a, [t + " and then some more words here" for t in a]) == pytest.approx(6.0)


def test_habits_and_repetition():
    rates = fidelity.habit_rates(["lol ok", "Sure!", "why? 😂", "hahaha nice"])
    assert rates == {"lowercase_start": 0.75, "emoji": 0.25, "laughter": 0.5, "question": 0.25, "exclamation": 0.25}
    assert fidelity.repeated_trigram_share(["a car that was a car that was", "no repeats in here at all"]) == 0.5


def test_a_groups_judge_contrasts_the_chat_with_the_base_models_assistant_replies():
    """split.persona: all: every turn is the group's, so the contrast is the base model's style."""
    rng = random.Random(3)

    def group_rows(n, seed):
        made = rows(mixed, mixed, n, seed)
        for i, row in enumerate(made):
            row["speaker"] = f"s{i % 5}"  # the group: several speakers' targets
        return made

    train = group_rows(300, 4)
    assert fidelity.is_group_voice(train) and not fidelity.is_group_voice(rows(casual, formal, 5, 1))
    assistant = [f"Certainly! Here is some information about {rng.choice(TOPICS)}. Let me know if you need more."
                 for _ in range(300)]
    judge, info = fidelity.fit_judge(train, seed=0, assistant_replies=assistant)
    assert "base model" in info["contrast"] and info["train_replies"] > 100
    held_assistant = [f"Certainly! I would be happy to discuss {rng.choice(TOPICS)} with you." for _ in range(100)]
    texts, labels = fidelity.group_judge_examples(group_rows(100, 5), held_assistant)
    assert fidelity.judge_quality(judge, texts, labels)["auc"] > 0.95
    # the other speakers' turns, the one-persona contrast, cannot tell a group from itself
    judge, info = fidelity.fit_judge(train, seed=0)
    assert "other speakers" in info["contrast"]
    texts, labels = fidelity.judge_examples(group_rows(150, 6))
    assert fidelity.judge_quality(judge, texts, labels)["auc"] < 0.65
