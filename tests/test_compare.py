"""qlora-pipeline compare: the PEFT-vs-full report, built from runs in a throwaway MLflow store.

Runs are logged the way the pipeline logs them (tracking.log_params / log_metrics), with start
times set by hand so "newest" does not hang on the clock.
"""

from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from qlora_pipeline import compare, tracking
from qlora_pipeline.cli import main
from qlora_pipeline.errors import PipelineError

from conftest import place_store

EXPERIMENT = "compare-test"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TRAIN = {  # metrics/train.json's shape, per method
    "qlora": {"trainable_parameters": 4_884_480, "total_parameters": 139_399_488, "peak_memory_mb": 2000.0,
              "wall_seconds": 100.0, "tokens_per_second": 500.0, "output_mb": 18.7, "zero_shot_val_loss": 4.3,
              "best_val_loss": 3.75, "steps": 80, "hardware": {"cpu_model": "AMD EPYC", "cpu_capability": "AVX512",
                                                              "gpu": None}},
    "lora": {"trainable_parameters": 4_884_480, "total_parameters": 139_399_488, "peak_memory_mb": 3000.0,
             "wall_seconds": 80.0, "tokens_per_second": 600.0, "output_mb": 18.7, "zero_shot_val_loss": 4.3,
             "best_val_loss": 3.70, "steps": 80, "hardware": {"cpu_model": "AMD EPYC", "cpu_capability": "AVX512",
                                                             "gpu": None}},
    "full": {"trainable_parameters": 134_515_008, "total_parameters": 134_515_008, "peak_memory_mb": 8000.0,
             "wall_seconds": 200.0, "tokens_per_second": 250.0, "output_mb": 540.0, "zero_shot_val_loss": 4.3,
             "best_val_loss": 3.60, "steps": 80, "hardware": {"cpu_model": "AMD EPYC", "cpu_capability": "AVX512",
                                                             "gpu": None}},
}
PERPLEXITY = {"qlora": (38.73, 32.79, 45.12), "lora": (37.10, 31.50, 43.00), "full": (30.25, 26.00, 31.00)}


def eval_metrics(perplexity: tuple[float, float, float]) -> dict:
    """metrics/eval.json's shape: scores with their intervals (chosen decoding left out)."""
    tuned, low, high = perplexity
    return {"confidence_level": 0.95,
            "perplexity": {"base": 69.8, "base_ci": [58.9, 82.1], "tuned": tuned, "tuned_ci": [low, high]},
            "rougeL": {"base": 0.088, "base_ci": [0.075, 0.101], "tuned": 0.0720, "tuned_ci": [0.0579, 0.0868]},
            "persona_score": {"base": 0.318, "base_ci": [0.264, 0.372], "tuned": 0.612, "tuned_ci": [0.575, 0.648],
                              "reference": 0.70}}


@pytest.fixture
def store(tmp_path, empty_store):
    return place_store(empty_store, tmp_path)


@pytest.fixture
def log_run(store):
    """Log one pipeline execution; returns its run id. ``started`` orders runs (ms since the epoch)."""
    client = MlflowClient(store)
    experiment_id = client.create_experiment(EXPERIMENT)
    mlflow.set_tracking_uri(store)

    def log(method, started, exp_name=None, train=None, evaluation=None, status="FINISHED", params=None):
        run = client.create_run(experiment_id, start_time=started,
                                tags={"dvc.exp_name": exp_name or f"compare-{method}-20261127T0300"})
        with mlflow.start_run(run_id=run.info.run_id):
            tracking.log_params("train", {"method": method, "learning_rate": 2e-4 if method != "full" else 2e-5,
                                          "max_steps": 80})
            tracking.log_params("split", {"max_examples": {"train": 2000}})
            tracking.log_params("seed", 42)
            for section, values in (params or {}).items():
                tracking.log_params(section, values)
            tracking.log_metrics("train", TRAIN[method] if train is None else train)
            tracking.log_metrics("eval", eval_metrics(PERPLEXITY[method]) if evaluation is None else evaluation)
        client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    yield log
    mlflow.set_tracking_uri(None)


def build(store, tmp_path, **kwargs) -> str:
    markdown, figure = compare.build_report(store, EXPERIMENT, tmp_path / "out", **kwargs)
    assert figure.read_bytes().startswith(PNG_SIGNATURE)
    return markdown.read_text(encoding="utf-8")


def row(markdown: str, label: str) -> list[str]:
    """The cells (qlora, lora, full) of the table row ``label``."""
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def summary(markdown: str) -> str:
    return markdown.split("## What the numbers show", 1)[1]


def test_one_column_per_method_with_its_numbers_and_intervals(store, log_run, tmp_path):
    ids = {method: log_run(method, started=1_000 + i) for i, method in enumerate(compare.REQUIRED)}
    markdown = build(store, tmp_path)
    assert "| | qlora | lora | full |" in markdown
    assert row(markdown, "test perplexity (tuned)") == ["38.73 [32.79, 45.12]", "37.10 [31.50, 43.00]",
                                                        "30.25 [26.00, 31.00]"]
    assert row(markdown, "learning rate") == ["0.0002", "0.0002", "2e-05"]
    assert row(markdown, "trainable parameters (% of total)") == ["4,884,480 (3.50%)", "4,884,480 (3.50%)",
                                                                  "134,515,008 (100.00%)"]
    assert row(markdown, "adapter / model on disk (MB)") == ["18.7", "18.7", "540.0"]
    assert row(markdown, "peak memory (MB)") == ["2,000", "3,000", "8,000"]
    assert row(markdown, "wall time (s)") == ["100.0", "80.0", "200.0"]
    assert row(markdown, "best validation loss") == ["3.7500", "3.7000", "3.6000"]
    assert row(markdown, "ROUGE-L (tuned)")[2] == "0.0720 [0.0579, 0.0868]"
    assert row(markdown, "persona score (tuned)")[0] == "0.612 [0.575, 0.648]"
    assert row(markdown, "persona score (persona's own replies)") == ["0.700"] * 3
    assert row(markdown, "training steps") == ["80"] * 3
    assert row(markdown, "CPU") == ["AMD EPYC, AVX512"] * 3
    assert row(markdown, "interval level") == ["95%"] * 3
    assert row(markdown, "MLflow run") == [f"`{ids[m]}`" for m in compare.REQUIRED]
    assert "Missing" not in markdown


def test_a_metric_not_logged_shows_a_dash_and_an_absent_optional_row_is_left_out(store, log_run, tmp_path):
    train = {k: v for k, v in TRAIN["lora"].items() if k not in ("output_mb", "steps")}
    log_run("lora", started=1_000, train=train)
    markdown = build(store, tmp_path)
    assert row(markdown, "adapter / model on disk (MB)") == ["–", "–", "–"]
    assert row(markdown, "GPU") == ["–", "–", "–"]  # gpu: null is no tag
    # no count logged (a cached split stage logs nothing): the cap the run had, marked as one
    assert row(markdown, "training examples") == ["–", "≤ 2,000", "–"]
    assert row(markdown, "training steps") == ["–", "≤ 80", "–"]
    assert "chosen decoding" not in markdown
    assert "Missing: qlora, full: no finished run whose DVC experiment name starts with `compare-`" in markdown


def test_an_interval_not_logged_shows_the_value_alone(store, log_run, tmp_path):
    evaluation = eval_metrics(PERPLEXITY["qlora"])
    del evaluation["perplexity"]["tuned_ci"]
    log_run("qlora", started=1_000, evaluation=evaluation)
    assert row(build(store, tmp_path), "test perplexity (tuned)") == ["38.73", "–", "–"]
    log_run("full", started=2_000)
    assert ("full has the lowest test perplexity, 30.25 [26.00, 31.00]: it is lower than qlora's 38.73, but without "
            "both intervals the gap cannot be judged.") in summary(build(store, tmp_path))


def test_the_chosen_decoding_row_appears_when_logged(store, log_run, tmp_path):
    evaluation = eval_metrics(PERPLEXITY["full"])
    evaluation["chosen"] = {"persona_score": {"base": 0.30, "base_ci": [0.25, 0.35], "tuned": 0.655,
                                              "tuned_ci": [0.61, 0.70]}}
    log_run("full", started=1_000, evaluation=evaluation)
    markdown = build(store, tmp_path)
    assert row(markdown, "persona score (tuned, chosen decoding)") == ["–", "–", "0.655 [0.610, 0.700]"]


def test_the_newest_matching_run_wins(store, log_run, tmp_path):
    log_run("full", started=1_000, evaluation=eval_metrics((99.0, 90.0, 110.0)))
    newest = log_run("full", started=3_000)
    log_run("full", started=2_000, evaluation=eval_metrics((77.0, 70.0, 85.0)))
    markdown = build(store, tmp_path)
    assert row(markdown, "test perplexity (tuned)")[2] == "30.25 [26.00, 31.00]"
    assert row(markdown, "MLflow run")[2] == f"`{newest}`"


def test_other_prefixes_unfinished_and_incomplete_runs_are_ignored(store, log_run, tmp_path):
    chosen = log_run("qlora", started=1_000)
    log_run("qlora", started=2_000, exp_name="sweep-qlora-1", evaluation=eval_metrics((11.0, 10.0, 12.0)))
    log_run("qlora", started=3_000, status="RUNNING", evaluation=eval_metrics((12.0, 11.0, 13.0)))
    log_run("qlora", started=4_000, status="FAILED", evaluation=eval_metrics((13.0, 12.0, 14.0)))
    log_run("qlora", started=5_000, evaluation={})  # evaluate never logged to this run
    markdown = build(store, tmp_path)
    assert row(markdown, "MLflow run")[0] == f"`{chosen}`"
    assert row(markdown, "test perplexity (tuned)")[0] == "38.73 [32.79, 45.12]"
    # --prefix picks the other experiment's run
    assert row(build(store, tmp_path, prefix="sweep-"), "test perplexity (tuned)")[0] == "11.00 [10.00, 12.00]"


def test_runs_given_by_id_are_used_as_they_are(store, log_run, tmp_path):
    older = log_run("lora", started=1_000, exp_name="by-hand")
    newer = log_run("lora", started=2_000)
    markdown = build(store, tmp_path, run_ids=[older])
    assert row(markdown, "MLflow run")[1] == f"`{older}`"
    assert "the runs given with `--runs`" in markdown
    with pytest.raises(PipelineError, match=f"--runs: run {older} is given 2 times"):  # was "both lora"
        compare.build_report(store, EXPERIMENT, tmp_path / "out", run_ids=[older, older])
    with pytest.raises(PipelineError, match=f"{older} and {newer} are both lora"):
        compare.build_report(store, EXPERIMENT, tmp_path / "out", run_ids=[older, newer])
    with pytest.raises(PipelineError, match="no MLflow run 0123"):
        compare.build_report(store, EXPERIMENT, tmp_path / "out", run_ids=["0123"])


def test_the_quality_sentence_names_the_lowest_perplexity_and_judges_the_overlap(store, log_run, tmp_path):
    for i, method in enumerate(compare.REQUIRED):
        log_run(method, started=1_000 + i)
    text = summary(build(store, tmp_path))
    # full 30.25 [26, 31]; lora's interval [31.5, 43] and qlora's [32.79, 45.12] lie above it
    assert ("Of the methods run, full has the lowest test perplexity, 30.25 [26.00, 31.00]: its interval lies "
            "wholly below qlora's and lora's (a clear difference).") in text

    log_run("qlora", started=5_000, evaluation=eval_metrics((29.0, 25.0, 33.0)))
    text = summary(build(store, tmp_path))
    assert ("Of the methods run, qlora has the lowest test perplexity, 29.00 [25.00, 33.00]: its interval overlaps "
            "lora's and full's (no clear difference).") in text


def test_the_cost_sentence_sets_each_peft_method_against_full(store, log_run, tmp_path):
    for i, method in enumerate(compare.REQUIRED):
        log_run(method, started=1_000 + i)
    text = summary(build(store, tmp_path))
    # 4,884,480 / 134,515,008 = 3.63%; 2000 / 8000 MB; 100 / 200 s; lora: 3000 / 8000, 80 / 200
    assert ("Against full fine-tuning, qlora trains 3.63% as many parameters, needs 0.25× the peak memory and takes "
            "0.5× the wall time; lora trains 3.63% as many parameters, needs 0.38× the peak memory and takes 0.4× "
            "the wall time.") in text


def test_without_a_full_run_the_report_says_so(store, log_run, tmp_path):
    log_run("qlora", started=1_000)
    text = summary(build(store, tmp_path))
    assert "Only qlora logged a test perplexity (38.73 [32.79, 45.12])" in text
    assert "There is no full fine-tuning run to set PEFT's cost against" in text


def test_no_matching_run_is_a_clear_error(store, log_run, tmp_path):
    log_run("qlora", started=1_000, exp_name="workspace")
    with pytest.raises(PipelineError, match=r"starts with 'compare-'.*run `make compare` first"):
        compare.build_report(store, EXPERIMENT, tmp_path / "out")
    with pytest.raises(PipelineError, match="no MLflow experiment 'nope'"):
        compare.build_report(store, "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(PipelineError, match=r"--out .*taken: a file is there, not a folder"):
        compare.build_report(store, EXPERIMENT, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "mine"


def test_cli_writes_the_report(store, log_run, tmp_path, base_params_dict, capsys):
    log_run("full", started=1_000)
    raw = copy.deepcopy(base_params_dict)
    raw["mlflow"].update(tracking_uri=store, experiment_name=EXPERIMENT)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out = tmp_path / "reports"
    assert main(["compare", "--params", str(params_file), "--out", str(out)]) == 0
    assert row((out / "compare.md").read_text(encoding="utf-8"), "test perplexity (tuned)")[2] == "30.25 [26.00, 31.00]"
    assert (out / "compare.png").read_bytes().startswith(PNG_SIGNATURE)
    assert main(["compare", "--params", str(params_file), "--out", str(out), "--prefix", "none-"]) == 1
    assert "run `make compare` first" in capsys.readouterr().err


def test_no_stage_imports_the_report():
    """compare reads MLflow, which DVC does not track: a stage importing it would re-run on every report edit."""
    from test_dvc_contract import STAGES, _closure

    import re

    for name, stage in STAGES.items():
        script = re.search(r"python (stages/\S+\.py)", stage["cmd"]).group(1)
        assert "src/qlora_pipeline/compare.py" not in _closure(script), f"{name} imports compare"


def test_make_compare_queues_equal_budgets_that_differ_only_in_method_and_learning_rate():
    from qlora_pipeline.compare_queue import queue_commands
    from qlora_pipeline.config import CompareConfig

    cfg = CompareConfig(methods=["qlora", "full"], learning_rate={"qlora": 2e-4, "full": 2e-5}, name_prefix="cmp-")
    (qname, qlora), (fname, full) = queue_commands(cfg, "T1")
    assert (qname, fname) == ("cmp-qlora-T1", "cmp-full-T1")
    assert qlora[:4] == ["dvc", "exp", "run", "--queue"]
    # every method retrains (none restored from the run cache), nothing upstream of training repeats
    assert qlora[-3:] == full[-3:] == ["--force", "--downstream", "train-adapter"]
    set_params = [full[i + 1] for i, arg in enumerate(full) if arg == "--set-param"]
    assert set_params == ["train.method=full", "train.objective=sft", "train.learning_rate=2e-05"]
    differing = {a for a, b in zip(qlora, full) if a != b}
    assert differing == {"cmp-qlora-T1", "train.method=qlora", "train.learning_rate=0.0002"}


def test_a_preference_tuned_run_is_its_own_column_with_what_preference_tuning_is_judged_by(store, log_run, tmp_path):
    for i, method in enumerate(compare.REQUIRED):
        log_run(method, started=1_000 + i)
    markdown = build(store, tmp_path)
    assert "| | qlora | lora | full |" in markdown and "on-topic" not in markdown  # no dpo run: no column, no rows
    substance = {"stopping": {"tuned_chosen": {"end_of_turn_rate": 0.95, "end_of_turn_rate_ci": [0.9, 1.0],
                                               "median_words": 13.0, "median_words_ci": [12.0, 15.0]},
                              "reference": {"median_words": 14.0, "median_words_ci": [11.5, 16.0]}},
                 "on_topic": {"tuned_chosen": {"pmi": 7.5, "pmi_ci": [5.8, 9.1], "context_match": 0.66,
                                               "context_match_ci": [0.55, 0.77]}}}
    dpo = log_run("qlora", started=5_000, exp_name="compare-qlora-dpo-20261204T0400",
                  train={**TRAIN["qlora"], "preference": {"pairs": 120, "final_reward_accuracy": 0.75}},
                  evaluation={**eval_metrics((36.0, 31.0, 42.0)), **substance}, params={"train": {"objective": "dpo"}})
    markdown = build(store, tmp_path)
    assert "| | qlora | lora | full | qlora-dpo |" in markdown
    assert row(markdown, "test perplexity (tuned)")[0] == "38.73 [32.79, 45.12]"  # qlora stays the SFT-only run
    assert row(markdown, "test perplexity (tuned)")[3] == "36.00 [31.00, 42.00]"
    assert row(markdown, "ends its turn (tuned, chosen decoding)") == ["–", "–", "–", "0.95 [0.90, 1.00]"]
    assert row(markdown, "median words (persona's own replies)")[3] == "14.0 [11.5, 16.0]"
    assert row(markdown, "on-topic PMI, nats (tuned, chosen decoding)")[3] == "7.50 [5.80, 9.10]"
    assert row(markdown, "preference pairs (DPO)") == ["–", "–", "–", "120"]
    assert row(markdown, "DPO reward accuracy, last step")[3] == "0.75"
    assert row(markdown, "MLflow run")[3] == f"`{dpo}`"
    assert "qlora-dpo trains" in summary(markdown)  # a PEFT method in the cost sentence too


def test_the_queued_experiments_bring_what_trainings_side_stages_made():
    """--downstream train-adapter checks out only training's own inputs in the experiment's copy: the style
    judge and the zero-shot replies, which choose-decoding, evaluate and risk read, are copied in."""
    import yaml

    from qlora_pipeline.compare_queue import queue_commands, side_outputs
    from qlora_pipeline.config import CompareConfig

    pipeline = yaml.safe_load((Path(__file__).resolve().parent.parent / "dvc.yaml").read_text())
    assert side_outputs(pipeline) == ["metrics/judge.json", "metrics/zero_shot.json", "models/judge",
                                      "reports/zero_shot"]
    (_, command), = queue_commands(CompareConfig(methods=["qlora-dpo"], learning_rate={"qlora-dpo": 2e-4}), "T1",
                                   pipeline)
    copied = [command[i + 1] for i, arg in enumerate(command) if arg == "--copy-paths"]
    assert copied == side_outputs(pipeline)
    assert "train.method=qlora" in command and "train.objective=dpo" in command


def test_the_report_names_the_store_as_configured_not_by_this_machines_path(store, log_run, tmp_path):
    log_run("qlora", 1_000)
    markdown = build(store, tmp_path, store_label="the repository's SQLite store (mlflow.db)")
    assert "the repository's SQLite store (mlflow.db)" in markdown and str(tmp_path) not in markdown


def test_a_run_given_twice_is_named_so_not_as_two_runs_of_one_method():
    from qlora_pipeline import compare
    from qlora_pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="--runs: run abc is given 2 times; give each run once"):
        compare.given_runs(None, ["abc", "def", "abc"])  # before any store is asked


def test_a_param_edited_to_no_number_shows_a_dash_and_an_out_that_cannot_be_made_is_named(store, log_run, tmp_path):
    """'abc' as a learning rate was a ValueError's traceback after compare.png was written beside an old compare.md;
    an --out below a file was NotADirectoryError's, after the runs had been read."""
    ids = {method: log_run(method, started=1_000 + i) for i, method in enumerate(compare.REQUIRED)}
    with sqlite3.connect(store.removeprefix("sqlite:///")) as db:  # MLflow keeps a param's value: edit the store
        db.execute("UPDATE params SET value = 'abc' WHERE key = 'train.learning_rate' AND run_uuid = ?",
                   (ids["qlora"],))
    db.close()
    assert row(build(store, tmp_path), "learning rate") == [compare.DASH, "0.0002", "2e-05"]
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(PipelineError, match=r"--out .*a-file/sub: compare\.md and compare\.png cannot be written "
                                            r"there \(.*\); give a folder you can write to"):
        compare.build_report(store, EXPERIMENT, tmp_path / "a-file" / "sub")
    assert (tmp_path / "a-file").read_text() == "mine"
