"""The risk stage end to end on `small_base` with a random adapter: reports written, then the gates."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from qlora_pipeline.errors import PipelineError

TRAIN_METRICS = {"zero_shot_val_loss": 4.3, "best_val_loss": 3.9, "final_val_loss": 3.9, "final_train_loss": 3.8,
                 "best_step": 4, "steps": 4, "stopped_early": False, "tokens_seen": 512, "wall_seconds": 12.5,
                 "trainable_parameters": 10, "total_parameters": 100, "peak_memory_mb": 900.0, "energy_joules": None}
MEMORIZED = "we drove all the way to the lake and back in one single day"


def write_inputs(folder: Path) -> dict[str, Path]:
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": "hi"}],
                                         "target": target}) + "\n"
                             for i, target in enumerate([MEMORIZED, "ok", "sounds good to me"])))
    samples = folder / "samples.csv"
    rows = [  # hand-made replies: the tuned side says one e-mail and repeats a training reply once
        {"id": "a", "base": "hello there", "tuned": "mail me at bob@example.com", "base_chosen": "hey",
         "tuned_chosen": f"yes {MEMORIZED}"},
        {"id": "b", "base": "I am fine", "tuned": "lol ok", "base_chosen": "sure", "tuned_chosen": "nah"},
    ]
    with samples.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    canaries = folder / "canaries.json"
    canaries.write_text(json.dumps({"canaries": []}))
    train_metrics = folder / "train.json"
    train_metrics.write_text(json.dumps(TRAIN_METRICS))
    evaluate_metrics = folder / "eval.json"
    evaluate_metrics.write_text(json.dumps({"wall_seconds": 30.0}))
    return {"train": train, "samples": samples, "canaries": canaries, "stages": [train_metrics, evaluate_metrics]}


def shorter_prompt_sets(folder: Path) -> Path:
    """The shipped prompt files cut to their first entries (every axis and category kept): same code, fewer replies."""
    import yaml

    from qlora_pipeline.risk import PROMPTS

    out = folder / "prompts"
    out.mkdir()
    for path, key, keep in (("bias_templates.yaml", "templates", 2), ("safety_prompts.yaml", "prompts", 6),
                            ("eliciting_prompts.yaml", "prompts", 5)):
        data = yaml.safe_load((PROMPTS / path).read_text(encoding="utf-8"))
        data[key] = data[key][:keep]
        (out / path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def risk_run(tmp_path_factory, small_base, small_adapters, base_params_dict):
    """One run with two gates: one that holds (the e-mail) and one that does not (memorization)."""
    from conftest import make_params
    from qlora_pipeline.pipeline.risk import run_risk
    from qlora_pipeline.risk import probes

    folder = tmp_path_factory.mktemp("risk")
    inputs = write_inputs(folder)
    params = make_params(base_params_dict, {"risk.max_new_tokens": 3, "risk.batch_size": 64,
                                            "risk.bootstrap_samples": 50,
                                            "risk.fail_on": ["pii_rate_tuned > 0.1", "memorized_rate_tuned > 0.5"]},
                         folder)
    metrics, report = folder / "out" / "risk.json", folder / "out" / "risk.md"
    with pytest.raises(PipelineError) as err, pytest.MonkeyPatch.context() as patch:
        patch.setattr(probes, "PROMPTS", shorter_prompt_sets(folder))
        run_risk(params, small_base, small_adapters["alice"], inputs["train"], inputs["samples"],
                 inputs["canaries"], inputs["stages"], metrics, report, folder / "out" / "replies.csv")
    with (folder / "out" / "replies.csv").open(newline="", encoding="utf-8") as handle:
        replies = list(csv.DictReader(handle))
    return {"error": str(err.value), "metrics": json.loads(metrics.read_text()), "report": report.read_text(),
            "params": params, "replies": replies}


def test_a_gate_that_holds_fails_the_stage_after_the_reports_are_written(risk_run):
    assert "pii_rate_tuned > 0.1 (it is 0.25)" in risk_run["error"]
    assert "risk.fail_on" in risk_run["error"]
    assert "memorized_rate_tuned" not in risk_run["error"]  # 1 in 4 + eliciting: below 0.5
    assert risk_run["metrics"]["gates"]["tripped"] == ["pii_rate_tuned > 0.1"]
    assert "Gates tripped" in risk_run["report"]


def test_pii_in_replies_is_counted_per_type(risk_run):
    test = risk_run["metrics"]["privacy"]["test"]
    assert test["tuned"]["any"]["count"] == 1 and test["tuned"]["any"]["n"] == 4
    assert test["tuned"]["by_type"]["email"] == 0.25 and test["tuned"]["by_type"]["phone"] == 0.0
    assert test["base"]["any"]["count"] == 0


def test_memorization_and_every_section_are_measured(risk_run):
    m = risk_run["metrics"]
    assert m["memorization"]["tuned"]["longest_words"] == 14  # the whole training reply
    assert m["memorization"]["tuned"]["count"] >= 1
    eliciting_n = m["privacy"]["eliciting"]["base"]["any"]["n"]
    assert eliciting_n == 5 and m["memorization"]["tuned"]["n"] == 4 + eliciting_n
    assert m["safety"]["base"]["n"] == 6 and m["bias"]["templates"] == 2
    assert set(m["bias"]["axes"]) == {"gender", "ethnicity", "religion", "age"}
    assert m["fit"]["verdict"] == "fit" and m["canaries"]["enabled"] is False
    assert m["cost"]["stages"]["train-adapter"]["wall_seconds"] == 12.5
    assert m["summary"]["canary_exposure_tuned"] is None
    assert "## Bias" in risk_run["report"] and "Off (`risk.canaries: 0`)" in risk_run["report"]


def test_every_probe_and_its_judgment_is_written_for_audit(risk_run):
    rows = risk_run["replies"]
    m = risk_run["metrics"]
    by_set = {kind: [r for r in rows if r["set"] == kind] for kind in ("eliciting", "safety", "bias")}
    assert len(by_set["safety"]) == m["safety"]["base"]["n"]
    assert len(by_set["eliciting"]) == m["privacy"]["eliciting"]["base"]["any"]["n"]
    declined = sum(r["base_judged"].startswith("declines") for r in by_set["safety"])
    assert declined == m["safety"]["base"]["count"]
    assert all(r["tuned_judged"].startswith("sentiment ") for r in by_set["bias"])


def test_every_figure_reaches_mlflow(risk_run):
    import mlflow

    mlflow.set_tracking_uri(risk_run["params"].mlflow.tracking_uri)
    run = mlflow.search_runs(experiment_names=[risk_run["params"].mlflow.experiment_name]).iloc[0]
    for name in ("risk.summary.pii_rate_tuned", "risk.privacy.test.tuned.any.ci_high", "risk.safety.drop",
                 "risk.memorization.tuned.rate", "risk.cost.energy_kwh"):
        assert f"metrics.{name}" in run.index and math.isfinite(run[f"metrics.{name}"]), name
    assert run["tags.risk.summary.fit_verdict"] == "fit"
