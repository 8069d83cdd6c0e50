"""style-judge: the persona's style judge, fitted once on the train split; choose-decoding and evaluate read it.

Reads:  <train> (train.jsonl: what the judge learns), <val> (val.jsonl: its held-out quality),
        <base>/ (only for a group's voice: the base model's replies are the contrast), params `seed`,
        `evaluate` (group_judge_prompts, max_new_tokens, batch_size, dequantize_4bit), `model`, `train.method`
Writes: <out>/ (judge.safetensors and terms.json: the judge; judge.json, vocabulary.json), <metrics> (what
        it was fitted on, its accuracy and AUC on validation replies); logs the metrics to MLflow
Run:    python stages/style_judge.py --params params.yaml --train data/splits/train.jsonl \
            --val data/splits/val.jsonl --base models/base --out models/judge --metrics metrics/judge.json
"""

import sys
from pathlib import Path

# This workspace's own package first: a queued DVC experiment runs in a copy of the repository, and its
# stages must run the copy's code (what dvc.lock hashes), not the editable install's checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from qlora_pipeline.pipeline.common import stage_main
from qlora_pipeline.process import JUDGE, TRACKING


def add_paths(parser):
    parser.add_argument("--train", type=Path, required=True, help="train split JSONL: what the judge learns from")
    parser.add_argument("--val", type=Path, required=True, help="validation split JSONL: its held-out quality")
    parser.add_argument("--base", type=Path, required=True, help="quantize-load's model folder (a group's voice)")
    parser.add_argument("--out", type=Path, required=True, help="the judge's folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")


def run(params, args):
    from qlora_pipeline.pipeline.style_judge import run_style_judge

    return run_style_judge(params, args.train, args.val, args.base, args.out, args.metrics)


def imports(params):
    return ("qlora_pipeline.pipeline.style_judge", *JUDGE, *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
