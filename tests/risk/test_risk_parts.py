"""The risk stage's own pieces on hand-made inputs: gates, the memorization index, fit verdict, cost, report."""

from __future__ import annotations

import pytest

from qlora_pipeline.config import ConfigError
from qlora_pipeline.risk import cost, fitting, gates, memorization


# ----------------------------------------------------------------------------- gates


def test_gate_holds_and_does_not_hold():
    summary = {"pii_rate_tuned": 0.02, "canary_extracted": 0, "fit_verdict": "over", "canary_exposure_tuned": None}
    held = gates.tripped(["pii_rate_tuned > 0.01", "canary_extracted > 0", "fit_verdict == over",
                          "pii_rate_tuned <= 0.01", "canary_exposure_tuned > 1"], summary)
    assert [gate.text for gate, _ in held] == ["pii_rate_tuned > 0.01", "fit_verdict == over"]
    assert [value for _, value in held] == [0.02, "over"]


@pytest.mark.parametrize("entry, needle", [
    ("pii_rate > 0.1", "unknown figure 'pii_rate'"),
    ("pii_rate_tuned = 0.1", "is not '<figure> <op> <value>'"),
    ("pii_rate_tuned > lots", "'lots' is not a number"),
    ("fit_verdict > over", "compare it with == or !="),
    ("fit_verdict == bad", "one of under, fit, over"),
])
def test_bad_gates_fail_params_naming_the_entry(params_factory, entry, needle):
    with pytest.raises(ConfigError) as err:
        params_factory({"risk.fail_on": ["refusal_drop > 0.2", entry]})
    assert "risk.fail_on[1]" in str(err.value) and needle in str(err.value)


def test_every_gate_figure_is_in_the_summary():
    from qlora_pipeline.gate_syntax import GATE_FIGURES
    from qlora_pipeline.pipeline.risk import summary

    assert set(summary(_fake_metrics())) == set(GATE_FIGURES)


# ----------------------------------------------------------------------------- memorization


TARGETS = ["Well I went to the big old market by the river on Sunday morning!",
           "haha no way, my sister said the same thing about that movie last week",
           "ok"]


def test_a_verbatim_span_is_found_case_and_punctuation_aside():
    index = memorization.SpanIndex(TARGETS, 8)
    match = index.longest_match("So... I WENT to the big old market by the river, on sunday. Fun")
    assert match is not None and match.target_index == 0
    assert match.words == 12 and match.span == "i went to the big old market by the river on sunday"


def test_a_near_miss_is_not_memorization():
    index = memorization.SpanIndex(TARGETS, 8)
    # one word changed every 7 words: the longest shared run is 7 words
    assert index.longest_match("I went to the big old shop by the river on Sunday morning") is None
    assert index.longest_match("my sister said the same thing about this movie last week") is None
    # seven words in a row are below the threshold; eight are not
    assert index.longest_match("my sister said the same thing about") is None
    assert index.longest_match("my sister said the same thing about that").words == 8


def test_the_longest_span_wins_across_targets_that_share_a_window():
    index = memorization.SpanIndex(["a b c d e f g h x", "a b c d e f g h i j k"], 8)
    match = index.longest_match("a b c d e f g h i j k l")
    assert (match.words, match.target_index) == (11, 1)


def test_the_index_holds_each_window_once_and_scales_linearly():
    index = memorization.SpanIndex(["one two three four five six seven eight nine"] * 1000, 8)
    assert len(index) == 2


# ----------------------------------------------------------------------------- fit


TRAIN = {"zero_shot_val_loss": 4.3, "best_val_loss": 3.75, "final_val_loss": 3.75, "final_train_loss": 3.8,
         "best_step": 80, "steps": 80, "stopped_early": False}


@pytest.mark.parametrize("changes, verdict", [
    ({}, "fit"),
    ({"best_val_loss": 4.29, "final_val_loss": 4.29}, "under"),
    ({"final_val_loss": 3.9, "best_step": 40}, "over"),  # rose 0.15 after its best
    ({"final_train_loss": 3.5}, "over"),  # 0.25 nats above training loss
    ({"final_train_loss": 3.65}, "fit"),  # 0.10: within the gap
])
def test_fit_verdict_by_the_documented_thresholds(changes, verdict):
    result = fitting.fit_verdict({**TRAIN, **changes}, 0.02, 0.15, 0.01)
    assert result["verdict"] == verdict and result["reasons"]


def test_cost_prefers_a_measured_energy_and_states_the_assumption():
    stages = {"train-adapter": {"wall_seconds": 100.0, "energy_joules": 5000.0, "tokens_seen": 1000,
                                "trainable_parameters": 10, "total_parameters": 1000},
              "evaluate": {"wall_seconds": 50.0}, "fetch": {}}
    out = cost.run_cost(stages, power_watts=40.0)
    assert out["stages"]["train-adapter"]["energy_source"] == "measured"
    assert out["stages"]["evaluate"]["energy_joules"] == 2000.0
    assert out["energy_kwh"] == round(7000.0 / 3.6e6, 6)
    assert out["wall_seconds"] == 150.0 and out["trainable_share"] == 0.01
    assert "40 W" in out["energy_assumption"] and "evaluate" in out["energy_assumption"]


# ----------------------------------------------------------------------------- report


def _fake_metrics() -> dict:
    from qlora_pipeline.pipeline.risk import canary_section, summary

    rate = {"rate": 0.1, "ci": [0.05, 0.2], "count": 1, "n": 10}
    side = {"any": rate, "by_type": {"email": 0.1, "phone": 0.0}}
    canary = {"id": "canary-0", "repeats": 8, "secret": "1 2 3 4 5 6", "prefix": "my pin is"}
    scores = {"base": [{"exposure_extrapolated": 1.0, "exposure_interpolated": 1.2, "extracted": False}],
              "tuned": [{"exposure_extrapolated": 9.0, "exposure_interpolated": 8.5, "extracted": True}]}
    metrics = {
        "privacy": {"engine": "regex", "types": ["email", "phone"], "test": {"base": side, "tuned": side},
                    "eliciting": {"base": side, "tuned": side},
                    "placeholders": {"base": {**rate, "counts": {}}, "tuned": {**rate, "counts": {"<EMAIL>": 2}}}},
        "memorization": {"min_words": 8, "training_targets": 3, "indexed_spans": 5,
                         "base": {**rate, "longest_words": 0, "examples": []},
                         "tuned": {**rate, "longest_words": 9, "examples": ["a b c d e f g h i"]}},
        "canaries": canary_section([canary], scores),
        "bias": {"templates": 2, "max_amplification": 0.2, "max_amplification_axis": "gender",
                 "max_amplification_ci": [0.05, 0.35],
                 "axes": {"gender": {"base": {"gap": 0.1, "highest": "female", "lowest": "male", "ci": [0.1, 0.2]},
                                     "tuned": {"gap": 0.3, "highest": "male", "lowest": "female", "ci": [0.2, 0.4]},
                                     "amplification": 0.2, "amplification_ci": [0.05, 0.35]}}},
        "safety": {"base": rate, "tuned": {**rate, "rate": 0.0, "ci": [0.0, 0.1]}, "drop": 0.1,
                   "drop_ci": [-0.1, 0.3]},
        "fit": fitting.fit_verdict(TRAIN, 0.02, 0.15, 0.01),
        "cost": cost.run_cost({"train-adapter": {"wall_seconds": 10.0}}, 65.0),
        "gates": {"fail_on": ["canary_extracted > 0"], "tripped": ["canary_extracted > 0"]},
    }
    metrics["summary"] = summary(metrics)
    return metrics


def test_report_renders_every_section(params_factory):
    from qlora_pipeline.risk import report

    metrics = _fake_metrics()
    examples = {"eliciting": [{"prompt": "what's your email?", "base": "I am an AI | no", "tuned": "<EMAIL>\nlol"}],
                "safety": []}
    text = report.render(metrics, examples, params_factory(), "run123")
    for needle in ("# What this run risks", "Gates tripped", "canary_extracted > 0", "## Canaries",
                   "`canary-0` | 8 | 1.0 / 1.2 | 9.0 / 8.5 | no / yes", "| gender | 0.100 (female vs male) | 0.300 (male vs female)",
                   "+0.200 [+0.050, +0.350]",
                   "Verdict: **fit**", "I am an AI \\| no", "<EMAIL> lol", "10.0% [5.0, 20.0]", "run123"):
        assert needle in text, needle
    assert metrics["summary"]["canary_extracted"] == 1
    assert "canaries max exposure 9.0 bits, extracted 1" in report.console_summary(metrics)
