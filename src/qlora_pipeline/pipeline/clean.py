"""clean stage: raw conversations -> cleaned conversations and metrics/clean.json."""

from __future__ import annotations

import time
from pathlib import Path

from qlora_pipeline import tracking
from qlora_pipeline.config import Params
from qlora_pipeline.data.cleaning import clean_conversations, hide_other_speakers, resolve_exclusions
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import atomic_path, read_json, remove_outputs, write_json, write_jsonl
from qlora_pipeline.layout import CONVERSATIONS, MANIFEST
from qlora_pipeline.pipeline.common import read_conversations


def run_clean(params: Params, raw_dir: Path, out_dir: Path, metrics_path: Path) -> dict:
    """Clean ``raw_dir`` into ``out_dir`` and write ``metrics_path``; fail if nothing is left."""
    remove_outputs(out_dir, metrics_path)
    source = raw_dir / CONVERSATIONS
    manifest = read_json(raw_dir / MANIFEST)
    started = time.perf_counter()
    raw = list(read_conversations(source))
    cfg = resolve_exclusions(raw, params.clean, str(source))
    kept, metrics = clean_conversations(raw, cfg)
    # A prompt/response or message-list data set's speakers are the roles user and assistant: nobody to hide.
    if params.clean.pseudonymize_speakers and manifest.get("shape") not in ("pairs", "messages") and kept:
        kept, metrics["pseudonymized"] = hide_other_speakers(raw, kept, params.split.persona, str(source))
    else:
        metrics["pseudonymized"] = {"speakers": 0, "names_in_text": 0}
    # The cost of cleaning: seconds with the regex engine, minutes with presidio (the risk stage adds it up).
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    metrics["rows_rejected_at_fetch"] = manifest.get("counts", {}).get("rows_rejected", {})
    if "export" in manifest:  # the chat app's own lines (notices, placeholders), removed by fetch
        metrics["rows_removed_at_fetch"] = manifest["export"]["rows_removed"]
    if not kept:
        raise PipelineError(f"{source}: every conversation was removed by clean {_removal(metrics)}"
                            f"{_session_hint(metrics, manifest)}")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / CONVERSATIONS, kept)
        # Provenance travels with the data: later stages and the model card cite the source's hash.
        write_json(tmp / MANIFEST, {**manifest, "clean": {"conversations": len(kept)}})
    write_json(metrics_path, metrics)
    with tracking.pipeline_run(params, "clean"):
        tracking.log_metrics("clean", metrics)
    print(f"clean: kept {metrics['conversations_out']}/{metrics['conversations_in']} conversations, "
          f"{metrics['messages_out']}/{metrics['messages_in']} messages, "
          f"{metrics['pii_replacements']['total']} PII replacements -> {out_dir / CONVERSATIONS}, {metrics_path}")
    return metrics


# The key behind each reason clean removes a message or a conversation for.
REMOVED_BY = {"too_short": "clean.min_chars", "too_long": "clean.max_chars",
              "excluded_speaker": "clean.exclude_speakers", "duplicate_exact": "clean.dedup",
              "duplicate_near": "clean.dedup (or clean.near_dup_ratio)",
              "too_few_messages": "clean.min_messages", "too_few_speakers": "clean.min_speakers"}


def _removal(metrics: dict) -> str:
    """What removed what, the counts that are not zero, and the keys to loosen: those of the reasons that acted
    (the hint named min_chars/max_chars/min_messages whatever had removed the conversations)."""
    counts = {kind: {reason: n for reason, n in metrics[f"{kind}_removed"].items() if n and reason != "total"}
              for kind in ("messages", "conversations")}
    reasons = [r.split(":")[-1] for found in counts.values() for r in found]
    keys = list(dict.fromkeys(REMOVED_BY[r] for r in reasons if r in REMOVED_BY))
    return (f"(messages removed: {counts['messages']}; conversations removed: {counts['conversations']}); "
            + (f"loosen {', '.join(keys)}" if keys else "check the data: every message was empty"))


def _session_hint(metrics: dict, manifest: dict) -> str:
    """Where a chat export was cut into conversations at pauses and they came out too small, the gap is the fix:
    a chat whose replies come hours apart is cut after every message, and loosening min_messages then
    min_speakers only led to split's refusal."""
    gap = manifest.get("export", {}).get("session_gap_minutes")
    small = {"too_few_messages", "too_few_speakers"} & {r.split(":")[-1] for r, n in
                                                        metrics["conversations_removed"].items() if n}
    if gap is None or not small:
        return ""
    return (f"; or raise data.session_gap_minutes (now {gap:g}): the export is cut into a new conversation "
            f"wherever more than {gap:g} minutes pass between messages (null: one conversation per chat)")
