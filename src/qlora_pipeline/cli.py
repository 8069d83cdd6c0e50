"""``qlora-pipeline``: the commands a user runs beside ``dvc``.

    qlora-pipeline summary                        where the outputs are, and the key metrics
    qlora-pipeline human-eval score RATINGS.csv   score a rater's blind A/B choices
    qlora-pipeline runs                           past runs whose adapter can be used below (runs:/<id>/adapter)
    qlora-pipeline compare                        PEFT vs full fine-tuning, from MLflow: reports/compare.md
    qlora-pipeline mlflow-sync                    send what stages kept while the MLflow server was away
    qlora-pipeline chat [--adapter NAME=SOURCE]   talk to the persona in this terminal
    qlora-pipeline serve [--adapter NAME=SOURCE]  an OpenAI-compatible server, several adapters on one base
    qlora-pipeline export --adapter SOURCE --out DIR   a merged model plain transformers loads (or GGUF: --format)

SOURCE is an adapter folder (models/adapter) or a past run's MLflow artifact (runs:/<run_id>/adapter).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.process import ADAPTERS, TRACKING, import_quietly, keep_freed_memory

# A command reads the file --params names, which must exist; without the flag, params.yaml here if there is one.
PARAMS_DEFAULT = " (default: ./params.yaml if there is one, else the defaults)"

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
    ("reports/decoding.json", "decoding grid scored on validation, the chosen one (choose-decoding)"),
    ("metrics/decoding.json", "the chosen decoding and its validation scores (choose-decoding)"),
    ("metrics/eval.json", "base vs tuned, greedy and chosen decoding: ROUGE, perplexity, voice, intervals (evaluate)"),
    ("reports/evaluate/", "samples.csv, human_eval.html for blind A/B rating, PNG figures (evaluate)"),
    ("data/canaries.json", "synthetic secrets inserted into training, if risk.canaries > 0 (split)"),
    ("metrics/risk.json", "PII, memorization, canaries, bias, safety drift, fit, cost; base vs tuned (risk)"),
    ("reports/risk.md", "the one-page risk report (risk)"),
]


def summary(args: argparse.Namespace) -> None:
    """Print where each stage's output is and the headline numbers."""
    print("\nOutputs:")
    for path, what in OUTPUTS:
        mark = " " if Path(path).exists() else "-"
        print(f" {mark} {path:<34} {what}")
    unreadable = [path for path, show in (("metrics/split.json", _split_line), ("metrics/train.json", _train_line),
                                          ("metrics/eval.json", _eval_table), ("metrics/risk.json", _risk_line))
                  if not _print_metrics(Path(path), show)]
    print("\nCompare runs: dvc exp show   |   dvc plots show   |   "
          "mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)")
    if unreadable:
        raise PipelineError(f"{', '.join(unreadable)}: not the metrics this version's stages write (see above); "
                            "write them again with `dvc repro --force` of the stages named in Outputs")


def _print_metrics(path: Path, show: Callable[[dict], str]) -> bool:
    """Print ``show`` of the metrics file at ``path`` if it is there; False if it is there but not readable
    (damaged, or written by another version): the other lines are still printed."""
    if not path.exists():
        return True
    try:
        print(show(json.loads(path.read_text(encoding="utf-8"))))
    # ValueError: JSON, UTF-8; OSError: a folder where the file was; ArithmeticError: Infinity where a count was
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, ArithmeticError) as err:
        print(f"\n{path}: not readable ({type(err).__name__}: {err})")
        return False
    return True


def _split_line(metrics: dict) -> str:
    sizes = ", ".join(f"{name} {metrics[name]['examples']}" for name in ("train", "val", "test"))
    return (f"\nPersona {metrics['persona']}: {sizes} examples; "
            f"{metrics['test_long_targets_in_train']} long test replies also in train.")


def _train_line(metrics: dict) -> str:
    return (f"Training: {metrics['steps']} steps, validation loss {metrics['zero_shot_val_loss']} (zero-shot) -> "
            f"{metrics['best_val_loss']} (best, step {metrics['best_step']}), {metrics['wall_seconds']} s.")


def _eval_table(metrics: dict) -> str:
    from qlora_pipeline.evaluation import summary_table

    return "\n" + summary_table(metrics)


def _risk_line(metrics: dict) -> str:
    from qlora_pipeline.risk.report import console_summary

    return "\n" + console_summary(metrics) + "  (reports/risk.md)"


def human_eval_score(args: argparse.Namespace) -> None:
    """Score the ratings against the key and log the result to the evaluate run's MLflow record."""
    from qlora_pipeline.human_eval.score import score_ratings

    result = score_ratings(args.ratings, args.key, confidence=args.confidence)
    print(json.dumps(result, indent=2))
    print(logged_to_run(args.run_file, result, args.ratings))


def logged_to_run(run_file: Path, result: dict, ratings: Path) -> str:
    """Log ``result`` into the run ``run_file`` names; the line saying where it went, or why it was not logged (a
    missing or damaged record is told, not a traceback: the score above stands)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from qlora_pipeline.io import read_json_object
    from qlora_pipeline.mlflow_store import resolve_tracking_uri

    if run_file.is_dir():
        return (f"{run_file} is a folder, not a run file: result not logged to MLflow. Fix: pass --run-file the "
                "run.json evaluate wrote (reports/evaluate/run.json)")
    if not run_file.is_file():
        return f"{run_file} not found: result not logged to MLflow"
    run = read_json_object(run_file)  # cut short or edited by hand: not logged, said, not a traceback
    run_id = run.get("mlflow_run_id")
    if not isinstance(run_id, str) or not run_id:
        return (f"{run_file}: no MLflow run id in it (evaluate ran while the MLflow server was unreachable, "
                "or the file is not evaluate's): result not logged to MLflow")
    uri = resolve_tracking_uri(run.get("tracking_uri") if isinstance(run.get("tracking_uri"), str) else None)
    unusable = _unusable_store(uri, run_id)
    if unusable:
        return unusable
    try:
        spool = log_human_eval(uri, run_id, result, ratings)
    except MlflowException as err:
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        return (f"result not logged to MLflow: {uri} refused run {run_id} ({reason}); the run may be in another "
                "store (mlflow.tracking_uri)")
    except SQLAlchemyError as err:  # a store damaged past its table list, or locked by another program
        reason = (str(getattr(err, "orig", None) or err).strip().splitlines() or [""])[0][:200]
        return (f"result not logged to MLflow run {run_id}: {uri} could not be read or written ({reason}). "
                f"Fix: check the store with `mlflow ui --backend-store-uri {uri}`, then score again")
    if spool is not None:
        return (f"result kept for MLflow run {run_id} in {spool} (the server is unreachable): send it with "
                "`qlora-pipeline mlflow-sync` once the server is back")
    return f"logged to MLflow run {run_id}"


def _unusable_store(uri: str, run_id: str) -> str | None:
    """Why the SQLite store ``uri`` names cannot take the result, else None (a server is tried when logging)."""
    from qlora_pipeline.mlflow_store import store_problem

    problem = store_problem(uri)  # MLflow would make an empty store of a missing file, then fail
    if problem:
        return (f"{problem}: result not logged to run {run_id}. Fix: point run.json's tracking_uri (or "
                "mlflow.tracking_uri) at the store evaluate logged to")
    return None


def log_human_eval(tracking_uri: str, run_id: str, result: dict, ratings: Path | None = None) -> Path | None:
    """The result into evaluate's run, nested keys dotted (``human_eval.broken.tuned.rate``), as stages log.

    Every key is logged each time, so a scoring replaces the whole of an earlier one in the run: broken rates
    of a ratings file without the marks are NaN (unknown, not zero; left out, an earlier file's would stay
    beside the new win rate). The tag ``human_eval.ratings_sha256`` tells which file they came from (not its name:
    a file per rater is often named after the rater, and the store may be a team's server).
    With the server away it waits in the spool for ``mlflow-sync``: the spool folder is returned, else None.
    """
    import hashlib

    from qlora_pipeline import tracking
    from qlora_pipeline.human_eval.score import BROKEN_FIELDS
    from qlora_pipeline.human_eval.formats import SYSTEMS

    logged = dict(result)
    if logged.get("broken") is None:
        logged["broken"] = {system: dict.fromkeys(BROKEN_FIELDS, math.nan) for system in SYSTEMS}
    if ratings is not None:
        logged["ratings_sha256"] = hashlib.sha256(Path(ratings).read_bytes()).hexdigest()
    with tracking.existing_run(tracking_uri, run_id, "human_eval") as spooled:
        tracking.log_metrics("human_eval", logged)
    return spooled()


def mlflow_sync(args: argparse.Namespace) -> None:
    """Send what stages kept in the spool while the MLflow server was unreachable."""
    from pydantic import ValidationError

    from qlora_pipeline.config import MlflowConfig
    from qlora_pipeline.spool import spool_dir, sync_spool

    try:  # the check params' mlflow.tracking_uri gets; MLflow's own refusal was a traceback
        MlflowConfig(tracking_uri=args.tracking_uri)
    except ValidationError as err:
        raise PipelineError(f"--tracking-uri: {err.errors()[0]['msg']}") from None
    # Each file's line as it is sent: a file refused later stops the sync, and the ones sent before it are gone.
    if not sync_spool(args.tracking_uri, on_line=lambda line: print(f"mlflow-sync: {line}", flush=True)):
        print(f"mlflow-sync: nothing to send in {spool_dir()}")


def _at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high]."""
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number " + (
                f"from {low} to {high}" if high is not None else f"of at least {low}"))
        return value
    return whole


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0, e.g. 30")
    return value


class _Once(argparse.Action):
    """A flag that may be given once: argparse would keep the last of several silently."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, "given twice; export takes one adapter (run it once per adapter)")
        setattr(namespace, self.dest, values)


def _confidence(text: str) -> float:
    from qlora_pipeline.intervals import two_sided_z

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a level in (0, 1), e.g. 0.95")
    try:  # a level so near 1 that the interval's normal quantile is infinite
        two_sided_z(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is too close to 1 for an interval with finite bounds; "
                                         "use at most 0.9999999999999998, e.g. 0.95 or 0.999") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("summary", help="where the outputs are, and the key metrics").set_defaults(func=summary)

    human = commands.add_parser("human-eval", help="blind A/B human evaluation")
    human_commands = human.add_subparsers(dest="human_command", required=True)
    score = human_commands.add_parser(
        "score", help="win rate of the tuned model and each model's loops-or-breaks rate, from a ratings CSV")
    score.add_argument("ratings", type=Path, help="ratings.csv downloaded from reports/evaluate/human_eval.html")
    score.add_argument("--key", type=Path, default=Path("reports/evaluate/human_eval_key.csv"), help="the A/B key")
    score.add_argument("--confidence", type=_confidence, default=0.95, help="interval level, in (0, 1)")
    score.add_argument("--run-file", type=Path, default=Path("reports/evaluate/run.json"),
                       help="which MLflow run the sheet came from (written by evaluate)")
    score.set_defaults(func=human_eval_score)

    runs = commands.add_parser("runs", help="past runs with an adapter, as runs:/<run_id>/adapter sources")
    runs.add_argument("--params", type=Path, default=None,
                      help=f"for the MLflow store and experiment{PARAMS_DEFAULT}")
    runs.add_argument("--limit", type=_at_least(1), default=20, help="newest runs looked at")
    runs.set_defaults(func=_run("qlora_pipeline.serving.runs", TRACKING))

    compare = commands.add_parser("compare", help="PEFT vs full fine-tuning: a report from the MLflow runs")
    compare.add_argument("--params", type=Path, default=None,
                         help=f"for the MLflow store and experiment{PARAMS_DEFAULT}")
    compare.add_argument("--out", type=Path, default=Path("reports"), help="folder for compare.md and compare.png")
    compare.add_argument("--prefix", default=None,
                         help="DVC experiment names of the comparison start with this (tag dvc.exp_name); "
                              "default: compare.name_prefix of params")
    compare.add_argument("--run", action="store_true",
                         help="first queue and run one equal-budget experiment per compare.methods (make compare)")
    compare.add_argument("--runs", nargs="+", default=None, metavar="RUN_ID",
                         help="exactly these MLflow runs, one per method, instead of the newest under --prefix")
    compare.set_defaults(func=_run("qlora_pipeline.compare_queue", TRACKING))

    sync = commands.add_parser("mlflow-sync", help="send what stages kept in .mlflow-spool/ while the MLflow "
                                                   "server was unreachable, into each execution's run")
    sync.add_argument("--tracking-uri", default=None,
                      help="send there instead of to the mlflow.tracking_uri each stage ran with")
    sync.set_defaults(func=mlflow_sync)

    chat = commands.add_parser("chat", help="talk to the persona in this terminal (/help lists the commands)")
    _model_arguments(chat)
    chat.add_argument("--use", default=None, help="the adapter to start with (default: the first given, else base)")
    chat.add_argument("--seed", type=_at_least(0), default=None,
                      help="seed of the sampling (a whole number >= 0), for a replayable session")
    chat.set_defaults(func=_run("qlora_pipeline.serving.chat", _model_imports, check=_model_command_line))

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server: base and every adapter as models")
    _model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    serve.add_argument("--port", type=_at_least(1, 65535), default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health and the chat page "
                            "(default: the QLORA_PIPELINE_API_KEY environment variable, if set)")
    serve.add_argument("--allow-runtime-adapters", action="store_true",
                       help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    serve.add_argument("--max-adapters", type=_at_least(1), default=16,
                       help="a runtime load is refused (409) once this many adapters are served (each holds its "
                            "weights in memory); the --adapter ones count, and are all served")
    serve.add_argument("--adapter-root", type=Path, action="append", default=[],
                       help="folder under which runtime adapters may be loaded (repeatable; default: models)")
    serve.add_argument("--max-batch-size", type=_at_least(1), default=8,
                       help="requests decoded together at most (continuous batching: a request joins the running "
                            "batch at the next step and leaves when it ends)")
    serve.add_argument("--mixed-batches", choices=("stacked", "peft"), default="stacked",
                       help="how a batch mixing adapters runs: every adapter's LoRA stacked into two matmuls per "
                            "layer, or PEFT's adapter_names loop (the reference)")
    serve.add_argument("--max-tokens-limit", type=_at_least(1), default=1024,
                       help="largest max_tokens a request may ask")
    serve.add_argument("--max-body-bytes", type=_at_least(1), default=1 << 20, help="largest request body accepted")
    serve.add_argument("--max-queue", type=_at_least(0), default=64,
                       help="requests admitted beyond the running batch; past that, 429 with Retry-After")
    serve.add_argument("--request-timeout", type=_seconds, default=300.0,
                       help="seconds a request may take from arrival to its last token; then 408 (a stream: an "
                            "error event)")
    serve.add_argument("--grace-seconds", type=_seconds, default=30.0,
                       help="on SIGTERM, how long requests in flight may take to finish before the server exits")
    serve.add_argument("--max-context", type=_at_least(1), default=None,
                       help="prompt + reply tokens at most (default: the model's max_position_embeddings)")
    serve.set_defaults(func=_run("qlora_pipeline.serving.server", _model_imports, check=_model_command_line))

    export = commands.add_parser("export", help="merge an adapter into the dequantized base; save and verify it")
    export.add_argument("--adapter", required=True, action=_Once, help="adapter folder or runs:/<run_id>/adapter")
    export.add_argument("--out", type=Path, required=True, help="folder for the merged model (must not exist)")
    export.add_argument("--format", choices=("safetensors", "gguf", "gguf-lora", "vllm"), default="safetensors",
                        help="safetensors: a folder plain transformers loads; gguf: the merged model for llama.cpp, "
                             "Ollama, LM Studio; gguf-lora: the adapter alone, for the base's own GGUF "
                             "(gguf formats need `make gguf`); vllm: the adapter checked against vLLM's LoRA limits, "
                             "with the `vllm serve` command")
    export.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="dtype of the merged weights (safetensors; default bfloat16)")
    export.add_argument("--quant", default=None,
                        help="GGUF types, comma-separated, one verified file each: f32, f16, bf16, q8_0, q6_k, "
                             "q5_k_m, q4_k_m (default f16,q8_0,q4_k_m); gguf-lora: f32, f16, bf16, q8_0 (default f16)")
    export.add_argument("--decoding", type=_decoding_report, default=Path("reports/decoding.json"),
                        help="the decoding chosen on validation, written into the GGUF's Ollama Modelfile "
                             "(default: reports/decoding.json if there is one)")
    export.add_argument("--base-gguf", type=Path, default=None,
                        help="gguf-lora: the base GGUF the LoRA is checked on (default: the one the base was "
                             "quantized from; for a safetensors base, its dequantized weights are written as one)")
    export.add_argument("--base", type=Path, default=Path("models/base"), help="the 4-bit base the adapter was trained on")
    export.add_argument("--test", type=Path, default=Path("data/splits/test.jsonl"),
                        help="examples the merged model is checked on (export_report.json)")
    export.add_argument("--max-samples", type=_at_least(1), default=32, help="test examples used for the check")
    export.add_argument("--params", type=Path, default=None,
                        help=f"for the MLflow store of runs:/ sources{PARAMS_DEFAULT}")
    export.set_defaults(func=_run("qlora_pipeline.serving.export", _model_imports, check=_export_command_line))
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=SOURCE",
                        help="an adapter folder or runs:/<run_id>/adapter, under NAME (repeatable)")
    parser.add_argument("--base", type=Path, default=Path("models/base"), help="the base the adapters were trained on")
    parser.add_argument("--params", type=Path, default=None,
                        help=f"the chat section's decoding defaults and the MLflow store{PARAMS_DEFAULT}")
    # argparse runs `type` on a given path only, not on this default: reports/decoding.json may be absent
    # (no choose-decoding yet), while a --decoding the user typed must be that report
    parser.add_argument("--decoding", type=_decoding_report, default=Path("reports/decoding.json"),
                        help="the decoding choose-decoding picked on validation; used for an adapter it was "
                             "picked for when chat.use_chosen_decoding is true (default: reports/decoding.json "
                             "if there is one)")
    parser.add_argument("--dequantize", choices=("auto", "true", "false"), default="auto",
                        help="dequantize the 4-bit base once for faster CPU generation (evaluate.dequantize_4bit)")


def _decoding_report(text: str) -> Path:
    """An argparse type: a JSON object file, as choose-decoding writes reports/decoding.json."""
    path = Path(text)
    fix = "give the reports/decoding.json choose-decoding wrote, or leave --decoding out"
    try:
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{text}: no such file; {fix}")
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{text}: not a file; {fix}")
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text}: cannot be read ({err.strerror or err}); {fix}") from None
    except ValueError as err:  # JSONDecodeError names the line and column; UnicodeDecodeError the byte
        raise argparse.ArgumentTypeError(f"{text}: not valid JSON ({err}); {fix}") from None
    if not isinstance(report, dict):
        raise argparse.ArgumentTypeError(f"{text}: holds a {type(report).__name__}, not the JSON object "
                                         f"choose-decoding writes; {fix}")
    return path


def _model_imports(args: argparse.Namespace) -> tuple[str, ...]:
    """What chat, serve and export run on: the model libraries, and MLflow where an adapter comes from a run.

    Reads ``--adapter`` as the command will (``serving.specs``, which imports no model library).
    """
    from qlora_pipeline.serving.specs import RUN_URI, parse_adapter_specs

    specs = parse_adapter_specs(args.adapter if isinstance(args.adapter, list) else [args.adapter])
    return (*ADAPTERS, *TRACKING) if any(spec.source.startswith(RUN_URI) for spec in specs) else ADAPTERS


def _model_command_line(args: argparse.Namespace) -> None:
    """``--adapter`` and ``--use`` checked before torch and the rest are imported (~4 s): a typo is said at once."""
    from qlora_pipeline.serving.specs import check_command_line

    check_command_line(args.adapter, getattr(args, "use", None))


def _export_command_line(args: argparse.Namespace) -> None:
    """A flag the export's format does not read was dropped without a word (a 32 s merge for a --quant that did
    nothing): refused with the rest of the command line's mistakes."""
    if args.quant is not None and args.format not in ("gguf", "gguf-lora"):
        raise PipelineError(f"--quant is for --format gguf or gguf-lora, not {args.format}; drop it, or choose "
                            "the format")
    if args.dtype is not None and args.format != "safetensors":
        raise PipelineError(f"--dtype is for --format safetensors, not {args.format} (gguf: --quant); drop it")
    _model_command_line(args)


def _run(module: str, imports: tuple[str, ...] | Callable[[argparse.Namespace], tuple[str, ...]] = (),
         check: Callable[[argparse.Namespace], None] | None = None):
    """The command's ``main(args)``, imported only when it runs: summary stays quick to start. The module and
    ``imports`` (the libraries it runs on, or a function of the arguments giving them) are imported with full
    garbage collections held off (``process.import_quietly``), after ``check(args)``, which refuses what the
    command line alone gets wrong."""
    def run(args: argparse.Namespace) -> None:
        import importlib

        if check is not None:
            check(args)
        import_quietly([module, *(imports(args) if callable(imports) else imports)])
        importlib.import_module(module).main(args)

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        args.func(args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
