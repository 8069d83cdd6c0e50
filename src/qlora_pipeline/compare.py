"""``qlora-pipeline compare``: PEFT (QLoRA, LoRA) against full fine-tuning, from the MLflow runs.

The equal-budget experiments (same examples, steps and seed; ``train.method`` qlora | lora | full,
each with its own learning rate) run as DVC experiments named with a common prefix (``make compare``).
Each is one MLflow run (``tracking.pipeline_run``). This picks one run per method and writes

    <out>/compare.md    one column per method: budget, cost, quality with intervals, two sentences
    <out>/compare.png   cost and quality panels, one bar or point per method

    qlora-pipeline compare [--params params.yaml] [--out reports] [--prefix compare-] [--runs RUN_ID ...]

Not a DVC stage and imported by none: the report reads MLflow, which DVC does not track. The
command, and the experiments ``--run`` queues first, are ``qlora_pipeline.compare_queue``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.templating import render

# A method is train.method, or qlora-dpo: qlora with train.objective dpo (SFT, then preference tuning).
METHODS = ("qlora", "lora", "full", "qlora-dpo")
REQUIRED = ("qlora", "lora", "full")  # always a column (named missing when absent); the others when they ran
PEFT_METHODS = ("qlora", "lora", "qlora-dpo")
PREFERENCE_SUFFIX = "-dpo"
MARKDOWN = "compare.md"
FIGURE = "compare.png"
DASH = "–"  # a metric the run did not log
COLORS = {"qlora": "tab:blue", "lora": "tab:orange", "full": "tab:gray", "qlora-dpo": "tab:green"}


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """What the report needs of one MLflow run, as MLflow logged it (params are text)."""

    method: str
    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    def metric(self, key: str) -> Optional[float]:
        return self.metrics.get(key)

    def interval(self, key: str) -> Optional[tuple[float, float]]:
        """``key``'s interval, logged by evaluate as ``<key>_ci_low`` / ``<key>_ci_high``."""
        low, high = self.metrics.get(f"{key}_ci_low"), self.metrics.get(f"{key}_ci_high")
        return None if low is None or high is None else (low, high)

    def param(self, key: str) -> Optional[str]:
        value = self.params.get(key)
        return None if value in (None, "null") else value


Runs = dict[str, Optional[MethodRun]]  # every method of METHODS, None where no run was found


# --------------------------------------------------------------------------------------------
# Finding the runs
# --------------------------------------------------------------------------------------------


def find_runs(client: Any, experiment_id: str, prefix: str) -> Runs:
    """Per method, the newest FINISHED run of the prefix's experiments that logged train and eval metrics."""
    found: Runs = {}
    for method in METHODS:
        # The prefix is matched here rather than with LIKE: '_' and '%' in it would be wildcards.
        query = f"attributes.status = 'FINISHED' and params.`train.method` = '{method.removesuffix(PREFERENCE_SUFFIX)}'"
        run = next((r for r in _search(client, experiment_id, query)
                    if _is_comparable(r, prefix) and method_of(r.data.params) == method), None)
        found[method] = None if run is None else _method_run(run)
    return found


def method_of(params: dict[str, str]) -> str:
    """The compared method a run's params make: train.method, with -dpo after preference tuning."""
    method = params.get("train.method", "")
    return method + PREFERENCE_SUFFIX if params.get("train.objective") == "dpo" else method


def shown(runs: Runs) -> list[str]:
    """The table's columns: the required methods, and any other that ran."""
    return [m for m in METHODS if m in REQUIRED or runs.get(m) is not None]


def _search(client: Any, experiment_id: str, query: str) -> Iterator[Any]:
    """Runs matching ``query``, newest first, page by page."""
    token = None
    while True:
        page = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _is_comparable(run: Any, prefix: str) -> bool:
    """Of the comparison, and both train-adapter and evaluate logged to it (DVC may have skipped a cached stage)."""
    keys = run.data.metrics.keys()
    return (run.data.tags.get("dvc.exp_name", "").startswith(prefix)
            and any(k.startswith("train.") for k in keys) and any(k.startswith("eval.") for k in keys))


def given_runs(client: Any, run_ids: list[str]) -> Runs:
    """Exactly these runs, one per method, whatever their status or prefix."""
    from mlflow.exceptions import MlflowException

    found: Runs = dict.fromkeys(METHODS)
    for run_id in run_ids:
        if run_ids.count(run_id) > 1:  # else named as two runs of one method
            raise PipelineError(f"--runs: run {run_id} is given {run_ids.count(run_id)} times; give each run once, "
                                "one per method")
        try:
            run = _method_run(client.get_run(run_id))
        except MlflowException:
            raise PipelineError(f"--runs: no MLflow run {run_id} in this store; "
                                "`qlora-pipeline runs` lists them") from None
        if run.method not in found:
            raise PipelineError(f"--runs: run {run_id} has train.method {run.method or 'not logged'}; "
                                f"give runs of {', '.join(METHODS)}")
        if found[run.method] is not None:
            raise PipelineError(f"--runs: {found[run.method].run_id} and {run_id} are both {run.method}; "
                                "give one run per method")
        found[run.method] = run
    return found


def _method_run(run: Any) -> MethodRun:
    return MethodRun(method=method_of(run.data.params), run_id=run.info.run_id,
                     params=dict(run.data.params), metrics=dict(run.data.metrics), tags=dict(run.data.tags))


# --------------------------------------------------------------------------------------------
# Table cells: text for one run, DASH where the run lacks the value
# --------------------------------------------------------------------------------------------


def _number(value: Optional[float], spec: str) -> str:
    return DASH if value is None else format(value, spec)


def _with_interval(run: MethodRun, key: str, spec: str) -> str:
    value, interval = run.metric(key), run.interval(key)
    if value is None or interval is None:
        return _number(value, spec)
    return f"{value:{spec}} [{interval[0]:{spec}}, {interval[1]:{spec}}]"


def _count_or_cap(run: MethodRun, metric: str, cap_param: str) -> str:
    """The count the run logged; else the param that capped it, as "≤ N" (a stage DVC found cached logs nothing)."""
    count = run.metric(metric)
    if count is not None:
        return f"{count:,.0f}"
    cap = _param_number(run, cap_param)
    return DASH if cap is None else f"≤ {int(cap):,}"


def _trainable(run: MethodRun) -> str:
    trainable, total = run.metric("train.trainable_parameters"), run.metric("train.total_parameters")
    if trainable is None:
        return DASH
    share = f" ({100 * trainable / total:.2f}%)" if total else ""
    return f"{trainable:,.0f}{share}"


def _learning_rate(run: MethodRun) -> str:
    rate = _param_number(run, "train.learning_rate")
    return DASH if rate is None else f"{rate:g}"


def _param_number(run: MethodRun, name: str) -> float | None:
    """A param read as a finite number; None where it is absent or no such number (a run's params edited in the
    store were a ValueError's traceback, after the figure had been written)."""
    try:
        value = float(run.param(name))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _cpu(run: MethodRun) -> str:
    parts = [run.tags.get(f"train.hardware.{key}") for key in ("cpu_model", "cpu_capability")]
    return ", ".join(p for p in parts if p) or DASH


def _level(run: MethodRun) -> str:
    level = run.metric("eval.confidence_level")
    return DASH if level is None else f"{100 * level:g}%"


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    cell: Callable[[MethodRun], str]
    # Left out of the table when no run has it (e.g. the chosen decoding, which older runs lack).
    optional: bool = False


def _metric(key: str, spec: str) -> Callable[[MethodRun], str]:
    return lambda run: _number(run.metric(key), spec)


def _interval(key: str, spec: str) -> Callable[[MethodRun], str]:
    return lambda run: _with_interval(run, key, spec)


ROWS = (
    Row("learning rate", _learning_rate),
    Row("training steps", lambda run: _count_or_cap(run, "train.steps", "train.max_steps")),
    Row("training examples", lambda run: _count_or_cap(run, "split.train.examples", "split.max_examples.train")),
    Row("seed", lambda run: run.param("seed") or DASH),
    Row("trainable parameters (% of total)", _trainable),
    Row("adapter / model on disk (MB)", _metric("train.output_mb", ",.1f")),
    Row("peak memory (MB)", _metric("train.peak_memory_mb", ",.0f")),
    Row("tokens/s", _metric("train.tokens_per_second", ",.1f")),
    Row("wall time (s)", _metric("train.wall_seconds", ",.1f")),
    Row("zero-shot validation loss", _metric("train.zero_shot_val_loss", ".4f")),
    Row("best validation loss", _metric("train.best_val_loss", ".4f")),
    Row("test perplexity (tuned)", _interval("eval.perplexity.tuned", ".2f")),
    Row("ROUGE-L (tuned)", _interval("eval.rougeL.tuned", ".4f")),
    Row("persona score (tuned)", _interval("eval.persona_score.tuned", ".3f")),
    Row("persona score (tuned, chosen decoding)", _interval("eval.chosen.persona_score.tuned", ".3f"), optional=True),
    Row("persona score (persona's own replies)", _metric("eval.persona_score.reference", ".3f"), optional=True),
    Row("ROUGE-L (tuned, chosen decoding)", _interval("eval.chosen.rougeL.tuned", ".4f"), optional=True),
    Row("repeated 3-gram (tuned, chosen decoding)", _interval("eval.chosen.repeated_3gram.tuned", ".3f"),
        optional=True),
    Row("distinct-2 (tuned, chosen decoding)", _metric("eval.chosen.tuned.distinct_2", ".3f"), optional=True),
    Row("ends its turn (tuned, chosen decoding)", _interval("eval.stopping.tuned_chosen.end_of_turn_rate", ".2f"),
        optional=True),
    Row("median words (tuned, chosen decoding)", _interval("eval.stopping.tuned_chosen.median_words", ".1f"),
        optional=True),
    Row("median words (persona's own replies)", _interval("eval.stopping.reference.median_words", ".1f"),
        optional=True),
    Row("on-topic PMI, nats (tuned, chosen decoding)", _interval("eval.on_topic.tuned_chosen.pmi", ".2f"),
        optional=True),
    Row("on-topic PMI, nats (persona's own replies)", _interval("eval.on_topic.reference.pmi", ".2f"), optional=True),
    Row("preference pairs (DPO)", _metric("train.preference.pairs", ",.0f"), optional=True),
    Row("DPO reward accuracy, last step", _metric("train.preference.final_reward_accuracy", ".2f"), optional=True),
    Row("interval level", _level),
    Row("GPU", lambda run: run.tags.get("train.hardware.gpu") or DASH),
    Row("CPU", _cpu),
    Row("DVC experiment", lambda run: run.tags.get("dvc.exp_name") or DASH),
    Row("MLflow run", lambda run: f"`{run.run_id}`"),
)


def table_rows(runs: Runs) -> list[dict]:
    """``{"label", "cells"}`` per row, one cell per shown method, in METHODS order."""
    rows = []
    for row in ROWS:
        cells = [DASH if runs.get(m) is None else row.cell(runs[m]) for m in shown(runs)]
        if not (row.optional and all(cell == DASH for cell in cells)):
            rows.append({"label": row.label, "cells": cells})
    return rows


# --------------------------------------------------------------------------------------------
# The two sentences
# --------------------------------------------------------------------------------------------


def summary_sentences(runs: Runs) -> list[str]:
    """What the numbers show, in two sentences: quality, then cost. The rules:

    1. Quality: the method with the lowest test perplexity (tuned), and for each other method
       whether the two intervals overlap. Overlap = no clear difference; apart = a clear one
       (at the logged interval level). With fewer than two perplexities, it says so.
    2. Cost: each PEFT method's trainable parameters (as a % of full's), peak memory and wall
       time (as multiples of full's). Without a full run, or without a PEFT run, it says so.
    """
    return [quality_sentence(runs), cost_sentence(runs)]


def quality_sentence(runs: Runs) -> str:
    key = "eval.perplexity.tuned"
    scored = {m: run for m, run in runs.items() if run is not None and run.metric(key) is not None}
    if not scored:
        return "No run logged a test perplexity (eval.perplexity.tuned), so the methods' quality cannot be ranked."
    best = min(scored, key=lambda m: scored[m].metric(key))  # ties: the first in METHODS order
    shown = _with_interval(scored[best], key, ".2f")
    if len(scored) == 1:
        return f"Only {best} logged a test perplexity ({shown}), so there is nothing to rank it against."
    return f"Of the methods run, {best} has the lowest test perplexity, {shown}: {_overlap_clauses(scored, best, key)}."


def _overlap_clauses(scored: dict[str, MethodRun], best: str, key: str) -> str:
    mine = scored[best].interval(key)
    overlapping, apart, unknown = [], [], []
    for method, run in scored.items():
        theirs = run.interval(key)
        if method == best:
            continue
        group = unknown if mine is None or theirs is None else overlapping if _overlap(mine, theirs) else apart
        group.append(method)
    clauses = []
    if overlapping:
        clauses.append(f"its interval overlaps {_possessive(overlapping)} (no clear difference)")
    if apart:
        clauses.append(f"its interval lies wholly below {_possessive(apart)} (a clear difference)")
    if unknown:
        values = [f"{m}'s {scored[m].metric(key):.2f}" for m in unknown]
        clauses.append(f"it is lower than {_and(values)}, but without both intervals the gap cannot be judged")
    return "; ".join(clauses)


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def cost_sentence(runs: Runs) -> str:
    full = runs.get("full")
    peft = [m for m in PEFT_METHODS if runs.get(m) is not None]
    if full is None:
        return "There is no full fine-tuning run to set PEFT's cost against: queue one with train.method=full " \
               "(make compare)."
    if not peft:
        return "Only full fine-tuning ran, so there is no PEFT cost to set against it."
    return f"Against full fine-tuning, {'; '.join(_cost_clause(m, runs[m], full) for m in peft)}."


def _cost_clause(method: str, run: MethodRun, full: MethodRun) -> str:
    parts = []
    params = _ratio(run, full, "train.trainable_parameters")
    if params is not None:
        parts.append(f"trains {100 * params:.3g}% as many parameters")
    for key, what in (("train.peak_memory_mb", "needs {:.2g}× the peak memory"),
                      ("train.wall_seconds", "takes {:.2g}× the wall time")):
        ratio = _ratio(run, full, key)
        if ratio is not None:
            parts.append(what.format(ratio))
    return f"{method} {_and(parts)}" if parts else f"{method} logged no cost metric full also logged"


def _ratio(run: MethodRun, full: MethodRun, key: str) -> Optional[float]:
    mine, theirs = run.metric(key), full.metric(key)
    return None if mine is None or not theirs else mine / theirs


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _possessive(methods: list[str]) -> str:
    return _and([f"{m}'s" for m in methods])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def render_markdown(runs: Runs, experiment: str, store: str, prefix: str, by_prefix: bool) -> str:
    return render("compare.md.j2", experiment=experiment, store=store, prefix=prefix, selection_by_prefix=by_prefix,
                  methods=shown(runs), rows=table_rows(runs), missing=[m for m in REQUIRED if runs.get(m) is None],
                  sentences=summary_sentences(runs))


COST_PANELS = (("train.trainable_parameters", "trainable parameters (log)", True),
               ("train.peak_memory_mb", "peak memory (MB)", False),
               ("train.wall_seconds", "wall time (s)", False))
QUALITY_PANELS = (("eval.perplexity.tuned", "test perplexity (lower is better)"),
                  ("eval.rougeL.tuned", "ROUGE-L (higher is better)"),
                  ("eval.persona_score.tuned", "persona score (higher is better)"))


def draw_figure(runs: Runs, out: Path) -> None:
    """Top row: cost per method (bars); bottom row: quality per method (points with their intervals)."""
    from qlora_pipeline.figures import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5))
    for ax, (key, title, log) in zip(axes[0], COST_PANELS):
        _cost_panel(ax, runs, key, title, log)
    for ax, (key, title) in zip(axes[1], QUALITY_PANELS):
        _quality_panel(ax, runs, key, title)
    fig.suptitle("PEFT vs full fine-tuning: cost (top), quality on the test split (bottom)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _cost_panel(ax: Any, runs: Runs, key: str, title: str, log: bool) -> None:
    columns = shown(runs)
    values = {m: runs[m].metric(key) for m in columns if runs.get(m) and runs[m].metric(key) is not None}
    for method, value in values.items():
        ax.bar(columns.index(method), value, color=COLORS[method])
    if log and values:  # full trains ~30x more parameters than LoRA: a linear axis hides LoRA's bar
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(values.values()) / 10)  # a decade below the smallest, so its bar shows
    _method_axis(ax, title, columns)


def _quality_panel(ax: Any, runs: Runs, key: str, title: str) -> None:
    columns = shown(runs)
    for x, method in enumerate(columns):
        run = runs.get(method)
        value = run.metric(key) if run else None
        if value is None:
            continue
        interval = run.interval(key)
        error = [[value - interval[0]], [interval[1] - value]] if interval else None
        ax.errorbar([x], [value], yerr=error, fmt="o", color=COLORS[method], capsize=4)
    _method_axis(ax, title, columns)


def _method_axis(ax: Any, title: str, columns: list[str]) -> None:
    ax.set_xticks(range(len(columns)), columns)
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_title(title, fontsize="medium")


def write_report(runs: Runs, out_dir: Path, experiment: str, store: str, prefix: str, by_prefix: bool
                 ) -> tuple[Path, Path]:
    """``compare.md`` and ``compare.png`` in ``out_dir``, each written whole or not at all."""
    from qlora_pipeline.io import atomic_path, write_text

    markdown, figure = out_dir / MARKDOWN, out_dir / FIGURE
    text = render_markdown(runs, experiment, store, prefix, by_prefix)  # before either file: both or neither new
    try:
        with atomic_path(figure) as tmp:
            draw_figure(runs, tmp)
        write_text(markdown, text)
    except OSError as err:  # a file on the way (--out metrics/eval.json/sub), a folder nothing can be made in
        raise PipelineError(f"--out {out_dir}: compare.md and compare.png cannot be written there "
                            f"({err.strerror or err}); give a folder you can write to") from None
    return markdown, figure


def build_report(tracking_uri: str, experiment_name: str, out_dir: Path, prefix: str = "compare-",
                 run_ids: Optional[list[str]] = None, store_label: Optional[str] = None) -> tuple[Path, Path]:
    """Pick the runs (``run_ids``, else the newest per method under ``prefix``) and write the report.

    ``store_label`` names the store in the report (default: ``tracking_uri``): the report is shared,
    so the repository's own store is named as such, not by this machine's path.
    """
    from qlora_pipeline.mlflow_store import mlflow_client

    if out_dir.exists() and not out_dir.is_dir():  # FileExistsError's traceback, after the runs were read
        raise PipelineError(f"--out {out_dir}: a file is there, not a folder; give the folder for compare.md and "
                            "compare.png")
    client = mlflow_client(tracking_uri)
    if run_ids:
        runs = given_runs(client, run_ids)
    else:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            raise PipelineError(f"no MLflow experiment '{experiment_name}' in {tracking_uri}; run `make compare` "
                                "first, or set mlflow.tracking_uri / --params to the store that has it")
        runs = find_runs(client, experiment.experiment_id, prefix)
        if not any(runs.values()):
            raise PipelineError(f"no finished run in MLflow experiment '{experiment_name}' ({tracking_uri}) whose "
                                f"DVC experiment name starts with '{prefix}' and that logged train and eval "
                                "metrics; run `make compare` first, or pass --prefix or --runs RUN_ID ...")
    return write_report(runs, out_dir, experiment_name, store_label or tracking_uri, prefix, by_prefix=not run_ids)
