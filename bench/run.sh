#!/usr/bin/env bash
# Every benchmark, each with its baseline in the same run; results in bench/results/<machine tag>/.
# Called by `make bench` after `make run` (the benchmarks read models/ and data/splits/) and `make gguf` (llama.cpp).
# Not here: bench/suite_cpu.py (where `make test` spends CPU, by process), which runs the whole test suite on a clone,
# and bench/suite_cpu_by_test.py (the same, test by test), which runs it on one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# The machine's tag: cpu-avx512-bf16, cpu-avx2, gpu-sm90; an Intel CPU's with -intel (cpu-intel-avx512-bf16),
# an AMX one's with -amx where torch can use its tiles. Kept out of the package: every stage imports
# qlora_pipeline.hardware, and DVC re-runs a stage when code it imports changes.
TAG=$($PY - <<'PY'
import sys
sys.path.insert(0, "src")
from qlora_pipeline import hardware
info = hardware.capability()
if info["gpu"]:
    print("gpu-sm" + info["gpu"].rsplit("capability ", 1)[-1].rstrip(")").replace(".", ""))
else:
    vendor = "intel-" if "intel" in info["cpu_model"].lower() else ""
    print(f"cpu-{vendor}{info['cpu_capability'].lower()}" + ("-bf16" if info["native_dtype"] == "bfloat16" else "")
          + ("-amx" if info["cpu_amx"] else ""))
PY
)
OUT=bench/results/$TAG
mkdir -p "$OUT"
$PY bench/train_bench.py --repeats 3 --out "$OUT/train.json"
$PY bench/packing_bench.py --out "$OUT/packing.json"
$PY bench/generation_bench.py --out "$OUT/generation.json"
$PY bench/engine_bench.py --rounds 3 --out "$OUT/engine.json"
$PY bench/dtype_bench.py --out "$OUT/dtype.json"
$PY bench/batch_invariance.py --prompts 48 --out "$OUT/batch_invariance.json"
$PY bench/topicality_bench.py --out "$OUT/topicality.json"
$PY bench/noop_repro.py --out "$OUT/noop_repro.json"
$PY bench/startup_bench.py --rounds 3 --out "$OUT/startup.json"
$PY bench/warm_start_bench.py --out "$OUT/warm_start.json"
$PY bench/judge_bench.py --out "$OUT/judge.json"
$PY bench/serve_bench.py --out "$OUT/serve.json"
$PY bench/long_prompt_bench.py --out "$OUT/long_prompt.json"
$PY bench/export_reference_bench.py --out "$OUT/export_reference.json"
$PY bench/gguf_read_bench.py --out "$OUT/gguf_read.json"
$PY bench/gguf_verify_bench.py --out "$OUT/gguf_verify.json"
bash bench/setup_bench.sh "$OUT/setup.json"
echo "results in $OUT/"
