"""vLLM serving our adapter over the 4-bit base: its greedy replies against ours, token for token (prepared; GPU only).

What `qlora-pipeline export --format vllm` promises, checked end to end on a CUDA machine:
1. vLLM loads the 4-bit base (``quantization="bitsandbytes"``) with ``enable_lora=True`` and the
   smallest ``max_lora_rank`` that fits, and serves the adapter through a ``LoRARequest``.
2. On the first ``--prompts`` test rows (as chat and serve render them: the chat template with the
   trained system prompt), vLLM's greedy replies (``temperature=0``, ``max_tokens=--tokens``) are
   compared token for token with this project's own (``Engine`` on the same 4-bit base + adapter,
   run as training ran it): the share of equal replies, where the first difference falls, and
   whether each reply ended its turn in both.
3. Tokens per second of vLLM for all prompts at once, beside the engine's.

Run on the device machine after `make run` (models/base, models/adapter, data/splits exist) with
vLLM installed (it is not a dependency of this project, and the lent machine reaches no index: a
vLLM wheel is far above what one call may carry, so this has not run yet):
    python3 bench/gpu_vllm.py --out $OUT/gpu_vllm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "models/base")
    parser.add_argument("--adapter", type=Path, default=ROOT / "models/adapter")
    parser.add_argument("--test", type=Path, default=ROOT / "data/splits/test.jsonl")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_vllm.json")
    args = parser.parse_args()

    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from qlora_pipeline.io import read_json, read_jsonl
    from qlora_pipeline.modeling.adapters import attach_adapters, autocast_like_training, load_base_for
    from qlora_pipeline.modeling.engine import Engine, Request, chat_prompt_ids
    from qlora_pipeline.serving import vllm as checks
    from qlora_pipeline.serving.models import read_adapter

    assert torch.cuda.is_available(), "a CUDA GPU is needed"
    adapter = read_adapter("persona", str(args.adapter), args.adapter)
    config = read_json(args.adapter / "adapter_config.json")
    assert not checks.problems(config), checks.problems(config)
    rows = [row for _, row in read_jsonl(args.test)][: args.prompts]
    system = adapter.system_prompt
    conversations = [r["messages"] if r["messages"][0]["role"] == "system" or not system
                     else [{"role": "system", "content": system}, *r["messages"]] for r in rows]
    result = {"prompts": len(rows), "max_tokens": args.tokens, "gpu": torch.cuda.get_device_name(0)}

    base4, tokenizer = load_base_for(adapter.resolved, args.base)
    prompts = chat_prompt_ids(tokenizer, conversations)
    tuned = attach_adapters(base4, {"persona": args.adapter})
    engine = Engine(tuned, tokenizer, autocast=lambda: autocast_like_training(adapter.resolved))
    started = time.perf_counter()
    ours = engine.run([Request(ids, adapter="persona", max_new_tokens=args.tokens) for ids in prompts])
    result["ours_seconds"] = time.perf_counter() - started
    del tuned, base4, engine
    torch.cuda.empty_cache()

    llm = LLM(model=str(args.base), quantization="bitsandbytes", enable_lora=True,
              max_lora_rank=checks.max_lora_rank(config), max_model_len=2048, gpu_memory_utilization=0.5)
    sampling = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling,
                           lora_request=LoRARequest("persona", 1, str(args.adapter)))
    result["vllm_seconds"] = time.perf_counter() - started
    eos = tokenizer.eos_token_id
    rows_out = []
    for mine, theirs in zip(ours, outputs):
        a = mine.token_ids
        b = [t for t in theirs.outputs[0].token_ids if t != eos]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
        rows_out.append({"equal": a == b, "first_difference": first, "ours_ended": mine.finish_reason == "stop",
                         "vllm_ended": theirs.outputs[0].finish_reason == "stop"})
    result["rows"] = rows_out
    result["equal_share"] = sum(r["equal"] for r in rows_out) / len(rows_out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
