"""QLoRA training speed and memory of a Llama-2-7B-shaped model on one GPU, against the project's targets.

The model is LlamaConfig's Llama-2-7B shape with random weights (no download is possible on the
device machine). They are written as bfloat16 safetensors shards one tensor at a time (the host
never holds more than one shard) and read back through ``BitsAndBytesConfig`` (NF4, double
quantization, bfloat16 compute), the same loader path as the pipeline's quantize-load stage.
Then the QLoRA recipe: ``prepare_model_for_kbit_training`` -> ``LoraConfig(r=16, lora_alpha=32,
all-linear)`` -> ``get_peft_model``, bitsandbytes' ``PagedAdamW32bit``, bfloat16 autocast, batch 1
x 512 random tokens. Each measurement warms up 3 steps and times 10, synchronising the GPU around
every step; it runs with activation checkpointing on, then off (skipped if it does not fit).

Reported: tokens/s, seconds/step, peak GPU memory (``max_memory_allocated``/``max_memory_reserved``
plus the paged optimizer state, which lives in CUDA managed memory outside PyTorch's allocator),
and model FLOPs utilisation. MFU counts (6 x parameters) FLOPs per token with checkpointing and
(4 x parameters) without: the base is frozen, so the backward pass computes input gradients only
(2N) and no weight gradients; recomputation adds another forward (2N). The denominator is this
card's dense bfloat16 matmul rate measured in the same run (best of several 8192^3 GEMMs); the
MFU over the H100 SXM's nominal 989 TFLOP/s is printed beside it. Targets, each judged per run:
MFU >= 30% (measured peak) and peak memory <= 6 GB (allocated + paged state, 10^9 bytes).

Run on a GPU machine (the device machine lacks bitsandbytes: carry its wheel, see below):
    python3 bench/gpu_llama7b.py --out bench/results/gpu_llama7b_h100.json
On the lent device machine, after here:
    pip download --no-deps -d bench/wheelhouse bitsandbytes==0.50.2 && echo /bench/wheelhouse/ >> .git/info/exclude
run with carry ["bench/wheelhouse"] and a 600 s limit (writing + quantizing 13.5 GB takes a few minutes;
--work keeps the weights for a rerun while the machine stays warm):
    python3 -m pip install -q --no-index --no-deps bench/wheelhouse/bitsandbytes-*.whl &&
    python3 bench/gpu_llama7b.py --work /tmp/gpu_llama7b --out $OUT/gpu_llama7b.json
Check the code path on a CPU (a small Llama shape, float32, plain AdamW; seconds):
    .venv/bin/python bench/gpu_llama7b.py --tiny --out /tmp/gpu_llama7b_tiny.json
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from math import prod
from pathlib import Path
from typing import Any

from benchlib import environment, matmul_peak_flops, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# Llama-2-7B as released (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
# Same vocabulary (the head is a large share of a small model's work), everything else small.
TINY = dict(LLAMA2_7B, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4)
NOMINAL_H100_SXM_BF16_TFLOPS = 989.0  # dense, no sparsity (NVIDIA H100 SXM datasheet)
TARGET_MFU = 0.30
TARGET_PEAK_MEMORY_BYTES = 6e9
SHARD_BYTES = 2 * 2**30
WEIGHTS_STAMP = "random_weights.json"
GIB = 2**30


# ------------------------------------------------------------------------------- model


def llama_config(tiny: bool) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**(TINY if tiny else LLAMA2_7B))


def parameter_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every saved tensor's name and shape, from a model built on the meta device (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}


def random_tensor(name: str, shape: tuple[int, ...], device: str) -> Any:
    """bfloat16 like a released checkpoint: norms at 1, the rest N(0, 0.02) as Llama initialises them."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02).cpu()


def write_random_checkpoint(config: Any, folder: Path, device: str, seed: int) -> Path:
    """A sharded safetensors checkpoint of random weights, written one tensor at a time.

    Drawing on the GPU is what keeps this quick for 6.7B values; at most one shard sits on the
    host. A folder already holding weights for the same config and seed is reused.
    """
    import torch
    from safetensors.torch import save_file

    stamp = json.loads(json.dumps({"config": config.to_dict(), "seed": seed}))  # as it reads back from disk
    if (folder / WEIGHTS_STAMP).is_file() and json.loads((folder / WEIGHTS_STAMP).read_text()) == stamp:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shapes = parameter_shapes(config)
    check_free_space(folder, 2 * sum(prod(shape) for shape in shapes.values()))
    torch.manual_seed(seed)
    weight_map, shard, shard_size, total = {}, {}, 0, 0
    for index, (name, shape) in enumerate(shapes.items()):
        shard[name] = random_tensor(name, shape, device)
        shard_size += shard[name].nbytes
        if shard_size >= SHARD_BYTES or index == len(shapes) - 1:
            filename = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, folder / filename, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, filename))
            total, shard, shard_size = total + shard_size, {}, 0
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.save_pretrained(folder)
    (folder / WEIGHTS_STAMP).write_text(json.dumps(stamp))  # last: a half-written folder is not reused
    return folder


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05:
        raise SystemExit(f"gpu_llama7b: {folder} has {free / GIB:.1f} GiB free and the random weights take "
                         f"{needed / GIB:.1f} GiB; point --work at a larger disk")


def load_4bit(folder: Path, cuda: bool) -> Any:
    """NF4 + double quantization, quantized while loading onto the GPU (4-bit layers cannot move later)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_pipeline.modeling.loading import NO_HUB_KERNELS

    # bfloat16 is the GPU's fast type; on a CPU without native bfloat16 it is ~30x slower (hardware.py).
    dtype = torch.bfloat16 if cuda else torch.float32
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=dtype, **NO_HUB_KERNELS,
                                                device_map={"": 0} if cuda else None, use_safetensors=True)


def add_lora(model: Any) -> Any:
    """The QLoRA recipe, activation checkpointing on (non-reentrant, as the pipeline runs it)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    # Dropout 0 as in params.yaml: dropout would add a mask per LoRA input to memory and time.
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config).train()  # checkpointing applies in training mode only


def set_checkpointing(model: Any, enabled: bool) -> bool:
    """Turn activation checkpointing on or off; return whether the decoder layers now checkpoint.

    transformers 5.24 renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*`` (the old
    names warn); earlier 5.x releases may have only the old ones (the device image listed 5.17).
    """
    base = model.get_base_model()
    renamed = hasattr(base, "activation_checkpointing_enable")
    prefix = "activation_checkpointing" if renamed else "gradient_checkpointing"
    if enabled:
        getattr(base, f"{prefix}_enable")(**{f"{prefix}_kwargs": {"use_reentrant": False}})
    else:
        getattr(base, f"{prefix}_disable")()
    return any(getattr(module, "gradient_checkpointing", False) for module in base.modules())


def parameter_count(config: Any) -> int:
    """N of the MFU formula: every parameter of the unquantized model, as bench/train_bench.py counts them.

    The input embedding is a lookup, not a matmul, so MFU overstates by its share: 1.9% at 7B, but
    42% at the tiny shape (whose CPU MFU can pass 100%; it only checks the code path).
    """
    return sum(prod(shape) for shape in parameter_shapes(config).values())


def quantization_summary(model: Any) -> dict:
    """Proof that the linear layers were quantized as configured, not left in bfloat16."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    state = layers[0].weight.quant_state if layers else None
    return {"linear4bit_layers": len(layers), "quant_type": state.quant_type if state else None,
            "double_quant": bool(state.nested) if state else None}


# ------------------------------------------------------------------------------ timing


def make_optimizer(model: Any, cuda: bool) -> Any:
    """QLoRA's paged 32-bit AdamW on the GPU (the pipeline's ``optim: auto``); plain AdamW on a CPU."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not cuda:
        return torch.optim.AdamW(trainable, lr=2e-4)
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW32bit(trainable, lr=2e-4)


def train_step(model: Any, optimizer: Any, batch: Any, cuda: bool) -> float:
    import torch

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())  # a host copy: also waits for the step, on CPU and GPU alike


def timed_steps(model: Any, optimizer: Any, batch: Any, steps: int, cuda: bool) -> tuple[list[float], list[float]]:
    """Seconds and loss of each step; the GPU is synchronised before each clock read."""
    import torch

    seconds, losses = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(train_step(model, optimizer, batch, cuda))
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds, losses


def paged_state_bytes(optimizer: Any) -> int:
    """Optimizer state in CUDA managed memory (bitsandbytes pages tensors of >= 1e5 values): not in torch's counters."""
    return sum(t.nbytes for state in optimizer.state.values() for t in state.values()
               if hasattr(t, "nbytes") and getattr(t, "is_paged", False))


def measure(model: Any, batch: Any, warmup: int, steps: int, cuda: bool) -> dict:
    """One measurement with a fresh optimizer; memory peaks count from the loaded model onwards."""
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    optimizer = make_optimizer(model, cuda)
    timed_steps(model, optimizer, batch, warmup, cuda)
    seconds, losses = timed_steps(model, optimizer, batch, steps, cuda)
    tokens = batch.numel()
    result = {"seconds_per_step": sum(seconds) / steps, "median_seconds_per_step": statistics.median(seconds),
              "min_seconds_per_step": min(seconds), "tokens_per_second": tokens * steps / sum(seconds),
              "first_loss": losses[0], "last_loss": losses[-1]}
    if cuda:
        paged = paged_state_bytes(optimizer)
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB, paged_optimizer_state_gib=paged / GIB,
                      peak_memory_bytes=torch.cuda.max_memory_allocated() + paged)
    del optimizer
    return result


# ------------------------------------------------------------------------------ report


def with_targets(run: dict, parameters: int, checkpointing: bool, peak_flops: float, cuda: bool,
                 judged: bool) -> dict:
    """MFU against the measured (and on a GPU the nominal) peak; pass/fail only where ``judged``.

    The targets are for the 7B shape on a GPU: a tiny model's pass or fail would mean nothing.
    """
    flops_per_token = (6 if checkpointing else 4) * parameters
    mfu = flops_per_token * run["tokens_per_second"] / peak_flops
    run = {"activation_checkpointing": checkpointing, **run, "mfu": mfu,
           "mfu_pass": mfu >= TARGET_MFU if judged else None}
    if cuda:
        run["mfu_vs_nominal_h100_sxm"] = flops_per_token * run["tokens_per_second"] / (
            NOMINAL_H100_SXM_BF16_TFLOPS * 1e12)
        run["peak_memory_pass"] = run["peak_memory_bytes"] <= TARGET_PEAK_MEMORY_BYTES if judged else None
    return run


def verdict(passed: bool | None) -> str:
    return "not judged" if passed is None else "pass" if passed else "FAIL"


def print_summary(report: dict) -> None:
    peak = report["matmul_peak"]
    print(f"{report['environment'].get('gpu') or 'CPU'}: measured {peak['dtype']} matmul peak "
          f"{peak['tflops']:.1f} TFLOP/s ({peak['size']}^3 GEMM)", file=sys.stderr)
    for name, run in report["runs"].items():
        if "skipped" in run:
            print(f"  {name}: skipped ({run['skipped']})", file=sys.stderr)
            continue
        line = (f"  {name}: {run['tokens_per_second']:.0f} tok/s, {run['seconds_per_step']:.3f} s/step, "
                f"MFU {run['mfu']:.1%} [{verdict(run['mfu_pass'])} >= {TARGET_MFU:.0%}]")
        if "peak_memory_bytes" in run:
            line += (f" ({run['mfu_vs_nominal_h100_sxm']:.1%} of nominal {NOMINAL_H100_SXM_BF16_TFLOPS:.0f}), "
                     f"peak {run['peak_memory_bytes'] / 1e9:.2f} GB = allocated {run['peak_allocated_gib']:.2f} GiB "
                     f"+ paged {run['paged_optimizer_state_gib']:.2f} GiB, reserved {run['peak_reserved_gib']:.2f} GiB "
                     f"[{verdict(run['peak_memory_pass'])} <= {TARGET_PEAK_MEMORY_BYTES / 1e9:.0f} GB]")
        print(line, file=sys.stderr)


# -------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small Llama shape; may run on a CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (512; tiny: 128)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (3; tiny: 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; tiny: 2)")
    parser.add_argument("--gemm-size", type=int, default=None, help="peak-matmul size (8192; tiny: 512)")
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the random checkpoint, kept and reused (default: a temp folder, removed)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    defaults = {"seq_len": (512, 128), "warmup": (3, 1), "steps": (10, 2), "gemm_size": (8192, 512)}
    for key, (full, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    return args


def build_model(args: argparse.Namespace, config: Any, cuda: bool, work: Path) -> tuple[Any, dict]:
    """The 4-bit base with LoRA attached, and the seconds its set-up took (the device time it costs)."""
    import torch

    started = time.perf_counter()
    folder = write_random_checkpoint(config, work / "random-llama", "cuda" if cuda else "cpu", args.seed)
    written = time.perf_counter()
    model = load_4bit(folder, cuda)
    torch.manual_seed(args.seed)  # LoRA's A matrices, also when the weights were reused rather than drawn
    model = add_lora(model)
    seconds = {"write_random_checkpoint": written - started, "load_4bit_and_lora": time.perf_counter() - written}
    return model, seconds


def measure_all(args: argparse.Namespace, model: Any, batch: Any, cuda: bool, peak_flops: float,
                parameters: int) -> dict:
    """One run per checkpointing setting; one that runs out of memory is recorded as skipped."""
    import torch

    runs = {}
    for checkpointing in {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]:
        name = f"checkpointing_{'on' if checkpointing else 'off'}"
        if set_checkpointing(model, checkpointing) != checkpointing:
            raise SystemExit(f"gpu_llama7b: activation checkpointing did not turn {'on' if checkpointing else 'off'}")
        try:
            run = measure(model, batch, args.warmup, args.steps, cuda)
        except torch.cuda.OutOfMemoryError as error:
            runs[name] = {"skipped": f"out of memory: {str(error).splitlines()[0]}"}
            continue
        runs[name] = with_targets(run, parameters, checkpointing, peak_flops, cuda, judged=cuda and not args.tiny)
    return runs


def run_all(args: argparse.Namespace, cuda: bool, work: Path, env: dict) -> dict:
    import torch

    config = llama_config(args.tiny)
    model, setup_seconds = build_model(args, config, cuda, work)
    generator = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=generator).to(model.device)
    peak = matmul_peak_flops("bfloat16" if cuda else "float32", "cuda" if cuda else "cpu", args.gemm_size, repeats=5,
                             inner=10)
    parameters = parameter_count(config)
    runs = measure_all(args, model, batch, cuda, peak, parameters)
    return {
        "model": "tiny Llama" if args.tiny else "Llama-2-7B shape, random weights",
        "config": TINY if args.tiny else LLAMA2_7B,
        "parameters": parameters,
        "embedding_parameters": config.vocab_size * config.hidden_size,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "quantization": quantization_summary(model),
        "batch_size": 1, "seq_len": args.seq_len, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "attention": model.config._attn_implementation,
        "environment": env,
        "matmul_peak": {"dtype": "bfloat16" if cuda else "float32", "size": args.gemm_size, "tflops": peak / 1e12},
        "nominal_peak_tflops": NOMINAL_H100_SXM_BF16_TFLOPS if cuda else None,
        "targets": {"mfu_min": TARGET_MFU, "peak_memory_max_bytes": TARGET_PEAK_MEMORY_BYTES},
        "runs": runs,
        "setup_seconds": setup_seconds,
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,  # Linux: KiB
    }


def main() -> None:
    args = parse_args()
    import torch

    # peft 0.21 still calls transformers' gradient_checkpointing_* names, deprecated in 5.24: noise here.
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)

    cuda = torch.cuda.is_available()
    if not (cuda or args.tiny):
        raise SystemExit("gpu_llama7b: no CUDA device; the 7B shape needs a GPU (use --tiny to check the code path)")
    env = environment()  # first: a missing library should fail in seconds, not after the weights
    missing = [f"{name} ({env[name]})" for name in ("bitsandbytes", "accelerate", "peft")
               if env[name].startswith("missing")]
    if missing:
        raise SystemExit(f"gpu_llama7b: {', '.join(missing)}; the device machine lacks them: carry their wheels "
                         "(see the module docstring)")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_llama7b."))
    try:
        report = run_all(args, cuda, work, env)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)  # 13.5 GB of random weights
    print_summary(report)
    print(json.dumps(report, indent=2))
    write_report(args.out, report)


if __name__ == "__main__":
    main()
