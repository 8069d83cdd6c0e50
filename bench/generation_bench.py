"""Generation speed as the stages (and chat) generate, through the engine: batched vs one at a time, the CPU repack.

One process loads the tuned model the way evaluate does (``models/base`` + ``models/adapter``,
the autocast training used) and generates greedy replies to the first test prompts with exactly
``--new-tokens`` new tokens each, so every side does the same work:
- one prompt at a time vs ``--batch`` prompts decoded together by the engine;
- the 4-bit layers as training runs them (dequantized on every call, repack off) vs dequantized
  once (``evaluate.dequantize_4bit``, same outputs) vs bitsandbytes' CPU repack on (only where the
  CPU has AVX-512 BF16; safe in a process that never saves the model).
Prints tokens/s of each and the ratios; best of ``--repeats``.

Run (after `make run`; nothing else busy on the machine):
    .venv/bin/python bench/generation_bench.py --out bench/results/generation_<machine>.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchlib import write_report

ROOT = Path(__file__).resolve().parents[1]


def tokens_per_second(model, tokenizer, conversations, batch_size: int, new_tokens: int, repeats: int) -> float:
    from qlora_pipeline.modeling.engine import Engine, Request, chat_prompt_ids

    # No end-of-turn token: every reply is exactly new_tokens long, so every side does the same work.
    engine = Engine(model, tokenizer, max_batch_size=batch_size, eos_token_ids=())
    adapter = "tuned" if hasattr(model, "peft_config") else None
    requests = [Request(ids, adapter, max_new_tokens=new_tokens) for ids in chat_prompt_ids(tokenizer, conversations)]
    engine.run(requests[:batch_size])  # warm-up (repacks if on)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        engine.run(requests)
        best = min(best, time.perf_counter() - started)
    return len(conversations) * new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT / "models/base")
    parser.add_argument("--adapter", type=Path, default=ROOT / "models/adapter")
    parser.add_argument("--test", type=Path, default=ROOT / "data/splits/test.jsonl")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))

    import bitsandbytes.functional as bnbf

    from qlora_pipeline import hardware
    from qlora_pipeline.io import read_jsonl
    from qlora_pipeline.modeling.adapters import autocast_like_training, load_tuned
    from qlora_pipeline.modeling.inference import dequantize_for_inference
    from qlora_pipeline.modeling.quantization import linear4bit_modules

    info = hardware.capability()
    print(f"machine: {hardware.capability_line(info)}", flush=True)
    conversations = [row["messages"] for _, row in read_jsonl(args.test)][: args.prompts]
    # (batch size, repack, dequantize once): each side on a freshly loaded model, since both the
    # repack and the dequantization change the layers in place.
    sides = {"batched, 4-bit": (args.batch, False, False), "one at a time, 4-bit": (1, False, False),
             "batched, dequantized once (evaluate)": (args.batch, False, True)}
    if bnbf.has_avx512bf16():
        sides["batched, 4-bit, repack on"] = (args.batch, True, False)
    results = {}
    for label, (batch_size, repack, dequantize) in sides.items():
        model, tokenizer, resolved = load_tuned(args.base, args.adapter)
        for layer in linear4bit_modules(model):
            layer.support_avx512bf16_for_cpu = repack
        if dequantize:
            dequantize_for_inference(model)
        with autocast_like_training(resolved):
            results[label] = tokens_per_second(model, tokenizer, conversations, batch_size, args.new_tokens,
                                               args.repeats)
        print(f"  {label:<40} {results[label]:8.1f} tokens/s", flush=True)
        del model
    batched = results["batched, 4-bit"]
    ratios = {"batched_vs_one_at_a_time": round(batched / results["one at a time, 4-bit"], 2),
              "dequantized_vs_4bit": round(results["batched, dequantized once (evaluate)"] / batched, 2)}
    if "batched, 4-bit, repack on" in results:
        ratios["repack_on_vs_off"] = round(results["batched, 4-bit, repack on"] / batched, 2)
    for name, value in ratios.items():
        print(f"{name}: {value}x")
    write_report(args.out, {
        "machine": info, "machine_line": hardware.capability_line(info), "prompts": len(conversations),
        "batch": args.batch, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "tokens_per_second": {k: round(v, 1) for k, v in results.items()}, "ratios": ratios})


if __name__ == "__main__":
    main()
