"""evaluate: the zero-shot base vs the tuned model on held-out test replies.

Reads:  <base>/, <adapter>/, <test> (test.jsonl), <train> (train.jsonl, the sheet's examples of the
        persona), <judge>/ (the style judge, from the style-judge stage), <zero-shot>/ (the base model's greedy
        test replies and reference NLL), <decoding> (the decoding chosen on validation), params `seed`, `evaluate`,
        `train.max_length`
Writes: <metrics> (ROUGE-1/2/L/Lsum, perplexity, end-of-turn rate, length ratio, distinct-1/2, persona
        score, repetition for base and tuned, greedy and under the chosen decoding, tuned - base, bootstrap
        intervals), <rouge-plot> (table for `dvc plots`), <reports>/ (samples.csv, human_eval.html +
        human_eval_key.csv, PNG figures, run.json); logs the run's artifacts (<artifacts>, adapter, reports) to MLflow
Run:    python stages/evaluate.py --params params.yaml --base models/base --adapter models/adapter \
            --test data/splits/test.jsonl --train data/splits/train.jsonl --judge models/judge --zero-shot reports/zero_shot --train-log metrics/train_log.csv --decoding reports/decoding.json \
            --metrics metrics/eval.json --rouge-plot metrics/eval_rouge.csv --reports reports/evaluate --artifacts params.yaml dvc.lock metrics/train_log.csv
"""

import sys
from pathlib import Path

# This workspace's own package first: a queued DVC experiment runs in a copy of the repository, and its
# stages must run the copy's code (what dvc.lock hashes), not the editable install's checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from qlora_pipeline.pipeline.common import model_imports, stage_main
from qlora_pipeline.process import JUDGE, ROUGE, TRACKING


def add_paths(parser):
    parser.add_argument("--base", type=Path, required=True, help="quantize-load's model folder")
    parser.add_argument("--adapter", type=Path, required=True, help="train-adapter's output folder")
    parser.add_argument("--test", type=Path, required=True, help="test split JSONL")
    parser.add_argument("--train", type=Path, required=True,
                        help="train split JSONL: the persona's own replies shown atop the human-eval sheet")
    parser.add_argument("--judge", type=Path, required=True, help="the style-judge stage's folder")
    parser.add_argument("--zero-shot", type=Path, required=True, help="the zero-shot stage's folder (the base side)")
    parser.add_argument("--train-log", type=Path, required=True, help="train-adapter's loss log, drawn as a PNG")
    parser.add_argument("--decoding", type=Path, required=True,
                        help="choose-decoding's report: the decoding of the second row (picked on validation)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")
    parser.add_argument("--rouge-plot", type=Path, required=True, help="ROUGE comparison CSV for dvc plots")
    parser.add_argument("--reports", type=Path, required=True, help="reports folder")
    parser.add_argument("--artifacts", type=Path, nargs="*", default=[], help="more files to log to MLflow")


def run(params, args):
    from qlora_pipeline.pipeline.evaluate import run_evaluate

    return run_evaluate(params, args.base, args.adapter, args.test, args.metrics, args.reports, args.rouge_plot,
                        args.artifacts, train_path=args.train, log_csv=args.train_log,
                        decoding_path=args.decoding, judge_dir=args.judge,
                        zero_shot_dir=args.zero_shot)


def imports(params):
    return ("qlora_pipeline.pipeline.evaluate", *model_imports(params), *JUDGE, *ROUGE, *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
