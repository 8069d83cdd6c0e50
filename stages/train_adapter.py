"""train-adapter: QLoRA (or LoRA, or full) fine-tuning on the persona examples.

Reads:  <base>/ (quantize-load's model), <splits>/train.jsonl, <splits>/val.jsonl, params `seed`, `model`, `train`
Writes: <out>/ (adapter safetensors or full model, tokenizer, training_config.json, model card README.md),
        <checkpoints>/ (kept across an interrupted run, so the next run resumes),
        <metrics> (losses, best step, tokens/s, peak memory, wall time), <log> (step, train/val loss, lr),
        <pairs> (train.objective dpo: each context with the person's reply and the model's own; else empty)
Run:    python stages/train_adapter.py --params params.yaml --base models/base --splits data/splits \
            --out models/adapter --checkpoints models/checkpoints --metrics metrics/train.json --log metrics/train_log.csv \
            --pairs data/preference/pairs.jsonl --accelerate-configs configs/accelerate
        With train.launcher: accelerate it runs itself again under `accelerate launch` (launching.py).
"""

import sys
from pathlib import Path

# This workspace's own package first: a queued DVC experiment runs in a copy of the repository, and its
# stages must run the copy's code (what dvc.lock hashes), not the editable install's checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from qlora_pipeline import launching
from qlora_pipeline.pipeline.common import stage_main
from qlora_pipeline.process import TRACKING, TRAINING


def add_paths(parser):
    parser.add_argument("--base", type=Path, required=True, help="quantize-load's model folder")
    parser.add_argument("--splits", type=Path, required=True, help="split's output folder")
    parser.add_argument("--out", type=Path, required=True, help="output adapter folder")
    parser.add_argument("--checkpoints", type=Path, required=True, help="checkpoint folder, persisted across runs")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")
    parser.add_argument("--log", type=Path, required=True, help="per-step loss CSV")
    parser.add_argument("--pairs", type=Path, default=None,
                        help="preference pairs JSONL (train.objective dpo; written empty for sft); unset = not kept")
    parser.add_argument("--accelerate-configs", type=Path, required=True,
                        help="folder of the accelerate configs train.accelerate_config names")


def run(params, args):
    if launching.needs_launch(params.train):  # train.launcher: accelerate; this process only waits
        return launching.relaunch(params, args.accelerate_configs, __file__, sys.argv[1:])
    from qlora_pipeline.pipeline.train_adapter import run_train_adapter

    return run_train_adapter(params, args.base, args.splits, args.out, args.checkpoints, args.metrics, args.log,
                             args.pairs)


def imports(params):
    # A process that launches the training processes only waits for them: it imports none of it.
    if launching.needs_launch(params.train):
        return ()
    return ("qlora_pipeline.pipeline.train_adapter", *TRAINING, *TRACKING)


if __name__ == "__main__":
    sys.exit(stage_main(__doc__, add_paths, run, imports=imports))
