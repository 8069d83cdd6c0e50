"""risk stage: what the run risks, base and tuned side by side: metrics/risk.json, reports/risk.md, MLflow, gates."""

from __future__ import annotations

import csv
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlora_pipeline import intervals, tracking
from qlora_pipeline.config import Params
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import read_json, read_jsonl, remove_outputs, write_csv, write_json, write_text
from qlora_pipeline.risk import bias, canaries, cost, fitting, gates, memorization, privacy, report, safety
from qlora_pipeline.risk.probes import load_probe_sets, probe_prompt_ids
from qlora_pipeline.test_replies import read_probes

SIDES = ("base", "tuned")
# evaluate's samples.csv: greedy replies and the first pass of the chosen decoding, per side.
SAMPLE_COLUMNS = {"base": ("base", "base_chosen"), "tuned": ("tuned", "tuned_chosen")}
# Stage metrics files whose wall time and energy make up the run's cost, by the stage's name.
STAGE_OF_METRICS = {"clean.json": "clean", "base.json": "quantize-load", "judge.json": "style-judge",
                    "zero_shot.json": "zero-shot", "train.json": "train-adapter", "decoding.json": "choose-decoding",
                    "eval.json": "evaluate"}


def run_risk(params: Params, base_dir: Path, adapter_dir: Path, train_path: Path, samples_path: Path,
             canaries_path: Path, stage_metrics: Sequence[Path], metrics_path: Path, report_path: Path,
             replies_path: Path, zero_shot_dir: Path | None = None) -> dict:
    """Measure every risk, write ``metrics_path``, ``report_path`` and ``replies_path`` (every probe with both
    replies and how each was judged), log to MLflow, then apply ``risk.fail_on``.

    ``zero_shot_dir``: the zero-shot stage's folder, whose probe replies are the base side's (without
    it, the base side is generated here too)."""
    from transformers import set_seed

    from qlora_pipeline.modeling.adapters import read_training_config

    remove_outputs(metrics_path, report_path, replies_path)
    cfg = params.risk
    resolved = read_training_config(adapter_dir)  # fail fast, naming the missing stage
    samples = read_samples(samples_path)
    targets = [row["target"] for _, row in read_jsonl(train_path)]
    canary_record = read_json(canaries_path).get("canaries", [])
    stages = read_stage_metrics(stage_metrics)
    probe_sets = load_probe_sets(cfg.bias_templates, params.seed)
    probes, safety_prompts, eliciting = probe_sets.bias, probe_sets.safety, probe_sets.eliciting
    set_seed(params.seed)
    started = time.perf_counter()

    system = resolved.get("split", {}).get("system_prompt") or ""
    prompts = probe_sets.texts
    base = read_probes(zero_shot_dir, system, prompts) if zero_shot_dir is not None else None
    generated, canary_scores = generate_and_score(params, base_dir, adapter_dir, system, prompts, canary_record, base)
    replies = {side: {"test": samples[side], **{k: v[side] for k, v in generated.items()}} for side in SIDES}
    # Judged once, used by the figures and by the audit file alike.
    hits = {prompt_set: {side: privacy.pii_hits(replies[side][prompt_set], params.clean.pii, params.clean.pii_engine)
                         for side in SIDES} for prompt_set in ("test", "eliciting")}
    sentiments = {side: bias.sentiment(generated["bias"][side]) for side in SIDES}

    metrics: dict[str, Any] = {
        "privacy": privacy_section(params, replies, hits),
        "memorization": memorization_section(cfg, targets, replies),
        "canaries": canary_section(canary_record, canary_scores),
        "bias": bias.axis_gaps(probes, sentiments["base"], sentiments["tuned"], cfg.bootstrap_samples,
                               cfg.confidence_level, params.seed),
        "safety": safety.refusal_rates(generated["safety"]["base"], generated["safety"]["tuned"],
                                       cfg.confidence_level),
        "fit": fitting.fit_verdict(stages["train-adapter"], cfg.underfit_min_improvement, cfg.overfit_gap,
                                   cfg.overfit_rise),
    }
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    metrics["cost"] = cost.run_cost({**stages, "risk": {"wall_seconds": metrics["wall_seconds"]}}, cfg.power_watts)
    metrics["summary"] = summary(metrics)
    tripped = gates.tripped(cfg.fail_on, metrics["summary"])
    metrics["gates"] = {"fail_on": list(cfg.fail_on), "tripped": [gate.text for gate, _ in tripped]}
    examples = report_examples(prompts, generated, safety_prompts, eliciting)
    audit = reply_rows(probes, safety_prompts, eliciting, generated, hits["eliciting"], sentiments)

    with tracking.pipeline_run(params, "risk") as run:  # opened first: a store error leaves no outputs
        write_json(metrics_path, metrics)
        write_text(report_path, report.render(metrics, examples, params, run.info.run_id))
        write_csv(replies_path, REPLY_FIELDS, audit)
        tracking.log_metrics("risk", metrics)
        # Words as tags: the verdict and which gates held.
        tracking.log_metrics("risk", {"summary": {"fit_verdict": metrics["fit"]["verdict"]},
                                      "gates": {"tripped": "; ".join(metrics["gates"]["tripped"]) or None}})
        tracking.log_artifacts([metrics_path, report_path, replies_path], under="risk")
    print(report.console_summary(metrics))
    if tripped:
        lines = "; ".join(f"{gate.text} (it is {value})" for gate, value in tripped)
        raise PipelineError(f"risk: gate(s) of risk.fail_on hold: {lines}. The reports are written "
                            f"({metrics_path}, {report_path}); fix the cause or change risk.fail_on")
    return metrics


def read_samples(path: Path) -> dict[str, list[str]]:
    """Per side, every reply evaluate generated on test: the greedy ones, then the chosen decoding's."""
    if not path.is_file():
        raise PipelineError(f"{path}: no evaluate samples; run the evaluate stage first (dvc repro evaluate)")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "base" not in rows[0] or "tuned" not in rows[0]:
        raise PipelineError(f"{path}: expected evaluate's samples.csv with base and tuned columns; "
                            "re-run the evaluate stage (dvc repro evaluate)")
    return {side: [row[column] for column in columns if column in rows[0] for row in rows]
            for side, columns in SAMPLE_COLUMNS.items()}


def read_stage_metrics(paths: Sequence[Path]) -> dict[str, dict]:
    """``{stage: metrics}`` for the given metrics files (named as in STAGE_OF_METRICS)."""
    out = {}
    for path in paths:
        stage = STAGE_OF_METRICS.get(path.name)
        if stage is None:
            raise PipelineError(f"--stage-metrics {path}: not a stage metrics file this stage knows "
                                f"({', '.join(STAGE_OF_METRICS)})")
        out[stage] = read_json(path)
    if "train-adapter" not in out:
        raise PipelineError("--stage-metrics: train.json is required (the fit verdict and the cost rest on it)")
    return out


def generate_and_score(params: Params, base_dir: Path, adapter_dir: Path, system: str,
                       prompts: dict[str, list[str]], canary_record: list[dict],
                       base: dict[str, list[str]] | None = None) -> tuple[dict, dict]:
    """Greedy replies of both sides to every prompt set, and each canary's exposure and extraction.

    One workload for the engine: the tuned side's replies to every prompt set (and the base's, unless
    ``base`` holds them from the zero-shot stage), and each canary's extraction attempt on both sides.
    """
    from qlora_pipeline.modeling.adapters import load_sides
    from qlora_pipeline.modeling.engine import Request

    cfg = params.risk
    sides = load_sides(base_dir, adapter_dir, params.evaluate.dequantize_4bit, cfg.batch_size)
    tokenizer = sides.tokenizer
    prompt_ids = probe_prompt_ids(tokenizer, system, prompts)
    extraction = [canaries.extraction_prompt_ids(tokenizer, canary) for canary in canary_record]
    generated_sides = {name: ("tuned",) if base is not None else SIDES for name in prompt_ids}
    work = [(name, side, ids) for name in prompt_ids for side in generated_sides[name] for ids in prompt_ids[name]]
    work += [("canaries", side, ids) for side in SIDES for ids in extraction]
    results = iter(sides.run([(side, Request(ids, max_new_tokens=cfg.max_new_tokens)) for _, side, ids in work]))
    generated: dict[str, dict[str, list[str]]] = {name: {} for name in [*prompt_ids, "canaries"]}
    for name, side, _ in work:
        generated[name].setdefault(side, []).append(next(results).text.strip())
    for name in prompt_ids:
        if base is not None:
            generated[name]["base"] = base[name]
    completions = generated.pop("canaries")
    scores: dict[str, list[dict]] = {side: [] for side in SIDES}

    def exposure(model: Any, side_tokenizer: Any, side: str) -> None:
        scores[side] = [{**canary_exposure(model, side_tokenizer, canary, cfg, params.seed),
                         **canaries.extracted(canary, completion)}
                        for canary, completion in zip(canary_record, completions[side])]

    if canary_record:
        sides.each(exposure)  # as evaluate: the logits training saw
    return generated, scores


def canary_exposure(model: Any, tokenizer: Any, canary: dict, cfg: Any, seed: int) -> dict:
    """Exposure of one canary: its rank among random secrets of the same format, both estimates."""
    found = canaries.exposure(model, tokenizer, canary, cfg.canary_candidates, seed, cfg.batch_size)
    return {"exposure_extrapolated": round(found["exposure_extrapolated_bits"], 3),
            "exposure_interpolated": round(found["exposure_bits"], 3), "rank": found["rank"],
            "candidates": found["candidates"], "log_perplexity": round(found["log_perplexity"], 4)}


def rate(flags: Sequence[bool], confidence: float) -> dict[str, Any]:
    """Share of True with its Wilson interval (exact enough at 0 and 1, where a bootstrap collapses)."""
    n = len(flags)
    if n == 0:
        return {"rate": None, "ci": None, "count": 0, "n": 0}
    count = int(sum(flags))
    low, high = intervals.wilson_interval(count, n, confidence)
    return {"rate": round(count / n, 5), "ci": [round(low, 5), round(high, 5)], "count": count, "n": n}


def privacy_section(params: Params, replies: dict[str, dict[str, list[str]]], hits: dict) -> dict:
    """PII per type in the test and eliciting replies (``hits[prompt_set][side]``), and placeholders said, per side."""
    confidence = params.risk.confidence_level
    types = list(params.clean.pii)
    out: dict[str, Any] = {"engine": params.clean.pii_engine, "types": types}
    for prompt_set, by_side in hits.items():
        out[prompt_set] = {side: {"any": rate(privacy.flags(found), confidence),
                                  "by_type": {kind: rate(privacy.flags(found, kind), confidence)["rate"]
                                              for kind in types}}
                           for side, found in by_side.items()}
    out["placeholders"] = {}
    for side in SIDES:
        said = privacy.placeholder_hits(replies[side]["test"] + replies[side]["eliciting"])
        out["placeholders"][side] = {**rate(privacy.flags(said), confidence),
                                     "counts": dict(sum(said, Counter()))}
    return out


def memorization_section(cfg: Any, targets: list[str], replies: dict[str, dict[str, list[str]]]) -> dict:
    """Replies repeating >= ``memorization_min_words`` words of one training target, per side."""
    index = memorization.SpanIndex(targets, cfg.memorization_min_words)
    out: dict[str, Any] = {"min_words": cfg.memorization_min_words, "training_targets": len(targets),
                           "indexed_spans": len(index)}
    for side in SIDES:
        said = replies[side]["test"] + replies[side]["eliciting"]
        matches = memorization.memorized(index, said)
        found = [m for m in matches if m is not None]
        longest = max(found, key=lambda m: m.words, default=None)
        out[side] = {**rate([m is not None for m in matches], cfg.confidence_level),
                     "longest_words": longest.words if longest else 0,
                     "examples": [m.span for m in sorted(found, key=lambda m: -m.words)[:3]]}
    return out


def canary_section(record: list[dict], scores: dict[str, list[dict]]) -> dict:
    """Per canary: repeats, exposure (both estimates) and extraction under base and tuned."""
    # Keyed by canary id, so every figure reaches MLflow as risk.canaries.items.<id>.<side>.<figure>.
    items = {canary["id"]: {"repeats": canary["repeats"], "secret": canary["secret"],
                            **{side: scores[side][index] for side in SIDES}}
             for index, canary in enumerate(record)}
    inserted = [item for item in items.values() if item["repeats"] > 0]
    fresh = [item for item in items.values() if item["repeats"] == 0]

    def mean(rows: list[dict], side: str, key: str) -> float | None:
        return round(float(np.mean([r[side][key] for r in rows])), 3) if rows else None

    return {
        "enabled": bool(inserted),
        "items": items,
        "inserted": len(inserted),
        "fresh": len(fresh),
        **{f"{kind}_exposure_{side}": mean(rows, side, "exposure_extrapolated")
           for kind, rows in (("inserted", inserted), ("fresh", fresh)) for side in SIDES},
        "max_exposure_tuned": max((r["tuned"]["exposure_extrapolated"] for r in inserted), default=None),
        "extracted_tuned": sum(bool(r["tuned"]["extracted"]) for r in inserted) if inserted else None,
        "extracted_base": sum(bool(r["base"]["extracted"]) for r in inserted) if inserted else None,
    }


def summary(metrics: dict) -> dict[str, Any]:
    """The headline figures, under the names ``risk.fail_on`` gates use (gate_syntax.GATE_FIGURES)."""
    privacy_, safety_ = metrics["privacy"], metrics["safety"]
    return {
        "pii_rate_base": privacy_["test"]["base"]["any"]["rate"],
        "pii_rate_tuned": privacy_["test"]["tuned"]["any"]["rate"],
        "elicited_pii_rate_base": privacy_["eliciting"]["base"]["any"]["rate"],
        "elicited_pii_rate_tuned": privacy_["eliciting"]["tuned"]["any"]["rate"],
        "placeholder_rate_tuned": privacy_["placeholders"]["tuned"]["rate"],
        "memorized_rate_base": metrics["memorization"]["base"]["rate"],
        "memorized_rate_tuned": metrics["memorization"]["tuned"]["rate"],
        "canary_exposure_tuned": metrics["canaries"]["max_exposure_tuned"],
        "canary_extracted": metrics["canaries"]["extracted_tuned"],
        "bias_amplification_max": metrics["bias"]["max_amplification"],
        "refusal_rate_base": safety_["base"]["rate"],
        "refusal_rate_tuned": safety_["tuned"]["rate"],
        "refusal_drop": safety_["drop"],
        "train_val_gap": metrics["fit"]["train_val_gap"],
        "fit_verdict": metrics["fit"]["verdict"],
        "energy_kwh": metrics["cost"]["energy_kwh"],
    }


REPLY_FIELDS = ("set", "id", "category", "prompt", "base", "tuned", "base_judged", "tuned_judged")


def reply_rows(probes: list, safety_prompts: list, eliciting: list, generated: dict, eliciting_hits: dict,
               sentiments: dict) -> list[dict]:
    """Every probe with both replies and what the rules made of each: the report's figures, auditable."""
    rows = []
    for index, prompt in enumerate(eliciting):
        replies = {side: generated["eliciting"][side][index] for side in SIDES}
        judged = {side: ", ".join(sorted(eliciting_hits[side][index])) or "no PII" for side in SIDES}
        rows.append(_reply_row("eliciting", prompt.prompt_id, prompt.category, prompt.text, replies, judged))
    for index, prompt in enumerate(safety_prompts):
        replies = {side: generated["safety"][side][index] for side in SIDES}
        matched = {side: safety.refusal_match(replies[side]) for side in SIDES}
        judged = {side: f"declines ({rule})" if rule else "does not decline" for side, rule in matched.items()}
        rows.append(_reply_row("safety", prompt.prompt_id, prompt.category, prompt.text, replies, judged))
    for index, probe in enumerate(probes):
        replies = {side: generated["bias"][side][index] for side in SIDES}
        judged = {side: f"sentiment {sentiments[side][index]:+.3f}" for side in SIDES}
        rows.append(_reply_row("bias", probe.template_id, f"{probe.axis}: {probe.group}", probe.text, replies, judged))
    return rows


def _reply_row(kind: str, prompt_id: str, category: str, text: str, replies: dict, judged: dict) -> dict:
    return {"set": kind, "id": prompt_id, "category": category, "prompt": text,
            **replies, **{f"{side}_judged": judged[side] for side in SIDES}}


def report_examples(prompts: dict[str, list[str]], generated: dict, safety_prompts: list, eliciting: list) -> dict:
    """A few prompt/reply pairs the report shows beside the figures."""
    def pairs(name: str, count: int) -> list[dict]:
        return [{"prompt": prompts[name][i], **{side: generated[name][side][i] for side in SIDES}}
                for i in range(min(count, len(prompts[name])))]

    return {"eliciting": pairs("eliciting", 4), "safety": pairs("safety", 4)}
