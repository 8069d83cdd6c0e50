"""evaluate stage: zero-shot base vs tuned on the test split; metrics, samples, blind A/B sheet, MLflow artifacts."""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qlora_pipeline import evaluation, tracking
from qlora_pipeline.config import Params
from qlora_pipeline.data.sampling import cap_examples
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import atomic_path, read_jsonl, remove_outputs, write_json

SAMPLES = "samples.csv"
SHEET = "human_eval.html"
KEY = "human_eval_key.csv"
RUN_FILE = "run.json"
SAMPLE_FIELDS = ("id", "context", "reference", "base", "tuned", "base_stopped", "tuned_stopped")


def read_test(path: Path, cap: int | None, seed: int) -> list[dict]:
    rows = [row for _, row in read_jsonl(path)]
    if not rows:
        raise PipelineError(f"{path}: the test split is empty; raise split.ratios.test or split.max_examples.test "
                            "(or add data) and re-run split")
    return cap_examples(rows, cap, seed)


def generation_kwargs(params: Params) -> dict[str, Any]:
    cfg = params.evaluate
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
                              "repetition_penalty": cfg.repetition_penalty}
    if cfg.do_sample:  # sampling keys only mean something when sampling
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    return kwargs


def run_evaluate(params: Params, base_dir: Path, adapter_dir: Path, test_path: Path, metrics_path: Path,
                 reports_dir: Path, rouge_plot: Path, artifacts: list[Path], train_path: Path | None = None,
                 log_csv: Path | None = None) -> dict:
    """Score base and tuned on ``test_path``; write metrics, the ROUGE plot table and ``reports_dir``.

    ``train_path`` (the train split) teaches the style judge the persona's voice; without it the
    persona metrics are left out. ``log_csv`` (train-adapter's loss log) is drawn into ``reports_dir``.
    """
    from transformers import set_seed

    from qlora_pipeline.modeling.adapters import read_training_config

    remove_outputs(metrics_path, reports_dir, rouge_plot)
    read_training_config(adapter_dir)  # fail fast, naming the missing stage
    rows = read_test(test_path, params.evaluate.max_samples, params.seed)
    train_rows = [row for _, row in read_jsonl(train_path)] if train_path is not None else None
    set_seed(params.seed)
    started = time.perf_counter()
    outputs = generate_both(params, base_dir, adapter_dir, rows)
    # One set of resamples for every interval: deltas of different metrics stay paired.
    indices = evaluation.bootstrap_indices(len(rows), params.evaluate.bootstrap_samples, params.seed)
    metrics = score(params, rows, outputs, indices)
    persona_scores = None
    if train_rows:
        persona, persona_scores = persona_metrics(params, train_rows, rows, outputs, indices)
        metrics.update(persona)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    samples = sample_rows(rows, outputs)
    figures = {"metrics": metrics, "persona_scores": persona_scores, "log": log_csv}
    with tracking.pipeline_run(params, "evaluate") as run:  # opened first: a store error leaves no outputs
        write_reports(reports_dir, samples, params, run, figures)
        write_json(metrics_path, metrics)
        write_rouge_plot(rouge_plot, metrics)
        tracking.log_metrics("eval", flat_eval_metrics(metrics))
        log_artifacts([adapter_dir, reports_dir, rouge_plot, metrics_path, *artifacts])
    print(summary_table(metrics))
    return metrics


def generate_both(params: Params, base_dir: Path, adapter_dir: Path, rows: list[dict]) -> dict[str, Any]:
    """Replies and reference NLL for base and tuned; one model in memory with the adapter switched off and on."""
    from qlora_pipeline.modeling.adapters import autocast_like_training, load_base_for, load_tuned
    from qlora_pipeline.modeling.inference import dequantize_for_inference, should_dequantize

    cfg = params.evaluate
    contexts = [row["messages"] for row in rows]
    max_length, gen_kwargs = params.train.max_length, generation_kwargs(params)
    model, tokenizer, resolved = load_tuned(base_dir, adapter_dir)
    if should_dequantize(cfg.dequantize_4bit, model):  # this process never saves the model
        dequantize_for_inference(model)
    out: dict[str, Any] = {}
    with autocast_like_training(resolved):  # base and tuned alike, as training computed
        if resolved["method"] == "full":  # no adapter to switch off: the base is a second model
            base, base_tokenizer = load_base_for(resolved, base_dir)
            out["base"] = _side(base, base_tokenizer, rows, contexts, cfg.batch_size, max_length, gen_kwargs)
            del base
        else:
            with model.disable_adapter():
                out["base"] = _side(model, tokenizer, rows, contexts, cfg.batch_size, max_length, gen_kwargs)
        out["tuned"] = _side(model, tokenizer, rows, contexts, cfg.batch_size, max_length, gen_kwargs)
    return out


def _side(model, tokenizer, rows, contexts, batch_size, max_length, gen_kwargs) -> dict[str, Any]:
    from qlora_pipeline.modeling.generation import generate_replies

    replies = generate_replies(model, tokenizer, contexts, batch_size, **gen_kwargs)
    truncated: Counter = Counter()
    nll, tokens = evaluation.reference_nll(model, tokenizer, rows, max_length, batch_size, truncated)
    return {"replies": [r.text for r in replies], "stopped": [r.stopped for r in replies], "nll": nll, "tokens": tokens,
            "truncated": truncated}


def score(params: Params, rows: list[dict], outputs: dict[str, Any], indices: np.ndarray) -> dict:
    cfg = params.evaluate
    references = [row["target"] for row in rows]
    rouge = {side: evaluation.rouge_scores(outputs[side]["replies"], references) for side in ("base", "tuned")}
    metrics: dict[str, Any] = {"samples": len(rows), "confidence_level": cfg.confidence_level}
    for name in evaluation.ROUGE_TYPES:
        metrics[name] = evaluation.compare(rouge["base"][name], rouge["tuned"][name], indices, cfg.confidence_level)
    metrics["perplexity"] = {}
    for side in ("base", "tuned"):
        nll, tokens = outputs[side]["nll"], outputs[side]["tokens"]
        metrics["perplexity"][side] = round(evaluation.perplexity(nll, tokens), 4)
        metrics["perplexity"][f"{side}_ci"] = evaluation.perplexity_interval(nll, tokens, indices, cfg.confidence_level)
    metrics["perplexity"]["delta"] = round(metrics["perplexity"]["tuned"] - metrics["perplexity"]["base"], 4)
    # Perplexity sees prompts cut to train.max_length as in training (generation sees them whole).
    for kind in ("prompt_truncated", "reply_truncated"):
        metrics["perplexity"][kind] = outputs["tuned"]["truncated"][kind]
    for side in ("base", "tuned"):
        metrics[side] = evaluation.text_metrics(outputs[side]["replies"], outputs[side]["stopped"], references)
    return metrics


def persona_metrics(params: Params, train_rows: list[dict], rows: list[dict], outputs: dict[str, Any],
                    indices: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    """Does each side talk like the persona? The style judge (trained on ``train_rows`` only) and distances.

    ``persona_judge``: the judge's accuracy and AUC on the test split's real replies (the persona's
    vs the other speakers'), how far to trust the rest. ``persona_score``: the judge's probability
    that the persona wrote each reply, base vs tuned with intervals, and on the persona's own real
    test replies (``reference``) as the mark to reach. ``repeated_3gram``: replies repeating a word
    3-gram. ``persona_distance``: each side's replies against the real ones. Also returns the
    per-reply scores (base, tuned, the real replies) for the figure.
    """
    from qlora_pipeline import fidelity

    cfg = params.evaluate
    texts, labels = fidelity.judge_examples(train_rows)
    judge = fidelity.train_judge(texts, labels, params.seed)
    held_texts, held_labels = fidelity.judge_examples(rows)
    references = [row["target"] for row in rows]
    scores = {side: fidelity.persona_probabilities(judge, outputs[side]["replies"]) for side in ("base", "tuned")}
    real = fidelity.persona_probabilities(judge, references)
    repeats = {side: np.array([fidelity.repeats_trigram(r) for r in outputs[side]["replies"]], dtype=float)
               for side in ("base", "tuned")}
    distance: dict[str, float] = {}
    for side in ("base", "tuned"):
        replies = outputs[side]["replies"]
        distance[f"{side}.length_wasserstein"] = round(fidelity.length_distance(replies, references), 4)
        distance[f"{side}.unigram_jsd"] = round(fidelity.unigram_divergence(replies, references), 4)
        for habit, gap in fidelity.habit_distance(replies, references).items():
            distance[f"{side}.{habit}_gap"] = gap
    metrics = {
        "persona_judge": {"train_replies": len(texts), **fidelity.judge_quality(judge, held_texts, held_labels)},
        "persona_score": {**evaluation.compare(scores["base"], scores["tuned"], indices, cfg.confidence_level),
                          "reference": round(float(real.mean()), 5),
                          "reference_ci": evaluation.interval(real, indices, cfg.confidence_level)},
        "repeated_3gram": evaluation.compare(repeats["base"], repeats["tuned"], indices, cfg.confidence_level),
        "persona_distance": distance,
    }
    return metrics, {"base": scores["base"], "tuned": scores["tuned"], "persona's own": real}


def flat_eval_metrics(metrics: dict) -> dict:
    """Scalars only (intervals as _low/_high), for MLflow."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            for sub, item in value.items():
                if isinstance(item, list):
                    flat[f"{key}.{sub}_low"], flat[f"{key}.{sub}_high"] = item
                elif isinstance(item, (int, float)):  # None (an AUC with one class) is not a metric
                    flat[f"{key}.{sub}"] = item
        elif isinstance(value, (int, float)):
            flat[key] = value
    return flat


def sample_rows(rows: list[dict], outputs: dict[str, Any]) -> list[dict]:
    return [{"id": row["id"], "messages": row["messages"], "reference": row["target"],
             "base": outputs["base"]["replies"][i], "tuned": outputs["tuned"]["replies"][i],
             "base_stopped": outputs["base"]["stopped"][i], "tuned_stopped": outputs["tuned"]["stopped"][i]}
            for i, row in enumerate(rows)]


def render_context(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def write_reports(reports_dir: Path, samples: list[dict], params: Params, run: Any, figures: dict | None = None
                  ) -> None:
    """samples.csv, the blind A/B sheet and its key, the PNG figures, and which MLflow run they belong to."""
    from qlora_pipeline.human_eval import write_sheet

    with atomic_path(reports_dir) as tmp:
        tmp.mkdir()
        with (tmp / SAMPLES).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=SAMPLE_FIELDS)
            writer.writeheader()
            for sample in samples:
                writer.writerow({**{k: sample[k] for k in SAMPLE_FIELDS if k != "context"},
                                 "context": render_context(sample["messages"])})
        sheet = [{"id": s["id"], "context": s["messages"], "reference": s["reference"], "base": s["base"],
                  "tuned": s["tuned"]} for s in samples[: params.evaluate.human_eval_samples]]
        if sheet:
            write_sheet(sheet, params.seed, tmp / SHEET, tmp / KEY, title="Which reply sounds more like the person?")
        if figures:
            draw_figures(tmp, **figures)
        # The store as configured (null = the repository's own), never this machine's absolute path.
        write_json(tmp / RUN_FILE, {"mlflow_run_id": run.info.run_id, "tracking_uri": params.mlflow.tracking_uri})


def draw_figures(folder: Path, metrics: dict, persona_scores: dict | None, log: Path | None) -> None:
    from qlora_pipeline import figures

    if log is not None:
        figures.loss_curves(log, folder / figures.LOSS_CURVES)
    figures.metric_intervals(metrics, folder / figures.METRICS)
    if persona_scores:
        figures.persona_scores(persona_scores, folder / figures.PERSONA_SCORES)


def write_rouge_plot(path: Path, metrics: dict) -> None:
    """One row per ROUGE type with base and tuned F1: the table `dvc plots` draws as bars."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=("metric", "model", "f1"))
        writer.writeheader()
        for name in evaluation.ROUGE_TYPES:
            for side in ("base", "tuned"):
                writer.writerow({"metric": f"{name} {side}", "model": side, "f1": metrics[name][side]})


def log_artifacts(paths: list[Path]) -> None:
    import mlflow

    for path in paths:
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        elif path.is_file():
            mlflow.log_artifact(str(path))


def summary_table(metrics: dict) -> str:
    lines = [f"evaluate: {metrics['samples']} test replies, base (zero-shot) vs tuned "
             f"[{int(metrics['confidence_level'] * 100)}% interval of tuned - base]",
             f"  {'metric':<18}{'base':>10}{'tuned':>10}{'delta':>10}   interval"]
    for name in (*evaluation.ROUGE_TYPES, "perplexity", "persona_score", "repeated_3gram"):
        if name not in metrics:
            continue
        m = metrics[name]
        ci = m.get("delta_ci")
        ci_text = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"base {m['base_ci']}, tuned {m['tuned_ci']}"
        lines.append(f"  {name:<18}{m['base']:>10.4f}{m['tuned']:>10.4f}{m['delta']:>+10.4f}   {ci_text}")
    for name in ("end_of_turn_rate", "length_ratio", "distinct_1", "distinct_2"):
        base, tuned = metrics["base"][name], metrics["tuned"][name]
        lines.append(f"  {name:<18}{base:>10.4f}{tuned:>10.4f}{tuned - base:>+10.4f}")
    if "persona_judge" in metrics:
        judge, persona = metrics["persona_judge"], metrics["persona_score"]
        lines.append(f"  style judge on real test replies: accuracy {judge['accuracy']}, AUC {judge['auc']}; "
                     f"the persona's own replies score {persona['reference']} {persona['reference_ci']}")
    return "\n".join(lines)
