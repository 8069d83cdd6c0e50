"""Base vs tuned on held-out replies: ROUGE with bootstrap intervals, perplexity, stopping, length, diversity.

Every score is computed per example first, so the intervals come from resampling examples
(seeded), and the tuned - base difference is paired: both sides use the same resamples.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from qlora_pipeline.intervals import interval, median_interval

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example ROUGE F1 from ``rouge_score`` (the implementation ``evaluate``'s rouge wraps), stemmed."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {name: np.array([s[name].fmeasure for s in scores]) for name in ROUGE_TYPES}










def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams across replies (corpus-level distinct-n)."""
    grams: Counter = Counter()
    for text in texts:
        words = text.split()
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return round(len(grams) / total, 5) if total else 0.0


def length_ratio(replies: Sequence[str], references: Sequence[str]) -> float:
    """Mean reply length over mean reference length, in words (1.0 = as long as the person's replies)."""
    reference_words = sum(len(r.split()) for r in references)
    return round(sum(len(r.split()) for r in replies) / reference_words, 4) if reference_words else 0.0


def word_counts(replies: Sequence[str]) -> np.ndarray:
    return np.array([len(r.split()) for r in replies], dtype=float)


def stopping(ended: np.ndarray | None, words: np.ndarray, indices: np.ndarray, confidence: float) -> dict[str, Any]:
    """Does a set of replies stop like the person? Its end-of-turn rate (``ended``: per example, the share of its
    replies that ended their turn before the token limit; None for the person's own replies, which always
    do) and its median length in words, with bootstrap intervals."""
    out: dict[str, Any] = {}
    if ended is not None:
        out["end_of_turn_rate"] = round(float(ended.mean()), 5)
        out["end_of_turn_rate_ci"] = interval(ended, indices, confidence)
    out["median_words"] = round(float(np.median(words)), 5)
    out["median_words_ci"] = median_interval(words, indices, confidence)
    return out


def text_metrics(replies: Sequence[str], stopped: Sequence[bool], references: Sequence[str]) -> dict[str, float]:
    return {
        "end_of_turn_rate": round(sum(stopped) / len(stopped), 4) if stopped else 0.0,
        "length_ratio": length_ratio(replies, references),
        "distinct_1": distinct_n(replies, 1),
        "distinct_2": distinct_n(replies, 2),
    }


def reference_nll(model: Any, tokenizer: Any, rows: Sequence[dict], max_length: int,
                  batch_size: int, counts: Counter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per example: summed negative log-likelihood of the reference reply (target tokens only), token count.

    Examples are encoded as in training, so prompts longer than ``max_length`` lose turns from the
    left; ``counts`` receives how many (``prompt_truncated``, ``reply_truncated``).
    """
    import torch
    from transformers import DataCollatorForSeq2Seq

    from qlora_pipeline.labels import IGNORE_INDEX
    from qlora_pipeline.modeling.loss import causal_lm_parts, target_token_nll
    from qlora_pipeline.data.formatting import encode_example

    encoded = [encode_example(tokenizer, row["messages"], row["target"], max_length, counts) for row in rows]
    tokenizer.padding_side = "right"
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    nll, tokens = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=int)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # less padding per batch
    parts = causal_lm_parts(model)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": encoded[i].input_ids, "attention_mask": [1] * len(encoded[i].input_ids),
                          "labels": encoded[i].labels} for i in chunk])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            if parts is None:  # a model the head cannot be taken from: full logits
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                example_nll, counts_ = _full_logits_nll(logits, batch["labels"])
            else:  # the vocabulary head only where a reference token is predicted
                decoder, head = parts
                hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                example_nll, counts_ = target_token_nll(hidden.last_hidden_state, batch["labels"], head)
        nll[chunk] = example_nll.float().tolist()
        tokens[chunk] = counts_.tolist()
    return nll, tokens


def _full_logits_nll(logits: Any, labels: Any) -> tuple[Any, Any]:
    import torch

    from qlora_pipeline.labels import IGNORE_INDEX

    shifted = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted,
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(dim=1), (shifted != IGNORE_INDEX).sum(dim=1)


def perplexity(nll: np.ndarray, tokens: np.ndarray) -> float:
    """Token-level perplexity over all examples: exp(total NLL / total target tokens)."""
    return float(np.exp(nll.sum() / tokens.sum())) if tokens.sum() else float("nan")


def perplexity_interval(nll: np.ndarray, tokens: np.ndarray, indices: np.ndarray, confidence: float) -> list[float]:
    values = np.exp(nll[indices].sum(axis=1) / tokens[indices].sum(axis=1))
    tail = (1 - confidence) / 2 * 100
    return [round(float(np.percentile(values, tail)), 4), round(float(np.percentile(values, 100 - tail)), 4)]


def summary_table(metrics: dict) -> str:
    """evaluate's metrics (``metrics/eval.json``) as the table the stage and ``qlora-pipeline summary`` print."""
    lines = [f"evaluate: {metrics['samples']} test replies, base (zero-shot) vs tuned "
             f"[{int(metrics['confidence_level'] * 100)}% interval of tuned - base]",
             f"  {'metric':<26}{'base':>10}{'tuned':>10}{'delta':>10}   interval"]
    rows = [(name, metrics[name]) for name in (*ROUGE_TYPES, "perplexity", "persona_score",
                                                "repeated_3gram") if name in metrics]
    rows += [(f"{name} (chosen)", m) for name, m in metrics.get("chosen", {}).items()
             if isinstance(m, dict) and "delta" in m]
    for name, m in rows:
        ci = m.get("delta_ci")
        ci_text = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"base {m['base_ci']}, tuned {m['tuned_ci']}"
        lines.append(f"  {name:<26}{m['base']:>10.4f}{m['tuned']:>10.4f}{m['delta']:>+10.4f}   {ci_text}")
    for name in ("end_of_turn_rate", "length_ratio", "distinct_1", "distinct_2"):
        base, tuned = metrics["base"][name], metrics["tuned"][name]
        lines.append(f"  {name:<26}{base:>10.4f}{tuned:>10.4f}{tuned - base:>+10.4f}")
    if "persona_judge" in metrics:
        judge, persona = metrics["persona_judge"], metrics["persona_score"]
        lines.append(f"  style judge on real test replies: accuracy {judge['accuracy']}, AUC {judge['auc']}; "
                     f"the persona's own replies score {persona['reference']} {persona['reference_ci']}")
    lines.append(f"  {'stops like the person':<26}{'ends turn':>12}{'median words':>28}")
    for name, row in metrics["stopping"].items():
        rate = f"{row['end_of_turn_rate']:.3f}" if "end_of_turn_rate" in row else "(always)"
        lines.append(f"    {name:<24}{rate:>12}{row['median_words']:>10.1f} {row['median_words_ci']}")
    if "on_topic" in metrics:
        on_topic = metrics["on_topic"]
        lines.append(f"  {'on topic (base-scored)':<26}{'pmi nats':>12}{'context match':>28}   chance {on_topic['chance']}")
        for name in ("base", "tuned", "tuned_chosen", "reference"):
            if name in on_topic:
                row = on_topic[name]
                lines.append(f"    {name:<24}{row['pmi']:>12.3f}{row['context_match']:>10.3f} {row['context_match_ci']}")
    if "chosen" in metrics:
        lines.append(f"  chosen decoding (picked on validation): {metrics['chosen']['decoding']}, "
                     f"{metrics['chosen']['passes']} pass(es) per prompt")
    return "\n".join(lines)
