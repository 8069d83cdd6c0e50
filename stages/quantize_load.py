"""quantize-load: load the base model, quantize it with bitsandbytes per params, save it.

Reads:  params `model` (name_or_path, gguf_file, revision, dtype, quantization, smoke prompts)
Writes: <out>/ (quantized weights, config, tokenizer; plain from_pretrained reloads it),
        <metrics> (parameters, memory footprint, bits/param, load time, zero-shot smoke replies)
Run:    python stages/quantize_load.py --params params.yaml --out models/base --metrics metrics/base.json
"""

import sys
from pathlib import Path

# This workspace's own package first: a queued DVC experiment runs in a copy of the repository, and its
# stages must run the copy's code (what dvc.lock hashes), not the editable install's checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from qlora_pipeline.pipeline.common import stage_main
from qlora_pipeline.process import QUANTIZED_MODEL, TRACKING


def add_paths(parser):
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")


def run(params, args):
    from qlora_pipeline.pipeline.quantize_load import run_quantize_load

    return run_quantize_load(params, args.out, args.metrics)


def imports(params):
    return ("qlora_pipeline.pipeline.quantize_load", *QUANTIZED_MODEL, "gguf", *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
