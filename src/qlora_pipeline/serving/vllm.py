"""export --format vllm: an adapter folder vLLM serves over the 4-bit base, checked against vLLM's LoRA limits.

    qlora-pipeline export --format vllm --adapter persona=models/adapter --out exports/persona-vllm
    bash exports/persona-vllm/serve-vllm.sh        # on a machine with a CUDA GPU and vLLM

vLLM serves PEFT LoRA adapters as they are (``--enable-lora --lora-modules name=path``) over a
bitsandbytes 4-bit base (``--quantization bitsandbytes``), with the OpenAI API ``serve`` speaks.
What vLLM refuses when it loads an adapter (its ``PEFTHelper``: DoRA, ``modules_to_save``, biases,
a rank above its largest ``--max-lora-rank``) is refused here instead, with the param that
changes it, before a GPU is involved. vLLM is not installed here and no GPU path of this export
has run: bench/gpu_vllm.py is the prepared check (docs/serving.md, "Many users: vLLM").

No stage imports this module: editing it re-runs nothing.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import atomic_path, read_json, write_text
from qlora_pipeline.serving.models import Adapter

# vLLM's --max-lora-rank choices (vllm/config/lora.py, MaxLoRARanks); an adapter needs one >= its rank.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Layers vLLM's LoRA kernels do not cover in a Llama-family model (embeddings and the head were
# dropped from vLLM's LoRA support along with its extra vocabulary).
UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
DAMAGED = "the adapter_config.json is damaged: use the adapter folder its training run saved"


def problems(config: dict) -> list[str]:
    """What vLLM would refuse in this adapter_config.json, each with the param that avoids it."""
    damaged = rank_problem(config)
    if damaged:  # the checks below read the ranks as numbers
        return [damaged]
    found = []
    if config.get("peft_type", "LORA") != "LORA":
        found.append(f"peft_type {config.get('peft_type')}: vLLM serves LoRA adapters only")
    if config.get("use_dora"):
        found.append("use_dora: vLLM does not serve DoRA adapters; train with train.lora.use_dora: false")
    if config.get("modules_to_save"):
        found.append(f"modules_to_save {config['modules_to_save']}: vLLM serves none; train without them")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        found.append("bias: vLLM serves adapters without biases; train with train.lora.bias: none")
    rank = largest_rank(config)
    if rank > MAX_LORA_RANKS[-1]:
        found.append(f"r {rank}: vLLM's largest --max-lora-rank is {MAX_LORA_RANKS[-1]}; lower train.lora.r")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    bad = [t for t in targets if any(t.endswith(u) for u in UNSUPPORTED_TARGETS)]
    if bad:
        found.append(f"target_modules {bad}: vLLM applies LoRA to linear layers only; drop them from "
                     "train.lora.target_modules")
    return found


def rank_problem(config: dict) -> str | None:
    """A rank that is not a whole number >= 1 (PEFT refuses one at load): read as a number it gave a traceback, or
    a --max-lora-rank for a rank of 0 or -4 and a rounded one for 16.7."""
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        return f"rank_pattern {pattern!r}: a mapping of module names to ranks; {DAMAGED}"
    for key, rank in [("r", config.get("r")), *((f"rank_pattern[{name!r}]", v) for name, v in pattern.items())]:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            return f"{key} {rank!r}: a LoRA rank is a whole number >= 1; {DAMAGED}"
    return None


def largest_rank(config: dict) -> int:
    """The adapter's largest rank: ``r``, or one of ``rank_pattern``'s."""
    return max([int(config.get("r", 0)), *map(int, (config.get("rank_pattern") or {}).values())])


def max_lora_rank(config: dict) -> int:
    rank = largest_rank(config)
    return next(choice for choice in MAX_LORA_RANKS if choice >= rank)


def export_vllm(adapter: Adapter, base_dir: Path, out: Path) -> dict:
    """The adapter's files and the command that serves them, or a refusal naming every problem."""
    config = read_json(adapter.folder / "adapter_config.json")
    found = problems(config)
    if found:
        raise PipelineError(f"--adapter {adapter.source}: vLLM cannot serve this adapter: " + "; ".join(found))
    if adapter.resolved.get("method") != "qlora":
        raise PipelineError(f"--adapter {adapter.source}: --format vllm serves qlora adapters over their 4-bit base")
    with atomic_path(out) as folder:
        (folder / "adapter").mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copy2(adapter.folder / name, folder / "adapter" / name)
        command = serve_command(adapter.name, base_dir, config)
        write_text(folder / "serve-vllm.sh", "#!/usr/bin/env bash\n# Written by `qlora-pipeline export --format "
                   "vllm`; run it from this folder.\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
                   + " \\\n    ".join(command) + "\n")
        (folder / "serve-vllm.sh").chmod(0o755)
    return {"format": "vllm", "command": " ".join(command), "max_lora_rank": max_lora_rank(config),
            "system_prompt": adapter.system_prompt}


def serve_command(name: str, base_dir: Path, config: dict) -> list[str]:
    """``vllm serve`` with the 4-bit base, this adapter under ``name``, on localhost."""
    return ["vllm serve " + shlex.quote(str(Path(base_dir).resolve())),
            "--quantization bitsandbytes", "--enable-lora", f"--lora-modules {shlex.quote(name)}=./adapter",
            f"--max-lora-rank {max_lora_rank(config)}", "--host 127.0.0.1 --port 8000"]


def summary(report: dict, out: Path) -> str:
    system = report["system_prompt"]
    return "\n".join([f"export -> {out} (vllm): the adapter's files and serve-vllm.sh", report["command"],
                      "Requests should carry the trained system prompt" + (f": {system!r}" if system else "")])

