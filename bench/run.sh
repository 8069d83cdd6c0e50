#!/usr/bin/env bash
# Every benchmark, each with its baseline in the same run; results in bench/results/<machine tag>/.
# Called by `make bench` after `make run` (the benchmarks read models/ and data/splits/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TAG=$($PY -c "import sys; sys.path.insert(0, 'src'); from qlora_pipeline import hardware; print(hardware.machine_tag())")
OUT=bench/results/$TAG
mkdir -p "$OUT"
$PY bench/train_bench.py --repeats 3 --out "$OUT/train.json"
$PY bench/generation_bench.py --out "$OUT/generation.json"
$PY bench/noop_repro.py --out "$OUT/noop_repro.json"
echo "results in $OUT/"
