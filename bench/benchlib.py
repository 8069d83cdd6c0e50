"""What every bench script measures the same way, CPU or GPU: the machine's matmul peak and its software.

Imported by the scripts beside it (``python bench/<script>.py`` puts this folder on the path).
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak_flops(dtype_name: str, device: str = "cpu", size: int = 2048, repeats: int = 10,
                      inner: int = 1) -> float:
    """Dense matmul FLOP/s in ``dtype_name``, best of ``repeats`` runs of ``inner`` GEMMs: the MFU denominator.

    Random operands (zeros run faster at lower power); one untimed run first warms up clocks and
    kernel heuristics; on a GPU each run is bracketed by a synchronize.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    best = float("inf")
    for attempt in range(repeats + 1):
        sync()
        started = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync()
        if attempt:
            best = min(best, time.perf_counter() - started)
    return 2 * size**3 * inner / best


def environment() -> dict:
    """Library versions, the CPU's capability line and, with CUDA, the GPU: the line every result carries.

    A library that fails to import is named with its error rather than raised, so a script can
    decide whether it needs it.
    """
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import hardware

    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": hardware.capability_line(),
           "cuda": torch.cuda.is_available()}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # reported, not fatal here
            env[name] = f"missing: {err}"
    if env["cuda"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), cuda_runtime=torch.version.cuda,
                   compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


# ----------------------------------------------------------------------- mixed batches (serving)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def peft_mixed_path(persona: Any) -> Iterator[None]:
    """PEFT's ``adapter_names`` path for mixed batches for the while: the engine takes it when ``stacked`` is None."""
    stacked = persona.stacked
    persona.stacked = None
    try:
        yield
    finally:
        persona.stacked = stacked


def first_differences(rows: list[Any], others: list[Any]) -> tuple[list[bool], list[int]]:
    same = [m.token_ids == a.token_ids for m, a in zip(rows, others)]
    first = [next((k for k, (x, y) in enumerate(zip(m.token_ids, a.token_ids)) if x != y),
                  min(len(m.token_ids), len(a.token_ids)))
             for m, a in zip(rows, others) if m.token_ids != a.token_ids]
    return same, first


def token_results(engine: Any, jobs: list[Any]) -> list[Any]:
    """The jobs run by the library engine underneath: results that keep the token ids."""
    return engine.core.run([engine.request(job) for job in jobs])


def mixed_batch_check(persona: Any, conversations: list[list[dict]], tokens: int) -> dict:
    """Rows over base + 3 adapters in one generated batch against each row alone, by the stacked path and by
    PEFT's; prefill logits of the mixed batch against one-adapter batches and each prompt alone. CPU or GPU.
    """
    import torch

    from qlora_pipeline.config import ChatConfig
    from qlora_pipeline.serving.engine import Engine, Job, Sampling
    from qlora_pipeline.serving.prompts import prompt_ids, with_system_prompt

    engine = Engine(persona, ChatConfig(temperature=0.0, top_k=0, repetition_penalty=1.0, no_repeat_ngram_size=0))
    names = ["base", "a0", "a1", "a2"]
    rows = [(names[i % 4], m) for i, m in enumerate(conversations)]
    ids = [prompt_ids(persona.tokenizer, with_system_prompt(m, persona.system_prompt(n))) for n, m in rows]

    def job(i: int) -> Any:
        return Job(ids[i], persona.peft_name(rows[i][0]), tokens, Sampling(0.0))

    # token_results runs what run_batch runs; its results keep the token ids (completions keep only text).
    if persona.stacked is None:
        raise RuntimeError("persona.stacked is None: the stacked path is not in use")
    engine.run_batch([job(0), job(1)])  # warm-up (kernels, autotuning), both mixed paths
    with peft_mixed_path(persona):
        engine.run_batch([job(0), job(1)])
    sync()
    started = time.perf_counter()
    mixed = token_results(engine, [job(i) for i in range(len(rows))])  # the stacked path
    sync()
    mixed_seconds = time.perf_counter() - started
    with peft_mixed_path(persona):
        started = time.perf_counter()
        peft_mixed = token_results(engine, [job(i) for i in range(len(rows))])
        sync()
        peft_seconds = time.perf_counter() - started
    alone = [token_results(engine, [job(i)])[0] for i in range(len(rows))]
    same, first_diff = first_differences(mixed, alone)
    peft_same, peft_first_diff = first_differences(peft_mixed, alone)
    vs_peft_same, vs_peft_first_diff = first_differences(mixed, peft_mixed)

    model = persona.model
    width = max(map(len, ids))
    pad = persona.tokenizer.pad_token_id
    batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    peft_names = [persona.peft_name(n) for n, _ in rows]
    vs_alone, vs_uniform, per_row = 0.0, 0.0, []
    st_vs_alone, st_vs_uniform, st_per_row = 0.0, 0.0, []
    with torch.no_grad(), persona.autocast():
        logits = model(input_ids=batch, attention_mask=mask, position_ids=positions,
                       adapter_names=peft_names).logits[:, -1].float()
        with persona.stacked.mixed(peft_names):
            stacked = model(input_ids=batch, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        stacked_vs_peft = float((stacked - logits).abs().max())
        stacked_vs_peft_per_row = [round(float((stacked[i] - logits[i]).abs().max()), 5) for i in range(len(rows))]
        for name in names:  # the same padded batch, every row through one adapter: routing alone differs
            with persona.using(name) as single_model:
                uniform = single_model(input_ids=batch, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            for i, (row_name, _) in enumerate(rows):
                if row_name == name:
                    vs_uniform = max(vs_uniform, float((logits[i] - uniform[i]).abs().max()))
                    st_vs_uniform = max(st_vs_uniform, float((stacked[i] - uniform[i]).abs().max()))
        for i, (name, _) in enumerate(rows):
            with persona.using(name) as single_model:
                single = single_model(input_ids=torch.tensor([ids[i]], device=model.device)).logits[0, -1].float()
            diff = float((logits[i] - single).abs().max())
            per_row.append(round(diff, 5))
            vs_alone = max(vs_alone, diff)
            diff = float((stacked[i] - single).abs().max())
            st_per_row.append(round(diff, 5))
            st_vs_alone = max(st_vs_alone, diff)
        scale = float(logits.abs().max())
    # Adapters differ from the base and from each other (else the check proves nothing).
    distinct = len({tuple(r.token_ids) for r in alone[:4]})
    return {"rows": len(rows), "adapters": names, "new_tokens": tokens, "prompt_tokens": sorted(Counter(map(len, ids)).items()),
            "generation_path": "engine, stacked LoRA (persona.stacked.mixed)",
            "identical_rows": sum(same), "identical_share": round(sum(same) / len(rows), 3),
            "differing_rows": [i for i, s in enumerate(same) if not s], "first_differing_token": first_diff,
            "peft_path": {"identical_rows_vs_alone": sum(peft_same),
                          "identical_share_vs_alone": round(sum(peft_same) / len(rows), 3),
                          "differing_rows_vs_alone": [i for i, s in enumerate(peft_same) if not s],
                          "first_differing_token_vs_alone": peft_first_diff,
                          "mixed_batch_seconds": round(peft_seconds, 3)},
            "stacked_vs_peft_generation": {"identical_rows": sum(vs_peft_same),
                                           "identical_share": round(sum(vs_peft_same) / len(rows), 3),
                                           "differing_rows": [i for i, s in enumerate(vs_peft_same) if not s],
                                           "first_differing_token": vs_peft_first_diff},
            "max_abs_prefill_logit_diff_stacked_vs_peft": round(stacked_vs_peft, 5),
            "prefill_logit_diff_stacked_vs_peft_per_row": stacked_vs_peft_per_row,
            "max_abs_prefill_logit_diff_vs_alone": round(vs_alone, 5),
            "prefill_logit_diff_vs_alone_per_row": per_row,
            "max_abs_prefill_logit_diff_vs_same_batch_one_adapter": round(vs_uniform, 5),
            "stacked_max_abs_prefill_logit_diff_vs_alone": round(st_vs_alone, 5),
            "stacked_prefill_logit_diff_vs_alone_per_row": st_per_row,
            "stacked_max_abs_prefill_logit_diff_vs_same_batch_one_adapter": round(st_vs_uniform, 5),
            "logit_note": "max_abs_prefill_logit_diff_* without 'stacked_' are PEFT's adapter_names forward",
            "max_abs_prefill_logit": round(scale, 3),
            "distinct_replies_among_base_a0_a1_a2": distinct,
            "mixed_batch_seconds": round(mixed_seconds, 3),
            "lora_dtype": str(next(p.dtype for n, p in model.named_parameters() if "lora_" in n)),
            "autocast": autocast_label(persona.autocast())}


def autocast_label(context: Any) -> str:
    if hasattr(context, "fast_dtype"):
        return f"autocast({context.device}, {context.fast_dtype})"
    return type(context).__name__


def write_report(path: Path | None, report: dict) -> None:
    """A script's results as indented JSON at ``path`` (its ``--out``; None: printed only, not kept)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
