"""evaluate stage: zero-shot base vs tuned on the test split; metrics, samples, blind A/B sheet, MLflow artifacts."""

from __future__ import annotations

import time

from pathlib import Path
from typing import Any

import numpy as np

from qlora_pipeline import decoding, evaluation, fidelity, intervals, test_replies, topicality, tracking
from qlora_pipeline.config import DecodingSetting, Params, decoding_setting_from
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import atomic_path, read_json, read_jsonl, remove_outputs, write_csv, write_json
from qlora_pipeline.data.canary_ids import without_canaries

SIDES = ("base", "tuned")
SAMPLES = "samples.csv"
SHEET = "human_eval.html"
KEY = "human_eval_key.csv"
RUN_FILE = "run.json"
SAMPLE_FIELDS = ("id", "context", "reference", "base", "tuned", "base_stopped", "tuned_stopped", "base_chosen",
                 "tuned_chosen")


def run_evaluate(params: Params, base_dir: Path, adapter_dir: Path, test_path: Path, metrics_path: Path,
                 reports_dir: Path, rouge_plot: Path, artifacts: list[Path], train_path: Path | None = None,
                 log_csv: Path | None = None, decoding_path: Path | None = None, judge_dir: Path | None = None,
                 zero_shot_dir: Path | None = None) -> dict:
    """Score base and tuned on ``test_path``; write metrics, the ROUGE plot table and ``reports_dir``.

    ``zero_shot_dir`` (the zero-shot stage's output) holds the base side's greedy replies and
    reference NLL; without it they are generated here. ``judge_dir`` (the style-judge stage's output) scores how much each side talks like the
    persona; without it the persona metrics are left out. ``train_path`` (the train split) gives
    the human-eval sheet the persona's own replies. ``log_csv`` (train-adapter's loss log) is drawn
    into ``reports_dir``. ``decoding_path`` (choose-decoding's report) adds the ``chosen`` row:
    base and tuned under the decoding picked on validation.
    """
    from transformers import set_seed

    from qlora_pipeline.modeling.adapters import read_training_config

    remove_outputs(metrics_path, reports_dir, rouge_plot)
    read_training_config(adapter_dir)  # fail fast, naming the missing stage
    chosen = read_chosen_decoding(decoding_path) if decoding_path is not None else None
    rows = test_replies.read_test(test_path, params.evaluate.max_samples, params.seed)
    train_rows = without_canaries([row for _, row in read_jsonl(train_path)]) if train_path is not None else None
    judge = fidelity.load_judge(judge_dir) if judge_dir is not None else None
    set_seed(params.seed)
    started = time.perf_counter()
    outputs = generate_both(params, base_dir, adapter_dir, rows, chosen, zero_shot_dir)
    # One set of resamples for every interval: deltas of different metrics stay paired.
    indices = intervals.bootstrap_indices(len(rows), params.evaluate.bootstrap_samples, params.seed)
    metrics = score(params, rows, outputs, indices)
    metrics["engine"] = outputs["engine"]
    persona_scores = None
    if judge is not None:
        persona, persona_scores = persona_metrics(params, judge, rows, outputs, indices)
        metrics.update(persona)
        judge = judge[0]
    if chosen is not None:
        metrics["chosen"] = chosen_row(params, chosen, rows, outputs["chosen"], judge, indices)
    metrics.update(substance_metrics(params, rows, outputs, indices))
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    samples = sample_rows(rows, outputs)
    figures = {"metrics": metrics, "persona_scores": persona_scores, "log": log_csv}
    with tracking.pipeline_run(params, "evaluate") as run:  # opened first: a store error leaves no outputs
        write_reports(reports_dir, samples, params, run, figures, train_rows)
        write_json(metrics_path, metrics)
        write_rouge_plot(rouge_plot, metrics)
        tracking.log_metrics("eval", metrics)
        tracking.log_artifacts([adapter_dir, reports_dir, rouge_plot, metrics_path, *artifacts])
    print(evaluation.summary_table(metrics))
    return metrics


def read_chosen_decoding(path: Path) -> DecodingSetting:
    """The setting choose-decoding picked, checked like params (a hand-edited file names its key)."""
    report = read_json(path)
    if not isinstance(report, dict) or "chosen" not in report:
        raise PipelineError(f"{path}: no 'chosen' setting; re-run the choose-decoding stage (dvc repro choose-decoding)")
    return decoding_setting_from(report["chosen"], str(path))


def generate_both(params: Params, base_dir: Path, adapter_dir: Path, rows: list[dict],
                  chosen: DecodingSetting | None = None, zero_shot_dir: Path | None = None) -> dict[str, Any]:
    """Replies and reference NLL for base and tuned; one model in memory with the adapter switched off and on.

    The base side's greedy replies and NLL come from the zero-shot stage when ``zero_shot_dir`` is
    given (they do not depend on the adapter). Everything else is one workload for the engine: the
    tuned side's greedy replies (each prompt's prefill also scoring its reference reply) and, with
    ``chosen``, both sides' replies under that decoding, one list per pass (``out["chosen"][side]``;
    a greedy choice reuses the greedy replies).
    """
    from qlora_pipeline.modeling.adapters import load_sides
    from qlora_pipeline.modeling.engine import as_reply

    cfg, max_length = params.evaluate, params.train.max_length
    sides = load_sides(base_dir, adapter_dir, cfg.dequantize_4bit, cfg.batch_size)
    greedy, cut, truncated = test_replies.greedy_requests(sides.tokenizer, rows, cfg.max_new_tokens, max_length)
    generated = ("tuned",) if zero_shot_dir is not None else SIDES
    workload = [(side, request) for side in generated for request in greedy]
    sampled = chosen is not None and chosen != DecodingSetting()
    runs = decoding.pass_requests([r.prompt_ids for r in greedy], chosen, cfg.samples_per_prompt,
                                  cfg.max_new_tokens, params.seed) if sampled else []
    # The base under the chosen decoding, as the zero-shot stage made it (every setting but plain greedy).
    base_chosen = test_replies.read_grid(zero_shot_dir, rows, chosen, len(runs)) if sampled and zero_shot_dir else None
    workload += [(side, request) for side in SIDES if side == "tuned" or base_chosen is None
                 for run in runs for request in run]
    results = iter(sides.run(workload))
    out: dict[str, Any] = {side: test_replies.outputs([next(results) for _ in greedy]) for side in generated}
    if zero_shot_dir is not None:
        out["base"] = test_replies.read_side(zero_shot_dir, rows)
    if chosen is not None:
        out["chosen"] = {side: ({"replies": [out[side]["replies"]], "stopped": [out[side]["stopped"]]} if not sampled
                                else base_chosen if side == "base" and base_chosen is not None
                                else _passes([[as_reply(next(results)) for _ in run] for run in runs]))
                         for side in SIDES}
    out["engine"] = {"replies": len(workload), **sides.engines["tuned"].stats.as_dict()}

    def score_cut(model, tokenizer, side):
        if side in generated:  # prompts training cut: their likelihood as training saw it
            test_replies.score_cut(model, tokenizer, rows, cut, max_length, cfg.batch_size, out[side])

    if cut:
        sides.each(score_cut)  # under training's autocast
    for side in SIDES:
        out[side]["truncated"] = truncated
    if cfg.on_topic_contexts and len(rows) > 1:
        started = time.perf_counter()
        others = topicality.mismatched_contexts(len(rows), cfg.on_topic_contexts, params.seed)
        # The base's replies and the person's own were scored by zero-shot (the same base, contexts and seed).
        known = out["base"].pop("on_topic", {}) if out["base"].get("on_topic_contexts") == others.shape[1] else {}
        texts = {name: passes for name, (passes, _) in reply_sets(rows, out).items() if name not in known}
        out["on_topic"] = {**known, **sides.on_base(lambda model, tokenizer: topicality.on_topic(
            model, tokenizer, [row["messages"] for row in rows], texts, others, max_length, cfg.max_new_tokens))}
        out["engine"]["on_topic_seconds"] = round(time.perf_counter() - started, 1)
    return out


def reply_sets(rows: list[dict], outputs: dict[str, Any]) -> dict[str, tuple[list[list[str]], list[list[bool]] | None]]:
    """The replies whose substance is measured, each as (passes of replies, passes of end-of-turn flags): base and
    tuned greedy, tuned under the chosen decoding, and the persona's own (which always end their turn)."""
    sets = {side: ([outputs[side]["replies"]], [outputs[side]["stopped"]]) for side in SIDES}
    if "chosen" in outputs:
        sets["tuned_chosen"] = (outputs["chosen"]["tuned"]["replies"], outputs["chosen"]["tuned"]["stopped"])
    sets["reference"] = ([[row["target"] for row in rows]], None)
    return sets


def substance_metrics(params: Params, rows: list[dict], outputs: dict[str, Any], indices: np.ndarray) -> dict:
    """Does each set of replies stop where the person would (``stopping``), and answer what was said (``on_topic``,
    see topicality)? Per set, with intervals; the persona's own replies (``reference``) are the mark."""
    confidence = params.evaluate.confidence_level
    stopping = {}
    for name, (passes, stopped) in reply_sets(rows, outputs).items():
        words = np.mean([evaluation.word_counts(texts) for texts in passes], axis=0)
        ended = np.mean(np.array(stopped, dtype=float), axis=0) if stopped is not None else None
        stopping[name] = evaluation.stopping(ended, words, indices, confidence)
    metrics: dict[str, Any] = {"stopping": stopping}
    if "on_topic" in outputs:
        scores = outputs["on_topic"]
        contexts = min(params.evaluate.on_topic_contexts, len(rows) - 1)
        on_topic: dict[str, Any] = {"contexts": contexts, "chance": round(1 / (contexts + 1), 5)}
        for name, values in scores.items():
            on_topic[name] = topicality.summary(values, indices, confidence)
        paired = intervals.compare(scores["base"]["pmi"], scores["tuned"]["pmi"], indices, confidence)
        on_topic["tuned_minus_base"] = {"pmi": paired["delta"], "pmi_ci": paired["delta_ci"]}
        metrics["on_topic"] = on_topic
    return metrics


def _passes(runs: list[list[Any]]) -> dict[str, Any]:
    return {"replies": [[r.text for r in run] for run in runs], "stopped": [[r.stopped for r in run] for run in runs]}


def score(params: Params, rows: list[dict], outputs: dict[str, Any], indices: np.ndarray) -> dict:
    cfg = params.evaluate
    references = [row["target"] for row in rows]
    rouge = {side: evaluation.rouge_scores(outputs[side]["replies"], references) for side in ("base", "tuned")}
    metrics: dict[str, Any] = {"samples": len(rows), "confidence_level": cfg.confidence_level}
    for name in evaluation.ROUGE_TYPES:
        metrics[name] = intervals.compare(rouge["base"][name], rouge["tuned"][name], indices, cfg.confidence_level)
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


def persona_metrics(params: Params, judge: tuple[Any, dict, set], rows: list[dict], outputs: dict[str, Any],
                    indices: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    """Does each side talk like the persona? The style judge (fitted on the train split by the style-judge
    stage) and distances.

    ``persona_judge``: what the judge was fitted on, and its accuracy and AUC on the test split's
    real replies (the persona's vs the other speakers', or for a group's voice vs the base's greedy
    replies), how far to trust the rest. ``persona_score``: the judge's probability that the
    persona wrote each reply, base vs tuned with intervals, and on the persona's own real test
    replies (``reference``) as the mark to reach. ``repeated_3gram``: replies repeating a word
    3-gram. ``persona_distance``: each side's replies against the real ones. Also returns the
    per-reply scores (base, tuned, the real replies) for the figure.
    """
    cfg = params.evaluate
    model, judge_info, _ = judge
    if judge_info.get("group_voice"):  # held out: the real test replies against the base's greedy replies to them
        held_texts, held_labels = fidelity.group_judge_examples(rows, outputs["base"]["replies"])
    else:
        held_texts, held_labels = fidelity.judge_examples(rows)
    references = [row["target"] for row in rows]
    scores = {side: fidelity.persona_probabilities(model, outputs[side]["replies"]) for side in SIDES}
    real = fidelity.persona_probabilities(model, references)
    repeats = {side: np.array([fidelity.repeats_trigram(r) for r in outputs[side]["replies"]], dtype=float)
               for side in SIDES}
    distance: dict[str, float] = {}
    for side in SIDES:
        distance.update(persona_distances(side, outputs[side]["replies"], references))
    fitted = {key: judge_info[key] for key in ("train_replies", "contrast") if key in judge_info}
    metrics = {
        "persona_judge": {**fitted, **fidelity.judge_quality(model, held_texts, held_labels)},
        "persona_score": {**intervals.compare(scores["base"], scores["tuned"], indices, cfg.confidence_level),
                          "reference": round(float(real.mean()), 5),
                          "reference_ci": intervals.interval(real, indices, cfg.confidence_level)},
        "repeated_3gram": intervals.compare(repeats["base"], repeats["tuned"], indices, cfg.confidence_level),
        "persona_distance": distance,
    }
    return metrics, {"base": scores["base"], "tuned": scores["tuned"], "persona's own": real}


def persona_distances(side: str, replies: list[str], references: list[str]) -> dict[str, float]:
    """One side's replies against the persona's real ones: length, word use and habits."""
    distance = {f"{side}.length_wasserstein": round(fidelity.length_distance(replies, references), 4),
                f"{side}.unigram_jsd": round(fidelity.unigram_divergence(replies, references), 4)}
    for habit, gap in fidelity.habit_distance(replies, references).items():
        distance[f"{side}.{habit}_gap"] = gap
    return distance


def chosen_row(params: Params, chosen: DecodingSetting, rows: list[dict], outputs: dict[str, Any], judge: Any,
               indices: np.ndarray) -> dict:
    """Base and tuned under the decoding chosen on validation: ROUGE, repetition, the voice, with intervals.

    Each prompt's scores are averaged over its passes (seeds) before resampling prompts.
    """
    cfg = params.evaluate
    references = [row["target"] for row in rows]
    per_prompt = {}
    for side in ("base", "tuned"):
        passes = outputs[side]["replies"]
        rouge = [evaluation.rouge_scores(texts, references) for texts in passes]
        per_prompt[side] = {name: np.mean([r[name] for r in rouge], axis=0) for name in ("rouge1", "rougeL")}
        per_prompt[side]["repeated_3gram"] = np.mean(
            [[float(fidelity.repeats_trigram(t)) for t in texts] for texts in passes], axis=0)
        if judge is not None:
            per_prompt[side]["persona_score"] = np.mean(
                [fidelity.persona_probabilities(judge, texts) for texts in passes], axis=0)
    row: dict[str, Any] = {"decoding": chosen.model_dump(), "passes": len(outputs["tuned"]["replies"])}
    for name in per_prompt["tuned"]:
        row[name] = intervals.compare(per_prompt["base"][name], per_prompt["tuned"][name], indices,
                                       cfg.confidence_level)
    row["persona_distance"] = {}
    for side in ("base", "tuned"):  # corpus-level over every pass's replies
        replies = [t for texts in outputs[side]["replies"] for t in texts]
        stopped = [s for flags in outputs[side]["stopped"] for s in flags]
        row[side] = evaluation.text_metrics(replies, stopped, references * len(outputs[side]["replies"]))
        row["persona_distance"].update(persona_distances(side, replies, references))
    return row


def sample_rows(rows: list[dict], outputs: dict[str, Any]) -> list[dict]:
    """Per test example: greedy replies of both sides and (first pass of) the chosen decoding's."""
    chosen = outputs.get("chosen")
    samples = []
    for i, row in enumerate(rows):
        sample = {"id": row["id"], "messages": row["messages"], "reference": row["target"],
                  "base": outputs["base"]["replies"][i], "tuned": outputs["tuned"]["replies"][i],
                  "base_stopped": outputs["base"]["stopped"][i], "tuned_stopped": outputs["tuned"]["stopped"][i]}
        if chosen is not None:
            for side in ("base", "tuned"):
                sample[f"{side}_chosen"] = chosen[side]["replies"][0][i]
        samples.append(sample)
    return samples


def render_context(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def write_reports(reports_dir: Path, samples: list[dict], params: Params, run: Any, figures: dict | None = None,
                  train_rows: list[dict] | None = None) -> None:
    """samples.csv, the blind A/B sheet and its key, the PNG figures, and which MLflow run they belong to."""
    from qlora_pipeline.human_eval.sheet import pick_persona_examples, write_sheet

    with atomic_path(reports_dir) as tmp:
        tmp.mkdir()
        fields = [k for k in SAMPLE_FIELDS if not samples or k == "context" or k in samples[0]]
        write_csv(tmp / SAMPLES, fields, ({**{k: sample[k] for k in fields if k != "context"},
                                           "context": render_context(sample["messages"])} for sample in samples))
        # The replies a user will get: the chosen decoding's where there is one.
        side = {name: f"{name}_chosen" if samples and f"{name}_chosen" in samples[0] else name
                for name in ("base", "tuned")}
        sheet = [{"id": s["id"], "context": s["messages"], "reference": s["reference"], "base": s[side["base"]],
                  "tuned": s[side["tuned"]]} for s in samples[: params.evaluate.human_eval_samples]]
        if sheet:
            examples = pick_persona_examples(train_rows or [], params.evaluate.human_eval_persona_examples,
                                             params.seed)
            write_sheet(sheet, params.seed, tmp / SHEET, tmp / KEY, title="Which reply sounds more like the person?",
                        persona_examples=examples)
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
    write_csv(path, ("metric", "model", "f1"), ({"metric": f"{name} {side}", "model": side, "f1": metrics[name][side]}
                                              for name in evaluation.ROUGE_TYPES for side in ("base", "tuned")))
