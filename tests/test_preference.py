"""Preference tuning without preference data: the pairs, and DPO on the SFT adapter (tiny 4-bit Llama)."""

from __future__ import annotations

import json

import pytest

from conftest import make_params
from qlora_pipeline import evaluation, preference
from qlora_pipeline.io import read_jsonl

ROWS = [{"id": f"c{i}:1", "messages": [{"role": "user", "content": f"day {i}?"}], "target": t}
        for i, t in enumerate(["yes", "no way", "maybe later"])]


def test_pairs_prefer_the_persons_reply_and_leave_out_a_rejected_reply_equal_to_it():
    pairs = preference.preference_rows(ROWS, ["yes ", "sure thing", "who knows"])
    assert [p["id"] for p in pairs] == ["c1:1", "c2:1"]  # the first pair's two replies are the same text
    assert pairs[0]["prompt"] == ROWS[1]["messages"]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "no way"}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "sure thing"}]


def test_dpo_reads_a_control_token_written_in_a_chat_as_text(tiny_llama):
    """TRL tokenizes DPO's rows itself: "<|im_end|>" in a reply was the end of its turn there, text in SFT."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [{"id": "c1:1", "messages": [{"role": "user", "content": "what ends a turn?"}], "target": "<|im_end|> does"}]
    (row,) = preference.dpo_rows(preference.preference_rows(rows, ["no idea"]))
    ids = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True,
                                        **row["chat_template_kwargs"])["input_ids"]  # as TRL's _tokenize calls it
    assert ids.count(end) == 3  # the template's system turn, the user's, the reply's: not the one in its text
    assert "<|im_end|> does<|im_end|>" in tokenizer.decode(ids)


@pytest.fixture(scope="module")
def two_runs(tiny_llama, base_params_dict, tmp_path_factory):
    """The same tiny training twice: SFT alone, and SFT then DPO on 8 self-play pairs."""
    import os

    from test_training import synthetic_splits

    from qlora_pipeline.pipeline.quantize_load import run_quantize_load
    from qlora_pipeline.pipeline.train_adapter import run_train_adapter

    tmp = tmp_path_factory.mktemp("preference")
    common = {"model.name_or_path": str(tiny_llama), "model.gguf_file": None, "model.dtype": "float32",
              "model.smoke_prompts": ["hi"], "model.smoke_max_new_tokens": 2, "train.bf16": False, "train.fp16": False,
              "train.max_steps": 2, "train.eval_steps": 1, "train.save_steps": 1, "train.per_device_train_batch_size": 4,
              "train.preference.max_prompts": 8, "train.preference.max_steps": 4,
              "train.preference.learning_rate": 0.005, "train.preference.max_new_tokens": 8}
    splits = synthetic_splits(tmp / "splits", n_train=16, n_val=4)
    os.environ["QLORA_PIPELINE_RUN_KEY"] = "preference"
    try:
        run_quantize_load(make_params(base_params_dict, common, tmp), tmp / "base", tmp / "base.json")
        runs = {}
        for objective in ("sft", "dpo"):
            params = make_params(base_params_dict, {**common, "train.objective": objective}, tmp)
            folder = tmp / objective
            metrics = run_train_adapter(params, tmp / "base", splits, folder / "adapter", folder / "ckpt",
                                        folder / "train.json", folder / "log.csv", folder / "pairs.jsonl")
            runs[objective] = (params, folder, metrics)
    finally:
        del os.environ["QLORA_PIPELINE_RUN_KEY"]
    return tmp, splits, runs


def test_dpo_writes_its_pairs_and_tunes_the_sft_adapter_toward_the_persons_replies(two_runs):
    from safetensors.torch import load_file

    tmp, splits, runs = two_runs
    _, sft_dir, sft_metrics = runs["sft"]
    params, dpo_dir, metrics = runs["dpo"]
    assert list(read_jsonl(sft_dir / "pairs.jsonl")) == [] and "preference" not in sft_metrics
    pairs = [row for _, row in read_jsonl(dpo_dir / "pairs.jsonl")]
    targets = {row["id"]: row["target"] for _, row in read_jsonl(splits / "train.jsonl")}
    assert 0 < len(pairs) <= 8 and all(p["chosen"][0]["content"] == targets[p["id"]] for p in pairs)
    assert all(p["rejected"][0]["content"] != p["chosen"][0]["content"] for p in pairs)
    tuned = metrics["preference"]
    assert tuned["steps"] == 4 and tuned["pairs"] == len(pairs) and tuned["contexts"] == 8
    assert json.loads((dpo_dir / "train.json").read_text())["preference"] == tuned
    # the SFT part is the same training (same seed): the adapters differ by what DPO did, and only by it
    sft_weights = load_file(sft_dir / "adapter" / "adapter_model.safetensors")
    dpo_weights = load_file(dpo_dir / "adapter" / "adapter_model.safetensors")
    assert sft_weights.keys() == dpo_weights.keys()  # TRL's frozen "ref" copy is not saved
    assert any(not (sft_weights[k] == dpo_weights[k]).all() for k in sft_weights)
    resolved = json.loads((dpo_dir / "adapter" / "training_config.json").read_text())
    assert resolved["train"]["objective"] == "dpo"
    # on its pairs, the tuned adapter prefers the person's replies over its own more than SFT did
    margins = {name: preference_margin(tmp / "base", folder / "adapter", pairs)
               for name, folder in (("sft", sft_dir), ("dpo", dpo_dir))}
    assert margins["dpo"] > margins["sft"], margins


def preference_margin(base_dir, adapter_dir, pairs) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected) under the adapter."""
    from qlora_pipeline.modeling.adapters import load_tuned

    model, tokenizer, _ = load_tuned(base_dir, adapter_dir)
    rows = lambda side: [{"messages": p["prompt"], "target": p[side][0]["content"]} for p in pairs]  # noqa: E731
    chosen, _ = evaluation.reference_nll(model, tokenizer, rows("chosen"), 256, 8)
    rejected, _ = evaluation.reference_nll(model, tokenizer, rows("rejected"), 256, 8)
    return float((rejected - chosen).mean())
