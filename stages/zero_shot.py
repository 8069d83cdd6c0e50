"""zero-shot: the base model's replies and likelihoods, once per base and data; evaluate and risk read them.

Reads:  <base>/, <test> (test.jsonl), <manifest> (the splits' manifest: the system prompt they were
        rendered with), params `seed`, `evaluate` (samples, tokens, batch), `risk` (probe tokens and
        templates), `model`, `train` (max_length; the method, precision and autocast of the base)
Writes: <out>/ (test.jsonl: per test example the base's greedy reply, whether it ended its turn,
        the reference reply's NLL; probes.json: its replies to the risk probes), <metrics>
Run:    python stages/zero_shot.py --params params.yaml --base models/base --test data/splits/test.jsonl \
            --manifest data/splits/manifest.json --out reports/zero_shot --metrics metrics/zero_shot.json
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
    parser.add_argument("--test", type=Path, required=True, help="test split JSONL")
    parser.add_argument("--manifest", type=Path, required=True, help="the splits' manifest.json")
    parser.add_argument("--out", type=Path, required=True, help="the base model's replies (folder)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")


def run(params, args):
    from qlora_pipeline.pipeline.zero_shot import run_zero_shot

    return run_zero_shot(params, args.base, args.test, args.manifest, args.out, args.metrics)


def imports(params):
    return ("qlora_pipeline.pipeline.zero_shot", *model_imports(params, ("qlora",)), *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
