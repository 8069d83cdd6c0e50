"""``qlora-pipeline compare``: with ``--run`` (``make compare``) first queue and run one equal-budget DVC
experiment per method, then write the report (``qlora_pipeline.compare``) from their MLflow runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_pipeline.compare import PREFERENCE_SUFFIX, build_report
from qlora_pipeline.errors import PipelineError

TRAIN_STAGE = "train-adapter"


def side_outputs(pipeline: dict, stage: str = TRAIN_STAGE) -> list[str]:
    """Outputs that stages after ``stage`` read but neither ``stage`` nor anything before it makes.

    ``dvc exp run --downstream`` checks out only the named stage's own inputs in the experiment's
    copy: the style judge and the base's zero-shot replies, made beside training, would be missing.
    """
    stages = pipeline["stages"]

    def paths(entries: list) -> list[str]:
        return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries or []]

    outs = {name: paths(spec.get("outs", [])) + paths(spec.get("metrics", [])) for name, spec in stages.items()}

    def maker(path: str) -> str | None:  # a dep may be a file inside a stage's output folder
        return next((name for name, made in outs.items() for out in made
                     if path == out or path.startswith(out.rstrip("/") + "/")), None)

    needs = {name: {maker(d) for d in paths(spec.get("deps", []))} - {None} for name, spec in stages.items()}

    def closure(start: set[str], step) -> set[str]:
        seen, todo = set(start), list(start)
        while todo:
            for other in step(todo.pop()):
                if other not in seen:
                    seen.add(other)
                    todo.append(other)
        return seen

    before = closure({stage}, lambda name: needs[name])
    after = closure({stage}, lambda name: [n for n, deps in needs.items() if name in deps]) - {stage}
    read = {d for name in after for d in paths(stages[name].get("deps", []))}
    return sorted(path for path in read if maker(path) is not None and maker(path) not in before | after)


def queue_commands(cfg: Any, stamp: str, pipeline: dict | None = None) -> list[tuple[str, list[str]]]:
    """One ``dvc exp run --queue`` per method: its name and command line.

    ``--force --downstream train-adapter`` retrains every method from the shared cached data and
    base even when one matches the workspace (DVC would otherwise restore it from its run cache
    and no run would reach MLflow), and repeats nothing upstream of training. ``--copy-paths``
    brings what training's side stages made (``side_outputs`` of ``pipeline``, dvc.yaml) into the
    experiment's copy.
    """
    copies = [arg for path in side_outputs(pipeline) for arg in ("--copy-paths", path)] if pipeline else []
    commands = []
    for method in cfg.methods:
        name = f"{cfg.name_prefix}{method}-{stamp}"
        objective = "dpo" if method.endswith(PREFERENCE_SUFFIX) else "sft"
        commands.append((name, ["dvc", "exp", "run", "--queue", "--name", name,
                                "--set-param", f"train.method={method.removesuffix(PREFERENCE_SUFFIX)}",
                                "--set-param", f"train.objective={objective}",
                                "--set-param", f"train.learning_rate={cfg.learning_rate[method]}",
                                *copies, "--force", "--downstream", TRAIN_STAGE]))
    return commands


def run_experiments(cfg: Any, poll_seconds: float = 10.0) -> list[str]:
    """Queue one experiment per method, run them one at a time, wait; return their names.

    One at a time: two trainings at once share the cores and each runs several times slower,
    which would distort the time and throughput rows.
    """
    import subprocess
    import time

    import yaml

    pipeline = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))
    names = []
    for name, command in queue_commands(cfg, time.strftime("%Y%m%dT%H%M%S"), pipeline):
        _dvc(command)
        names.append(name)
    _dvc(["dvc", "queue", "start", "--jobs", "1"])
    print(f"compare: running {', '.join(names)} (dvc queue status / dvc queue logs <name> to follow)", flush=True)
    while True:
        time.sleep(poll_seconds)
        status = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True).stdout
        mine = [line for line in status.splitlines() if any(name in line for name in names)]
        if not any(word in line for line in mine for word in ("Queued", "Running")):
            break
    failed = [line.split()[1] if len(line.split()) > 1 else line for line in mine if "Failed" in line]
    if failed:
        raise PipelineError(f"compare: experiment(s) failed: {', '.join(failed)}; see `dvc queue logs <name>`")
    return names


def _dvc(command: list[str]) -> None:
    import subprocess

    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"`{' '.join(command)}` failed: {(proc.stderr or proc.stdout).strip()}")


def runs_named(tracking_uri: str, experiment_name: str, names: list[str]) -> list[str]:
    """The MLflow run ids of the DVC experiments ``names`` (tag ``dvc.exp_name``)."""
    from qlora_pipeline.mlflow_store import mlflow_client

    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    found = []
    for name in names:
        runs = [] if experiment is None else client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`dvc.exp_name` = '{name}'", max_results=1)
        if not runs:
            raise PipelineError(f"compare: experiment {name} ran but left no MLflow run in {tracking_uri}")
        found.append(runs[0].info.run_id)
    return found


def main(args: Any) -> None:
    from qlora_pipeline.config import command_params
    from qlora_pipeline.mlflow_store import require_store, resolve_tracking_uri, store_errors

    params = command_params(args.params)
    prefix = params.compare.name_prefix if args.prefix is None else args.prefix
    if args.run and args.runs:  # --runs was dropped, and the whole queue ran
        raise PipelineError("--run and --runs: choose one: --run queues and runs new experiments, --runs names runs "
                            "that exist")
    if args.prefix is not None and (args.run or args.runs):  # it was dropped: these pick the runs themselves
        raise PipelineError(f"--prefix and --{'run' if args.run else 'runs'}: --prefix picks the newest runs of "
                            "experiments so named, which --run and --runs do not read; drop it (--run names its "
                            "experiments by params' compare.name_prefix)")
    if prefix == "":  # it was read as "the default"; every experiment's runs is no equal-budget comparison
        raise PipelineError("--prefix '': give the start of the comparison's experiment names (default: params' "
                            f"compare.name_prefix, {params.compare.name_prefix!r}), or --runs RUN_ID ...")
    uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    require_store(uri, missing_ok=args.run)  # --run's stages make the store
    run_ids = args.runs
    if args.run:
        experiments = run_experiments(params.compare)  # DVC's queue: no store read until it is done
        with store_errors(uri):
            run_ids = runs_named(uri, params.mlflow.experiment_name, experiments)
    label = params.mlflow.tracking_uri or "the repository's SQLite store (mlflow.db)"
    with store_errors(uri):
        markdown, figure = build_report(uri, params.mlflow.experiment_name, args.out, prefix, run_ids, label)
    print(f"wrote {markdown} and {figure}")
