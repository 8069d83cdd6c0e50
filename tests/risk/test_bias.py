"""Bias probes: the shipped templates render for every group; gaps and amplification on known scores."""

from __future__ import annotations

import pytest
import yaml

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.risk import PROMPTS
from qlora_pipeline.risk.bias import Probe, axis_gaps, load_probes, sentiment

SHIPPED = PROMPTS / "bias_templates.yaml"


def _probes(table: dict[str, dict[str, list[float]]]) -> tuple[list[Probe], list[float]]:
    """Probes and scores from ``{axis: {group: [score per template]}}`` (templates t0, t1, ...)."""
    probes, scores = [], []
    for axis, groups in table.items():
        for group, values in groups.items():
            for index, value in enumerate(values):
                probes.append(Probe(axis, group, f"t{index}", f"{group} {index}"))
                scores.append(value)
    return probes, scores


# Axis "shifted": tuning adds 0.3 to g1 on every template and leaves g2 alone, so the gap grows
# from 0.2 to 0.5 under every resample. Axis "steady": tuning adds 0.1 to every group, so the
# gap is unchanged however the templates are resampled.
BASE = {"shifted": {"g1": [0.2, 0.4, 0.0], "g2": [0.0, 0.2, -0.2]},
        "steady": {"h1": [0.5, -0.5, 0.1], "h2": [0.0, 0.3, -0.4], "h3": [0.2, 0.2, 0.2]}}
TUNED = {"shifted": {"g1": [0.5, 0.7, 0.3], "g2": [0.0, 0.2, -0.2]},
         "steady": {g: [v + 0.1 for v in values] for g, values in BASE["steady"].items()}}


@pytest.fixture(scope="module")
def gaps() -> dict:
    probes, base = _probes(BASE)
    same_probes, tuned = _probes(TUNED)
    assert probes == same_probes
    return axis_gaps(probes, base, tuned, bootstrap_samples=500, confidence=0.9, seed=3)


def test_group_means_and_gaps_are_exact(gaps):
    shifted = gaps["axes"]["shifted"]
    assert shifted["groups"] == {"g1": {"base": 0.2, "tuned": 0.5}, "g2": {"base": 0.0, "tuned": 0.0}}
    assert shifted["base"]["gap"] == pytest.approx(0.2)
    assert (shifted["base"]["highest"], shifted["base"]["lowest"]) == ("g1", "g2")
    assert shifted["tuned"]["gap"] == pytest.approx(0.5)
    assert shifted["amplification"] == pytest.approx(0.3)
    # g1 - g2 is 0.2 (base) and 0.5 (tuned) on every template: no resample can change the gaps.
    assert shifted["amplification_ci"] == pytest.approx([0.3, 0.3])
    assert shifted["base"]["ci"] == pytest.approx([0.2, 0.2])


def test_an_axis_that_tuning_shifts_evenly_has_no_amplification(gaps):
    steady = gaps["axes"]["steady"]
    # group means: h1 (0.5 - 0.5 + 0.1) / 3, h2 -0.1 / 3, h3 0.2
    assert steady["groups"]["h1"]["base"] == pytest.approx(0.03333)
    assert steady["groups"]["h2"]["base"] == pytest.approx(-0.03333)
    assert steady["groups"]["h3"]["tuned"] == pytest.approx(0.3)
    assert steady["base"]["gap"] == pytest.approx(0.23333)
    assert (steady["base"]["highest"], steady["base"]["lowest"]) == ("h3", "h2")
    assert steady["tuned"]["gap"] == pytest.approx(0.23333)
    assert steady["amplification"] == pytest.approx(0.0)
    low, high = steady["amplification_ci"]
    assert low <= 0.0 <= high
    assert steady["base"]["ci"][1] > steady["base"]["ci"][0]  # the templates disagree: a real spread


def test_max_amplification_names_the_axis(gaps):
    assert gaps["max_amplification"] == pytest.approx(0.3)
    assert gaps["max_amplification_axis"] == "shifted"
    assert gaps["max_amplification_ci"] == pytest.approx([0.3, 0.3])
    assert (gaps["unit"], gaps["templates"], gaps["bootstrap_samples"]) == ("template", 3, 500)


def test_one_template_leaves_nothing_to_resample():
    # Resampling templates, not replies: with one template every resample is the data itself.
    probes, base = _probes({"a": {"x": [0.4], "y": [-0.2]}})
    out = axis_gaps(probes, base, [0.1, 0.0], bootstrap_samples=200, confidence=0.95, seed=0)["axes"]["a"]
    assert out["base"]["ci"] == pytest.approx([0.6, 0.6])
    assert out["amplification"] == pytest.approx(-0.5)
    assert out["amplification_ci"] == pytest.approx([-0.5, -0.5])


def test_the_same_seed_gives_the_same_intervals():
    probes, base = _probes(BASE)
    _, tuned = _probes({"shifted": BASE["shifted"], "steady": {"h1": [0.9, 0.0, 0.1], "h2": [0.0, 0.3, -0.4],
                                                               "h3": [0.2, 0.2, 0.2]}})
    first = axis_gaps(probes, base, tuned, 300, 0.95, seed=7)
    assert axis_gaps(probes, base, tuned, 300, 0.95, seed=7) == first


def test_a_missing_cell_is_refused():
    probes, base = _probes(BASE)
    with pytest.raises(ValueError, match="every template needs a probe for every group"):
        axis_gaps(probes[1:], base[1:], base[1:], 10, 0.95, 0)
    with pytest.raises(ValueError, match="probes but"):
        axis_gaps(probes, base, base[1:], 10, 0.95, 0)


def test_sentiment_sign():
    scores = sentiment(["I love them, they're wonderful and kind!", "They are awful, I hate them.",
                        "they live on the second floor"])
    assert scores[0] > 0.5
    assert scores[1] < -0.5
    assert scores[2] == 0.0


# --------------------------------------------------------------------------------------------
# The shipped file
# --------------------------------------------------------------------------------------------


def test_shipped_probes_cover_four_axes_and_render_every_group():
    raw = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    probes = load_probes(SHIPPED)
    templates = {p.template_id for p in probes}
    assert len(templates) >= 24
    assert set(raw["axes"]) == {"gender", "ethnicity", "religion", "age"}
    assert all(len(groups) >= 3 for groups in raw["axes"].values())
    groups = sum(len(g) for g in raw["axes"].values())
    assert len(probes) == len(templates) * groups
    assert not [p.text for p in probes if "{" in p.text or "}" in p.text]
    for axis in raw["axes"]:  # the slot changed the text: one distinct prompt per group
        for template_id in templates:
            texts = [p.text for p in probes if p.axis == axis and p.template_id == template_id]
            assert len(set(texts)) == len(raw["axes"][axis])


def test_shipped_header_cites_the_term_source():
    header = SHIPPED.read_text(encoding="utf-8").split("axes:")[0]
    assert "HolisticBias" in header and "Smith et al., 2022" in header
    assert "written for this project" in header


# --------------------------------------------------------------------------------------------
# Load errors name the file and the entry
# --------------------------------------------------------------------------------------------

VALID = {
    "axes": {"age": [{"group": "young", "people": "young people"}, {"group": "elderly", "people": "elderly people"}]},
    "templates": [{"id": "neighbour", "text": "my neighbour is {group}"},
                  {"id": "like", "text": "what are {people} like?"}],
}


def _write(tmp_path, **changes) -> str:
    doc = yaml.safe_load(yaml.safe_dump(VALID))
    doc.update(changes)
    path = tmp_path / "probes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return str(path)


def test_a_valid_file_loads(tmp_path):
    probes = load_probes(_write(tmp_path))
    assert [p.text for p in probes] == ["my neighbour is young", "my neighbour is elderly",
                                        "what are young people like?", "what are elderly people like?"]
    assert probes[0] == Probe("age", "young", "neighbour", "my neighbour is young")


@pytest.mark.parametrize("changes, expected", [
    ({"templates": [{"id": "plain", "text": "what do you think?"}]},
     r"templates\[0\] \(id 'plain'\): .* needs exactly one slot"),
    ({"templates": [{"id": "two", "text": "{group} or {people}?"}]},
     r"templates\[0\] \(id 'two'\): .* exactly one slot"),
    ({"templates": [{"id": "odd", "text": "is {grp} nice?"}]}, r"templates\[0\] \(id 'odd'\): unknown slot \{grp\}"),
    ({"templates": [{"id": "brace", "text": "is {group nice?"}]}, r"templates\[0\] \(id 'brace'\): unbalanced braces"),
    ({"templates": [{"id": "x", "txt": "my neighbour is {group}"}]}, r"templates\[0\]: unknown key 'txt'"),
    ({"templates": [{"id": "x", "text": "a {group}"}, {"id": "x", "text": "b {group}"}]}, r"the id 'x' appears twice"),
    ({"axes": {"age": []}}, r"axes\.age: an axis needs a list of at least two groups"),
    ({"axes": {"age": [{"group": "young", "people": "young people"}, {"group": "old"}]}},
     r"axes\.age\[1\]: missing key 'people'"),
    ({"axes": {"age": [{"group": "young", "people": ""}, {"group": "old", "people": "old people"}]}},
     r"axes\.age\[0\]: 'people' must be non-empty text"),
    ({"groups": {}}, r"unknown key 'groups'"),
])
def test_malformed_files_name_the_file_and_entry(tmp_path, changes, expected):
    path = _write(tmp_path, **changes)
    with pytest.raises(PipelineError, match=expected) as err:
        load_probes(path)
    assert str(err.value).startswith(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(PipelineError, match="nowhere.yaml: file not found"):
        load_probes(tmp_path / "nowhere.yaml")
