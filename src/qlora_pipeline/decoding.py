"""Decoding settings, run and scored: the grid search on validation and the chosen row of evaluate.

A sampled setting is run ``samples_per_prompt`` times, pass k of prompt i drawing from its own
seeded stream (:func:`row_seed`), and each prompt's scores are averaged over its passes: the unit
of the bootstrap stays the prompt, and a rerun gives the same numbers. A greedy setting is run once.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from qlora_pipeline import evaluation, fidelity, intervals
from qlora_pipeline.config import DecodingSetting, ObjectiveWeights
from qlora_pipeline.modeling.engine import Request, row_decoding

# Scored per prompt for every setting ("ended": the share of its replies that ended their turn before
# the token limit; "words": their mean length in words).
SCORES = ("persona_score", "rougeL", "repeated_3gram", "unknown_words", "ended", "words")
# Scores whose mark is the persona's own replies on the same split: the objective weighs the gap,
# either way. A decoding the judge finds *more* persona-like than the person is a caricature
# (over-produced habits), not a closer voice; fewer unknown words than the person's own typos and
# names is no merit either, more is garbling.
MATCHED = ("persona_score", "unknown_words")
# What the objective weighs (ObjectiveWeights' names). length_gap: how far the median reply length lies
# from the person's median, relative to it; a persona that talks on past where the person stops is not them.
OBJECTIVE_TERMS = ("persona_gap", "unknown_words_gap", "rougeL", "repeated_3gram", "end_of_turn_rate", "length_gap")


def passes(setting: DecodingSetting, samples_per_prompt: int) -> int:
    return samples_per_prompt if setting.sampled else 1


def row_seed(seed: int, pass_index: int, prompt_index: int) -> int:
    """The seed of pass k of prompt i: the same on every rerun and whatever a row is batched with; the same for
    every setting of the grid, so the settings are compared on the same random numbers."""
    digest = hashlib.sha256(f"{seed}:{pass_index}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def pass_requests(prompt_ids: Sequence[list[int]], setting: DecodingSetting, samples_per_prompt: int,
                  max_new_tokens: int, seed: int) -> list[list[Request]]:
    """One request per pass and prompt: ``result[k][i]`` is pass k's request for prompt i (its adapter unset)."""
    decoding = row_decoding(setting)
    return [[Request(list(ids), decoding=decoding, max_new_tokens=max_new_tokens,
                     seed=row_seed(seed, k, i) if setting.sampled else None) for i, ids in enumerate(prompt_ids)]
            for k in range(passes(setting, samples_per_prompt))]


def prompt_scores(judge: Any, replies: list[list[str]], references: Sequence[str],
                  known_words: set[str], stopped: list[list[bool]] | None = None) -> dict[str, np.ndarray]:
    """Per prompt, averaged over the passes: the judge's persona probability, ROUGE-L F1, repeats a 3-gram
    (0/1), share of words unknown to the training chats, ended its turn (0/1; ``stopped`` per pass, None = the
    person's own replies, which always do), length in words."""
    stopped = stopped if stopped is not None else [[True] * len(texts) for texts in replies]
    per_pass = [{"persona_score": fidelity.persona_probabilities(judge, texts),
                 "rougeL": evaluation.rouge_scores(texts, references)["rougeL"],
                 "repeated_3gram": np.array([fidelity.repeats_trigram(t) for t in texts], dtype=float),
                 "unknown_words": np.array([fidelity.unknown_word_share(t, known_words) for t in texts]),
                 "ended": np.array(flags, dtype=float), "words": evaluation.word_counts(texts)}
                for texts, flags in zip(replies, stopped)]
    return {name: np.mean([scores[name] for scores in per_pass], axis=0) for name in SCORES}


def objective(means: dict[str, float], weights: ObjectiveWeights) -> float:
    return sum(getattr(weights, name) * means[name] for name in OBJECTIVE_TERMS)


def choose(results: list[dict]) -> int:
    """The index of the best-scoring setting; a tie goes to the earlier (simpler) one of the grid."""
    return max(range(len(results)), key=lambda i: (results[i]["objective"], -i))


def setting_result(setting: DecodingSetting, scores: dict[str, np.ndarray], reference: dict[str, float],
                   weights: ObjectiveWeights, indices: np.ndarray, confidence: float, samples_per_prompt: int,
                   examples: Sequence[str] = ()) -> dict:
    """One grid row of reports/decoding.json: the setting, its mean scores with intervals, its objective.

    ``reference`` holds the persona's own replies' means on the same split for the MATCHED scores;
    ``examples`` a few of the setting's replies (first pass), for a person to read.
    """
    means = {name: round(float(values.mean()), 5) for name, values in scores.items()}
    for name in MATCHED:
        means[f"{name.removesuffix('_score')}_gap"] = round(abs(means[name] - reference[name]), 5)
    means["end_of_turn_rate"] = means["ended"]
    means["median_words"] = round(float(np.median(scores["words"])), 5)
    means["length_gap"] = round(abs(means["median_words"] - reference["median_words"]) / reference["median_words"], 5)
    return {"setting": setting.model_dump(), "passes": passes(setting, samples_per_prompt), **means,
            **{f"{name}_ci": intervals.interval(values, indices, confidence) for name, values in scores.items()},
            "objective": round(objective(means, weights), 5), "examples": list(examples)}


def reference_scores(judge: Any, references: Sequence[str], known_words: set[str]) -> dict[str, float]:
    """The MATCHED scores and the median length (at least one word) of the persona's own replies: the marks a
    decoding should land on."""
    scores = prompt_scores(judge, [list(references)], references, known_words)
    return {**{name: round(float(scores[name].mean()), 5) for name in MATCHED},
            "median_words": max(round(float(np.median(scores["words"])), 5), 1.0)}
