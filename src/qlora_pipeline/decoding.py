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

# Scored per prompt for every setting; the objective's weights carry the same names.
SCORES = ("persona_score", "rougeL", "repeated_3gram")


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


def prompt_scores(judge: Any, replies: list[list[str]], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per prompt, averaged over the passes: the judge's persona probability, ROUGE-L F1, repeats a 3-gram (0/1)."""
    per_pass = [{"persona_score": fidelity.persona_probabilities(judge, texts),
                 "rougeL": evaluation.rouge_scores(texts, references)["rougeL"],
                 "repeated_3gram": np.array([fidelity.repeats_trigram(t) for t in texts], dtype=float)}
                for texts in replies]
    return {name: np.mean([scores[name] for scores in per_pass], axis=0) for name in SCORES}


def objective(means: dict[str, float], weights: ObjectiveWeights) -> float:
    return sum(getattr(weights, name) * means[name] for name in SCORES)


def choose(results: list[dict]) -> int:
    """The index of the best-scoring setting; a tie goes to the earlier (simpler) one of the grid."""
    return max(range(len(results)), key=lambda i: (results[i]["objective"], -i))


def setting_result(setting: DecodingSetting, scores: dict[str, np.ndarray], weights: ObjectiveWeights,
                   indices: np.ndarray, confidence: float, samples_per_prompt: int) -> dict:
    """One grid row of reports/decoding.json: the setting, its mean scores with intervals, its objective."""
    means = {name: round(float(values.mean()), 5) for name, values in scores.items()}
    return {"setting": asdict(setting), "passes": passes(setting, samples_per_prompt), **means,
            **{f"{name}_ci": evaluation.interval(values, indices, confidence) for name, values in scores.items()},
            "objective": round(objective(means, weights), 5)}
