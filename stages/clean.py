"""clean: normalise, scrub PII, drop excluded speakers, duplicates and short conversations.

Reads:  <raw>/conversations.jsonl, <raw>/manifest.json, params `clean`
Writes: <out>/conversations.jsonl, <metrics> (counts per rule, PII replacements per type)
Run:    python stages/clean.py --params params.yaml --raw data/raw --out data/clean --metrics metrics/clean.json
"""

import sys
from pathlib import Path

from qlora_pipeline.pipeline.common import stage_main
from qlora_pipeline.pipeline.clean import run_clean


def add_paths(parser):
    parser.add_argument("--raw", type=Path, required=True, help="fetch's output folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, lambda params, args: run_clean(params, args.raw, args.out, args.metrics)))
