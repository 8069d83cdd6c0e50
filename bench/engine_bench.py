"""The generation engine against the path the stages took before it, on the same prompts, in one run.

Before the engine every stage generated with ``model.generate`` over length-sorted static batches of
``evaluate.batch_size`` rows, one call per side, setting and pass: a batch ran until its longest row
ended, every row of it for every step. That path is kept here (``static_replies``) as the baseline.

Workloads, on `make run`'s outputs (models/base, models/adapter, data/splits, reports/decoding.json):

1. choose-decoding's grid: every setting of ``decoding.grid`` on the validation prompts
   (``decoding.max_samples``), sampled settings ``evaluate.samples_per_prompt`` passes each.
2. evaluate's four rows: base and tuned, greedy and under the decoding chosen on validation
   (sampled: ``samples_per_prompt`` passes), on the test prompts (``evaluate.max_samples``).
3. Mixed batches: the test prompts' greedy replies as tuned rows only, against the same prompts
   half base and half tuned: completion tokens per second of each (target: mixed >= 0.8x).

For 1 and 2, both paths' wall time and their ratio (target >= 4x), and for the static path the decode
steps its rows spent after they had ended (end-of-turn token or the token limit): each batch runs
``batch size x longest reply`` row-steps. The engine spends none (``row_steps`` equals the tokens
generated after each row's first). Greedy replies of the two paths are compared (they should be
the same tokens); sampled ones cannot be (the engine draws from per-row seeded streams).

Run after `make run`, on an idle machine (one heavy process at a time):
    .venv/bin/python bench/engine_bench.py --out bench/results/<machine>/engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchlib import write_report

ROOT = Path(__file__).resolve().parents[1]


def static_replies(model, tokenizer, prompt_ids: list[list[int]], batch_size: int, generate_kwargs: dict) -> tuple[list, dict]:
    """The stages' former path: length-sorted static batches through ``model.generate``; replies and row-steps."""
    import torch

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    replies: list = [None] * len(prompt_ids)
    row_steps = useful = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [prompt_ids[i] for i in chunk]}, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**batch, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
        new = output[:, batch["input_ids"].shape[1]:].tolist()
        row_steps += len(chunk) * max(len(row) for row in new)  # every row rides every step of its batch
        for i, row in zip(chunk, new):
            ended = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            useful += ended
            replies[i] = row[: ended - 1] if tokenizer.eos_token_id in row else row
    return replies, {"row_steps": row_steps, "useful_row_steps": useful, "after_end": row_steps - useful,
                     "after_end_share": round((row_steps - useful) / row_steps, 4) if row_steps else 0.0}


def static_workload(sides, jobs: list[tuple[str, list[list[int]], object, int, int]], batch_size: int
                    ) -> tuple[list, dict, float]:
    """Each job ``(side, prompts, setting, passes, seed)`` as the stages ran it: one generate pass per pass."""
    from transformers import set_seed

    from qlora_pipeline.modeling.adapters import autocast_like_training

    out, counts = [], {"row_steps": 0, "useful_row_steps": 0, "after_end": 0}
    started = time.perf_counter()
    for side, prompts, setting, passes, seed in jobs:
        model, tokenizer = sides.models[side]
        kwargs = {"max_new_tokens": MAX_NEW_TOKENS, **generate_kwargs(setting)}
        for k in range(passes):
            set_seed(seed + k)
            with autocast_like_training(sides.resolved):
                context = model.disable_adapter() if side == "base" and sides.adapters["tuned"] else _null()
                with context:
                    replies, steps = static_replies(model, tokenizer, prompts, batch_size, kwargs)
            out.append(replies)
            for key in counts:
                counts[key] += steps[key]
    counts["after_end_share"] = round(counts["after_end"] / counts["row_steps"], 4)
    return out, counts, time.perf_counter() - started


def generate_kwargs(setting) -> dict:
    """generate() arguments of a params decoding setting, as config.generate_kwargs made them before the engine,
    and the length decay the grid has had since (generate's own ``exponential_decay_length_penalty``): both
    paths decode alike, so greedy replies can be compared and neither runs longer replies than the other."""
    kwargs = {"do_sample": setting.sampled, "repetition_penalty": setting.repetition_penalty,
              "no_repeat_ngram_size": setting.no_repeat_ngram_size}
    from qlora_pipeline.modeling.engine import row_decoding

    decay = row_decoding(setting).exponential_decay_length_penalty  # the engine's own reading of the setting
    if decay is not None:
        kwargs["exponential_decay_length_penalty"] = decay
    if setting.sampled:
        kwargs.update(temperature=setting.temperature, top_p=setting.top_p, top_k=setting.top_k)
    return kwargs


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


MAX_NEW_TOKENS = 48
# The batch the stages generated in before the engine (evaluate.batch_size's former default).
FORMER_BATCH_SIZE = 16


def engine_workload(sides, jobs, seed: int) -> tuple[list, dict, float]:
    from qlora_pipeline import decoding

    workload, shapes = [], []
    for side, prompts, setting, passes, _ in jobs:
        runs = decoding.pass_requests(prompts, setting, passes, MAX_NEW_TOKENS, seed)
        shapes.append(len(runs))
        workload += [(side, request) for run in runs for request in run]
    engine = sides.engines["tuned"]
    before = dict(vars(engine.stats))
    started = time.perf_counter()
    results = iter(sides.run(workload))
    seconds = time.perf_counter() - started
    out = []
    for (side, prompts, *_), count in zip(jobs, shapes):
        for _ in range(count):
            out.append([next(results).token_ids for _ in prompts])
    stats = {k: v - before[k] for k, v in vars(engine.stats).items()}
    stats["mean_batch"] = round(stats["row_steps"] / stats["decode_steps"], 2) if stats["decode_steps"] else 0
    return out, stats, seconds


def compare(name: str, sides, jobs, batch_size: int, seed: int, rounds: int = 1) -> dict:
    """Both paths on ``jobs``, ``rounds`` times interleaved (static, engine, static, ...): their median seconds
    and the ratio of the medians, each round's seconds beside them (a 2-core machine's speed drifts by the hour,
    and one round of each showed 3.65x and 3.98x for one code). The step counts, the engine's phase seconds and
    the replies compared are the last round's; the static path runs first in every round."""
    import statistics

    timings: dict[str, list[float]] = {"static": [], "engine": []}
    for _ in range(rounds):  # every round computes the same tokens: greedy rows and seeded draws alike
        static, steps, seconds = static_workload(sides, jobs, batch_size)
        timings["static"].append(seconds)
        engine, stats, seconds = engine_workload(sides, jobs, seed)
        timings["engine"].append(seconds)
    static_seconds, engine_seconds = statistics.median(timings["static"]), statistics.median(timings["engine"])
    greedy = [i for i, (side, prompts, setting, passes, _) in enumerate(
        [job for job in jobs for _ in range(job[3] if job[2].sampled else 1)]) if not setting.sampled]
    same = sum(a == b for i in greedy for a, b in zip(static[i], engine[i]))
    rows = sum(len(static[i]) for i in greedy)
    tokens = sum(len(r) for run in engine for r in run)
    out = {"replies": sum(len(run) for run in engine), "engine_tokens": tokens,
           "static_seconds": round(static_seconds, 1), "engine_seconds": round(engine_seconds, 1),
           "speedup": round(static_seconds / engine_seconds, 2), "target_speedup": ">= 4",
           "rounds": {k: [round(x, 1) for x in v] for k, v in timings.items()},
           "static_decode_row_steps": steps, "engine": stats,
           "greedy_replies_identical": f"{same} of {rows}"}
    print(f"{name}: {json.dumps(out)}", flush=True)
    return out


def mixed_vs_one_model(sides, prompts: list[list[int]], seed: int, repeats: int) -> dict:
    from qlora_pipeline.modeling.engine import Request

    def rate(adapters: list[str | None]) -> float:
        engine = sides.engines["tuned"]
        requests = [Request(p, adapter, max_new_tokens=MAX_NEW_TOKENS) for p, adapter in zip(prompts, adapters)]
        started = time.perf_counter()
        results = engine.run(requests)
        return sum(r.completion_tokens for r in results) / (time.perf_counter() - started)

    tuned = [sides.adapters["tuned"]] * len(prompts)
    mixed = [None if i % 2 else sides.adapters["tuned"] for i in range(len(prompts))]
    rates = {"one_model": [], "mixed_base_tuned": []}
    for _ in range(repeats):  # interleaved, median taken
        rates["one_model"].append(rate(tuned))
        rates["mixed_base_tuned"].append(rate(mixed))
    import statistics

    median = {k: round(statistics.median(v), 2) for k, v in rates.items()}
    out = {"tokens_per_second": median, "per_round": {k: [round(x, 2) for x in v] for k, v in rates.items()},
           "mixed_vs_one_model": round(median["mixed_base_tuned"] / median["one_model"], 3), "target": ">= 0.8"}
    print(f"mixed: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the workspace whose models/ and data/ are used")
    parser.add_argument("--skip", nargs="*", default=[], choices=("grid", "evaluate", "mixed"))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the mixed-batch measurement")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the grid's and evaluate's comparison, interleaved; medians reported")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    for flag in ("rounds", "repeats"):  # a median of no rounds is no figure
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: give 1 or more")
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qlora_pipeline import hardware
    from qlora_pipeline.config import DecodingSetting, decoding_setting_from, load_params
    from qlora_pipeline.data.sampling import cap_examples
    from qlora_pipeline.io import read_json, read_jsonl
    from qlora_pipeline.modeling.adapters import load_sides
    from qlora_pipeline.modeling.engine import chat_prompt_ids

    params = load_params(ROOT / "params.yaml")
    cfg = params.evaluate
    global MAX_NEW_TOKENS
    MAX_NEW_TOKENS = cfg.max_new_tokens
    sides = load_sides(args.root / "models/base", args.root / "models/adapter", cfg.dequantize_4bit, cfg.batch_size)

    def prompts(split: str, cap: int | None) -> list[list[int]]:
        rows = cap_examples([row for _, row in read_jsonl(args.root / f"data/splits/{split}.jsonl")], cap, params.seed)
        return chat_prompt_ids(sides.tokenizer, [row["messages"] for row in rows])

    val, test = prompts("val", params.decoding.max_samples), prompts("test", cfg.max_samples)
    chosen_path = args.root / "reports/decoding.json"
    chosen = decoding_setting_from(read_json(chosen_path)["chosen"], str(chosen_path)) if chosen_path.is_file() \
        else next(s for s in params.decoding.grid if s.sampled)
    report: dict = {"machine": hardware.capability_line(), "hardware": hardware.capability(),
                    "static_batch_size": FORMER_BATCH_SIZE, "engine_max_batch_size": cfg.batch_size,
                    "max_new_tokens": MAX_NEW_TOKENS}
    seed, passes = params.seed, cfg.samples_per_prompt
    if "grid" not in args.skip:
        jobs = [("tuned", val, s, passes if s.sampled else 1, seed) for s in params.decoding.grid]
        report["choose_decoding_grid"] = compare("grid", sides, jobs, FORMER_BATCH_SIZE, seed, args.rounds)
    if "evaluate" not in args.skip:
        jobs = [(side, test, DecodingSetting(), 1, seed) for side in ("base", "tuned")]
        if chosen != DecodingSetting():  # as evaluate: any other decoding (penalties too) is a row of its own
            jobs += [(side, test, chosen, passes if chosen.sampled else 1, seed) for side in ("base", "tuned")]
        report["evaluate_rows"] = {"chosen": chosen.model_dump(), **compare("evaluate", sides, jobs, FORMER_BATCH_SIZE, seed,
                                                                           args.rounds)}
    if "mixed" not in args.skip:
        report["mixed_batches"] = mixed_vs_one_model(sides, test, seed, args.repeats)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
