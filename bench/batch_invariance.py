"""Does a float32 row give the same tokens alone as in a batch? The engine's claim, measured per thread count.

The engine computes each row's logits in matmuls over the whole batch. A row's numbers are the same
alone and batched only where the matmul kernels sum each row's products in the same order whatever the
number of rows; CPU BLAS kernels pick their blocking, and for a few rows another kernel, by the shape
and the thread count. Two measures, each for 1 and for 2 threads (or --threads):

1. One linear layer of the model's shape (576 -> 1536, float32): for each batch size M, whether the first M
   rows computed alone in a batch of M are bit for bit the rows of a batch of 192.
2. The default run's trained adapter on its base, cast to float32 (no autocast): greedy replies to the test prompts,
   each alone against all in one batch (``Engine.run``): how many replies differ.

Run after `make run` (models/base, models/adapter, data/splits/test.jsonl), on an idle machine:
    .venv/bin/python bench/batch_invariance.py --out bench/results/<machine>/batch_invariance.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchlib import write_report

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 2, 4, 7, 8, 16, 32, 64, 99, 150)


def linear_rows() -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=generator)
    inputs = torch.randn(192, 576, generator=generator)
    full = torch.nn.functional.linear(inputs, weight)
    same = {m: bool(torch.equal(torch.nn.functional.linear(inputs[:m], weight), full[:m])) for m in SIZES}
    return {"rows_identical_to_the_batch_of_192": same}


def replies(engine, prompts, tokens: int) -> dict:
    from qlora_pipeline.modeling.adapters import TUNED
    from qlora_pipeline.modeling.engine import Request

    requests = [Request(ids, TUNED, max_new_tokens=tokens) for ids in prompts]
    batched = [r.token_ids for r in engine.run(requests)]
    alone = [engine.run([request])[0].token_ids for request in requests]
    differ = [i for i, (a, b) in enumerate(zip(batched, alone)) if a != b]
    first = [next(k for k, (x, y) in enumerate(zip(batched[i] + [-1], alone[i] + [-2])) if x != y) for i in differ]
    return {"replies": len(requests), "differ": len(differ), "first_differing_token": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="test prompts (each is also run alone)")
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per reply")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qlora_pipeline import hardware  # first: the package keeps bitsandbytes from asking the hub for kernels
    from qlora_pipeline.io import read_jsonl
    from qlora_pipeline.modeling.adapters import load_tuned_for_generation
    from qlora_pipeline.modeling.engine import Engine, chat_prompt_ids

    model, tokenizer, _ = load_tuned_for_generation(ROOT / "models/base", ROOT / "models/adapter", True)
    import torch

    for parameter in model.parameters():  # float32 throughout, whatever dtype the run computed in
        parameter.data = parameter.data.float()
    for module in model.modules():  # the dense layers compute in their compute dtype
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float32
    engine = Engine(model, tokenizer, max_batch_size=max(args.prompts, 1))  # no autocast: float32
    rows = [row for _, row in read_jsonl(ROOT / "data/splits/test.jsonl")][: args.prompts]
    prompts = chat_prompt_ids(tokenizer, [row["messages"] for row in rows])
    report: dict = {"machine": hardware.capability_line(), "dtype": "float32", "tokens": args.tokens}
    for threads in args.threads:
        torch.set_num_threads(threads)
        report[f"threads_{threads}"] = {"linear": linear_rows(), "engine": replies(engine, prompts, args.tokens)}
        print(f"threads {threads}:", report[f"threads_{threads}"], flush=True)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
