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
                                 max_tokens: int = 1024) -> np.ndarray:
    """``log p(continuation | prompt)`` for each continuation, packed without padding.

    One row holds the prompt and then as many continuations as fit in ``max_tokens``, each at the
    positions it would have right after the prompt; a block mask lets each continuation see the
    prompt and its own earlier tokens, never another continuation. Padded to the longest of its
    chunk, the replies here wasted a third to a half of the decoder's work (reference and generated
    replies differ in length by an order of magnitude), which on a float32 CPU was most of the time.
    The vocabulary head runs only where a token is predicted: the prompt's last position and the
    continuations' own positions but their last.
    """
    import torch

    from qlora_pipeline.modeling.loss import causal_lm_parts

    out = np.zeros(len(continuations))
    parts = causal_lm_parts(model)
    with torch.no_grad():
        for pack in _packs(len(prompt), [len(c) for c in continuations], max_tokens):
            ids, positions, mask, targets, before, row_of = _packed_row(model, prompt, [continuations[i] for i in pack])
            if parts is None:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=False).logits[0, before]
            else:
                decoder, lm_head = parts
                hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 use_cache=False).last_hidden_state
                logits = lm_head(hidden[0, before])
            scores = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
            totals = torch.zeros(len(pack), dtype=scores.dtype, device=scores.device).index_add_(0, row_of, scores)
            out[pack] = totals.cpu().numpy()
    return out


def _packs(prompt_length: int, lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Continuations grouped in order, each group fitting beside the prompt in ``max_tokens`` (at least one each)."""
    packs: list[list[int]] = []
    used = max_tokens
    for index, length in enumerate(lengths):
        if used + length > max_tokens:
            packs.append([])
            used = prompt_length
        packs[-1].append(index)
        used += length
    return packs


def _packed_row(model: Any, prompt: list[int], part: list[list[int]]) -> tuple[Any, ...]:
    """Inputs of one packed row: ids, positions, the 4D block mask, and per scored token its
    target, the position whose output predicts it, and which continuation it belongs to."""
    import torch

    device, dtype = model.device, model.dtype
    start, total = len(prompt), len(prompt) + sum(len(c) for c in part)
    ids = torch.tensor([prompt + [t for c in part for t in c]], device=device)
    positions = torch.cat([torch.arange(start)] + [start + torch.arange(len(c)) for c in part])[None].to(device)
    allowed = torch.zeros((total, total), dtype=torch.bool)
    allowed[:, :start] = True
    allowed[:start, :start] = torch.ones((start, start), dtype=torch.bool).tril()
    targets, before, row_of = [], [], []
    offset = start
    for row, tokens in enumerate(part):
        span = slice(offset, offset + len(tokens))
        allowed[span, span] = torch.ones((len(tokens), len(tokens)), dtype=torch.bool).tril()
        # Token 0 follows the prompt's last position; token t the continuation's own token t - 1.
        before += [start - 1] + list(range(offset, offset + len(tokens) - 1))
        targets += tokens
        row_of += [row] * len(tokens)
        offset += len(tokens)
    # A 4D mask goes to the attention as it is: boolean for SDPA (as transformers builds its own, and
    # whatever dtype autocast gives the scores), additive in the model's dtype for eager attention.
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        mask = allowed
    else:
        mask = torch.zeros((total, total), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return (ids, positions, mask[None, None].to(device), torch.tensor(targets, device=device),
            torch.tensor(before, device=device), torch.tensor(row_of, device=device))


def scoring_plan(tokenizer: Any, contexts: Sequence[list[dict]], reply_sets: dict[str, list[list[str]]],
                 others: np.ndarray, max_length: int, max_reply_tokens: int) -> tuple[list, dict, list]:
    """What :func:`on_topic` scores: per context its prompt ids, the reply ids per (set, pass), and per
    context the replies scored after it as (set and pass, reply index, slot; -1 for its own context)."""
    from qlora_pipeline.modeling.engine import chat_prompt_ids

    keep = max(max_length - max_reply_tokens - 1, 1)
    prompts = [ids[-keep:] for ids in chat_prompt_ids(tokenizer, contexts)]
    replies = {(name, p): reply_ids(tokenizer, texts, max_reply_tokens)
               for name, passes in reply_sets.items() for p, texts in enumerate(passes)}
    after: list[list[tuple[Any, int, int]]] = [[] for _ in prompts]
    for key in replies:
        for i in range(len(prompts)):
            after[i].append((key, i, -1))
            for slot, j in enumerate(others[i]):
                after[j].append((key, i, slot))
    return prompts, replies, after


def on_topic(model: Any, tokenizer: Any, contexts: Sequence[list[dict]], reply_sets: dict[str, list[list[str]]],
             others: np.ndarray, max_length: int, max_reply_tokens: int) -> dict[str, dict[str, np.ndarray]]:
    """Per set of replies (a list of passes, each a reply per context): per-example scores, averaged over passes.

    ``model`` is the base (its adapter off). Each context is scored in one packed row with every reply
    scored after it (its own replies of every set, and the replies it is a mismatch for); prompts lose
    turns from the left to fit ``max_length`` with a reply of ``max_reply_tokens``, as training cuts them.
    """
    n, k = others.shape
    prompts, replies, after = scoring_plan(tokenizer, contexts, reply_sets, others, max_length, max_reply_tokens)
    own = {key: np.zeros(n) for key in replies}
    other = {key: np.zeros((n, k)) for key in replies}
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
