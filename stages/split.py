"""split: persona examples with chat context, split train/val/test by conversation.

Reads:  <clean>/conversations.jsonl, params `seed`, `split`, `risk.canaries`, `risk.canary_repeats`
Writes: <out>/train.jsonl, <out>/val.jsonl, <out>/test.jsonl, <canaries> (the inserted and fresh
        canaries: secrets kept outside the training data), <metrics>
Run:    python stages/split.py --params params.yaml --clean data/clean --out data/splits --metrics metrics/split.json \
            --canaries data/canaries.json
"""

import sys
from pathlib import Path

# This workspace's own package first: a queued DVC experiment runs in a copy of the repository, and its
# stages must run the copy's code (what dvc.lock hashes), not the editable install's checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from qlora_pipeline.pipeline.common import stage_main
from qlora_pipeline.process import TRACKING


def add_paths(parser):
    parser.add_argument("--clean", type=Path, required=True, help="clean's output folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")
    parser.add_argument("--canaries", type=Path, required=True, help="canaries record (JSON)")


def run(params, args):
    from qlora_pipeline.pipeline.split import run_split

    return run_split(params, args.clean, args.out, args.metrics, args.canaries)


def imports(params):
    return ("qlora_pipeline.pipeline.split", *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
