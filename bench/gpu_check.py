"""GPU check of the training path: 4-bit NF4 on CUDA, QLoRA with the CUDA optimizer, adapter reload, generation.

Runs the project's own functions (not the DVC stages: the device machine has no MLflow or DVC)
on a small random Llama with the real SmolLM2 tokenizer, on whatever GPU torch sees, and prints
what it found as JSON. Nothing here is timed against a baseline; it checks behaviour.

Run: python bench/gpu_check.py --tokenizer <folder with tokenizer files> --out result.json

``--fsdp``: the FSDP-QLoRA path of ``train.accelerate_config: fsdp_qlora`` (4-bit weights stored as
bfloat16 so FSDP can flatten them with the rest, each decoder layer its own unit, the adapter
gathered whole by ``training.save_sharded`` before saving). Run it under accelerate's launcher with
the shipped config; one process on one GPU wraps and gathers as N would, without the sharding:
    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp_qlora.yaml \
        --num_processes 1 bench/gpu_check.py --fsdp --tokenizer <folder> --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def tiny_llama(folder: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fsdp", action="store_true", help="bfloat16 quant storage; gather the adapter via save_sharded")
    args = parser.parse_args()
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check."))

    from collections import Counter

    import torch
    import yaml
    from transformers import AutoTokenizer, TrainerCallback

    from qlora_pipeline import training
    from qlora_pipeline.config import params_from_dict
    from qlora_pipeline.modeling.adapters import attach_adapters, load_base_for
    from qlora_pipeline.modeling.engine import Engine, Request, as_reply, chat_prompt_ids
    from qlora_pipeline.modeling.loading import load_model, resolve_source, set_end_token
    from qlora_pipeline.modeling.quantization import bnb_config, footprint, linear4bit_modules
    from qlora_pipeline.evaluation import perplexity, reference_nll

    training.make_step_logger = TrainerCallback  # no MLflow on the device machine: a no-op callback
    result: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    model_dir = tiny_llama(args.work / "tiny", args.tokenizer)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(name_or_path=str(model_dir), gguf_file=None, eos_token="<|im_end|>")
    raw["train"].update(max_steps=6, eval_steps=3, save_steps=3, per_device_train_batch_size=8)
    if args.fsdp:
        raw["model"]["quantization"]["bnb_4bit_quant_storage"] = "bfloat16"
    params = params_from_dict(raw)

    cfg = params.model
    model = load_model(resolve_source(cfg), cfg, bnb_config(cfg.quantization), args.work / "dense")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    set_end_token(tokenizer, model, cfg.eos_token)
    layers = linear4bit_modules(model)
    result["base"] = {"device": str(model.device), "linear4bit": len(layers),
                      "quant_type": layers[0].weight.quant_state.quant_type,
                      "double_quant": bool(layers[0].weight.quant_state.nested), **footprint(model)}
    base_dir = args.work / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    del model

    rows = [{"messages": [{"role": "system", "content": "Be yourself."},
                          {"role": "user", "content": f"what did you do on day {i}?"}],
             "target": f"on day {i} I went hiking, it was great"} for i in range(64)]
    model, tokenizer = training.prepare_model(params, base_dir, args.work / "dense2")
    counts = Counter()
    train_ds = training.build_dataset(rows[:48], tokenizer, 128, counts)
    val_ds = training.build_dataset(rows[48:], tokenizer, 128, Counter())
    started = time.perf_counter()
    trainer = training.train_model(params, model, tokenizer, train_ds, val_ds, args.work / "ckpt", None)
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    result["fsdp"] = {"enabled": bool(trainer.is_fsdp_enabled),
                      "wrapped_units": sum(type(m).__name__ == "FullyShardedDataParallel"
                                           for m in trainer.model_wrapped.modules())} if args.fsdp else None
    result["train"] = {"optim": str(trainer.args.optim), "steps": trainer.state.global_step,
                       "val_losses": evals, "seconds": round(time.perf_counter() - started, 2),
                       "peak_memory_mb": training.peak_memory_mb(), "device": str(trainer.model.device)}

    batch = {"input_ids": torch.tensor([train_ds[0]["input_ids"]], device=trainer.model.device)}
    trained = trainer.model.eval()
    with torch.no_grad():
        # Under FSDP the forward runs through the wrapped model, which gathers each unit's shards.
        expected = (trainer.model_wrapped if args.fsdp else trained)(**batch).logits
    if not training.save_sharded(trainer, args.work / "adapter"):
        trained.save_pretrained(args.work / "adapter")
    result["adapter_files"] = sorted(p.name for p in (args.work / "adapter").iterdir())
    base, _ = load_base_for({"method": "qlora"}, base_dir)
    tuned = attach_adapters(base, {"tuned": args.work / "adapter"})
    with torch.no_grad():
        reloaded = tuned(**batch).logits
    result["adapter_reload_max_abs_diff"] = float((reloaded - expected).abs().max())

    prompts = chat_prompt_ids(tokenizer, [r["messages"] for r in rows[:4]])
    replies = [as_reply(r) for r in Engine(tuned, tokenizer).run([Request(p, "tuned", max_new_tokens=8)
                                                                  for p in prompts])]
    result["generation"] = [{"text": r.text, "new_tokens": r.new_tokens, "stopped": r.stopped} for r in replies]
    nll, tokens = reference_nll(tuned, tokenizer, rows[48:56], 128, 4)
    with tuned.disable_adapter():
        base_nll, base_tokens = reference_nll(tuned, tokenizer, rows[48:56], 128, 4)
    result["perplexity"] = {"tuned": perplexity(nll, tokens), "base": perplexity(base_nll, base_tokens)}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
