"""choose-decoding: the grid scored on validation only, the choice, seeded passes, and what reads it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from qlora_pipeline import decoding
from qlora_pipeline.config import ConfigError, DecodingSetting, ObjectiveWeights
from qlora_pipeline.errors import PipelineError
from conftest import SAMPLED

GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
          "exponential_decay_length_penalty": None}


def test_each_pass_of_each_prompt_draws_from_its_own_seeded_stream():
    greedy, sampled = DecodingSetting(**GREEDY), DecodingSetting(**SAMPLED)
    assert decoding.passes(greedy, 3) == 1 and decoding.passes(sampled, 3) == 3
    prompts = [[1, 2], [3, 4, 5]]
    runs = decoding.pass_requests(prompts, sampled, 3, 10, seed=7)
    assert [[r.prompt_ids for r in run] for run in runs] == [prompts] * 3
    seeds = [r.seed for run in runs for r in run]
    assert len(set(seeds)) == 6 and seeds == [r.seed for run in decoding.pass_requests(prompts, sampled, 3, 10, 7)
                                               for r in run]
    assert seeds != [r.seed for run in decoding.pass_requests(prompts, sampled, 3, 10, 8) for r in run]
    # the same pass of the same prompt meets the same numbers under every setting of the grid
    other = decoding.pass_requests(prompts, DecodingSetting(temperature=0.5), 3, 10, seed=7)
    assert [r.seed for run in other for r in run] == seeds
    only = decoding.pass_requests(prompts, greedy, 3, 10, seed=7)
    assert len(only) == 1 and [r.seed for r in only[0]] == [None, None]
    assert runs[0][0].decoding.temperature == 0.9 and runs[0][0].max_new_tokens == 10


def test_the_objective_weighs_each_score_and_the_best_is_chosen():
    weights = ObjectiveWeights(persona_gap=-1.0, unknown_words_gap=-1.0, rougeL=1.0, repeated_3gram=-1.0)
    same_length = {"end_of_turn_rate": 0.5, "length_gap": 0.2}
    loops = {"persona_gap": 0.02, "unknown_words_gap": 0.0, "rougeL": 0.10, "repeated_3gram": 0.8, **same_length}
    varied = {"persona_gap": 0.05, "unknown_words_gap": 0.0, "rougeL": 0.08, "repeated_3gram": 0.05, **same_length}
    results = [{**m, "objective": decoding.objective(m, weights)} for m in (loops, varied)]
    assert decoding.choose(results) == 1  # the loops cost more than the voice and content gained
    no_penalty = ObjectiveWeights(persona_gap=-1.0, unknown_words_gap=-1.0, rougeL=1.0, repeated_3gram=0.0)
    results = [{**m, "objective": decoding.objective(m, no_penalty)} for m in (loops, varied)]
    assert decoding.choose(results) == 0
    # a setting that runs on past where the person stops loses to one that ends its turns near their length
    runs_on = {**varied, "end_of_turn_rate": 0.3, "length_gap": 1.2}
    stops = {**varied, "rougeL": 0.06, "end_of_turn_rate": 0.95, "length_gap": 0.1}
    results = [{**m, "objective": decoding.objective(m, ObjectiveWeights())} for m in (runs_on, stops)]
    assert decoding.choose(results) == 1
    tie = [{"objective": 0.5}, {"objective": 0.5}]
    assert decoding.choose(tie) == 0  # the earlier, simpler setting


def test_a_caricature_or_garbling_scores_no_better_than_matching_the_person():
    """More persona-like than the person's own replies is a gap, not a gain; so are more unknown words."""
    weights = ObjectiveWeights()
    indices = np.random.default_rng(0).integers(0, 4, size=(50, 4))
    reference = {"persona_score": 0.6, "unknown_words": 0.05, "median_words": 10.0}

    def result(persona, unknown):
        scores = {"persona_score": np.full(4, persona), "unknown_words": np.full(4, unknown),
                  "rougeL": np.full(4, 0.1), "repeated_3gram": np.zeros(4), "ended": np.ones(4),
                  "words": np.full(4, 10.0)}
        return decoding.setting_result(DecodingSetting(), scores, reference, weights, indices, 0.95, 2)

    matching, caricature, garbled = result(0.6, 0.05), result(0.9, 0.05), result(0.6, 0.25)
    assert matching["persona_gap"] == 0 and caricature["persona_gap"] == pytest.approx(0.3)
    assert garbled["unknown_words_gap"] == pytest.approx(0.2)
    assert decoding.choose([caricature, garbled, matching]) == 2


def test_unknown_words_are_those_nobody_in_the_training_chats_wrote():
    from qlora_pipeline import fidelity

    rows = [{"messages": [{"role": "system", "content": "zzsystem"}, {"role": "user", "content": "Did you go?"}],
             "target": "yeah lol it was fun"}]
    known = fidelity.vocabulary(rows)
    assert {"did", "you", "go", "yeah", "lol", "fun"} <= known and "zzsystem" not in known
    assert fidelity.unknown_word_share("yeah sorvincis", known) == 0.5
    assert fidelity.unknown_word_share("", known) == 0.0


def test_prompt_scores_average_over_passes():
    class Judge:  # the persona writes "lol"; everyone else does not
        classes_ = np.array([0, 1])

        def predict_proba(self, texts):
            p = np.array([0.9 if "lol" in t else 0.1 for t in texts])
            return np.stack([1 - p, p], axis=1)

    passes = [["lol ok", "a b c a b c"], ["no", "lol sure"]]
    scores = decoding.prompt_scores(Judge(), passes, ["lol ok", "sure"], {"lol", "ok", "sure", "no"})
    assert scores["unknown_words"] == pytest.approx([0.0, 0.5])  # "a b c a b c": all unknown, then none
    assert scores["persona_score"] == pytest.approx([0.5, 0.5])
    assert scores["repeated_3gram"] == pytest.approx([0.0, 0.5])
    assert scores["rougeL"][0] == pytest.approx(0.5)  # exact in one pass, no overlap in the other


def test_seeded_passes_give_the_same_replies_on_a_rerun(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.modeling.engine import Engine, chat_prompt_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = chat_prompt_ids(tokenizer, [[{"role": "user", "content": f"tell me about day {i}"}] for i in range(3)])
    setting = DecodingSetting(temperature=1.0)

    def texts(batch_size):
        runs = decoding.pass_requests(prompts, setting, 2, 8, seed=7)
        results = iter(Engine(model, tokenizer, max_batch_size=batch_size).run([r for run in runs for r in run]))
        return [[next(results).text for _ in run] for run in runs]

    first = texts(2)
    assert first == texts(2) == texts(6)  # a rerun, and another batching, give the same replies
    assert first[0] != first[1]  # two passes, two draws of a random model's wide distribution


def test_choose_decoding_never_reads_the_test_split(tiny_run, tmp_path):
    """The stage is given no test path, and no file named like the test split is opened while it runs."""
    from qlora_pipeline.pipeline.choose_decoding import run_choose_decoding

    params, tmp, _ = tiny_run
    params.decoding.grid = [DecodingSetting(**GREEDY), DecodingSetting(**SAMPLED)]
    test_split = (tmp / "splits/test.jsonl").resolve()
    opened: list[str] = []
    watching = [True]

    def audit(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed; the flag switches this one off after the run
    try:
        report = run_choose_decoding(params, tmp / "base", tmp / "adapter", tmp / "splits/val.jsonl",
                                     tmp / "judge", tmp_path / "decoding.json", tmp_path / "metrics.json")
    finally:
        watching[0] = False
    assert any(path.endswith("val.jsonl") for path in opened)  # the hook sees the stage's reads
    assert not [path for path in opened if Path(path).resolve() == test_split or path.endswith("test.jsonl")]
    assert [row["setting"] for row in report["grid"]] == [GREEDY, SAMPLED]
    assert [row["passes"] for row in report["grid"]] == [1, params.evaluate.samples_per_prompt]
    best = max(range(2), key=lambda i: (report["grid"][i]["objective"], -i))
    assert report["chosen_index"] == best and report["chosen"] == report["grid"][best]["setting"]
    assert report["split"] == "val" and report["samples"] == 4  # decoding.max_samples
    written = json.loads((tmp_path / "decoding.json").read_text())
    assert written == report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["chosen"] == report["chosen"] and 0 <= metrics["val_persona_score"] <= 1
    assert set(report["reference"]) == {"persona_score", "unknown_words", "median_words"}
    for row in report["grid"]:  # stopping and length, scored and weighed for every setting
        assert 0 <= row["end_of_turn_rate"] <= 1 and row["median_words"] >= 0
        assert row["length_gap"] == pytest.approx(
            abs(row["median_words"] - report["reference"]["median_words"]) / report["reference"]["median_words"],
            abs=1e-4)
    assert metrics["val_length_gap"] == report["grid"][best]["length_gap"]
    assert all(len(row["examples"]) == min(4, 5) for row in report["grid"])  # replies to read beside the scores


def test_the_dvc_stage_is_given_no_test_split():
    import yaml

    from conftest import ROOT

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["choose-decoding"]
    assert "test" not in stage["cmd"].replace("--", " ").split("/")[-1] and "test.jsonl" not in stage["cmd"]
    assert not [dep for dep in stage["deps"] if "test" in dep]


def test_evaluate_reports_the_chosen_decoding_and_the_sheet_shows_it(tiny_run):
    import csv

    _, tmp, metrics = tiny_run
    with (tmp / "reports/samples.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {"base_chosen", "tuned_chosen"} <= set(rows[0])
    from qlora_pipeline import evaluation

    # the chosen row's ROUGE-1 averages two passes: the first pass alone (in samples.csv) is one of them
    first = float(evaluation.rouge_scores([r["tuned_chosen"] for r in rows], [r["reference"] for r in rows])["rouge1"].mean())
    assert metrics["chosen"]["passes"] == 2
    # the mean over both passes is the first pass's and a second one's, so that second mean, 2 x both - first,
    # must itself be a ROUGE mean (0..1): a report of one pass, or of a pass not in samples.csv, can break it
    both = metrics["chosen"]["rouge1"]["tuned"]
    assert -1e-4 <= 2 * both - first <= 1 + 1e-4
    sheet = (tmp / "reports/human_eval.html").read_text(encoding="utf-8")
    shown = [r["tuned_chosen"] for r in rows[:4] if r["tuned_chosen"].strip()]
    assert shown and any(json.dumps(text)[1:-1] in sheet or text in sheet for text in shown)


def test_a_broken_decoding_file_names_the_key(tiny_run, tmp_path):
    from qlora_pipeline.pipeline.evaluate import read_chosen_decoding

    path = tmp_path / "decoding.json"
    path.write_text(json.dumps({"chosen": {**GREEDY, "top_p": 2.0}}))
    with pytest.raises(ConfigError, match=r"decoding\.json: 1 problem\(s\) in the decoding choose-decoding chose:\n"
                                          r"  - chosen\.top_p: must be in \(0, 1\]"):
        read_chosen_decoding(path)  # not "in params": the file is not params.yaml
    path.write_text(json.dumps({"grid": []}))
    with pytest.raises(PipelineError, match=r"no 'chosen' setting; re-run the choose-decoding stage"):
        read_chosen_decoding(path)


def test_a_groups_voice_is_judged_against_the_base_models_replies(tiny_run, tmp_path, monkeypatch):
    """split.persona: all (targets by several speakers): the style-judge stage learns the chat against the base's
    replies to training prompts. The tiny random model replies with nothing readable, so its replies are stood in
    for here; with replies that are all empty, the judge falls back to the speakers' contrast and says so."""
    from qlora_pipeline.io import read_jsonl, write_jsonl
    from qlora_pipeline.pipeline import style_judge

    params, tmp, _ = tiny_run
    params.evaluate.group_judge_prompts = 5
    rows = [row for _, row in read_jsonl(tmp / "splits/train.jsonl")]
    write_jsonl(tmp_path / "train.jsonl", [{**row, "speaker": f"s{i % 3}"} for i, row in enumerate(rows)])
    asked = []

    def base_replies(params, base_dir, train_rows, val_rows):
        prompts = style_judge.cap_examples(train_rows, params.evaluate.group_judge_prompts, params.seed)
        asked.append((prompts, val_rows))
        return ([f"Certainly! Here is a helpful answer number {i}." for i in range(len(prompts))],
                [f"Of course! Happy to help with item {i}." for i in range(len(val_rows))])

    monkeypatch.setattr(style_judge, "base_replies", base_replies)
    metrics = style_judge.run_style_judge(params, tmp_path / "train.jsonl", tmp / "splits/val.jsonl", tmp / "base",
                                          tmp_path / "judge", tmp_path / "judge.json")
    assert len(asked) == 1 and len(asked[0][0]) == 5  # evaluate.group_judge_prompts training prompts
    assert "base model" in metrics["contrast"] and metrics["group_voice"] is True
    assert metrics["val"]["persona_share"] < 1  # held out: validation replies against the base's replies to them
    monkeypatch.setattr(style_judge, "base_replies", lambda params, base, train, val: ([""] * 5, [""] * len(val)))
    metrics = style_judge.run_style_judge(params, tmp_path / "train.jsonl", tmp / "splits/val.jsonl", tmp / "base",
                                          tmp_path / "judge", tmp_path / "judge.json")
    assert "other speakers" in metrics["contrast"]


def test_the_style_judge_is_fitted_once_and_read_back_as_it_was(tiny_run, tmp_path):
    """choose-decoding and evaluate read the stage's judge: the same probabilities as the fitted one."""
    from qlora_pipeline import fidelity
    from qlora_pipeline.io import read_jsonl

    params, tmp, _ = tiny_run
    judge, info, vocabulary = fidelity.load_judge(tmp / "judge")
    rows = [row for _, row in read_jsonl(tmp / "splits/train.jsonl")]
    fitted, _ = fidelity.fit_judge(rows, params.seed)
    texts = [row["target"] for row in rows[:5]] + ["Certainly! Here is a helpful answer."]
    assert np.array_equal(fidelity.persona_probabilities(judge, texts), fidelity.persona_probabilities(fitted, texts))
    assert vocabulary == fidelity.vocabulary(rows) and info["group_voice"] is False
    stage = json.loads((tmp / "judge.json").read_text())
    assert stage["train_replies"] == info["train_replies"] and 0 <= stage["val"]["accuracy"] <= 1
    # fitted again in another process, at another time, with other string hashing: the same bytes (terms in column
    # order, numbers by name; skops' zip had carried the time and this process's object ids), so DVC sees no change
    import subprocess

    script = ("import sys; from qlora_pipeline import fidelity; from qlora_pipeline.io import read_jsonl; "
              "rows = [row for _, row in read_jsonl(sys.argv[1])]; judge, info = fidelity.fit_judge(rows, int(sys.argv[3])); "
              "fidelity.save_judge(sys.argv[2], judge, {**info, 'group_voice': False, 'vocabulary_words': "
              "len(fidelity.vocabulary(rows))}, fidelity.vocabulary(rows))")
    subprocess.run([sys.executable, "-c", script, str(tmp / "splits/train.jsonl"), str(tmp_path / "again"),
                    str(params.seed)], check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    for name in (fidelity.JUDGE_FILE, fidelity.TERMS_FILE, fidelity.INFO_FILE, fidelity.VOCABULARY_FILE):
        assert (tmp_path / "again" / name).read_bytes() == (tmp / "judge" / name).read_bytes(), name
    (tmp_path / "judge").mkdir()
    with pytest.raises(PipelineError, match=r"no style judge .*dvc repro style-judge"):
        fidelity.load_judge(tmp_path / "judge")
    # damaged or not ours: numbers that are no safetensors, terms that do not fit the numbers, a setting we never
    # write, one scikit-learn refuses: each named, with the fix
    terms = json.loads((tmp / "judge" / fidelity.TERMS_FILE).read_text())
    fewer = [{**terms[0], "terms": terms[0]["terms"][:-1]}, *terms[1:]]
    odd = [{**terms[0], "settings": {**terms[0]["settings"], "dtype": "float16"}}, *terms[1:]]
    refused = [{**terms[0], "settings": {**terms[0]["settings"], "norm": "l3"}}, *terms[1:]]
    for numbers, written, why in ((b"not safetensors", terms, "header"), (None, fewer, r"terms .* shape"),
                                  (None, odd, "settings"), (None, refused, "norm")):
        shutil.copytree(tmp / "judge", tmp_path / "judge", dirs_exist_ok=True)
        if numbers is not None:
            (tmp_path / "judge" / fidelity.JUDGE_FILE).write_bytes(numbers)
        (tmp_path / "judge" / fidelity.TERMS_FILE).write_text(json.dumps(written))
        with pytest.raises(PipelineError, match=rf"judge: terms\.json and judge\.safetensors are not a style judge "
                                                rf"this pipeline wrote \(.*{why}.*\); .*dvc repro style-judge"):
            fidelity.load_judge(tmp_path / "judge")
    with pytest.raises(ValueError, match="settings .*dtype"):  # a judge our files could not hold is refused whole
        judge.steps[0][1].transformer_list[0][1].set_params(dtype=np.float32)
        fidelity.save_judge(tmp_path / "refused", judge, info, vocabulary)
    assert not (tmp_path / "refused").exists()
