"""clean: normalise, scrub PII, drop excluded speakers, duplicates and short conversations.

Reads:  <raw>/conversations.jsonl, <raw>/manifest.json, params `clean`
Writes: <out>/conversations.jsonl, <metrics> (counts per rule, PII replacements per type)
Run:    python stages/clean.py --params params.yaml --raw data/raw --out data/clean --metrics metrics/clean.json
"""

import sys
from pathlib import Path

# This workspace's own package first: a queued DVC experiment runs in a copy of the repository, and its
# stages must run the copy's code (what dvc.lock hashes), not the editable install's checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from qlora_pipeline.pipeline.common import stage_main
from qlora_pipeline.process import TRACKING


def add_paths(parser):
    parser.add_argument("--raw", type=Path, required=True, help="fetch's output folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")


def run(params, args):
    from qlora_pipeline.pipeline.clean import run_clean

    return run_clean(params, args.raw, args.out, args.metrics)


def imports(params):
    return ("qlora_pipeline.pipeline.clean", *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
