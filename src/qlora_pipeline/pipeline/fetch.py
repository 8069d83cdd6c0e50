"""fetch stage: the configured source -> canonical conversations and a manifest."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qlora_pipeline import tracking
from qlora_pipeline.config import Params
from qlora_pipeline.data.sources import fetch
from qlora_pipeline.io import atomic_path, remove_outputs, write_json, write_jsonl
from qlora_pipeline.layout import CONVERSATIONS, MANIFEST


def run_fetch(params: Params, out_dir: Path) -> dict:
    """Read ``params.data`` into ``out_dir/conversations.jsonl`` and ``out_dir/manifest.json``."""
    remove_outputs(out_dir)
    result = fetch(params.data)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / CONVERSATIONS, result.conversations)
        write_json(tmp / MANIFEST, result.manifest)
    counts = result.manifest["counts"]
    with tracking.pipeline_run(params, "fetch"):
        tracking.log_metrics("fetch", counts)
        tracking.log_metrics("fetch", {"source": result.manifest["source"], "sha256": result.manifest["sha256"]})
        if "export" in result.manifest:
            tracking.log_metrics("fetch", {"export": result.manifest["export"]})
    print(f"fetch: {counts['conversations']} conversations, {counts['messages']} messages, "
          f"{counts['speakers']} speakers{_export_summary(result.manifest)} -> {out_dir / CONVERSATIONS}, "
          f"{out_dir / MANIFEST}")
    if "export" in result.manifest:
        # Display names, as split.persona and clean.exclude_speakers take them: who is in the export.
        print(f"fetch: most messages: {_top_speakers(result.conversations)}")
    return result.manifest


def _export_summary(manifest: dict) -> str:
    """" (3 files, 2 chats; 12 app lines removed, 1 row rejected)" for a chat-app export, else ""."""
    export = manifest.get("export")
    if not export:
        return ""
    skipped = sum(export["threads_skipped"].values())
    return (f" ({export['files']} file(s), {export['threads']} chat(s){f', {skipped} skipped' if skipped else ''}; "
            f"{sum(export['rows_removed'].values())} app line(s) removed, "
            f"{sum(manifest['counts']['rows_rejected'].values())} row(s) rejected)")


def _top_speakers(conversations: list[dict], shown: int = 8) -> str:
    counts = Counter(m["speaker"] for c in conversations for m in c["messages"])
    more = f", and {len(counts) - shown} more" if len(counts) > shown else ""
    return ", ".join(f"{name} ({n})" for name, n in counts.most_common(shown)) + more
