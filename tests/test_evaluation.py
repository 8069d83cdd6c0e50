"""evaluate: the statistics, the stage's outputs, an independent ROUGE check, MLflow, and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from qlora_pipeline import evaluation, intervals
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import write_jsonl
from conftest import SAMPLED


def test_paired_interval_and_determinism():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 0.3, 200)
    tuned = base + 0.05 + rng.normal(0, 0.01, 200)
    idx = intervals.bootstrap_indices(200, 500, seed=3)
    result = intervals.compare(base, tuned, idx, 0.95)
    assert result["delta_ci"][0] > 0.04 and result["delta_ci"][1] < 0.06  # paired: tight around +0.05
    assert result["base_ci"][0] < result["base"] < result["base_ci"][1]
    assert result == intervals.compare(base, tuned, intervals.bootstrap_indices(200, 500, seed=3), 0.95)
    assert result != intervals.compare(base, tuned, intervals.bootstrap_indices(200, 500, seed=4), 0.95)


def test_text_metrics():
    assert evaluation.distinct_n(["a b a b", "a b"], 1) == round(2 / 6, 5)
    assert evaluation.distinct_n(["a b a b", "a b"], 2) == round(2 / 4, 5)
    assert evaluation.length_ratio(["one two", "three"], ["a b c", "d"]) == 0.75
    metrics = evaluation.text_metrics(["x y", "z"], [True, False], ["x", "y"])
    assert metrics["end_of_turn_rate"] == 0.5 and metrics["length_ratio"] == 1.5


def test_reference_perplexity_matches_the_models_own_loss(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.data.formatting import encode_example

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}], "target": f"answer number {i} " * (i + 1)}
            for i in range(3)]
    nll, tokens = evaluation.reference_nll(model, tokenizer, rows, max_length=128, batch_size=2)
    for row, row_nll, row_tokens in zip(rows, nll, tokens):
        enc = encode_example(tokenizer, row["messages"], row["target"], 128)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss
        assert row_tokens == sum(label != -100 for label in enc.labels)
        assert row_nll / row_tokens == pytest.approx(loss.item(), rel=1e-4)
    assert evaluation.perplexity(nll, tokens) == pytest.approx(np.exp(nll.sum() / tokens.sum()))


def test_reference_perplexity_counts_prompts_cut_to_max_length(tiny_llama):
    from collections import Counter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    long_context = [{"role": "user" if i % 2 else "assistant", "content": f"turn {i} " * 20} for i in range(1, 8)]
    rows = [{"messages": long_context, "target": "ok"}, {"messages": [{"role": "user", "content": "hi"}], "target": "yo"}]
    counts = Counter()
    nll, tokens = evaluation.reference_nll(model, tokenizer, rows, max_length=64, batch_size=2, counts=counts)
    assert counts["prompt_truncated"] == 1 and counts["reply_truncated"] == 0
    assert len(nll) == 2 and (tokens > 0).all()


# ------------------------------------------------------------------------ the stage


def test_evaluate_writes_metrics_samples_and_sheet(tiny_run):
    from qlora_pipeline import fidelity

    params, tmp, metrics = tiny_run
    samples = list(csv.DictReader((tmp / "reports" / "samples.csv").open()))
    references = [s["reference"] for s in samples]
    assert metrics["samples"] == 6  # evaluate.max_samples caps the 8 synthetic test rows
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        m = metrics[name]
        assert set(m) == {"base", "base_ci", "tuned", "tuned_ci", "delta", "delta_ci"}
        assert m["delta"] == pytest.approx(m["tuned"] - m["base"], abs=1e-4)
    assert metrics["perplexity"]["base"] > 1 and metrics["perplexity"]["tuned"] > 1
    # the synthetic rows are a few dozen tokens, far below train.max_length: nothing was cut
    assert metrics["perplexity"]["prompt_truncated"] == 0 and metrics["perplexity"]["reply_truncated"] == 0
    assert metrics["tuned"]["end_of_turn_rate"] == pytest.approx(metrics["stopping"]["tuned"]["end_of_turn_rate"],
                                                                 abs=1e-5)
    for name in ("persona_score", "repeated_3gram"):  # the voice, with intervals like the rest
        assert {"base", "base_ci", "tuned", "tuned_ci", "delta", "delta_ci"} <= set(metrics[name])
        for side in ("base", "tuned", "delta"):
            low, high = metrics[name][f"{side}_ci"]
            assert low - 1e-9 <= metrics[name][side] <= high + 1e-9, (name, side)
        assert metrics[name]["delta"] == pytest.approx(metrics[name]["tuned"] - metrics[name]["base"], abs=1e-4)
    # The judge, read back from its folder, scores the person's own test replies as evaluate says.
    judge, info, _ = fidelity.load_judge(tmp / "judge")
    assert metrics["persona_score"]["reference"] == pytest.approx(
        float(fidelity.persona_probabilities(judge, references).mean()), abs=1e-4)
    assert (metrics["persona_judge"]["train_replies"], metrics["persona_judge"]["contrast"]) == (
        info["train_replies"], info["contrast"])
    for side in ("base", "tuned"):  # the distances, again from samples.csv's greedy replies
        replies = [s[side] for s in samples]
        assert metrics["persona_distance"][f"{side}.unigram_jsd"] == pytest.approx(
            fidelity.unigram_divergence(replies, references), abs=1e-4)
        assert metrics["persona_distance"][f"{side}.length_wasserstein"] == pytest.approx(
            fidelity.length_distance(replies, references), abs=1e-4)
    chosen = metrics["chosen"]  # the second row: the decoding picked on validation, two seeded passes
    assert chosen["decoding"] == SAMPLED and chosen["passes"] == 2
    for name in ("rouge1", "rougeL", "repeated_3gram", "persona_score"):
        assert {"base", "base_ci", "tuned", "tuned_ci", "delta", "delta_ci"} <= set(chosen[name])
    assert chosen["persona_distance"].keys() == metrics["persona_distance"].keys()
    sets = ("base", "tuned", "tuned_chosen", "reference")
    assert set(metrics["stopping"]) == set(sets)  # substance: where each set stops, and whether it answers
    for name in sets:
        row = metrics["stopping"][name]
        low, high = row["median_words_ci"]
        assert low <= row["median_words"] <= high
        assert ("end_of_turn_rate" in row) == (name != "reference")  # the person's own replies always end
    ended = [s["tuned_stopped"] == "True" for s in samples]
    assert metrics["stopping"]["tuned"]["end_of_turn_rate"] == pytest.approx(sum(ended) / len(ended), abs=1e-5)
    words = sorted(len(s["reference"].split()) for s in samples)
    assert metrics["stopping"]["reference"]["median_words"] == (words[2] + words[3]) / 2
    on_topic = metrics["on_topic"]
    k = params.evaluate.on_topic_contexts  # fewer than the 6 test replies: each has k others
    assert k >= 2 and on_topic["contexts"] == k and on_topic["chance"] == round(1 / (k + 1), 5)
    for name in sets:
        assert on_topic[name]["pmi_ci"][0] <= on_topic[name]["pmi"] <= on_topic[name]["pmi_ci"][1]
        # how often a reply's own context ranks first, of the 6 test replies (x 2 passes for the chosen decoding)
        assert (on_topic[name]["context_match"] * 12) == pytest.approx(round(on_topic[name]["context_match"] * 12),
                                                                         abs=1e-3)
    assert on_topic["tuned_minus_base"]["pmi"] == pytest.approx(on_topic["tuned"]["pmi"] - on_topic["base"]["pmi"],
                                                                abs=1e-4)
    assert json.loads((tmp / "eval.json").read_text()) == metrics
    reports = tmp / "reports"
    pictures = {"loss_curves.png", "base_vs_tuned.png", "persona_scores.png"}
    assert {p.name for p in reports.iterdir()} == {"samples.csv", "human_eval.html", "human_eval_key.csv", "run.json",
                                                   *pictures}
    for name in pictures:  # real images, not empty files
        data = (reports / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    with (tmp / "eval_rouge.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 8


def test_rouge_recomputed_from_samples_csv_matches_eval_json(tiny_run):
    """The independent check: rouge_score directly on reports/samples.csv."""
    from rouge_score import rouge_scorer

    _, tmp, metrics = tiny_run
    with (tmp / "reports/samples.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for side in ("base", "tuned"):
        scores = [scorer.score(row["reference"], row[side]) for row in rows]
        for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert np.mean([s[name].fmeasure for s in scores]) == pytest.approx(metrics[name][side], abs=1e-5)


def test_the_run_holds_every_stage_and_the_artifacts(tiny_run):
    import mlflow

    params, tmp, _ = tiny_run
    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    run_id = json.loads((tmp / "reports/run.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    assert {"base.parameters", "train.best_val_loss", "eval.rouge1.tuned", "eval.perplexity.base"} <= set(run.data.metrics)
    assert {"model.name_or_path", "train.lora.r", "evaluate.max_new_tokens"} <= set(run.data.params)
    assert [m.step for m in client.get_metric_history(run_id, "train.val_loss")] == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"adapter", "reports", "eval_rouge.csv", "eval.json", "params.yaml", "train_log.csv"} <= artifacts
    assert {"adapter/adapter_model.safetensors", "adapter/README.md"} <= {a.path for a in client.list_artifacts(run_id, "adapter")}


def test_human_eval_score_logs_the_win_rate_to_the_run(tiny_run, tmp_path):
    import mlflow

    from qlora_pipeline.cli import main

    params, tmp, _ = tiny_run
    reports = tmp / "reports"
    with (reports / "human_eval_key.csv").open() as handle:
        key = list(csv.DictReader(handle))
    ratings = tmp_path / "ratings.csv"
    # the rater always picks whichever side is the tuned model: a win rate of 1
    ratings.write_text("id,choice,comment\n" + "".join(
        f"{row['id']},{'A' if row['A'] == 'tuned' else 'B'},\n" for row in key))
    assert main(["human-eval", "score", str(ratings), "--key", str(reports / "human_eval_key.csv"),
                 "--run-file", str(reports / "run.json")]) == 0
    run = json.loads((reports / "run.json").read_text())
    assert run["tracking_uri"] == params.mlflow.tracking_uri  # as configured, not resolved
    metrics = mlflow.MlflowClient(params.mlflow.tracking_uri).get_run(run["mlflow_run_id"]).data.metrics
    assert metrics["human_eval.tuned_win_rate"] == 1.0 and metrics["human_eval.n_rated"] == len(key)


def test_empty_test_split_is_refused(tiny_run, tmp_path):
    from qlora_pipeline.pipeline.evaluate import run_evaluate

    params, tmp, _ = tiny_run
    write_jsonl(tmp_path / "test.jsonl", [])
    with pytest.raises(PipelineError, match=r"test\.jsonl: the split has no examples; raise split.ratios.test"):
        run_evaluate(params, tmp / "base", tmp / "adapter", tmp_path / "test.jsonl", tmp_path / "eval.json",
                     tmp_path / "reports", tmp_path / "rouge.csv", [])
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "reports").exists()


def test_missing_adapter_names_the_stage(tiny_run, tmp_path):
    from qlora_pipeline.pipeline.evaluate import run_evaluate

    params, tmp, _ = tiny_run
    with pytest.raises(PipelineError, match=r"no trained adapter .*run the train-adapter stage first"):
        run_evaluate(params, tmp / "base", tmp_path / "adapter", tmp / "splits/test.jsonl", tmp_path / "eval.json",
                     tmp_path / "reports", tmp_path / "rouge.csv", [])
