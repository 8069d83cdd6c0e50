"""fetch: read the source named by params `data` into canonical conversations.

Reads:  params `data` (source, path, shape, hf, fields, prompt_template)
Writes: <out>/conversations.jsonl, <out>/manifest.json (source, version, sha256, counts)
Run:    python stages/fetch.py --params params.yaml --out data/raw
"""

import sys
from pathlib import Path

# This workspace's own package first: a queued DVC experiment runs in a copy of the repository, and its
# stages must run the copy's code (what dvc.lock hashes), not the editable install's checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from qlora_pipeline.pipeline.common import stage_main
from qlora_pipeline.process import TRACKING


def add_paths(parser):
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(params, args):
    from qlora_pipeline.pipeline.fetch import run_fetch

    return run_fetch(params, args.out)


def imports(params):
    return ("qlora_pipeline.pipeline.fetch", *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
