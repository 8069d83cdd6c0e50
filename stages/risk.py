"""risk: what the run risks, base and tuned side by side, after evaluate.

Reads:  <base>/, <adapter>/, <zero-shot>/ (the base model's probe replies), <train> (train.jsonl: the targets memorization is looked for in), <samples>
        (evaluate's samples.csv: the generated test replies), <canaries> (split's canaries.json), the stages'
        <stage-metrics> (clean/base/judge/zero_shot/train/decoding/eval .json: fit verdict and cost), params `seed`, `risk`,
        `clean.pii`, `clean.pii_engine`, `evaluate.dequantize_4bit`
Writes: <metrics> (PII per type, placeholders, memorization, canary exposure and extraction, bias gaps and
        amplification, refusal rates, fit verdict, cost; `summary` holds the figures gates name), <report>
        (one page), <replies> (every probe, both replies, how each was judged); logs them to MLflow. Exits non-zero after writing them when a `risk.fail_on` gate holds.
Run:    python stages/risk.py --params params.yaml --base models/base --adapter models/adapter \
            --zero-shot reports/zero_shot --train data/splits/train.jsonl --samples reports/evaluate/samples.csv \
            --canaries data/canaries.json --stage-metrics metrics/clean.json metrics/base.json metrics/judge.json \
            metrics/zero_shot.json metrics/train.json metrics/decoding.json metrics/eval.json \
            --metrics metrics/risk.json --report reports/risk.md --replies reports/risk_replies.csv
"""

import sys
from pathlib import Path

# This workspace's own package first: a queued DVC experiment runs in a copy of the repository, and its
# stages must run the copy's code (what dvc.lock hashes), not the editable install's checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from qlora_pipeline.pipeline.common import model_imports, stage_main
from qlora_pipeline.process import TRACKING


def add_paths(parser):
    parser.add_argument("--base", type=Path, required=True, help="quantize-load's model folder")
    parser.add_argument("--adapter", type=Path, required=True, help="train-adapter's output folder")
    parser.add_argument("--zero-shot", type=Path, required=True, help="the zero-shot stage's folder (base replies)")
    parser.add_argument("--train", type=Path, required=True, help="train split JSONL: memorization is looked for here")
    parser.add_argument("--samples", type=Path, required=True, help="evaluate's samples.csv (generated test replies)")
    parser.add_argument("--canaries", type=Path, required=True, help="split's canaries.json")
    parser.add_argument("--stage-metrics", type=Path, nargs="+", required=True,
                        help="metrics files of clean, quantize-load, train-adapter, choose-decoding, evaluate")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")
    parser.add_argument("--report", type=Path, required=True, help="the one-page Markdown report")
    parser.add_argument("--replies", type=Path, required=True,
                        help="CSV of every probe, both replies and how each was judged (for audit)")


def run(params, args):
    from qlora_pipeline.pipeline.risk import run_risk

    return run_risk(params, args.base, args.adapter, args.train, args.samples, args.canaries, args.stage_metrics,
                    args.metrics, args.report, args.replies,
                    zero_shot_dir=args.zero_shot)


def imports(params):
    return ("qlora_pipeline.pipeline.risk", *model_imports(params), *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
