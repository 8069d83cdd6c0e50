"""Preference tuning without preference data: the person's real reply over the model's own (SPIN-style DPO).

Nobody has preference labels for their own chats, but every training example holds one: the reply
the person actually gave is preferred over a reply the model makes for the same context. After
supervised tuning (SFT), the adapter samples a reply to each of ``max_prompts`` training contexts
(``rejected_from: adapter``, the self-play of SPIN, Chen et al. 2024; or the base's reply,
``rejected_from: base``), and TRL's ``DPOTrainer`` tunes the same adapter on (context, the
person's reply, the model's reply). The reference the DPO loss measures against is the SFT adapter
itself, which TRL copies, frozen, into a second adapter named ``ref`` (``reference: adapter``,
SPIN's choice), or the adapter switched off (``reference: base``): never a second copy of the base.

The pairs are an output of the train-adapter stage (``data/preference/pairs.jsonl``, in the folder
DVC tracks), so DVC keeps them by hash beside the adapter they shaped.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

from qlora_pipeline.config import Params, PreferenceConfig
from qlora_pipeline.data.chat_ids import template_ids
from qlora_pipeline.data.sampling import cap_examples

REFERENCE_ADAPTER = "ref"  # the name under which TRL's DPOTrainer looks for a reference adapter


def pick_contexts(rows: Sequence[dict], cfg: PreferenceConfig, seed: int) -> list[dict]:
    """The training examples whose contexts get a rejected reply (a seeded sample)."""
    return cap_examples(list(rows), cfg.max_prompts, seed)


def rejected_replies(model: Any, tokenizer: Any, rows: Sequence[dict], cfg: PreferenceConfig, seed: int,
                     batch_size: int = 64) -> list[str]:
    """The model's own sampled reply to each row's context (``generate()``, seeded; left padding)."""
    import torch
    from transformers import set_seed

    # The prompts as training renders them.
    prompts = [template_ids(tokenizer, row["messages"], add_generation_prompt=True) for row in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    set_seed(seed)
    replies: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                                 top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True)  # training turned it off
            replies += [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    model.train(was_training)
    return replies


def preference_rows(rows: Sequence[dict], rejected: Sequence[str]) -> list[dict]:
    """TRL's conversational preference format: the context, the person's reply (chosen), the model's (rejected).

    A pair whose two replies are the same text teaches nothing and is left out (counted by the caller).
    """
    return [{"id": row["id"], "prompt": row["messages"], "chosen": [{"role": "assistant", "content": row["target"]}],
             "rejected": [{"role": "assistant", "content": reply}]}
            for row, reply in zip(rows, rejected) if reply.strip() != row["target"].strip()]


def dpo_rows(pairs: list[dict]) -> list[dict]:
    """The pairs as DPOTrainer reads them. A control token written in a chat is text here too, as in SFT
    (``data.chat_ids``): TRL tokenizes each row itself, with the row's ``chat_template_kwargs``."""
    return [{**{k: row[k] for k in ("prompt", "chosen", "rejected")},
             "chat_template_kwargs": {"sanitize_control_tokens": True}} for row in pairs]


def tune(params: Params, model: Any, tokenizer: Any, pairs: list[dict], precision: Any, adapter: str) -> dict:
    """DPO on ``pairs`` of the adapter ``adapter`` of ``model`` (a PEFT model), in place; the run's metrics."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = params.train.preference
    with tempfile.TemporaryDirectory(prefix="dpo-") as folder:
        args = DPOConfig(output_dir=str(Path(folder) / "out"), max_steps=cfg.max_steps,
                         per_device_train_batch_size=cfg.per_device_train_batch_size,
                         learning_rate=cfg.learning_rate, lr_scheduler_type="constant", beta=cfg.beta,
                         loss_type=[cfg.loss_type], max_length=params.train.max_length, seed=params.seed,
                         bf16=precision.bf16, fp16=precision.fp16, logging_steps=1, save_strategy="no",
                         report_to=[], use_cpu=not _cuda(), disable_tqdm=True)
        dataset = Dataset.from_list(dpo_rows(pairs))
        # Given a PEFT model with a trained adapter, TRL copies it, frozen, as the adapter "ref" and measures
        # against that (SPIN's reference). Without "ref" it switches the adapters off: the base as reference.
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        if cfg.reference == "base" and REFERENCE_ADAPTER in model.peft_config:
            model.delete_adapter(REFERENCE_ADAPTER)
            model.set_adapter(adapter)
        trainer.train()
        if REFERENCE_ADAPTER in model.peft_config:
            model.delete_adapter(REFERENCE_ADAPTER)
            model.set_adapter(adapter)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    first, last = (logged[0], logged[-1]) if logged else ({}, {})

    def value(entry: dict, key: str) -> float | None:
        return round(float(entry[key]), 5) if key in entry else None

    return {"pairs": len(pairs), "steps": trainer.state.global_step,
            "first_loss": value(first, "loss"), "final_loss": value(last, "loss"),
            "first_reward_accuracy": value(first, "rewards/accuracies"),
            "final_reward_accuracy": value(last, "rewards/accuracies"),
            "final_reward_margin": value(last, "rewards/margins")}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
