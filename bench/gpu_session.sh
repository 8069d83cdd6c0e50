#!/usr/bin/env bash
# The GPU checks that fit one call of the lent device machine, run one after another; each part's
# output and JSON land in $OUT (what comes back from the machine), and a failed part does not stop
# the next one.
#   gpu_check  the training path on CUDA (bench/gpu_check.py): NF4 base, QLoRA steps, adapter reload,
#              the library engine's generation, perplexity
#   gpu_fsdp   the same under accelerate's launcher with configs/accelerate/fsdp_qlora.yaml, one process
#   gpu_serve  the serving engine on a TinyLlama-shape 4-bit base (bench/gpu_serve.py)
# The machine reaches no index and lacks bitsandbytes, pydantic, datasets and our peft floor: they
# travel as wheels (.whl/, ignored by git), installed into a folder of their own so the machine's
# torch, transformers and accelerate stay. Tokenizer files of the SmolLM2 base travel in .gpu_tok/.
# Prepare here, after `make run` (models/base holds the tokenizer files):
#   mkdir -p .gpu_tok && cp models/base/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu_tok/
#   echo /.gpu_tok/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     bitsandbytes==0.50.2 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
#     typing-inspection datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18
# (datasets 4.4 rather than 5.x: 5.x needs huggingface-hub 2, which the machine's transformers 5.17
# does not take.) Then the device call, carrying .whl and .gpu_tok: bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-session}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
  { echo "gpu_session: installing .whl/ failed" >&2; exit 1; }
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
STEPS="$OUT/steps.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, peft, bitsandbytes, accelerate
import pyarrow, huggingface_hub, datasets
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "bitsandbytes", bitsandbytes.__version__, "accelerate", accelerate.__version__, "pyarrow", pyarrow.__version__,
      "huggingface_hub", huggingface_hub.__version__, "datasets", datasets.__version__)'; } >"$STEPS" 2>&1

step() {  # step NAME SECONDS COMMAND...: runs it with a time limit, its output in NAME.log
  local name=$1 limit=$2 started rc
  shift 2
  started=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - started)) s" | tee -a "$STEPS"
}

step gpu_check 120 python3 bench/gpu_check.py --tokenizer .gpu_tok --out "$OUT/gpu_check.json"
step gpu_fsdp 120 python3 -m accelerate.commands.launch --config_file configs/accelerate/fsdp_qlora.yaml \
  --num_processes 1 bench/gpu_check.py --fsdp --tokenizer .gpu_tok --out "$OUT/gpu_fsdp.json"
step gpu_serve 240 python3 bench/gpu_serve.py --tokenizer .gpu_tok --out "$OUT/gpu_serve.json"
