"""split: choose the persona, turn conversations into chat examples, split by conversation.

An example is the persona's reply (``target``) with up to ``context_turns`` preceding turns as
chat messages: the persona speaks as ``assistant``, everyone else as ``user``. Train, val and
test are grouped by conversation, so no conversation's text leaks across splits, and the
assignment depends only on the conversation ids and ``seed``.
"""

from __future__ import annotations

import random
from collections import Counter
from statistics import mean
from typing import Iterable

from qlora_pipeline.config import SplitConfig
from qlora_pipeline.data.sampling import cap_examples
from qlora_pipeline.data.speakers import message_counts, resolve_persona
from qlora_pipeline.errors import PipelineError

SPLITS = ("train", "val", "test")
# A target this long that appears verbatim in both train and test is real leakage, not "ok" or "lol".
LONG_TARGET_CHARS = 30


def to_turns(messages: list[dict]) -> list[dict]:
    """Merge consecutive messages of one speaker into a turn (chat logs split turns into lines)."""
    turns: list[dict] = []
    for message in messages:
        if turns and turns[-1]["speaker"] == message["speaker"]:
            turns[-1]["text"] += "\n" + message["text"]
        else:
            turns.append({"speaker": message["speaker"], "text": message["text"]})
    return turns


def chat_messages(turns: list[dict], persona: str) -> list[dict]:
    """Turns as chat roles, starting with a user turn and alternating, as strict templates (Llama-2) need."""
    messages: list[dict] = []
    for turn in turns:
        role = "assistant" if turn["speaker"] == persona else "user"
        if messages and messages[-1]["role"] == role:  # several other people in a row: one user turn
            messages[-1]["content"] += "\n" + turn["text"]
        elif messages or role == "user":
            messages.append({"role": role, "content": turn["text"]})
    return messages


def conversation_examples(conv: dict, cfg: SplitConfig, persona: str, skipped: Counter) -> list[dict]:
    """Every persona reply that has a preceding turn becomes one example."""
    turns = to_turns(conv["messages"])
    examples = []
    if turns and (persona == "all" or turns[0]["speaker"] == persona):
        skipped["opening_turn_without_context"] += 1
    for index in range(1, len(turns)):
        speaker = turns[index]["speaker"]
        if persona != "all" and speaker != persona:
            continue
        if len(turns[index]["text"]) < cfg.min_target_chars:
            skipped["target_too_short"] += 1
            continue
        context = chat_messages(turns[max(0, index - cfg.context_turns): index], speaker)
        if not context:  # only the persona's own earlier turns in the window
            skipped["no_user_turn_in_context"] += 1
            continue
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        examples.append({
            "id": f"{conv['id']}:{index}",
            "conversation_id": conv["id"],
            "speaker": speaker,
            "messages": system + context,
            "target": turns[index]["text"],
        })
    return examples


# The key that decides each kind of skipped reply, for a message that says why too few were left.
SKIP_KEYS = {"target_too_short": "split.min_target_chars", "no_user_turn_in_context": "split.context_turns",
             # a chat app's export is cut into conversations at pauses: replies hours apart each open one
             "opening_turn_without_context": "data.session_gap_minutes, for a chat app's export"}


def skipped_note(skipped: Counter) -> str:
    """``; replies skipped: 812 shorter than split.min_target_chars ...``, or nothing if none was skipped."""
    parts = [f"{count} {reason.replace('_', ' ')}" + (f" ({SKIP_KEYS[reason]})" if reason in SKIP_KEYS else "")
             for reason, count in sorted(skipped.items()) if count]
    return f" Persona replies skipped: {', '.join(parts)}." if parts else ""


def assign_conversations(conversation_ids: list[str], cfg: SplitConfig, seed: int, why: str = "") -> dict[str, str]:
    """Seeded shuffle of conversation ids, cut by the ratios; each non-zero split gets at least one.
    ``why``: what left so few, said when the train split would be empty."""
    ids = sorted(conversation_ids)
    random.Random(seed).shuffle(ids)
    ratios = {name: getattr(cfg.ratios, name) for name in SPLITS}
    sizes = {name: int(round(ratios[name] * len(ids))) for name in ("val", "test")}
    for name in ("val", "test"):
        if ratios[name] > 0 and sizes[name] == 0 and len(ids) >= 3:
            sizes[name] = 1
    sizes["train"] = len(ids) - sizes["val"] - sizes["test"]
    if sizes["train"] <= 0:
        raise PipelineError(
            f"split: only {len(ids)} conversation(s) have persona replies; not enough for a train split.{why} "
            "Add data, lower split.ratios.val/test, or choose another split.persona"
            + (", or change a key named above" if why else "")
        )
    assignment, start = {}, 0
    for name in SPLITS:
        for conv_id in ids[start: start + sizes[name]]:
            assignment[conv_id] = name
        start += sizes[name]
    return assignment


def split_examples(conversations: list[dict], cfg: SplitConfig, seed: int, source: str) -> tuple[dict, dict]:
    """Return ``({split: [examples]}, metrics)``."""
    persona = resolve_persona(conversations, cfg.persona, source)
    skipped: Counter = Counter()
    by_conversation = {c["id"]: conversation_examples(c, cfg, persona, skipped) for c in conversations}
    by_conversation = {cid: exs for cid, exs in by_conversation.items() if exs}
    assignment = assign_conversations(list(by_conversation), cfg, seed, skipped_note(skipped))
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for conv_id in sorted(by_conversation):
        splits[assignment[conv_id]].extend(by_conversation[conv_id])
    uncapped = {name: len(rows) for name, rows in splits.items()}
    splits = {name: cap_examples(rows, getattr(cfg.max_examples, name), seed) for name, rows in splits.items()}
    metrics = split_metrics(splits, persona, conversations, skipped, uncapped)
    return splits, metrics


def split_metrics(splits: dict, persona: str, conversations: list[dict], skipped: Counter, uncapped: dict) -> dict:
    counts = message_counts(conversations)
    train_targets = {ex["target"] for ex in splits["train"]}
    test_targets = [ex["target"] for ex in splits["test"]]
    overlap = [t for t in test_targets if t in train_targets]
    long_test = [t for t in test_targets if len(t) >= LONG_TARGET_CHARS]
    metrics = {
        "persona": persona,
        "persona_messages": sum(counts.values()) if persona == "all" else counts[persona],
        "speakers": len(counts),
        "examples_skipped": dict(sorted(skipped.items())),
        "test_targets_in_train": len(overlap),
        "test_targets_in_train_share": _share(len(overlap), len(test_targets)),
        "test_long_targets_in_train": sum(len(t) >= LONG_TARGET_CHARS for t in overlap),
        "test_long_targets_in_train_share": _share(
            sum(len(t) >= LONG_TARGET_CHARS for t in overlap), len(long_test)
        ),
    }
    for name, rows in splits.items():
        metrics[name] = {
            "examples": len(rows),
            "examples_before_cap": uncapped[name],
            "conversations": len({ex["conversation_id"] for ex in rows}),
            "mean_target_chars": _mean(len(ex["target"]) for ex in rows),
            "mean_context_chars": _mean(sum(len(m["content"]) for m in ex["messages"]) for ex in rows),
            "mean_context_turns": _mean(sum(m["role"] != "system" for m in ex["messages"]) for ex in rows),
        }
    return metrics


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return round(mean(values), 2) if values else 0.0
