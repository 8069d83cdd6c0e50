"""``qlora-pipeline``: the commands a user runs beside ``dvc``.

    qlora-pipeline summary                        where the outputs are, and the key metrics
    qlora-pipeline human-eval score RATINGS.csv   score a rater's blind A/B choices
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qlora_pipeline.errors import PipelineError

OUTPUTS = [
    ("data/raw/conversations.jsonl", "canonical conversations (fetch)"),
    ("data/raw/manifest.json", "source, version, sha256, counts (fetch)"),
    ("data/clean/conversations.jsonl", "cleaned, PII-scrubbed conversations (clean)"),
    ("metrics/clean.json", "counts per cleaning rule and PII type (clean)"),
    ("data/splits/", "train/val/test persona examples (split)"),
    ("metrics/split.json", "split sizes, persona, leakage check (split)"),
    ("models/base/", "quantized base model + tokenizer (quantize-load)"),
    ("metrics/base.json", "parameters, memory, bits/param, load time, smoke replies (quantize-load)"),
    ("models/adapter/", "adapter + model card + resolved config (train-adapter)"),
    ("metrics/train.json", "losses, best step, tokens/s, peak memory (train-adapter)"),
    ("metrics/train_log.csv", "loss curves: dvc plots show (train-adapter)"),
    ("metrics/eval.json", "base vs tuned: ROUGE, perplexity, intervals (evaluate)"),
    ("reports/", "samples.csv, human_eval.html for blind A/B rating (evaluate)"),
]


def summary(args: argparse.Namespace) -> None:
    """Print where each stage's output is and the headline numbers."""
    print("\nOutputs:")
    for path, what in OUTPUTS:
        mark = " " if Path(path).exists() else "-"
        print(f" {mark} {path:<34} {what}")
    split = Path("metrics/split.json")
    if split.exists():
        metrics = json.loads(split.read_text())
        sizes = ", ".join(f"{name} {metrics[name]['examples']}" for name in ("train", "val", "test"))
        print(f"\nPersona {metrics['persona']}: {sizes} examples; "
              f"{metrics['test_long_targets_in_train']} long test replies also in train.")
    train = Path("metrics/train.json")
    if train.exists():
        metrics = json.loads(train.read_text())
        print(f"Training: {metrics['steps']} steps, validation loss {metrics['zero_shot_val_loss']} (zero-shot) -> "
              f"{metrics['best_val_loss']} (best, step {metrics['best_step']}), {metrics['wall_seconds']} s.")
    evaluation = Path("metrics/eval.json")
    if evaluation.exists():
        from qlora_pipeline.pipeline.evaluate import summary_table

        print("\n" + summary_table(json.loads(evaluation.read_text())))
    print("\nCompare runs: dvc exp show   |   dvc plots show   |   "
          "mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)")


def human_eval_score(args: argparse.Namespace) -> None:
    """Score the ratings against the key and log the result to the evaluate run's MLflow record."""
    from qlora_pipeline.human_eval import score_ratings

    result = score_ratings(args.ratings, args.key, confidence=args.confidence)
    print(json.dumps(result, indent=2))
    if args.run_file.is_file():
        from qlora_pipeline.tracking import resolve_tracking_uri

        run = json.loads(args.run_file.read_text(encoding="utf-8"))
        log_human_eval(resolve_tracking_uri(run.get("tracking_uri")), run["mlflow_run_id"], result)
        print(f"logged to MLflow run {run['mlflow_run_id']}")
    else:
        print(f"{args.run_file} not found: result not logged to MLflow")


def log_human_eval(tracking_uri: str, run_id: str, result: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run_id, f"human_eval.{key}", float(value))


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a level in (0, 1), e.g. 0.95")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("summary", help="where the outputs are, and the key metrics").set_defaults(func=summary)

    human = commands.add_parser("human-eval", help="blind A/B human evaluation")
    human_commands = human.add_subparsers(dest="human_command", required=True)
    score = human_commands.add_parser("score", help="win rate of the tuned model from a ratings CSV")
    score.add_argument("ratings", type=Path, help="ratings.csv downloaded from reports/human_eval.html")
    score.add_argument("--key", type=Path, default=Path("reports/human_eval_key.csv"), help="the A/B key")
    score.add_argument("--confidence", type=_confidence, default=0.95, help="interval level, in (0, 1)")
    score.add_argument("--run-file", type=Path, default=Path("reports/run.json"),
                       help="which MLflow run the sheet came from (written by evaluate)")
    score.set_defaults(func=human_eval_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
