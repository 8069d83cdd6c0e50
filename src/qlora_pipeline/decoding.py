"""Decoding settings, run and scored: the grid search on validation and the chosen row of evaluate.

A sampled setting is run ``samples_per_prompt`` times, pass k seeded with ``seed + k``, and each
prompt's scores are averaged over its passes: the unit of the bootstrap stays the prompt, and a
rerun on the same machine gives the same numbers. A greedy setting is run once.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import numpy as np

from qlora_pipeline import evaluation, fidelity
from qlora_pipeline.config import DecodingSetting, ObjectiveWeights

# Scored per prompt for every setting.
SCORES = ("persona_score", "rougeL", "repeated_3gram", "unknown_words")
# Scores whose mark is the persona's own replies on the same split: the objective weighs the gap,
# either way. A decoding the judge finds *more* persona-like than the person is a caricature
# (over-produced habits), not a closer voice; fewer unknown words than the person's own typos and
# names is no merit either, more is garbling.
MATCHED = ("persona_score", "unknown_words")
# What the objective weighs (ObjectiveWeights' names).
OBJECTIVE_TERMS = ("persona_gap", "unknown_words_gap", "rougeL", "repeated_3gram")


def passes(setting: DecodingSetting, samples_per_prompt: int) -> int:
    return samples_per_prompt if setting.sampled else 1


def generate_passes(model: Any, tokenizer: Any, contexts: Sequence[list[dict]], setting: DecodingSetting,
                    samples_per_prompt: int, batch_size: int, max_new_tokens: int, seed: int) -> list[list[Any]]:
    """Replies to every context, once per pass: ``result[k][i]`` is pass k's reply to context i."""
    from transformers import set_seed

    from qlora_pipeline.modeling.generation import generate_replies

    out = []
    for k in range(passes(setting, samples_per_prompt)):
        set_seed(seed + k)  # pass k draws the same tokens on every rerun
        out.append(generate_replies(model, tokenizer, contexts, batch_size, max_new_tokens=max_new_tokens,
                                    **setting.generate_kwargs()))
    return out


def prompt_scores(judge: Any, replies: list[list[str]], references: Sequence[str],
                  known_words: set[str]) -> dict[str, np.ndarray]:
    """Per prompt, averaged over the passes: the judge's persona probability, ROUGE-L F1, repeats a 3-gram
    (0/1), share of words unknown to the training chats."""
    per_pass = [{"persona_score": fidelity.persona_probabilities(judge, texts),
                 "rougeL": evaluation.rouge_scores(texts, references)["rougeL"],
                 "repeated_3gram": np.array([fidelity.repeats_trigram(t) for t in texts], dtype=float),
                 "unknown_words": np.array([fidelity.unknown_word_share(t, known_words) for t in texts])}
                for texts in replies]
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
    return {"setting": asdict(setting), "passes": passes(setting, samples_per_prompt), **means,
            **{f"{name}_ci": evaluation.interval(values, indices, confidence) for name, values in scores.items()},
            "objective": round(objective(means, weights), 5), "examples": list(examples)}


def reference_scores(judge: Any, references: Sequence[str], known_words: set[str]) -> dict[str, float]:
    """The MATCHED scores of the persona's own replies: the marks a decoding should land on."""
    scores = prompt_scores(judge, [list(references)], references, known_words)
    return {name: round(float(scores[name].mean()), 5) for name in MATCHED}


def base_replies(model: Any, tokenizer: Any, resolved: dict, base_dir: Any, contexts: Sequence[list[dict]],
                 batch_size: int, max_new_tokens: int) -> list[str]:
    """The base model's greedy replies (the adapter switched off; a full fine-tune's base loaded beside it)."""
    from qlora_pipeline.modeling.adapters import load_base_for
    from qlora_pipeline.modeling.generation import generate_replies

    if resolved["method"] == "full":
        base, base_tokenizer = load_base_for(resolved, base_dir)
        replies = generate_replies(base, base_tokenizer, contexts, batch_size, max_new_tokens=max_new_tokens,
                                   do_sample=False)
        del base
    else:
        with model.disable_adapter():
            replies = generate_replies(model, tokenizer, contexts, batch_size, max_new_tokens=max_new_tokens,
                                       do_sample=False)
    return [r.text for r in replies]
