"""quantize-load stage: the base model, quantized per params, saved with its tokenizer, and what it costs."""

from __future__ import annotations

import time
from pathlib import Path

from qlora_pipeline import hardware, tracking
from qlora_pipeline.config import Params
from qlora_pipeline.io import atomic_path, remove_outputs, write_json
from qlora_pipeline.modeling.engine import Engine, Request, as_reply, chat_prompt_ids
from qlora_pipeline.modeling.inference import dequantized
from qlora_pipeline.modeling.loading import gguf_read_once, load_model, load_tokenizer, resolve_source, set_end_token
from qlora_pipeline.modeling.quantization import bnb_config, footprint


def run_quantize_load(params: Params, out_dir: Path, metrics_path: Path) -> dict:
    """Load ``params.model``, quantize it, save it to ``out_dir`` and its metrics to ``metrics_path``."""
    remove_outputs(out_dir, metrics_path)
    cfg = params.model
    dtype = hardware.resolve_dtype(cfg.dtype)
    source = resolve_source(cfg)  # cheap checks first: a bad path fails before any loading
    quantization = bnb_config(cfg.quantization)
    with atomic_path(out_dir) as tmp:
        started = time.perf_counter()
        with gguf_read_once():  # the tokenizer's and the model's reads of a GGUF share one parse
            tokenizer = load_tokenizer(source, cfg)
            model = load_model(source, cfg, quantization, tmp.parent / "dense")
        load_seconds = time.perf_counter() - started
        set_end_token(tokenizer, model, cfg.eos_token)
        smoke = smoke_test(model, tokenizer, cfg.smoke_prompts, cfg.smoke_max_new_tokens)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        wall_seconds = time.perf_counter() - started
    metrics = {
        # As configured, not the resolved folder: committed metrics hold no machine's paths.
        "source": {"kind": source.kind, "name_or_path": cfg.name_or_path, "gguf_file": cfg.gguf_file,
                   "revision": cfg.revision},
        "quantization": "4bit-" + cfg.quantization.bnb_4bit_quant_type if cfg.quantization.load_in_4bit
        else "8bit" if cfg.quantization.load_in_8bit else dtype,
        # What the auto dtypes resolved to on this machine, and the machine itself.
        "dtype": dtype,
        "bnb_4bit_compute_dtype": hardware.resolve_dtype(cfg.quantization.bnb_4bit_compute_dtype)
        if cfg.quantization.load_in_4bit else None,
        "hardware": hardware.capability(),
        **footprint(model),
        "load_seconds": round(load_seconds, 2),
        "wall_seconds": round(wall_seconds, 1),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "smoke_test": smoke,
        "smoke_stop_rate": round(sum(s["stopped"] for s in smoke) / len(smoke), 3) if smoke else None,
    }
    write_json(metrics_path, metrics)
    with tracking.pipeline_run(params, "quantize_load"):
        tracking.log_metrics("base", {k: v for k, v in metrics.items() if k != "smoke_test"})
    print(f"quantize-load: {metrics['parameters']:,} parameters, {metrics['quantization']}, "
          f"{metrics['memory_footprint_mb']} MB ({metrics['bits_per_parameter']} bits/param), "
          f"loaded in {metrics['load_seconds']} s -> {out_dir}/, {metrics_path}")
    for item in smoke:
        print(f"  smoke: {item['prompt']!r} -> {item['reply']!r}{'' if item['stopped'] else ' [did not stop]'}")
    return metrics


def smoke_test(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy zero-shot replies to fixed prompts through the chat template.

    On a CPU the 4-bit layers are dequantized once for it (the same outputs bit for bit, modeling/inference.py), not
    at every decode step as bitsandbytes' CPU path does, and put back for the save after it.
    """
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    requests = [Request(ids, max_new_tokens=max_new_tokens) for ids in chat_prompt_ids(tokenizer, conversations)]
    with dequantized(model):
        replies = [as_reply(result) for result in Engine(model.eval(), tokenizer).run(requests)]
    return [{"prompt": p, "reply": r.text, "stopped": r.stopped, "new_tokens": r.new_tokens}
            for p, r in zip(prompts, replies)]
