"""Does a reply belong to its own conversation? Pointwise mutual information under the frozen base model.

A reply that could follow any message ("lol yeah", a monologue about ATVs) is about as likely
after another conversation's context as after its own; a reply that answers what was said is
much likelier after its own. For each reply the base model (never the tuned one, which would
grade itself) scores ``log p(reply | its context)`` and ``log p(reply | c')`` for ``k`` seeded
contexts ``c'`` of other test conversations, the same for every set of replies compared, and:

- ``pmi``: ``log p(reply | own) - mean_c' log p(reply | c')`` in nats, the reply's information about
  its own context against the marginal the other contexts estimate. A reply that ignores its
  context (a constant "ok") scores ~0.
- ``context_match``: 1 when the own context makes the reply likelier than every other one (chance
  ``1 / (k + 1)``), the rank-1 rate of picking the true context among ``k + 1``.

The reply is scored as a whole turn: its first ``max_reply_tokens`` tokens (the budget a generated
reply had; the person's own long replies are cut the same way) and the end-of-turn token, the same
tokens after every context.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qlora_pipeline import intervals

SCORES = ("pmi", "context_match")


def mismatched_contexts(n: int, k: int, seed: int) -> np.ndarray:
    """For each of ``n`` examples, ``k`` distinct other examples' indices (seeded; never its own)."""
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    out = np.empty((n, max(k, 0)), dtype=int)
    for i in range(n):
        drawn = rng.choice(n - 1, size=k, replace=False)
        out[i] = drawn + (drawn >= i)  # skip i itself
    return out


def from_log_likelihoods(own: np.ndarray, other: np.ndarray) -> dict[str, np.ndarray]:
    """Per reply: ``pmi`` and ``context_match`` from its log-likelihood after its own context (n,) and others' (n, k).

    The marginal ``log p(reply)`` is estimated by the mean log-likelihood over the other contexts
    (the geometric mean of the probabilities): then a reply that ignores its context scores 0 in
    expectation, where a log-mean-exp estimate would push it below 0 by the contexts' spread.
    """
    return {"pmi": own - other.mean(axis=1), "context_match": (own > other.max(axis=1)).astype(float)}


def reply_ids(tokenizer: Any, replies: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each reply as an assistant turn's tokens: its first ``max_tokens`` (the budget a generated reply had), then
    the end of turn. Scored identically after every context."""
    eot = tokenizer.eos_token_id
    encoded = tokenizer(list(replies), add_special_tokens=False)["input_ids"] if replies else []
    return [ids[:max_tokens] + [eot] for ids in encoded]


def continuation_log_likelihoods(model: Any, prompt: list[int], continuations: list[list[int]],
                                 chunk: int = 32) -> np.ndarray:
    """``log p(continuation | prompt)`` for each continuation, the prompt's keys and values computed once.

    The vocabulary head, most of a 135M model's work here, runs only where a token is predicted:
    the prompt's last position and the continuations' own positions, never on padding.
    """
    import torch

    from qlora_pipeline.modeling.loss import causal_lm_parts

    device = model.device
    out = np.zeros(len(continuations))
    order = sorted(range(len(continuations)), key=lambda i: len(continuations[i]))  # less padding per chunk
    parts = causal_lm_parts(model)
    with torch.no_grad():
        first = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
        head = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        for start in range(0, len(order), chunk):
            part = [continuations[i] for i in order[start:start + chunk]]
            rows, width = len(part), max(len(c) for c in part)
            ids = torch.zeros((rows, width), dtype=torch.long, device=device)
            mask = torch.zeros((rows, width), dtype=torch.long, device=device)
            for r, tokens in enumerate(part):
                ids[r, :len(tokens)] = torch.tensor(tokens)
                mask[r, :len(tokens)] = 1
            cache = _copy_cache(first.cache, rows)
            attention = torch.cat([torch.ones((rows, len(prompt)), dtype=torch.long, device=device), mask], dim=1)
            positions = (len(prompt) + torch.arange(width, device=device)).expand(rows, width)
            # Token 0 follows the prompt's last position; token t the continuation's position t - 1.
            wanted = mask[:, 1:].bool()
            total = head[ids[:, 0]].clone()
            if wanted.any():
                if parts is None:
                    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache,
                                   use_cache=True).logits[:, :-1][wanted]
                else:
                    decoder, lm_head = parts
                    hidden = decoder(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache,
                                     use_cache=True).last_hidden_state
                    logits = lm_head(hidden[:, :-1][wanted])
                following = torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, 1:][wanted][:, None])[:, 0]
                row_of = torch.arange(rows, device=device)[:, None].expand(rows, width - 1)[wanted]
                total.index_add_(0, row_of, following)
            out[order[start:start + rows]] = total.cpu().numpy()
    return out


def _copy_cache(cache: Any, rows: int) -> Any:
    import copy

    repeated = copy.deepcopy(cache)  # each chunk extends its own copy
    repeated.batch_repeat_interleave(rows)
    return repeated


def on_topic(model: Any, tokenizer: Any, contexts: Sequence[list[dict]], reply_sets: dict[str, list[list[str]]],
             others: np.ndarray, max_length: int, max_reply_tokens: int) -> dict[str, dict[str, np.ndarray]]:
    """Per set of replies (a list of passes, each a reply per context): per-example scores, averaged over passes.

    ``model`` is the base (its adapter off). Each context is prefilled once for every reply scored
    after it (its own replies of every set, and the replies it is a mismatch for); prompts lose
    turns from the left to fit ``max_length`` with a reply of ``max_reply_tokens``, as training cuts them.
    """
    from qlora_pipeline.modeling.engine import chat_prompt_ids

    n, k = others.shape
    keep = max(max_length - max_reply_tokens - 1, 1)
    prompts = [ids[-keep:] for ids in chat_prompt_ids(tokenizer, contexts)]
    replies = {(name, p): reply_ids(tokenizer, texts, max_reply_tokens)
               for name, passes in reply_sets.items() for p, texts in enumerate(passes)}
    own = {key: np.zeros(n) for key in replies}
    other = {key: np.zeros((n, k)) for key in replies}
    after: list[list[tuple[Any, int, int]]] = [[] for _ in range(n)]  # per context: (set and pass, reply, slot)
    for key in replies:
        for i in range(n):
            after[i].append((key, i, -1))
            for slot, j in enumerate(others[i]):
                after[j].append((key, i, slot))
    model.eval()
    for j, wanted in enumerate(after):
        scores = continuation_log_likelihoods(model, prompts[j], [replies[key][i] for key, i, _ in wanted])
        for (key, i, slot), score in zip(wanted, scores):
            if slot < 0:
                own[key][i] = score
            else:
                other[key][i, slot] = score
    out = {}
    for name, passes in reply_sets.items():
        per_pass = [from_log_likelihoods(own[name, p], other[name, p]) for p in range(len(passes))]
        out[name] = {score: np.mean([scores[score] for scores in per_pass], axis=0) for score in SCORES}
    return out


def summary(scores: dict[str, np.ndarray], indices: np.ndarray, confidence: float) -> dict[str, Any]:
    """Means with bootstrap intervals (``<score>_ci``; the evaluate stage's shared resamples)."""
    out: dict[str, Any] = {}
    for name, values in scores.items():
        out[name] = round(float(values.mean()), 5)
        out[f"{name}_ci"] = intervals.interval(values, indices, confidence)
    return out
