"""``qlora-pipeline runs``: the past runs whose adapter can be chatted with, served or exported.

Every pipeline execution that reaches evaluate logs its adapter to its MLflow run under
``adapter``; this lists those runs, newest first, with the ``runs:/<run_id>/adapter`` source that
``--adapter NAME=SOURCE`` takes, and what tells them apart (experiment name, LoRA rank, method,
validation loss, ROUGE-L).
"""

from __future__ import annotations

import datetime
from typing import Any

from qlora_pipeline.errors import PipelineError

ADAPTER_ARTIFACT = "adapter"
COLUMNS = ("source", "experiment", "started", "method", "r", "best_val_loss", "rougeL")


def adapter_runs(tracking_uri: str, experiment_name: str, limit: int) -> list[dict]:
    """Runs of ``experiment_name`` that logged an adapter, newest first, as table rows."""
    from qlora_pipeline.mlflow_store import mlflow_client

    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise PipelineError(f"no MLflow experiment '{experiment_name}' in {tracking_uri}; run the pipeline first "
                            "(make run), or set mlflow.tracking_uri / --params to the store that has it")
    rows = []
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=limit):
        if not any(a.path == ADAPTER_ARTIFACT for a in client.list_artifacts(run.info.run_id)):
            continue
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        rows.append({
            "source": f"runs:/{run.info.run_id}/{ADAPTER_ARTIFACT}",
            "experiment": tags.get("dvc.exp_name", "-"),
            "started": datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
            "method": params.get("train.method", "-"),
            "r": params.get("train.lora.r", "-"),
            "best_val_loss": _number(metrics.get("train.best_val_loss")),
            "rougeL": _number(metrics.get("eval.rougeL.tuned")),
        })
    return rows


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def main(args: Any) -> None:
    from qlora_pipeline.config import command_params
    from qlora_pipeline.mlflow_store import require_store, resolve_tracking_uri, store_errors

    params = command_params(args.params)
    uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    require_store(uri)
    with store_errors(uri):
        rows = adapter_runs(uri, params.mlflow.experiment_name, args.limit)
    if not rows:
        print(f"no run with an adapter in {uri} yet: `make run` (or dvc exp run) logs one per evaluate")
        return
    print(table(rows))
    print("\nUse a source with --adapter NAME=SOURCE (chat, serve) or --adapter SOURCE (export).")
