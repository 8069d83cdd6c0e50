"""Export's reference on the 4-bit layers against the same passes dequantized (``modeling.inference.dequantized``).

`qlora-pipeline export` holds every file it writes to a reference: the 4-bit base with the adapter, run as
training ran it. Its passes (the reference's logits on the test rows, the base's without the adapter, and for
a GGUF export greedy replies to four of them) ran on bitsandbytes' 4-bit layers, which on a CPU dequantize
their whole weight at every forward pass. Now they run with the layers dequantized once, and put back for
the merge. Here ``gguf.build_reference`` (the product's function) runs both ways on the same rows, in the same
process, interleaved, with the one context swapped; the report says whether the two references are the same
numbers (logits bit for bit, greedy tokens equal) and the ratio of their times.

After `make run` (the default run's base and adapter, its test split), on an idle machine:
    .venv/bin/python bench/export_reference_bench.py --out bench/results/<machine>/export_reference.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from benchlib import environment, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--adapter", type=Path, default=Path("models/adapter"))
    parser.add_argument("--test", type=Path, default=Path("data/splits/test.jsonl"))
    parser.add_argument("--max-samples", type=int, default=32, help="as export's own default")
    parser.add_argument("--rounds", type=int, default=2, help="of each way, interleaved")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from qlora_pipeline.modeling import inference
    from qlora_pipeline.modeling.adapters import load_base_for
    from qlora_pipeline.serving import gguf
    from qlora_pipeline.serving.export import read_test_rows
    from qlora_pipeline.serving.models import read_adapter

    adapter = read_adapter("persona", str(args.adapter), args.adapter)
    rows = read_test_rows(args.test, args.max_samples, adapter.resolved.get("seed", 42))
    base4, tokenizer = load_base_for(adapter.resolved, args.base)
    ways = {"4bit_layers": lambda model: inference.dequantized(model, False), "dequantized": inference.dequantized}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    references = {}
    for round_ in range(args.rounds):
        order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
        for way in order:
            with mock.patch.object(gguf, "dequantized", ways[way]):
                started = time.perf_counter()
                chat = gguf.chat_reference(tokenizer, adapter, rows)
                references[way] = gguf.build_reference(base4, chat, adapter, rows)
                seconds[way].append(round(time.perf_counter() - started, 2))
            print(f"round {round_ + 1}: {way} {seconds[way][-1]} s", flush=True)

    before, after = references["4bit_layers"], references["dequantized"]
    same_logits = all(torch.equal(a, b) for a, b in zip(before.logits, after.logits))
    report = {
        **environment(),
        "rows": len(rows), "target_tokens": sum(len(ex.targets) for ex in before.examples),
        "greedy_prompts": len(before.greedy), "greedy_tokens": sum(map(len, before.greedy)),
        "precision": before.precision,
        "seconds": seconds,
        "median_seconds": {way: statistics.median(values) for way, values in seconds.items()},
        "speedup": round(statistics.median(seconds["4bit_layers"]) / statistics.median(seconds["dequantized"]), 2),
        "logits_bit_identical": same_logits,
        "greedy_equal": before.greedy == after.greedy,
        "adapter_effect_equal": before.adapter_effect == after.adapter_effect,
    }
    medians = report["median_seconds"]
    print(f"reference of {report['rows']} rows and {report['greedy_prompts']} greedy replies: "
          f"{medians['4bit_layers']} s on the 4-bit layers, {medians['dequantized']} s dequantized, "
          f"{report['speedup']}x; logits bit-identical: {same_logits}, greedy equal: {report['greedy_equal']}")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
