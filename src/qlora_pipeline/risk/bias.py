"""Counterfactual bias probes: does tuning widen the sentiment gap between groups of an axis?

Every template of ``prompts/bias_templates.yaml`` is sent once per group, so the prompts of one
template differ only in the group. Each reply gets a VADER compound score (-1 .. 1); per axis,
a group's score is its mean over the templates, the **gap** is the highest group mean minus the
lowest, and the **amplification** is the tuned gap minus the base gap (positive = tuning made the
model speak about some group more warmly or coldly than about another, more than the base did).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.intervals import bootstrap_indices
from qlora_pipeline.risk.prompt_files import check_keys, read_yaml_mapping, text_value

# The slots a template may use, each filled from the group entry's key of the same name.
SLOTS = ("group", "people")


@dataclass(frozen=True)
class Probe:
    axis: str
    group: str
    template_id: str
    text: str


# --------------------------------------------------------------------------------------------
# The probe file
# --------------------------------------------------------------------------------------------


def load_probes(path: str | Path, templates_cap: int | None = None, seed: int = 0) -> list[Probe]:
    """Every template rendered for every group of every axis, ordered by axis, template, group.

    The file has ``axes`` (axis name: list of ``{group, people}``, at least two groups) and
    ``templates`` (list of ``{id, text}``, the text with exactly one slot of :data:`SLOTS`).
    ``templates_cap``: a seeded sample of that many templates (in file order), each still sent for
    every group, so every comparison stays within a template.
    """
    from qlora_pipeline.data.sampling import cap_examples

    data = read_yaml_mapping(path, ("axes", "templates"))
    axes = _axes(data["axes"], f"{path}: axes")
    templates = _templates(data["templates"], f"{path}: templates")
    templates = [(t["id"], t["text"]) for t in cap_examples([{"id": i, "text": x} for i, x in templates],
                                                             templates_cap, seed)]
    return [Probe(axis, group["group"], template_id, text.format(**group))
            for axis, groups in axes.items() for template_id, text in templates for group in groups]


def _axes(raw: Any, where: str) -> dict[str, list[dict[str, str]]]:
    if not isinstance(raw, dict) or not raw:
        raise PipelineError(f"{where}: expected a mapping of axis name to its groups")
    return {str(axis): _groups(axis, groups, f"{where}.{axis}") for axis, groups in raw.items()}


def _groups(axis: Any, raw: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(axis, str) or not axis.strip():
        raise PipelineError(f"{where}: an axis needs a name")
    if not isinstance(raw, list) or len(raw) < 2:
        raise PipelineError(f"{where}: an axis needs a list of at least two groups (a gap is between groups), "
                            f"got {raw!r}")
    groups = []
    for index, entry in enumerate(raw):
        check_keys(entry, SLOTS, f"{where}[{index}]")
        groups.append({slot: text_value(entry, slot, f"{where}[{index}]") for slot in SLOTS})
    _check_unique([g["group"] for g in groups], where, "group")
    return groups


def _templates(raw: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise PipelineError(f"{where}: expected a non-empty list of {{id, text}}")
    templates = []
    for index, entry in enumerate(raw):
        check_keys(entry, ("id", "text"), f"{where}[{index}]")
        template_id = text_value(entry, "id", f"{where}[{index}]")
        entry_where = f"{where}[{index}] (id {template_id!r})"
        text = text_value(entry, "text", entry_where)
        _check_slots(text, entry_where)
        templates.append((template_id, text))
    _check_unique([template_id for template_id, _ in templates], where, "id")
    return templates


def _check_slots(text: str, where: str) -> None:
    """Exactly one slot, and one of :data:`SLOTS`; no other braces (they would survive rendering)."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as err:
        raise PipelineError(f"{where}: unbalanced braces in {text!r} ({err})") from None
    unknown = [field for field in fields if field not in SLOTS]
    if unknown:
        raise PipelineError(f"{where}: unknown slot {{{unknown[0]}}} in {text!r}; the slots are "
                            + ", ".join(f"{{{slot}}}" for slot in SLOTS))
    if len(fields) != 1:
        raise PipelineError(f"{where}: {text!r} needs exactly one slot, {{group}} or {{people}}; "
                            f"it has {len(fields)}")


def _check_unique(names: Sequence[str], where: str, key: str) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PipelineError(f"{where}: the {key} {duplicates[0]!r} appears twice; each must be unique")


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _analyzer() -> Any:
    # Loading the lexicon takes a moment; one analyzer serves the whole process.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(texts: Sequence[str]) -> np.ndarray:
    """VADER compound score of each text, in [-1, 1] (0 for an empty reply)."""
    analyzer = _analyzer()
    return np.array([analyzer.polarity_scores(text)["compound"] for text in texts], dtype=float)


def axis_gaps(probes: Sequence[Probe], base_scores: Sequence[float], tuned_scores: Sequence[float],
              bootstrap_samples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Per axis, group means, the gap between groups for base and tuned, and its amplification.

    ``base_scores[i]`` and ``tuned_scores[i]`` score the replies to ``probes[i]``. Every axis must
    have every template for every one of its groups (as :func:`load_probes` gives).

    Intervals resample **templates**, not single replies. The templates are what varies at random
    (we wrote some; we could have written others), while the groups are fixed by design; and the
    replies to one template share its wording, so they are not independent. A resampled template
    keeps its replies for every group together, and the base and tuned sides use the same
    resamples, so the gap and the amplification are compared on the same prompts. All axes share
    the resamples too, which gives ``max_amplification`` an interval.

    Returns:
        ``{"unit": "template", "templates": n, "bootstrap_samples", "confidence",
        "axes": {axis: {"groups": {group: {"base": mean, "tuned": mean}},
                        "base": {"gap", "highest", "lowest", "ci"}, "tuned": {...},
                        "amplification", "amplification_ci"}},
        "max_amplification", "max_amplification_axis", "max_amplification_ci"}``
    """
    base_scores, tuned_scores = np.asarray(base_scores, dtype=float), np.asarray(tuned_scores, dtype=float)
    if not len(probes) == len(base_scores) == len(tuned_scores):
        raise ValueError(f"{len(probes)} probes but {len(base_scores)} base and {len(tuned_scores)} tuned scores")
    grids = _grids(probes, base_scores, tuned_scores)
    template_ids = next(iter(grids.values()))[0]
    indices = bootstrap_indices(len(template_ids), bootstrap_samples, seed)
    axes, resampled = {}, {}
    for axis, (_, groups, base, tuned) in grids.items():
        axes[axis], resampled[axis] = _axis_summary(groups, base, tuned, indices, confidence)
    top = max(axes, key=lambda axis: axes[axis]["amplification"])  # first axis in file order on a tie
    return {
        "unit": "template",
        "templates": len(template_ids),
        "bootstrap_samples": bootstrap_samples,
        "confidence": confidence,
        "axes": axes,
        "max_amplification": axes[top]["amplification"],
        "max_amplification_axis": top,
        "max_amplification_ci": _percentile_interval(np.max(list(resampled.values()), axis=0), confidence),
    }


def _grids(probes: Sequence[Probe], base: np.ndarray,
           tuned: np.ndarray) -> dict[str, tuple[list[str], list[str], np.ndarray, np.ndarray]]:
    """Per axis: template ids, groups, and the (template x group) score tables of base and tuned."""
    cells: dict[str, dict[tuple[str, str], int]] = {}
    for index, probe in enumerate(probes):
        axis_cells = cells.setdefault(probe.axis, {})
        if (probe.template_id, probe.group) in axis_cells:
            raise ValueError(f"two probes for template {probe.template_id!r}, group {probe.group!r} "
                             f"on axis {probe.axis!r}")
        axis_cells[(probe.template_id, probe.group)] = index
    grids = {}
    for axis, axis_cells in cells.items():
        template_ids = list(dict.fromkeys(template_id for template_id, _ in axis_cells))
        groups = list(dict.fromkeys(group for _, group in axis_cells))
        if len(axis_cells) != len(template_ids) * len(groups):
            raise ValueError(f"axis {axis!r}: every template needs a probe for every group")
        order = np.array([[axis_cells[(t, g)] for g in groups] for t in template_ids])
        grids[axis] = (template_ids, groups, base[order], tuned[order])
    if len({tuple(grid[0]) for grid in grids.values()}) != 1:
        raise ValueError("every axis needs the same templates (they are resampled together)")
    return grids


def _axis_summary(groups: list[str], base: np.ndarray, tuned: np.ndarray, indices: np.ndarray,
                  confidence: float) -> tuple[dict[str, Any], np.ndarray]:
    """One axis's figures, and its amplification under each resample (for the maximum's interval)."""
    base_gaps, tuned_gaps = _resampled_gaps(base, indices), _resampled_gaps(tuned, indices)
    base_side, tuned_side = _gap(groups, base), _gap(groups, tuned)
    summary = {
        "groups": {group: {"base": _round(b), "tuned": _round(t)}
                   for group, b, t in zip(groups, base.mean(axis=0), tuned.mean(axis=0))},
        "base": {**base_side, "ci": _percentile_interval(base_gaps, confidence)},
        "tuned": {**tuned_side, "ci": _percentile_interval(tuned_gaps, confidence)},
        "amplification": _round(tuned_side["gap"] - base_side["gap"]),
        "amplification_ci": _percentile_interval(tuned_gaps - base_gaps, confidence),
    }
    return summary, tuned_gaps - base_gaps


def _gap(groups: list[str], table: np.ndarray) -> dict[str, Any]:
    """Highest group mean minus lowest, and which groups those are (the first listed on a tie)."""
    means = table.mean(axis=0)
    return {"gap": _round(means.max() - means.min()), "highest": groups[int(means.argmax())],
            "lowest": groups[int(means.argmin())]}


def _resampled_gaps(table: np.ndarray, indices: np.ndarray) -> np.ndarray:
    means = table[indices].mean(axis=1)  # (resamples, groups): each resample's group means
    return means.max(axis=1) - means.min(axis=1)


def _percentile_interval(values: np.ndarray, confidence: float) -> list[float]:
    """As ``intervals.interval``, for a statistic other than a mean: percentiles of its resamples."""
    tail = (1 - confidence) / 2 * 100
    return [_round(np.percentile(values, tail)), _round(np.percentile(values, 100 - tail))]


def _round(value: float) -> float:
    return round(float(value), 5)
