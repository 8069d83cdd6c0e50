"""Shared fixtures: the real params.yaml as a dict to override, and small source files."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from qlora_pipeline.config import Params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]

# No hub is reachable; tests must never wait on one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def base_params_dict() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def make_params(base: dict, overrides: dict | None = None, tmp_path: Path | None = None) -> Params:
    """The repository's params with dotted-key overrides, and MLflow pointed into tmp_path."""
    raw = copy.deepcopy(base)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    if tmp_path is not None:
        raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return params_from_dict(raw)


@pytest.fixture
def params_factory(base_params_dict, tmp_path):
    return lambda overrides=None: make_params(base_params_dict, overrides, tmp_path)


CHAT_ROWS = [
    # conversation c1: alice and bob, alice is the most active speaker overall
    {"conv": "c1", "who": "alice", "msg": "hi bob, how was the trip?", "ts": "2020-01-01T10:00:00Z"},
    {"conv": "c1", "who": "bob", "msg": "great, thanks! we hiked a lot", "ts": "2020-01-01T10:00:05Z"},
    {"conv": "c1", "who": "alice", "msg": "nice, where did you go?", "ts": "2020-01-01T10:00:09Z"},
    {"conv": "c1", "who": "bob", "msg": "the alps, mostly around zermatt", "ts": "2020-01-01T10:00:15Z"},
    {"conv": "c1", "who": "alice", "msg": "i have always wanted to go there", "ts": "2020-01-01T10:00:20Z"},
    {"conv": "c2", "who": "carol", "msg": "alice are you coming tonight?", "ts": "2020-01-02T18:00:00Z"},
    {"conv": "c2", "who": "alice", "msg": "yes! mail me at alice@example.com", "ts": "2020-01-02T18:01:00Z"},
    {"conv": "c2", "who": "carol", "msg": "done, see you at 8:30", "ts": "2020-01-02T18:02:00Z"},
    {"conv": "c2", "who": "alice", "msg": "see you then", "ts": "2020-01-02T18:03:00Z"},
]


def write_chat_jsonl(path: Path, rows=CHAT_ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CHAT_FIELDS = {"data.fields.conversation_id": "conv", "data.fields.speaker": "who",
               "data.fields.text": "msg", "data.fields.time": "ts"}


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="session")
def quantized_base(tmp_path_factory, base_params_dict) -> Path:
    """The real SmolLM2-135M GGUF, quantized to NF4 by the quantize-load stage (built once per session)."""
    from qlora_pipeline.pipeline.quantize_load import run_quantize_load

    tmp = tmp_path_factory.mktemp("base")
    params = make_params(base_params_dict, {"model.smoke_prompts": ["hi, how are you?"],
                                            "model.smoke_max_new_tokens": 8}, tmp)
    os.environ["QLORA_PIPELINE_RUN_KEY"] = "tests-quantized-base"
    try:
        run_quantize_load(params, tmp / "base", tmp / "base.json")
    finally:
        del os.environ["QLORA_PIPELINE_RUN_KEY"]
    return tmp / "base"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, quantized_base) -> Path:
    """A tiny random Llama with the real tokenizer: for tests where only shapes matter."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(quantized_base)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
