"""The serving engine on a GPU: mixed-batch correctness, batched throughput and memory per adapter.

A Llama with random weights (TinyLlama's ~1.1B shape: hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 KV heads, untied head) and the real SmolLM2 tokenizer's vocabulary is written as
bfloat16 safetensors, quantized as the quantize-load stage does (``BitsAndBytesConfig`` NF4, double
quantization, bfloat16 compute, ``device_map={"": 0}``) and saved as a 4-bit base folder. Random
LoRA adapters (r 16, alpha 32, all-linear, ``init_lora_weights=False``, one seed each) are saved on
it with a ``training_config.json`` like train-adapter writes (the base's fingerprint, bf16 autocast
on a GPU, a system prompt of their own). Then only the serving code runs: ``load_persona_model``
and ``Engine.run_batch`` (no MLflow, FastAPI or DVC is imported).

Mixed-adapter batches take two paths: the default stacked LoRA (``modeling/stacked_lora.py``,
``persona.stacked``; two matmuls a layer whatever the adapters) and PEFT's ``adapter_names`` loop.
Both are measured on the same PersonaModel: for PEFT's path ``persona.stacked`` is set to None
for the while (the engine then passes ``adapter_names``) and restored after.

1. Mixed batches: 16 prompts over base + 3 adapters, 24 greedy tokens as one mixed batch through
   the engine (the stacked path) vs each prompt alone with its adapter: the share of rows with the
   same tokens, where the first differing token is; the same batch through PEFT's path, and its
   rows vs the stacked path's. Prefill logits (last position) of the padded mixed batch: PEFT's
   ``adapter_names`` forward and the stacked forward (``with persona.stacked.mixed(names)``), each
   vs every prompt alone and vs the-same-padded-batch-run-with-one-adapter (the latter isolates the
   per-row adapter routing from batch-shape and padding noise), and stacked vs PEFT.
2. Throughput: 8 and 32 rows of equal-length prompts, 64 greedy tokens each, as one
   ``run_batch`` spread over 3 adapters (stacked, then PEFT's path), as one ``run_batch`` on 1
   adapter, and one request per ``run_batch`` (one at a time; over the first ``--serial-requests``
   of them: every one is the same work, so the rate is the same). Completion tokens per second;
   warm-up first (every path); the GPU is synchronised around every timing.
3. GPU memory: ``torch.cuda.memory_allocated`` with the base alone, then with 1, 3 and 10 adapters
   loaded at run time (``PersonaModel.load_adapter``, which calls ``restack()``: the adapters'
   weights become views into the stacks, so they are held once); growth per adapter vs its
   safetensors size.

The JSON is rewritten after every part, so a run cut short still leaves what it measured.

On the lent device machine (bitsandbytes travels as a wheel; tokenizer files in .gpu_tok/):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 python3 bench/gpu_serve.py --tokenizer .gpu_tok --out $OUT/gpu_serve.json
Check the code path on a CPU (a tiny shape, float32 compute, no autocast):
    .venv/bin/python bench/gpu_serve.py --tiny --tokenizer .gpu_tok --out /tmp/gpu_serve_tiny.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from benchlib import environment, mixed_batch_check, peft_mixed_path, sync

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# TinyLlama-1.1B's shape (TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json); the vocabulary is the tokenizer's.
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(TINYLLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)

TOPICS = ["the weekend", "your job", "the football match", "that new film", "your sister", "the trip to Rome",
          "the dinner party", "your garden", "the concert", "the new phone", "your cat", "the book club",
          "the marathon", "your flat", "the wedding", "the exam", "the holiday", "your car", "the museum",
          "the rain", "your neighbour", "the bakery", "the beach", "the meeting", "your birthday", "the park",
          "the train strike", "your piano lessons", "the podcast", "the camping trip", "your new bike",
          "the office party", "the storm", "the recipe", "your brother", "the lake", "the festival",
          "the hiking trail", "the chess club", "your dentist"]
QUESTIONS = ["hey, how was {}?", "so what do you think about {}?", "tell me about {} please",
             "did you hear the news about {}?"]


# ----------------------------------------------------------------------- the model and adapters


def build_base(work: Path, tokenizer_dir: Path, shape: dict, cuda: bool) -> tuple[Path, dict]:
    """A random Llama of ``shape``, saved dense, quantized to NF4 as quantize-load does, saved as a 4-bit folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from qlora_pipeline.modeling.loading import NO_HUB_KERNELS
    from qlora_pipeline.modeling.quantization import disable_cpu_repack, footprint, linear4bit_modules

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, **shape)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: seconds, not minutes
        model = LlamaForCausalLM(config)
    dense = work / "dense"
    model.to(dtype).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, quantization_config=quantization, **NO_HUB_KERNELS,
                                                 device_map={"": 0} if cuda else None)
    disable_cpu_repack(model)
    layers = linear4bit_modules(model)
    info = {"config": shape, "vocab_size": len(tokenizer), **footprint(model), "linear4bit_layers": len(layers),
            "quant_type": layers[0].weight.quant_state.quant_type,
            "double_quant": bool(layers[0].weight.quant_state.nested), "compute_dtype": str(dtype)}
    base = work / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    info["base_on_disk_mb"] = round(sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20, 1)
    info["build_seconds"] = round(time.perf_counter() - started, 1)
    return base, info


def make_adapters(base: Path, work: Path, count: int, cuda: bool) -> list[Path]:
    """``count`` random LoRA adapters of the pipeline's LoRA config, saved as train-adapter saves them."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_pipeline.config import load_params
    from qlora_pipeline.layout import RESOLVED_CONFIG
    from qlora_pipeline.modeling.preparation import base_fingerprint, prepare_4bit_base

    params = load_params(ROOT / "params.yaml")
    compute = "bfloat16" if cuda else "float32"
    model_section = params.model.model_dump()
    model_section["quantization"]["bnb_4bit_compute_dtype"] = compute
    train_section = params.train.model_dump()
    train_section.update(bf16=cuda, fp16=False)  # autocast as training on this machine would use
    fingerprint = base_fingerprint("qlora", base, {})
    model, tokenizer = prepare_4bit_base(base, compute)
    config = LoraConfig(task_type="CAUSAL_LM", **params.train.lora.model_dump())
    config.init_lora_weights = False  # random A and B: each adapter changes the outputs
    model = get_peft_model(model, config)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    made = []
    for index in range(count):
        torch.manual_seed(100 + index)
        with torch.no_grad():  # nn.Linear's default init, as init_lora_weights=False leaves it; a seed per adapter
            for parameter in lora:
                torch.nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))
        out = work / f"adapter{index}"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        resolved = {"method": "qlora", "base_model": str(base), "seed": params.seed, "base_fingerprint": fingerprint,
                    "model": model_section, "train": train_section,
                    "split": {"system_prompt": f"You are persona number {index}. Reply in your own voice.",
                              "context_turns": 4}}
        (out / RESOLVED_CONFIG).write_text(json.dumps(resolved, indent=2))
        made.append(out)
    del model, lora
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return made


# ----------------------------------------------------------------------- 1. mixed batches


def conversations(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(TOPICS[i % len(TOPICS)])}]
            for i in range(count)]


# ----------------------------------------------------------------------- 2. throughput


def equal_length_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """``count`` prompts (one shared system message) that all take the same number of tokens."""
    from qlora_pipeline.serving.prompts import prompt_ids

    system = {"role": "system", "content": "You are a friendly person chatting with a friend."}
    candidates = [prompt_ids(tokenizer, [system, {"role": "user", "content": q.format(t)}])
                  for q in QUESTIONS for t in TOPICS]
    length, _ = Counter(map(len, candidates)).most_common(1)[0]
    same = [c for c in candidates if len(c) == length]
    return [same[i % len(same)] for i in range(count)]


def timed(engine: Any, batches: list[list[Any]]) -> dict:
    """Run each list of jobs as one run_batch, one after another; completion tokens per second of wall time."""
    sync()
    started = time.perf_counter()
    completions = [c for jobs in batches for c in engine.run_batch(jobs)]
    sync()
    wall = time.perf_counter() - started
    tokens = sum(c.completion_tokens for c in completions)
    return {"requests": len(completions), "run_batch_calls": len(batches), "completion_tokens": tokens,
            "finish_reasons": dict(Counter(c.finish_reason for c in completions)),
            "wall_seconds": round(wall, 3), "tokens_per_second": round(tokens / wall, 2)}


def throughput(persona: Any, row_counts: list[int], tokens: int, serial_requests: int) -> dict:
    from qlora_pipeline.config import ChatConfig
    from qlora_pipeline.serving.engine import Engine, Job, Sampling

    engine = Engine(persona, ChatConfig(temperature=0.0, top_k=0, repetition_penalty=1.0, no_repeat_ngram_size=0))
    prompts = equal_length_prompts(persona.tokenizer, max(row_counts))

    def jobs(count: int, adapters: list[str], new_tokens: int = tokens) -> list[Any]:
        return [Job(prompts[i], adapters[i % len(adapters)], new_tokens, Sampling(0.0)) for i in range(count)]

    if persona.stacked is None:
        raise RuntimeError("persona.stacked is None: the stacked path is not in use")
    mixed3 = ["a0", "a1", "a2"]
    for adapters in (mixed3, ["a0"]):  # warm-up: every forward path, a few batch sizes
        for count in (1, *row_counts):
            engine.run_batch(jobs(count, adapters, 4))
    with peft_mixed_path(persona):
        for count in row_counts:
            engine.run_batch(jobs(count, mixed3, 4))
    out: dict[str, Any] = {"prompt_tokens": len(prompts[0]), "new_tokens": tokens, "decoding": "greedy"}
    for count in row_counts:
        mixed = timed(engine, [jobs(count, mixed3)])
        with peft_mixed_path(persona):
            peft_mixed = timed(engine, [jobs(count, mixed3)])
        single = timed(engine, [jobs(count, ["a0"])])
        serial = timed(engine, [[job] for job in jobs(count, mixed3)[:serial_requests]])
        out[f"rows_{count}"] = {
            "mixed_3_adapters": mixed, "mixed_3_adapters_peft": peft_mixed, "single_adapter": single,
            "one_at_a_time_3_adapters": serial,
            "mixed_vs_single": round(mixed["tokens_per_second"] / single["tokens_per_second"], 3),
            "mixed_peft_vs_single": round(peft_mixed["tokens_per_second"] / single["tokens_per_second"], 3),
            "stacked_vs_peft_mixed": round(mixed["tokens_per_second"] / peft_mixed["tokens_per_second"], 3),
            "batched_vs_one_at_a_time": round(single["tokens_per_second"] / serial["tokens_per_second"], 3),
            "mixed_vs_one_at_a_time": round(mixed["tokens_per_second"] / serial["tokens_per_second"], 3)}
    out["note"] = (f"mixed_3_adapters: the default stacked-LoRA path; mixed_3_adapters_peft: the same PersonaModel "
                   "with persona.stacked set to None for the while (the engine passes PEFT's adapter_names), then "
                   f"restored. One at a time: the first {serial_requests} requests of each set, each its own "
                   "run_batch (every request is the same work, so the rate stands for all of them)")
    out["targets"] = {"mixed_vs_single": ">= 0.70", "batched_vs_one_at_a_time": ">= 3.0"}
    return out


# ----------------------------------------------------------------------- 3. memory


def cuda_allocated(base: Path, adapters: list[Path], counts: list[int]) -> dict:
    """``torch.cuda.memory_allocated`` with 0, 1, 3, 10 adapters loaded at run time (what a GPU pays);
    serve_bench.py's ``server_rss`` measures a served process's resident memory on a CPU instead.
    """
    import torch

    from qlora_pipeline.serving.models import AdapterSpec, load_persona_model

    cuda = torch.cuda.is_available()

    def allocated() -> int | None:
        gc.collect()
        if not cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    before = allocated()
    persona = load_persona_model(base, [], runtime_adapters=True)
    loaded = {0: allocated()}
    for count in counts:
        while len(persona.adapters) < count:
            index = len(persona.adapters)
            persona.load_adapter(AdapterSpec(f"m{index}", str(adapters[index])))
        loaded[count] = allocated()
    on_disk = (adapters[0] / "adapter_model.safetensors").stat().st_size
    out: dict[str, Any] = {"adapters_loaded": sorted(loaded), "adapter_on_disk_mb": round(on_disk / 2**20, 2)}
    if cuda:
        top, one = max(counts), min(counts)
        per_adapter = (loaded[top] - loaded[one]) / (top - one)
        out.update({"allocated_before_load_mb": round(before / 2**20, 1),
                    "allocated_mb": {str(c): round((v - before) / 2**20, 1) for c, v in loaded.items()},
                    "growth_first_adapter_mb": round((loaded[one] - loaded[0]) / 2**20, 2),
                    "growth_per_adapter_mb": round(per_adapter / 2**20, 2),
                    "growth_vs_disk": round(per_adapter / on_disk, 3), "target": "<= 1.2",
                    "max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
    del persona
    gc.collect()
    return out


# ----------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with the SmolLM2 tokenizer files")
    parser.add_argument("--tiny", action="store_true", help="a very small shape, for a quick check of the code path")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--prompts", type=int, default=16, help="rows of the mixed-batch check")
    parser.add_argument("--check-tokens", type=int, default=24)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32], help="rows per throughput batch")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--serial-requests", type=int, default=8)
    parser.add_argument("--memory-counts", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--skip", nargs="*", default=[], choices=("mixed", "throughput", "memory"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu_serve."))

    import torch

    from qlora_pipeline.serving.models import AdapterSpec, load_persona_model

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    result: dict[str, Any] = {"model": ("tiny" if args.tiny else "TinyLlama-1.1B shape") + ", random weights, "
                                       "SmolLM2 tokenizer", "environment": environment()}

    def save(stage: str) -> None:
        result.setdefault("seconds", {})[stage] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"[{time.perf_counter() - started:7.1f}s] {stage} done", flush=True)

    def attempt(stage: str, measure: Any) -> None:
        """One part; a failure is recorded (and printed) and the next part still runs."""
        try:
            result[stage] = measure()
        except Exception:
            # paths inside the repository as relative ones: no machine's folders in committed results
            result[f"{stage}_error"] = traceback.format_exc().replace(f"{ROOT}{os.sep}", "")
            print(result[f"{stage}_error"], file=sys.stderr, flush=True)
        save(stage)

    base, result["base"] = build_base(args.work, args.tokenizer, TINY if args.tiny else TINYLLAMA, cuda)
    save("base")
    adapters = make_adapters(base, args.work, max([3, *args.memory_counts]), cuda)
    save("adapters")

    if not ({"mixed", "throughput"} <= set(args.skip)):
        persona = load_persona_model(base, [AdapterSpec(f"a{i}", str(p)) for i, p in enumerate(adapters[:3])])
        result["persona"] = {"device": str(persona.model.device), "dequantized": persona.dequantized,
                             "mixed_batches": persona.mixed_batches, "stacked": persona.stacked is not None,
                             "allocated_mb": round(torch.cuda.memory_allocated() / 2**20, 1) if cuda else None}
        if "mixed" not in args.skip:
            attempt("mixed_batch", lambda: mixed_batch_check(persona, conversations(args.prompts), args.check_tokens))
        if "throughput" not in args.skip:
            attempt("throughput", lambda: throughput(persona, args.rows, args.new_tokens, args.serial_requests))
        del persona
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if "memory" not in args.skip:
        attempt("memory", lambda: cuda_allocated(base, adapters, sorted(args.memory_counts)))

    summary = {"device": result["environment"].get("gpu", "cpu")}
    if "mixed_batch" in result:
        m = result["mixed_batch"]
        summary["mixed_batch"] = (
            f"stacked path {m['identical_rows']}/{m['rows']} rows identical to alone, PEFT path "
            f"{m['peft_path']['identical_rows_vs_alone']}/{m['rows']}, stacked vs PEFT "
            f"{m['stacked_vs_peft_generation']['identical_rows']}/{m['rows']}; max prefill |dlogit| stacked vs PEFT "
            f"{m['max_abs_prefill_logit_diff_stacked_vs_peft']}; PEFT vs alone {m['max_abs_prefill_logit_diff_vs_alone']}, "
            f"vs same batch one adapter {m['max_abs_prefill_logit_diff_vs_same_batch_one_adapter']}; stacked vs alone "
            f"{m['stacked_max_abs_prefill_logit_diff_vs_alone']}, vs same batch one adapter "
            f"{m['stacked_max_abs_prefill_logit_diff_vs_same_batch_one_adapter']}")
    for key, value in result.get("throughput", {}).items():
        if key.startswith("rows_"):
            summary[f"throughput_{key}"] = (
                f"mixed stacked {value['mixed_3_adapters']['tokens_per_second']} tok/s, mixed PEFT "
                f"{value['mixed_3_adapters_peft']['tokens_per_second']}, single "
                f"{value['single_adapter']['tokens_per_second']}, one-at-a-time "
                f"{value['one_at_a_time_3_adapters']['tokens_per_second']}; mixed/single stacked "
                f"{value['mixed_vs_single']}, PEFT {value['mixed_peft_vs_single']}; "
                f"batched/one-at-a-time {value['batched_vs_one_at_a_time']}")
    if "memory" in result and "allocated_mb" in result["memory"]:
        mem = result["memory"]
        summary["memory"] = (f"allocated MB by adapters loaded {mem['allocated_mb']}; per adapter "
                             f"{mem['growth_per_adapter_mb']} MB vs {mem['adapter_on_disk_mb']} MB on disk "
                             f"({mem['growth_vs_disk']}x)")
    result["summary"] = summary
    save("all")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
