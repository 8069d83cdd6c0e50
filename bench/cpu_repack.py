"""What turning off bitsandbytes' CPU repack costs: greedy generation speed, repack off vs on.

Both sides load the same 4-bit base and generate the same tokens in the same process; the
script prints tokens/s for each and the ratio off/on. The repack is off everywhere in the
pipeline because a repacked layer saves back with loss and trains with wrong gradients.

Run (after `make run` has written models/base; nothing else busy on the machine):
    .venv/bin/python bench/cpu_repack.py --base models/base --repeats 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def tokens_per_second(model, batch, new_tokens: int, repeats: int) -> float:
    import torch

    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up (repacks if on)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            best = min(best, time.perf_counter() - started)
    return batch["input_ids"].shape[0] * new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from qlora_pipeline.modeling.generation import chat_prompts
    from qlora_pipeline.modeling.loading import load_saved_base
    from qlora_pipeline.modeling.quantization import linear4bit_modules

    prompts = [[{"role": "user", "content": f"Tell me something about the number {i}."}] for i in range(args.batch)]
    results = {}
    for label, repack in (("repack off (pipeline)", False), ("repack on (bitsandbytes default)", True)):
        model, tokenizer = load_saved_base(args.base)
        for layer in linear4bit_modules(model):
            layer.support_avx512bf16_for_cpu = repack
        tokenizer.padding_side = "left"
        batch = tokenizer(chat_prompts(tokenizer, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        results[label] = tokens_per_second(model.eval(), batch, args.new_tokens, args.repeats)
        print(f"{label:<36} {results[label]:8.1f} tokens/s")
    off, on = results.values()
    print(f"ratio off/on: {off / on:.2f}x  (batch {args.batch}, {args.new_tokens} new tokens, best of {args.repeats})")


if __name__ == "__main__":
    main()
