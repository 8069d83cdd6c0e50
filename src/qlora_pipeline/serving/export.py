"""Export: one qlora adapter merged into its base, saved as a plain model that transformers alone loads.

    qlora-pipeline export --adapter models/adapter --out exports/persona --dtype bfloat16

Why dequantize, then merge. A qlora adapter was trained against the base's NF4 weights as
bitsandbytes dequantizes them on every forward pass (``W_q``), not against the weights the base
was quantized from. The model it learned is ``W_q + ΔW``: its update partly corrects the
quantization error, and holds only for those exact weights. So every 4-bit layer is dequantized
here op for op as bitsandbytes computes with it (``modeling.inference.dequantize_weight``), into a
dense model of the chosen dtype, and PEFT adds ``ΔW`` there. The shortcut PEFT offers on a 4-bit
base (``merge_and_unload`` re-quantizes ``W_q + ΔW`` to NF4) rounds most of ``ΔW`` away, as ``ΔW``
is small next to one NF4 step; it is scored beside the export to show what it would have cost.

The export is checked before it counts: the saved folder is loaded back with plain
``from_pretrained`` and compared on the test split, token for token, with the reference (the
4-bit base + adapter, run as training ran it). ``export_report.json`` in the folder holds the
numbers. A model outside the tolerance of its precision is not kept: the folder then holds the
report alone and the command fails.

No stage imports this module: editing it re-runs nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from qlora_pipeline.config import Params, command_params
from qlora_pipeline.data.formatting import encode_example
from qlora_pipeline.data.sampling import cap_examples
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.hardware import resolve_mixed_precision
from qlora_pipeline.io import (atomic_path, read_json, read_json_object, read_jsonl, remove_outputs, write_json,
                               write_text)
from qlora_pipeline.labels import IGNORE_INDEX
from qlora_pipeline.layout import RESOLVED_CONFIG
from qlora_pipeline.modeling.adapters import FIX_ADAPTER, attach_adapters, autocast_like_training, load_base_for
from qlora_pipeline.modeling.inference import dequantize_weight, dequantized
from qlora_pipeline.modeling.loading import NO_HUB_KERNELS, device_map, set_end_token
from qlora_pipeline.modeling.preparation import base_fingerprint
from qlora_pipeline.modeling.quantization import linear4bit_modules
from qlora_pipeline.serving.models import Adapter, check_same_base, fetch_adapter, read_adapter
from qlora_pipeline.serving.specs import parse_adapter_spec
from qlora_pipeline.mlflow_store import resolve_tracking_uri

REPORT = "export_report.json"
QLORA = "qlora"
TEST_ROW_ROLES = ("system", "user", "assistant")  # the roles the split stage writes
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Mantissa bits: the comparison is as coarse as the coarser of the reference and the export.
_MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}


@dataclass(frozen=True)
class Tolerance:
    max_abs_logit_diff: float
    mean_kl: float


# Bounds per precision, from the rounding noise a correct merge shows on SmolLM2-135M with the
# trained adapter (logits up to ~37), 32 test examples (738 reply tokens), max |Δlogit| / mean KL:
#   float32 vs a float32 reference: 7e-5 / 5e-9    float16: 0.15-0.23 / 2-4e-5
#   bfloat16 (export or reference, 4-bit matmuls under training's autocast): 0.39-1.9 / 0.8-5e-3
# while a merge that loses the adapter (the naive 4-bit merge, or no adapter at all) is off by
# 18 / 0.46. Each bound is 2-5x the noise (100x for float32, whose noise a larger model's longer
# sums may grow) and well below the loss of the adapter. The mean KL is the sharper test; the max
# |Δlogit| is one worst token, so it is looser.
TOLERANCES = {
    "float32": Tolerance(max_abs_logit_diff=0.01, mean_kl=1e-6),
    "float16": Tolerance(max_abs_logit_diff=1.0, mean_kl=2e-4),
    "bfloat16": Tolerance(max_abs_logit_diff=4.0, mean_kl=0.02),
}


@dataclass
class Example:
    input_ids: list[int]
    targets: torch.Tensor  # the label of every position that predicts a reply token
    positions: torch.Tensor  # the positions that predict them: only they meet the vocabulary head


def main(args: Any) -> None:
    """``qlora-pipeline export``: check everything cheap first, then merge, save, verify."""
    check_out_free(args.out)
    check_out_outside(args.out, {"--base": args.base, "--adapter": Path(parse_adapter_spec(args.adapter).source)})
    params = command_params(args.params)
    fmt = getattr(args, "format", "safetensors")
    dtype = getattr(args, "dtype", None) or "bfloat16"
    if fmt == "vllm":  # the adapter as it is: nothing to verify on test rows
        from qlora_pipeline.serving import vllm

        with downloaded_adapter(args, params) as adapter:
            print(vllm.summary(vllm.export_vllm(adapter, args.base, args.out), args.out))
        return
    check_test_file(args.test)
    if args.max_samples < 1:
        raise PipelineError(f"--max-samples {args.max_samples}: give at least 1 test example to verify with")
    if fmt != "safetensors":
        from qlora_pipeline.serving import gguf

        gguf.main(args, params)
        return
    with downloaded_adapter(args, params) as adapter:
        rows = read_test_rows(args.test, args.max_samples, params.seed)
        report = export(adapter, args.base, args.out, dtype, rows)
    print(summary_table(report, args.out))
    if not report["passed"]:
        raise PipelineError(failure_message(report, args.out))


@contextlib.contextmanager
def downloaded_adapter(args: Any, params: Params) -> Iterator[Adapter]:
    """``--adapter`` resolved (a runs:/ source downloaded for the time of the block) and checked against ``--base``."""
    with tempfile.TemporaryDirectory(prefix="qlora-export-") as downloads:
        yield resolve_adapter(args.adapter, args.base, resolve_tracking_uri(params.mlflow.tracking_uri),
                              Path(downloads))


# ------------------------------------------------------------------------------------------- checks


def check_out_free(out: Path) -> None:
    """``--out`` is free and can be made: checked before the minutes of a merge, leaving nothing behind."""
    try:
        if out.exists() or out.is_symlink():
            raise PipelineError(f"--out {out} already exists; remove it or choose another folder "
                                "(export never writes over a model)")
        check_out_writable(out)
    except OSError as err:  # e.g. a folder on the way this user may not look into
        raise PipelineError(f"--out {out}: cannot be checked ({err.strerror or err}); choose an --out in a "
                            "folder you can write to") from None


def check_out_writable(out: Path) -> None:
    """The nearest folder of ``out`` that exists is a folder this process can write into (the rest is made later)."""
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PipelineError(f"--out {out}: {ancestor} is a file, not a folder, so nothing can be made in it; "
                            "choose an --out in a folder")
    # Made and removed, not os.access: root passes that for /proc, where the save failed after the merge's minutes.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=ancestor))
    except OSError as err:
        raise PipelineError(f"--out {out}: nothing can be made in the folder {ancestor} ({err.strerror or err}); "
                            "choose an --out in a folder you can write to") from None


def check_out_outside(out: Path, inputs: dict[str, Path]) -> None:
    """``--out`` is in none of the folders export reads: a merged model in the adapter's folder (a DVC output, the
    folder a server loads) or the base's was written there whole."""
    target = out.resolve()
    for flag, folder in inputs.items():
        root = folder.resolve()
        if folder.is_dir() and (target == root or root in target.parents):
            raise PipelineError(f"--out {out} is inside {flag} {folder}: export writes a new folder beside its "
                                "inputs, never into them; choose an --out outside it (e.g. exports/persona)")


def check_test_file(path: Path) -> None:
    if not path.is_file():
        raise PipelineError(f"--test {path}: no such file; run `dvc repro split` (it writes data/splits/test.jsonl) "
                            "or give a JSONL file of {messages, target} rows")


def resolve_adapter(source: str, base_dir: Path, tracking_uri: str | None, downloads: Path) -> Adapter:
    """The adapter of ``source`` (a folder or ``runs:/``), refused unless it is a qlora adapter of ``base_dir``."""
    spec = parse_adapter_spec(source)
    folder = fetch_adapter(spec.source, tracking_uri, downloads)
    refuse_full_model(spec.source, folder)
    adapter = read_adapter(spec.name, spec.source, folder)
    method = adapter.resolved.get("method")
    if method != QLORA:
        raise PipelineError(
            f"--adapter {spec.source} was trained with method {method} on the unquantized source, so there is no "
            "quantization to undo: merge it into that source with PeftModel.from_pretrained(...).merge_and_unload(); "
            "export handles qlora adapters")
    max_length = (adapter.resolved.get("train") or {}).get("max_length")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise PipelineError(f"--adapter {spec.source}: {folder / RESOLVED_CONFIG} key 'train.max_length' must be a "
                            f"positive integer (test rows are cut to it as training cut them), not {max_length!r}; "
                            f"{FIX_ADAPTER}")
    fingerprint = base_fingerprint(QLORA, base_dir, adapter.resolved.get("model", {}))
    check_same_base([adapter], QLORA, fingerprint, str(base_dir))
    return adapter


def refuse_full_model(source: str, folder: Path) -> None:
    """A full fine-tune is already what export makes: say so instead of a generic "not an adapter"."""
    # absent or damaged: not a full fine-tune by its record (read_adapter then says what is wrong)
    is_full = read_json_object(folder / RESOLVED_CONFIG).get("method") == "full"
    if is_full or ((folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()):
        raise PipelineError(f"--adapter {source} is a full fine-tuned model, not an adapter: it is already a plain "
                            "model that AutoModelForCausalLM.from_pretrained loads, with nothing to merge; "
                            "copy the folder instead")


def read_test_rows(path: Path, cap: int, seed: int) -> list[dict]:
    """A seeded sample of at most ``cap`` rows of ``path``, each with ``messages`` and ``target``."""
    rows = []
    for number, row in read_jsonl(path):
        problem = row_problem(row)
        if problem:
            raise PipelineError(f"{path}:{number}: {problem}, as the split stage writes them")
        rows.append(row)
    if not rows:
        raise PipelineError(f"--test {path}: no rows; the export is verified on test examples")
    return cap_examples(rows, cap, seed)


def row_problem(row: dict) -> str | None:
    """Why a test row cannot be rendered, else None: a malformed turn gave a traceback from the chat template, or
    a message blaming the model, after the base had loaded."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not isinstance(row.get("target"), str):
        return "a test row needs 'messages' (a list of chat turns) and 'target' (the reply text)"
    if not messages:
        return "'messages' is empty: a test row needs the turns its target replies to"
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in TEST_ROW_ROLES
                and isinstance(message.get("content"), str)):
            return (f"messages[{index}] needs a 'role' ({', '.join(TEST_ROW_ROLES)}) and a text 'content', "
                    f"not {shown_turn(message)}")
    return None


def shown_turn(message: Any) -> str:
    text = json.dumps(message, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------- pipeline


def export(adapter: Adapter, base_dir: Path, out: Path, dtype_name: str, rows: list[dict]) -> dict:
    """Merge, save into ``out`` (whole or not at all), verify; return the report written beside the model."""
    started = time.perf_counter()
    dtype = getattr(torch, dtype_name)
    base4, tokenizer = load_base_for(adapter.resolved, base_dir)
    examples = encode_rows(tokenizer, rows, adapter.resolved["train"]["max_length"])
    reference_precision = compute_precision(base4, adapter.resolved)
    dense = dequantized_copy(base4, dtype)  # the packed weights as saved: loaders turn the CPU repack off
    tuned = attach_adapters(base4, {adapter.name: adapter.folder})
    with autocast_like_training(adapter.resolved):
        with dequantized(tuned):  # the same logits (modeling/inference.py); the 4-bit layers back for the merge after
            reference_logits = target_logits(tuned, examples)
        naive = score(naive_4bit_merge(tuned), examples, reference_logits)
    del tuned, base4
    merged = merge_adapter(dense, adapter.folder)
    with atomic_path(out) as folder:
        save_merged(merged, tokenizer, folder)
        del merged, dense
        check_plain_folder(folder)
        merged_scores = score(load_plain(folder), examples, reference_logits)
        report = build_report(dtype_name, reference_precision, examples, reference_logits, merged_scores, naive)
        report["seconds"] = round(time.perf_counter() - started, 1)
        finish_folder(folder, report, adapter, base_dir)
    return report


def encode_rows(tokenizer: Any, rows: list[dict], max_length: int) -> list[Example]:
    """Rows as training encoded them; only the positions that predict a reply token are compared."""
    examples = []
    for row in rows:
        encoded = encode_example(tokenizer, row["messages"], row["target"], max_length)
        labels = torch.tensor(encoded.labels[1:])  # position t predicts token t + 1
        mask = labels != IGNORE_INDEX
        examples.append(Example(encoded.input_ids, labels[mask], mask.nonzero().squeeze(1)))
    return examples


def compute_precision(base4: Any, resolved: dict) -> str:
    """The coarsest float the reference computes in: its 4-bit matmuls or training's autocast."""
    names = {str(m.compute_dtype or torch.float32).removeprefix("torch.") for m in linear4bit_modules(base4)}
    train = resolved.get("train", {})
    bf16, fp16 = resolve_mixed_precision(train.get("bf16", False), train.get("fp16", False))
    names |= {"bfloat16"} if bf16 else {"float16"} if fp16 else set()
    return coarsest(names | {"float32"})


def coarsest(names: set[str]) -> str:
    return min(names, key=_MANTISSA_BITS.__getitem__)


def dequantized_copy(base4: Any, dtype: Any) -> Any:
    """A dense model of the base's architecture in ``dtype``: 4-bit layers dequantized, the rest copied.

    No quantization config travels with it, so the saved ``config.json`` asks for no bitsandbytes.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = plain_config(base4)
    with no_init_weights():  # every weight is overwritten below: random init would be wasted time
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    dense.tie_weights()  # init_weights, skipped above, is what ties a shared head to the embeddings
    copy_dequantized_weights(base4, dense)
    dense.generation_config = copy.deepcopy(base4.generation_config)
    return dense.eval()


def plain_config(base4: Any) -> Any:
    """The base's config without its quantization: what a dense copy of it, or a converter, reads."""
    config = copy.deepcopy(base4.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def copy_dequantized_weights(base4: Any, dense: Any) -> None:
    """Every weight of ``base4`` into ``dense``, a 4-bit one as bitsandbytes computes with it.

    A 4-bit weight is dequantized in its layer's compute dtype first: that rounded weight, not the
    exact NF4 value, is what the adapter was trained against. One layer at a time, so the model
    is never held twice.
    """
    import bitsandbytes as bnb

    targets = dict(dense.named_parameters(remove_duplicate=False))  # a tied head is listed under its own name too
    four_bit = {name: m for name, m in base4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    filled = []
    with torch.no_grad():
        for name, layer in four_bit.items():
            filled.append(_copy_into(targets, f"{name}.weight",
                                     dequantize_weight(layer.weight, layer.compute_dtype or torch.float32)))
            if layer.bias is not None:
                filled.append(_copy_into(targets, f"{name}.bias", layer.bias))
        for name, param in base4.named_parameters(remove_duplicate=False):
            if name.rpartition(".")[0] not in four_bit:
                filled.append(_copy_into(targets, name, param))
    if set(targets) - set(filled):
        raise PipelineError(f"the base has no weight for {sorted(set(targets) - set(filled))[:3]} of the dense model: "
                            "its architecture is not one export can rebuild")


def _copy_into(targets: dict[str, Any], name: str, value: Any) -> str:
    if name not in targets:
        raise PipelineError(f"the base's weight {name} has no place in the dense model: "
                            "its architecture is not one export can rebuild")
    targets[name].copy_(value)  # casts to the dense dtype and moves to its device
    return name


def merge_adapter(dense: Any, adapter_folder: Path) -> Any:
    """``dense`` with the adapter added into its weights (PEFT adds ΔW in float32, then rounds once)."""
    merged = attach_adapters(dense, {"default": adapter_folder}).merge_and_unload(safe_merge=True)
    leftover = [name for name, module in merged.named_modules() if hasattr(module, "lora_A")]
    if leftover:
        raise PipelineError(f"the merged model still holds LoRA layers ({leftover[0]}, ...): "
                            "the adapter uses a layer type PEFT cannot merge")
    return merged.eval()


def naive_4bit_merge(tuned: Any) -> Any:
    """The shortcut, for contrast: PEFT merges into the 4-bit layers (dequantize, add, re-quantize to NF4)."""
    with warnings.catch_warnings():  # "may get different generations due to rounding errors": measured here
        warnings.simplefilter("ignore", UserWarning)
        return tuned.merge_and_unload().eval()


def save_merged(model: Any, tokenizer: Any, folder: Path) -> None:
    """Weights (safetensors: transformers 5 writes no other format), tokenizer with its chat template, end tokens."""
    set_end_token(tokenizer, model, None)  # eos ends a reply, pad differs from it: in config and generation config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def check_plain_folder(folder: Path) -> None:
    """The folder needs neither peft nor bitsandbytes: say which part would, should one slip in."""
    if "quantization_config" in read_json(folder / "config.json"):
        raise PipelineError(f"{folder}/config.json carries a quantization_config: loading it would need bitsandbytes")
    if (folder / "adapter_config.json").is_file():
        raise PipelineError(f"{folder} holds adapter_config.json: loading it would need peft")
    weights = [p.name for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)]
    if not weights or any(not name.endswith(".safetensors") for name in weights):
        raise PipelineError(f"{folder}: expected safetensors weights only, found {sorted(weights) or 'none'}")


def load_plain(folder: Path) -> Any:
    """The saved model as any user loads it: plain ``from_pretrained``, its dtype from config.json."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map=device_map(), **NO_HUB_KERNELS).eval()


# -------------------------------------------------------------------------------------------- scores


def target_logits(model: Any, examples: list[Example]) -> list[torch.Tensor]:
    """Float32 logits at the positions that predict reply tokens, one example at a time (no padding)."""
    logits = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids], device=model.device)
            output = model(input_ids=ids, logits_to_keep=example.positions.to(model.device))
            logits.append(output.logits[0].float().cpu())
    return logits


def score(model: Any, examples: list[Example], reference: list[torch.Tensor]) -> dict:
    """max |Δlogit|, mean KL(reference || model) per target token and perplexity, against ``reference``."""
    return score_logits(target_logits(model, examples), examples, reference)


def score_logits(logits_of: list[torch.Tensor], examples: list[Example], reference: list[torch.Tensor]) -> dict:
    """``score`` of logits computed elsewhere (a GGUF runtime's), at the same positions as ``reference``."""
    worst, kl_sum, nll_sum, tokens = 0.0, 0.0, 0.0, 0
    for example, ref, logits in zip(examples, reference, logits_of):
        # float64: KL of near-equal distributions is a small difference of large sums
        ref_logp, logp = torch.log_softmax(ref.double(), -1), torch.log_softmax(logits.double(), -1)
        worst = max(worst, float((logits - ref).abs().max()))
        kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
        nll_sum += float(torch.nn.functional.cross_entropy(logits, example.targets, reduction="sum"))
        tokens += len(example.targets)
    return {"max_abs_logit_diff": worst, "mean_kl": kl_sum / tokens, "perplexity": math.exp(nll_sum / tokens)}


def reference_perplexity(examples: list[Example], reference: list[torch.Tensor]) -> float:
    nll = sum(float(torch.nn.functional.cross_entropy(ref, ex.targets, reduction="sum"))
              for ex, ref in zip(examples, reference))
    return math.exp(nll / sum(len(ex.targets) for ex in examples))


def build_report(dtype_name: str, reference_precision: str, examples: list[Example], reference: list[torch.Tensor],
                 merged: dict, naive: dict) -> dict:
    """export_report.json: the numbers, the tolerance they are held to, and whether they meet it."""
    precision = coarsest({dtype_name, reference_precision})
    tolerance = TOLERANCES[precision]
    passed = merged["max_abs_logit_diff"] <= tolerance.max_abs_logit_diff and merged["mean_kl"] <= tolerance.mean_kl
    return {
        "dtype": dtype_name,
        "samples": len(examples),
        "tokens": sum(len(ex.targets) for ex in examples),
        "reference": {"perplexity": _round(reference_perplexity(examples, reference)),
                      "precision": reference_precision},
        "merged": {k: _round(v) for k, v in merged.items()},
        "naive_4bit_merge": {k: _round(v) for k, v in naive.items()},
        # The comparison is as exact as the coarser of the export dtype and the reference's compute precision.
        "tolerance": {"precision": precision, "max_abs_logit_diff": tolerance.max_abs_logit_diff,
                      "mean_kl": tolerance.mean_kl},
        "passed": passed,
    }


def _round(value: float) -> float:
    return float(f"{value:.6g}")


# --------------------------------------------------------------------------------------- the folder


def finish_folder(folder: Path, report: dict, adapter: Adapter, base_dir: Path) -> None:
    """Report and model card beside a verified model; a model that failed is dropped, its report kept."""
    if not report["passed"]:
        remove_outputs(*folder.iterdir())
    else:
        write_text(folder / "README.md", model_card(report, adapter, base_dir))
    write_json(folder / REPORT, report)


def model_card(report: dict, adapter: Adapter, base_dir: Path) -> str:
    """A Hugging Face model card: what was merged into what, the training run, the verification."""
    from huggingface_hub import ModelCard, ModelCardData

    model, tolerance = adapter.resolved.get("model", {}), report["tolerance"]
    source = model.get("name_or_path", "?") + (f" ({model['gguf_file']})" if model.get("gguf_file") else "")
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["qlora-pipeline", "merged", "persona-chat"])
    metrics = {k: v for k, v in (adapter.resolved.get("metrics") or {}).items() if not isinstance(v, dict)}
    lines = [
        "# Persona chat model (qlora adapter, merged)",
        "",
        "A plain transformers model: `AutoModelForCausalLM.from_pretrained` loads it, with no peft or bitsandbytes.",
        "",
        f"- Base: the 4-bit base `{base_dir}` (quantized from `{source}`), every 4-bit layer dequantized as "
        "bitsandbytes computes with it",
        f"- Adapter: `{adapter.source}` (LoRA `{json.dumps(adapter.resolved.get('train', {}).get('lora'))}`), "
        "merged with PEFT",
        f"- Weights: {report['dtype']}",
        "",
        *_metrics_table("## Training run (training_config.json)", metrics),
        f"## Verification on {report['samples']} test examples ({report['tokens']} reply tokens)",
        "",
        "Against the reference (4-bit base + adapter, run as training ran it), on the same token ids:",
        "",
        *summary_rows(report, markdown=True),
        "",
        f"Tolerance ({tolerance['precision']}): max |Δlogit| <= {tolerance['max_abs_logit_diff']}, "
        f"mean KL <= {tolerance['mean_kl']}. Numbers: `{REPORT}`.",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _metrics_table(title: str, metrics: dict) -> list[str]:
    if not metrics:
        return []
    return [title, "", "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in metrics.items()], ""]


# ------------------------------------------------------------------------------------------- output


def summary_rows(report: dict, markdown: bool = False) -> list[str]:
    merged, naive = report["merged"], report["naive_4bit_merge"]
    table = [("model", "max |Δlogit|", "mean KL", "perplexity"),
             ("reference (4-bit + adapter)", "-", "-", f"{report['reference']['perplexity']:.4f}"),
             (f"merged ({report['dtype']})", f"{merged['max_abs_logit_diff']:.4g}", f"{merged['mean_kl']:.3g}",
              f"{merged['perplexity']:.4f}"),
             ("naive 4-bit merge", f"{naive['max_abs_logit_diff']:.4g}", f"{naive['mean_kl']:.3g}",
              f"{naive['perplexity']:.4f}")]
    if markdown:  # a bare | would split a cell
        rows = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
        return [rows[0], "|---|---|---|---|", *rows[1:]]
    return [f"{row[0]:<28} {row[1]:>13} {row[2]:>10} {row[3]:>11}" for row in table]


def summary_table(report: dict, out: Path) -> str:
    tolerance = report["tolerance"]
    verdict = "within" if report["passed"] else "OUTSIDE"
    return "\n".join([
        f"export -> {out} ({report['dtype']}): {report['samples']} test examples, {report['tokens']} reply tokens, "
        f"{report['seconds']} s",
        *summary_rows(report),
        f"merged is {verdict} the {tolerance['precision']} tolerance (max |Δlogit| <= "
        f"{tolerance['max_abs_logit_diff']}, mean KL <= {tolerance['mean_kl']})",
    ])


def failure_message(report: dict, out: Path) -> str:
    merged, tolerance = report["merged"], report["tolerance"]
    return (f"{out}: the merged model is outside the {tolerance['precision']} tolerance (max |Δlogit| "
            f"{merged['max_abs_logit_diff']} vs {tolerance['max_abs_logit_diff']}, mean KL {merged['mean_kl']} vs "
            f"{tolerance['mean_kl']}), so it was not kept; {out / REPORT} has the numbers. "
            + ("Export with --dtype float32, whose rounding is finer" if report["dtype"] != "float32" else
               "Check that --base is the base the adapter was trained on"))
