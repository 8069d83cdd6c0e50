"""choose-decoding: the decoding of the tuned model picked on the validation split (never the test split).

Reads:  <base>/, <adapter>/, <val> (val.jsonl, what the settings are scored on), <judge>/ (the style
        judge and the training chats' vocabulary, from the style-judge stage), params `seed`, `decoding`, `evaluate` (samples per prompt, batch, tokens, intervals)
Writes: <out> (every grid setting with its validation persona score, ROUGE-L and repeated-3-gram share,
        intervals, the objective, and the chosen one; read by evaluate, chat and serve),
        <metrics> (the chosen setting and its validation scores); logs both to MLflow
Run:    python stages/choose_decoding.py --params params.yaml --base models/base --adapter models/adapter \
            --val data/splits/val.jsonl --judge models/judge --out reports/decoding.json \
            --metrics metrics/decoding.json
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
    parser.add_argument("--val", type=Path, required=True, help="validation split JSONL: what settings are scored on")
    parser.add_argument("--judge", type=Path, required=True, help="the style-judge stage's folder")
    parser.add_argument("--out", type=Path, required=True, help="the grid and the chosen decoding (JSON)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file: the choice")


def run(params, args):
    from qlora_pipeline.pipeline.choose_decoding import run_choose_decoding

    return run_choose_decoding(params, args.base, args.adapter, args.val, args.judge, args.out, args.metrics)


def imports(params):
    return ("qlora_pipeline.pipeline.choose_decoding", *model_imports(params), *JUDGE, *ROUGE, *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
