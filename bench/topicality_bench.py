"""On-topic scoring (``topicality.on_topic``): replies packed without padding against the padded chunks before.

Both score the same replies after the same contexts with the frozen base, as zero-shot (the base's
replies and the person's own) and evaluate (the tuned model's greedy and chosen-decoding replies)
do, with ``evaluate.on_topic_contexts`` mismatched contexts each. The baseline is the former path,
kept here (``padded_log_likelihoods``): per context, the prompt prefilled once, its cache copied for
chunks of 32 continuations padded to the chunk's longest. Reported per workload: wall time of both,
their ratio, the share of the baseline's continuation tokens that were padding, and the largest
difference between the two paths' log-likelihoods (float sums in another order).

Run after `make run`, on an idle machine:
    .venv/bin/python bench/topicality_bench.py --out bench/results/<machine>/topicality.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def padded_log_likelihoods(model, prompt: list[int], continuations: list[list[int]], chunk: int = 32) -> np.ndarray:
    """The former ``continuation_log_likelihoods``: shared prompt cache, continuations padded per chunk."""
    import torch

    from qlora_pipeline.modeling.loss import causal_lm_parts

    device = model.device
    out = np.zeros(len(continuations))
    order = sorted(range(len(continuations)), key=lambda i: len(continuations[i]))
    decoder, lm_head = causal_lm_parts(model)
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
            cache = copy.deepcopy(first.past_key_values)
            cache.batch_repeat_interleave(rows)
            attention = torch.cat([torch.ones((rows, len(prompt)), dtype=torch.long, device=device), mask], dim=1)
            positions = (len(prompt) + torch.arange(width, device=device)).expand(rows, width)
            wanted = mask[:, 1:].bool()
            total = head[ids[:, 0]].clone()
            if wanted.any():
                hidden = decoder(input_ids=ids, attention_mask=attention, position_ids=positions,
                                 cache=cache, use_cache=True).last_hidden_state
                logits = lm_head(hidden[:, :-1][wanted])
                following = torch.log_softmax(logits.float(), dim=-1).gather(1, ids[:, 1:][wanted][:, None])[:, 0]
                row_of = torch.arange(rows, device=device)[:, None].expand(rows, width - 1)[wanted]
                total.index_add_(0, row_of, following)
            out[order[start:start + rows]] = total.cpu().numpy()
    return out


def workload(tokenizer, contexts, reply_sets, others, max_length, max_reply_tokens):
    """Per context: its prompt and the continuations on_topic scores after it (its own scoring plan)."""
    from qlora_pipeline import topicality

    prompts, replies, after = topicality.scoring_plan(tokenizer, contexts, {name: [texts] for name, texts in
                                                                            reply_sets.items()},
                                                      others, max_length, max_reply_tokens)
    return prompts, [[replies[key][i] for key, i, _ in wanted] for wanted in after]


def timed(score, model, prompts, after) -> tuple[list[np.ndarray], float]:
    started = time.perf_counter()
    scores = [score(model, prompt, continuations) for prompt, continuations in zip(prompts, after)]
    return scores, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from qlora_pipeline import hardware, process, topicality
    from qlora_pipeline.config import load_params
    from qlora_pipeline.data.sampling import read_split
    from qlora_pipeline.modeling.adapters import autocast_like_training, load_base_for_params

    process.keep_freed_memory()
    params = load_params(ROOT / "params.yaml")
    model, tokenizer, resolved = load_base_for_params(params, ROOT / "models/base", params.evaluate.dequantize_4bit)
    samples = list(csv.DictReader((ROOT / "reports/evaluate/samples.csv").open(encoding="utf-8")))
    test = {row["id"]: row for row in read_split(ROOT / "data/splits/test.jsonl", "run make run first")}
    contexts = [test[row["id"]]["messages"] for row in samples]
    others = topicality.mismatched_contexts(len(samples), params.evaluate.on_topic_contexts, params.seed)
    result = {"machine": hardware.capability_line(), "torch_threads": torch.get_num_threads(),
              "contexts": len(samples), "mismatched_contexts": int(others.shape[1]), "workloads": {}}
    for stage, sets in (("zero-shot", ("base", "reference")), ("evaluate", ("tuned", "tuned_chosen"))):
        prompts, after = workload(tokenizer, contexts, {name: [row[name] for row in samples] for name in sets},
                                  others, params.train.max_length, params.evaluate.max_new_tokens)
        with autocast_like_training(resolved):  # as evaluate's on_base runs it
            padded, padded_seconds = timed(padded_log_likelihoods, model, prompts, after)
            packed, packed_seconds = timed(topicality.continuation_log_likelihoods, model, prompts, after)
        real = sum(len(c) for group in after for c in group)
        padded_tokens = sum(len(group) * max(map(len, group)) for group in after)  # one chunk per context here
        result["workloads"][stage] = {
            "sets": list(sets), "continuations": sum(map(len, after)), "prompt_tokens": sum(map(len, prompts)),
            "continuation_tokens": real, "baseline_padding_share": round(1 - real / padded_tokens, 3),
            "padded_seconds": round(padded_seconds, 2), "packed_seconds": round(packed_seconds, 2),
            "speedup": round(padded_seconds / packed_seconds, 2),
            "max_abs_log_likelihood_diff": float(max(np.abs(a - b).max() for a, b in zip(padded, packed)))}
        print(stage, json.dumps(result["workloads"][stage]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
