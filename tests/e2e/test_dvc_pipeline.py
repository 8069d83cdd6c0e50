"""The real pipeline under DVC, on a tiny params override: repro, no-op repro, what makes which stage stale, MLflow.

Queued grids: test_mlflow_server.py (QLoRA and full fine-tuning side by side) and test_data_dependency.py
(queued experiments read the workspace's edits and log into the repository's own store).

Runs in a throwaway git + DVC copy of the repository, with a small chat log and a tiny random
Llama, so every stage runs for real in seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import (BASELINE_RUN, BIN, copy_baseline, dvc_paths, set_params, sh, sqlite_runs, stale_stages,
                      stage_status)

pytestmark = pytest.mark.slow


def restore_committed(repo: Path) -> None:
    """Put params.yaml, dvc.lock and the outputs back as committed, for the next test: the metrics files
    (`cache: false`: git keeps them) by git, the rest from DVC's cache.

    When a test runs alone, dvc.lock is not committed yet: only params.yaml is restored then.
    """
    tracked = sh(["git", "ls-files", "params.yaml", "dvc.lock", "metrics"], repo).split()
    sh(["git", "checkout", "--", *tracked], repo)
    if "dvc.lock" in tracked:
        sh(["dvc", "checkout", "--force"], repo)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_baseline) -> Path:
    """A copy of the session's baseline run (conftest's tiny_baseline: `dvc repro`, then committed)."""
    return copy_baseline(tiny_baseline, tmp_path_factory.mktemp("e2e") / "repo")


def test_repro_runs_every_stage_into_one_mlflow_run(repo, tiny_baseline):
    out = tiny_baseline.repro_output  # the baseline's `dvc repro`, whose results this copy holds
    stages = ("fetch", "clean", "split", "quantize-load", "train-adapter", "style-judge", "choose-decoding", "zero-shot",
              "evaluate", "risk")
    for stage in stages:
        assert f"Running stage '{stage}'" in out
    assert out.index("Running stage 'evaluate'") < out.index("Running stage 'risk'")
    assert (repo / "reports/risk.md").read_text().startswith("# What this run risks")
    table = sqlite_runs(repo)
    assert len(table) == 1
    run = table.iloc[0]
    for metric in ("fetch.conversations", "clean.messages_out", "split.train.examples", "base.parameters",
                   "train.best_val_loss", "decoding.val_persona_score", "eval.rouge1.tuned", "eval.perplexity.tuned",
                   "eval.chosen.persona_score.tuned", "eval.chosen.repeated_3gram.tuned_ci_high",
                   "risk.summary.pii_rate_tuned", "risk.summary.refusal_drop", "risk.bias.max_amplification",
                   "risk.memorization.tuned.rate", "risk.cost.energy_kwh"):
        assert f"metrics.{metric}" in table.columns, metric
        assert_logged_as_written(repo, run, metric)
    assert run["tags.dvc.exp_name"] == "workspace" and len(run["tags.git.commit"]) == 40
    assert run["params.train.lora.r"] == "16" and run["tags.params.hash"]
    chosen = json.loads((repo / "reports/decoding.json").read_text())["chosen"]
    assert run["params.decoding.chosen.repetition_penalty"] == str(chosen["repetition_penalty"])
    evaluated = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluated["chosen"]["decoding"] == chosen
    # substance: the base's and the person's on-topic scores came from zero-shot, the tuned sets' from evaluate
    zero_shot = [json.loads(line) for line in (repo / "reports/zero_shot/test.jsonl").read_text().splitlines()]
    assert {name for name in zero_shot[0]["on_topic"] if name != "contexts"} == {"base", "reference"}
    assert evaluated["on_topic"]["base"]["pmi"] == pytest.approx(
        sum(r["on_topic"]["base"]["pmi"] for r in zero_shot) / len(zero_shot), abs=1e-4)
    assert {"base", "tuned", "tuned_chosen", "reference"} <= set(evaluated["on_topic"]) <= set(evaluated["stopping"]) | {
        "contexts", "chance", "tuned_minus_base"}
    for metric in ("eval.on_topic.tuned_chosen.pmi", "eval.stopping.tuned_chosen.end_of_turn_rate",
                   "eval.stopping.reference.median_words_ci_high"):
        assert_logged_as_written(repo, run, metric)
    shown = sh(["dvc", "metrics", "show", "--json"], repo)
    assert "val_persona_score" in shown and "persona_score" in shown
    assert "refusal_rate_tuned" in shown and "memorized_rate_tuned" in shown
    steps = BASELINE_RUN["train.max_steps"]
    assert f"Training: {steps} steps" in sh([str(BIN / "python"), "-m", "qlora_pipeline.cli", "summary"], repo)

    assert "Data and pipelines are up to date" in sh(["dvc", "repro"], repo)
    assert sh(["git", "status", "--porcelain"], repo) == ""  # the results are committed: nothing left over


# Where each stage's metrics are written; fetch's counts live in its manifest.
METRICS_FILES = {"fetch": "data/raw/manifest.json", "clean": "metrics/clean.json", "split": "metrics/split.json",
                 "base": "metrics/base.json", "train": "metrics/train.json", "decoding": "metrics/decoding.json",
                 "eval": "metrics/eval.json", "risk": "metrics/risk.json"}


def assert_logged_as_written(repo: Path, run, metric: str) -> None:
    """The MLflow value is a finite number, and the one the stage wrote at that key of its file."""
    import math

    logged = run[f"metrics.{metric}"]
    assert math.isfinite(logged), metric
    prefix, *keys = metric.split(".")
    node = json.loads((repo / METRICS_FILES[prefix]).read_text())
    for key in keys:
        if not isinstance(node, dict) or key not in node:  # logged under a flattened name of its own
            return
        node = node[key]
    assert logged == pytest.approx(float(node), rel=1e-6, abs=1e-9), metric


def test_editing_chat_serve_or_export_code_reruns_no_stage(repo):
    """The serving package and the CLI are no stage's dependency: editing them leaves every result valid."""
    edited = [*sorted((repo / "src/qlora_pipeline/serving").glob("*.py")), repo / "src/qlora_pipeline/cli.py"]
    assert len(edited) >= 5  # models, engine, prompts, chat, server, export
    for path in edited:
        path.write_text(path.read_text() + "\n# an edit that changes nothing a stage computes\n")
    try:
        assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)
        # the control: an edit to code evaluate runs does make it stale
        generation = repo / "src/qlora_pipeline/modeling/engine.py"
        generation.write_text(generation.read_text() + "\n# edited\n")
        status = sh(["dvc", "status"], repo)
        assert "evaluate:" in status and "train-adapter:" not in status and "quantize-load:" in status
    finally:
        sh(["git", "checkout", "--", "src"], repo)
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)


def test_editing_code_that_shapes_outputs_makes_exactly_its_stages_stale(repo):
    """Which train rows are canaries (data/canary_ids.py) shapes split, style-judge, evaluate and risk; how decoding
    params become generation (modeling/engine.py's row_decoding) shapes every stage that generates."""
    edits = {"src/qlora_pipeline/data/canary_ids.py": {"split", "style-judge", "evaluate", "risk"},
             "src/qlora_pipeline/modeling/engine.py": {"quantize-load", "style-judge", "choose-decoding", "zero-shot",
                                                       "evaluate", "risk"}}
    for path, stages in edits.items():
        target = repo / path
        target.write_text(target.read_text() + "\n# an edit\n")
        try:
            status = sh(["dvc", "status"], repo)
            assert stale_stages(status) == stages, (path, status)
        finally:
            sh(["git", "checkout", "--", "src"], repo)
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)


def test_generation_params_make_the_generating_stages_stale_and_nothing_before_them(repo):
    """A generation key makes every stage that generates or judges replies of that length stale, and nothing
    before them. What such an experiment makes (a new MLflow run with the key's new value, risk's own keys in its
    report) is test_data_dependency.py's README command, which sets the same keys."""
    set_params(repo, {"evaluate.max_new_tokens": 3})
    status = sh(["dvc", "status"], repo)
    # choose-decoding makes its choice at the same reply length; style-judge and zero-shot score and generate at it
    stale = stale_stages(status)
    assert stale == {"style-judge", "choose-decoding", "zero-shot", "evaluate"}, status
    for stage in stale:
        # evaluate's param is the whole section, the others' the key
        assert re.search(r"modified:\s+evaluate(\.max_new_tokens)?$", stage_status(status, stage), re.M), status
    # and risk runs after them: it reads what they write again (`dvc status` names a stage whose own deps changed)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    written = {out for name in stale for key in ("outs", "metrics") for out in dvc_paths(stages[name].get(key))}
    read = {dep for dep in stages["risk"]["deps"] if any(dep == out or dep.startswith(f"{out}/") for out in written)}
    assert {"reports/evaluate/samples.csv", "metrics/eval.json", "metrics/decoding.json"} <= read, read
    restore_committed(repo)
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)


def test_changing_risk_params_makes_risk_alone_stale(repo):
    """risk is the last stage: what `dvc status` finds stale is what a run re-runs (the keys' effect on risk's
    output is test_data_dependency.py's README command, which sets them)."""
    set_params(repo, {"risk.memorization_min_words": 6, "risk.power_watts": 30})
    status = sh(["dvc", "status"], repo)
    assert stale_stages(status) == {"risk"}, status
    restore_committed(repo)
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)


def test_split_params_make_split_stale_and_nothing_before_it(repo):
    """Canaries and context turns are split's params (as DVC sees them): split is stale, not fetch, clean or the
    base. What they do to the data, and that every stage after split re-runs on it, is test_mlflow_server.py's
    first test, whose run sets both."""
    set_params(repo, {"risk.canaries": 1, "risk.canary_repeats": 3, "split.context_turns": 2})
    status = sh(["dvc", "status"], repo)
    stale = stale_stages(status)
    assert "split" in stale and not stale & {"fetch", "clean", "quantize-load"}, status
    for key in ("risk.canaries", "risk.canary_repeats", "split"):  # split's own section holds context_turns
        assert re.search(rf"modified:\s+{re.escape(key)}$", stage_status(status, "split"), re.M), status
    restore_committed(repo)
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)
