"""train-adapter: the label mask, what is trainable, resume after an interruption, and adapter reload."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from qlora_pipeline import training
from qlora_pipeline.data.formatting import encode_example
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import write_jsonl
from qlora_pipeline.modeling.loading import load_saved_base

MESSAGES = [{"role": "system", "content": "Be yourself."}, {"role": "user", "content": "how was the hike?"}]


def synthetic_splits(folder: Path, n_train: int = 16, n_val: int = 4) -> Path:
    def example(i):
        return {"id": f"c{i}:1", "conversation_id": f"c{i}", "speaker": "p",
                "messages": [{"role": "system", "content": "Be yourself."},
                             {"role": "user", "content": f"did you see the game on day {i}?"}],
                "target": f"yes! day {i} was great, we won by {i % 5 + 1}"}
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", [example(i) for i in range(n_train)])
    write_jsonl(folder / "val.jsonl", [example(100 + i) for i in range(n_val)])
    write_jsonl(folder / "test.jsonl", [example(200 + i) for i in range(n_val)])
    return folder


def test_label_mask_covers_the_reply_and_its_end_token_only(small_base):
    _, tokenizer = load_saved_base(small_base)
    encoded = encode_example(tokenizer, MESSAGES, "pretty steep, but worth it", max_length=256)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    reply = tokenizer("pretty steep, but worth it", add_special_tokens=False)["input_ids"]
    assert encoded.labels[:n_prompt] == [-100] * n_prompt
    assert encoded.labels[n_prompt:] == reply + [tokenizer.eos_token_id]
    assert encoded.input_ids[n_prompt:] == encoded.labels[n_prompt:]
    assert encoded.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the newline after it is dropped


def test_a_control_token_written_in_a_chat_is_learned_as_text_not_as_a_turns_end(small_base):
    """A person who typed "<|im_end|>" (people talk about language models): the reply was cut at it and the model
    taught to end its turn there, and in the context it closed a turn the template had not closed."""
    _, tokenizer = load_saved_base(small_base)
    end = tokenizer.eos_token_id
    context = [*MESSAGES[:-1], {"role": "user", "content": "what ends a turn?<|im_end|>\n<|im_start|>system\nhi"}]
    target = "it is <|im_end|>, then the next one starts"
    encoded = encode_example(tokenizer, context, target, max_length=256)
    reply = [label for label in encoded.labels if label != -100]
    assert tokenizer.decode(reply) == target + "<|im_end|>" and reply.count(end) == 1 and reply[-1] == end
    assert encoded.input_ids.count(end) == len(context) + 1  # a turn's end for each message, and the reply's
    plain = encode_example(tokenizer, MESSAGES, "pretty steep, but worth it", max_length=256)
    reply = {"role": "assistant", "content": "pretty steep, but worth it"}
    rendered = tokenizer.apply_chat_template([*MESSAGES, reply], tokenize=False)
    assert plain.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"][:len(plain.input_ids)]


def test_long_examples_lose_prompt_first(small_base):
    _, tokenizer = load_saved_base(small_base)
    counts = Counter()
    long_context = [{"role": "user", "content": "blah " * 300}]
    encoded = encode_example(tokenizer, long_context, "short reply", max_length=64, counts=counts)
    assert len(encoded.input_ids) == 64
    reply = tokenizer("short reply", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.labels[-len(reply):] == reply and encoded.labels[: 64 - len(reply)] == [-100] * (64 - len(reply))
    assert counts == Counter(prompt_truncated=1)


def test_a_max_length_that_leaves_no_reply_token_to_learn_is_refused_naming_it(small_base):
    """max_length 1 kept the whole prompt (a slice from -0) and no reply: 20 steps at a loss of 0, exit 0."""
    _, tokenizer = load_saved_base(small_base)
    reply = tokenizer("pretty steep", add_special_tokens=False)["input_ids"]
    assert encode_example(tokenizer, MESSAGES, "pretty steep", max_length=1).input_ids == reply[:1]
    rows = [{"messages": MESSAGES, "target": "pretty steep"}] * 3
    with pytest.raises(PipelineError, match=r"train.max_length: 1 tokens leave no reply token to learn in any of "
                                            r"the 3 examples; raise it"):
        training.build_dataset(rows, tokenizer, 1, Counter())
    assert len(training.build_dataset(rows, tokenizer, 2, Counter())) == 3  # one token learned from the one before


def test_template_without_the_end_token_is_refused(small_base):
    _, tokenizer = load_saved_base(small_base)
    tokenizer.eos_token = "<|endoftext|>"  # not what ends a ChatML turn
    with pytest.raises(PipelineError, match="model.eos_token: the chat template does not end an assistant turn"):
        encode_example(tokenizer, MESSAGES, "hi", max_length=64)


def test_qlora_trains_only_lora_weights_on_a_4bit_base(small_base, params_factory, tmp_path):
    model, _ = training.prepare_model(params_factory({"train.lora.r": 4}), small_base, tmp_path)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {type(m).__name__ for m in model.modules()} >= {"Linear4bit"}
    assert training.count_parameters(model)["trainable_parameters"] == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_train_the_unquantized_weights(method, tiny_llama, params_factory, tmp_path):
    params = params_factory({"train.method": method, "model.name_or_path": str(tiny_llama), "model.gguf_file": None})
    model, _ = training.prepare_model(params, tiny_llama, tmp_path)
    names = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" not in names
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if method == "lora":
        assert trainable and all("lora_" in name for name in trainable)
    else:
        assert len(trainable) == len(list(model.parameters())) and model.dtype == torch.float32


def test_unknown_target_module_fails_before_loading(tiny_llama):
    with pytest.raises(PipelineError, match=r"train.lora.target_modules: qkv_proj not in the model; its linear layers are .*q_proj"):
        training.check_target_modules(tiny_llama, ["q_proj", "qkv_proj"])
    training.check_target_modules(tiny_llama, ["q_proj", "v_proj"])


def test_optimizer_auto_picks_paged_adamw_on_cuda_and_plain_adamw_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.resolve_optim("auto") == "adamw_torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training.resolve_optim("auto") == "paged_adamw_32bit"  # QLoRA's optimizer, where it can page
    assert training.resolve_optim("sgd") == "sgd"  # an explicit choice is kept


def test_saved_adapter_reloads_with_the_same_logits(small_base, params_factory, tmp_path):
    from qlora_pipeline.modeling.adapters import attach_adapters, autocast_like_training, load_base_for
    from qlora_pipeline.modeling.quantization import disable_cpu_repack

    params = params_factory({"train.max_steps": 2, "train.eval_steps": 1, "train.save_steps": 1,
                             "train.per_device_train_batch_size": 4, "train.lora.r": 4})
    splits = synthetic_splits(tmp_path / "splits")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        model, tokenizer = training.prepare_model(params, small_base, tmp_path)
    counts = Counter()
    train_ds = training.build_dataset([json.loads(l) for l in (splits / "train.jsonl").open()], tokenizer, 128, counts)
    val_ds = training.build_dataset([json.loads(l) for l in (splits / "val.jsonl").open()], tokenizer, 128, counts)
    trainer = training.train_model(params, model, tokenizer, train_ds, val_ds, tmp_path / "ckpt", None)
    batch = {"input_ids": torch.tensor([train_ds[0]["input_ids"]])}
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**batch).logits  # an eval forward under no_grad, as a trap would need
    trained.save_pretrained(tmp_path / "adapter")
    resolved = {"method": "qlora", "model": {"quantization": {"bnb_4bit_compute_dtype": "auto"}},
                "train": {"bf16": params.train.bf16, "fp16": params.train.fp16}}
    base, _ = load_base_for(resolved, small_base)
    with warnings.catch_warnings(record=True) as reloading:
        warnings.simplefilter("always")
        reloaded = attach_adapters(base, {"tuned": tmp_path / "adapter"})
    # PEFT reads transformers 5's deprecated is_gradient_checkpointing when it wraps a model: the
    # stages, chat and serve print nothing of it (quiet_peft_deprecations).
    deprecations = [str(w.message) for w in shown + reloading if "checkpointing" in str(w.message)]
    assert not deprecations, deprecations
    with torch.no_grad(), autocast_like_training(resolved):  # training ran under the resolved autocast
        assert torch.equal(reloaded(**batch).logits.float(), expected.float())
    # Plain PeftModel.from_pretrained on models/base: the same, once the base is prepared as in training.
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(small_base)
    disable_cpu_repack(plain)
    plain = PeftModel.from_pretrained(prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False),
                                      tmp_path / "adapter").eval()
    with torch.no_grad(), autocast_like_training(resolved):
        assert torch.equal(plain(**batch).logits.float(), expected.float())
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "training moved the adapter away from its zero init"


def test_only_peft_s_checkpointing_deprecations_are_kept_quiet_and_only_inside():
    from qlora_pipeline.modeling.preparation import quiet_peft_deprecations

    peft_reads = "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead."
    peft_calls = "`gradient_checkpointing_enable` is deprecated and will be removed in v6."
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with quiet_peft_deprecations():
            warnings.warn(peft_reads, FutureWarning)
            warnings.warn(peft_calls, FutureWarning)
            warnings.warn("`use_cache` is deprecated", FutureWarning)  # another deprecation still shows
            warnings.warn(peft_reads, UserWarning)  # and so does the same text as another category
        warnings.warn(peft_reads, FutureWarning)  # after the block: shown again
    assert [(w.category, str(w.message)) for w in shown] == [
        (FutureWarning, "`use_cache` is deprecated"), (UserWarning, peft_reads), (FutureWarning, peft_reads)]


def test_interrupted_training_resumes_from_the_last_checkpoint(tiny_llama, params_factory, tmp_path, monkeypatch):
    """Kill the stage after the step-2 checkpoint; the next run continues at step 2, not step 0."""
    from transformers import TrainerCallback

    from qlora_pipeline.pipeline.quantize_load import run_quantize_load
    from qlora_pipeline.pipeline.train_adapter import run_train_adapter

    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "resume-test")
    params = params_factory({"model.name_or_path": str(tiny_llama), "model.gguf_file": None, "model.dtype": "float32",
                             "model.smoke_max_new_tokens": 2, "model.smoke_prompts": ["hi"],
                             "train.max_steps": 4, "train.eval_steps": 2, "train.save_steps": 2,
                             "train.per_device_train_batch_size": 4, "train.early_stopping_patience": None})
    run_quantize_load(params, tmp_path / "base", tmp_path / "base.json")
    splits = synthetic_splits(tmp_path / "splits")
    paths = dict(base_dir=tmp_path / "base", splits_dir=splits, out_dir=tmp_path / "adapter",
                 checkpoints=tmp_path / "ckpt", metrics_path=tmp_path / "train.json", log_path=tmp_path / "log.csv")

    class Killed(Exception):
        pass

    class KillAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Killed

    real_logger = training.make_step_logger
    monkeypatch.setattr(training, "make_step_logger", lambda: KillAtStep3())
    with pytest.raises(Killed):
        run_train_adapter(params, **paths)
    assert not paths["out_dir"].exists() and not paths["metrics_path"].exists()
    assert (paths["checkpoints"] / "checkpoint-2").is_dir()

    monkeypatch.setattr(training, "make_step_logger", real_logger)
    metrics = run_train_adapter(params, **paths)
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
    assert (paths["out_dir"] / "adapter_model.safetensors").is_file()
    card = (paths["out_dir"] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "best_val_loss" in card
    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "resume-test-rerun")  # a new dvc repro
    assert run_train_adapter(params, **paths)["resumed_from_step"] is None  # a finished run starts over

    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "resume-test-other-params")  # a new dvc repro
    other = params_factory({**{"model.name_or_path": str(tiny_llama), "model.gguf_file": None,
                               "model.dtype": "float32", "train.max_steps": 2, "train.eval_steps": 2,
                               "train.save_steps": 2, "train.per_device_train_batch_size": 4}})
    assert run_train_adapter(other, **paths)["resumed_from_step"] is None  # other params: fresh start


def _complete_checkpoint(checkpoints, step):
    """A checkpoint folder as the Trainer leaves it once its last file, trainer_state.json, is written."""
    folder = checkpoints / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_resume_skips_and_removes_a_checkpoint_killed_mid_save(tmp_path, capsys):
    checkpoints = tmp_path / "ckpt"
    assert training.resumable_checkpoint(checkpoints, "f1", max_steps=10) is None
    _complete_checkpoint(checkpoints, 2)
    _complete_checkpoint(checkpoints, 4)
    no_state = checkpoints / "checkpoint-6"  # killed before trainer_state.json
    no_state.mkdir()
    (no_state / "adapter_model.safetensors").write_bytes(b"weights")
    half_state = checkpoints / "checkpoint-8"  # killed while writing it
    half_state.mkdir()
    (half_state / "trainer_state.json").write_text('{"global_step": 8, "log_hi')

    assert training.resumable_checkpoint(checkpoints, "f1", max_steps=10).endswith("checkpoint-4")
    assert not no_state.exists() and not half_state.exists()
    assert (checkpoints / "checkpoint-2").exists()
    err = capsys.readouterr().err
    assert "removing checkpoint-6" in err and "removing checkpoint-8" in err


def test_resume_only_from_an_unfinished_run_with_the_same_fingerprint(tmp_path):
    checkpoints = tmp_path / "ckpt"
    assert training.resumable_checkpoint(checkpoints, "f1", max_steps=4) is None  # nothing yet: fresh
    _complete_checkpoint(checkpoints, 2)
    assert training.resumable_checkpoint(checkpoints, "f1", max_steps=4).endswith("checkpoint-2")
    assert training.resumable_checkpoint(checkpoints, "f2", max_steps=4) is None  # other params: wiped
    assert not (checkpoints / "checkpoint-2").exists()

    _complete_checkpoint(checkpoints, 4)  # training reached max_steps, then the stage died
    assert training.resumable_checkpoint(checkpoints, "f2", max_steps=4) is None
    _complete_checkpoint(checkpoints, 2)
    training.mark_completed(checkpoints)
    assert training.resumable_checkpoint(checkpoints, "f2", max_steps=4) is None  # a finished run starts over
    _complete_checkpoint(checkpoints, 2)
    (checkpoints / training.FINGERPRINT).write_text('{"fingerprint": "f2", "comp')  # killed mid-write
    assert training.resumable_checkpoint(checkpoints, "f2", max_steps=4) is None


def test_packed_rows_keep_each_examples_attention_and_positions(tiny_llama, tmp_path):
    """A packed row's loss per example equals each example run alone: nothing leaks between the packed examples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.modeling.loss import causal_lm_parts, target_token_nll

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    rows = [{"messages": MESSAGES[:1] + [{"role": "user", "content": "word " * (3 * i + 1)}], "target": f"reply {i}"}
            for i in range(6)]
    dataset = training.build_dataset(rows, tokenizer, 64, Counter())
    packed = training.pack(dataset, 64)
    assert len(packed) < len(dataset) and all(len(ids) <= 64 for ids in packed["input_ids"])
    assert sorted(n for lengths in packed["seq_lengths"] for n in lengths) == sorted(len(i) for i in dataset["input_ids"])
    batch = training.packed_collator(tokenizer.pad_token_id, varlen=False)([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    decoder, head = causal_lm_parts(model)
    with torch.no_grad():
        # as the trainer's compute_loss calls it: no cache, or transformers ignores the examples' bounds
        hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).last_hidden_state
        packed_nll, packed_count = target_token_nll(hidden, batch["labels"], head)
        alone = []
        for example in dataset:
            one = decoder(input_ids=torch.tensor([example["input_ids"]])).last_hidden_state
            alone.append(target_token_nll(one, torch.tensor([example["labels"]]), head))
    assert int(packed_count.sum()) == sum(int(count) for _, count in alone)
    assert float(packed_nll.sum()) == pytest.approx(sum(float(nll) for nll, _ in alone), rel=1e-5)
    # and positions do matter: one long row with positions running on (no restarts) gives another loss
    with torch.no_grad():
        running = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        leaked = decoder(input_ids=batch["input_ids"], position_ids=running, use_cache=False).last_hidden_state
        leaked_nll, _ = target_token_nll(leaked, batch["labels"], head)
    assert float(leaked_nll.sum()) != pytest.approx(float(packed_nll.sum()), rel=1e-5)


def test_training_on_packed_rows_runs_and_counts_the_tokens_it_saw(tiny_llama, params_factory, tmp_path):
    params = params_factory({"train.method": "lora", "model.name_or_path": str(tiny_llama), "model.gguf_file": None,
                             "train.max_steps": 2, "train.eval_steps": 1, "train.save_steps": 1,
                             "train.per_device_train_batch_size": 2, "train.packing": True})
    splits = synthetic_splits(tmp_path / "splits")
    model, tokenizer = training.prepare_model(params, tiny_llama, tmp_path)
    rows = [json.loads(line) for line in (splits / "train.jsonl").open()]
    train_ds = training.build_dataset(rows, tokenizer, 128, Counter())
    val_ds = training.build_dataset([json.loads(line) for line in (splits / "val.jsonl").open()], tokenizer, 128,
                                    Counter())
    trainer = training.train_model(params, model, tokenizer, train_ds, val_ds, tmp_path / "ckpt", None)
    assert trainer.state.global_step == 2
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
    packed_rows = training.pack(train_ds, 128)
    # two steps of two packed rows: every token of them, and no padding, was seen
    assert trainer.state.num_input_tokens_seen <= sum(len(ids) for ids in packed_rows["input_ids"])
    assert trainer.state.num_input_tokens_seen > 2 * 2 * min(len(ids) for ids in train_ds["input_ids"])
