"""zero-shot stage: what the base model says before any training, computed once per base and data.

The base side of evaluate (greedy replies to the test split, the reference replies' likelihood, and
the on-topic scores of the base's replies and the person's own)
and of risk (replies to the probe sets) depend on the base model, the test split and the prompts,
never on an adapter. Here they are generated once, as one workload for the engine; evaluate and
risk read them and generate only the tuned side. An experiment that changes training re-runs
neither this stage nor its cost.
"""

from __future__ import annotations

import time
from pathlib import Path

from qlora_pipeline import decoding, test_replies, topicality, tracking
from qlora_pipeline.config import DecodingSetting, Params
from qlora_pipeline.io import atomic_path, read_json, remove_outputs, write_json
from qlora_pipeline.risk.probes import load_probe_sets, probe_prompt_ids


def run_zero_shot(params: Params, base_dir: Path, test_path: Path, manifest_path: Path, out_dir: Path,
                  metrics_path: Path) -> dict:
    """The base model's test replies with their reference NLL, and its probe replies, into ``out_dir``."""
    from qlora_pipeline.modeling.adapters import autocast_like_training, load_base_for_params
    from qlora_pipeline.modeling.engine import Engine, Request, as_reply

    cfg = params.evaluate
    remove_outputs(out_dir, metrics_path)
    rows = test_replies.read_test(test_path, cfg.max_samples, params.seed)
    system = system_prompt(manifest_path, params)
    probes = load_probe_sets(params.risk.bias_templates, params.seed)
    started = time.perf_counter()
    model, tokenizer, resolved = load_base_for_params(params, base_dir, cfg.dequantize_4bit)
    engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size,
                    autocast=lambda: autocast_like_training(resolved))
    requests, cut, truncated = test_replies.greedy_requests(tokenizer, rows, cfg.max_new_tokens,
                                                            params.train.max_length)
    probe_ids = probe_prompt_ids(tokenizer, system, probes.texts)
    probe_requests = [Request(ids, max_new_tokens=params.risk.max_new_tokens)
                      for name in probe_ids for ids in probe_ids[name]]
    # The base under every setting of the grid but plain greedy (whose replies are the greedy ones above),
    # penalised greedy included: evaluate's base row under the decoding chosen on validation is then one of
    # these, whichever the adapter's choice, and an experiment that retrains generates the tuned side alone.
    grid = {test_replies.setting_key(setting): decoding.pass_requests(
        [r.prompt_ids for r in requests], setting, cfg.samples_per_prompt, cfg.max_new_tokens, params.seed)
        for setting in params.decoding.grid if setting != DecodingSetting()}
    grid_requests = [request for runs in grid.values() for run in runs for request in run]
    results = engine.run(requests + probe_requests + grid_requests)
    side = test_replies.outputs(results[:len(rows)])
    grid_results = iter(results[len(rows) + len(probe_requests):])
    grid_replies = {key: [[as_reply(next(grid_results)) for _ in run] for run in runs] for key, runs in grid.items()}
    results = results[:len(rows) + len(probe_requests)]
    with autocast_like_training(resolved):
        test_replies.score_cut(model, tokenizer, rows, cut, params.train.max_length, cfg.batch_size, side)
        if cfg.on_topic_contexts and len(rows) > 1:  # the base's replies and the person's: no adapter involved
            others = topicality.mismatched_contexts(len(rows), cfg.on_topic_contexts, params.seed)
            side["on_topic_contexts"] = others.shape[1]
            side["on_topic"] = topicality.on_topic(
                model, tokenizer, [row["messages"] for row in rows],
                {"base": [side["replies"]], "reference": [[row["target"] for row in rows]]}, others,
                params.train.max_length, cfg.max_new_tokens)
    replies = iter(r.text.strip() for r in results[len(rows):])
    probe_replies = {name: [next(replies) for _ in ids] for name, ids in probe_ids.items()}
    metrics = {"test_replies": len(rows), "probes": {name: len(ids) for name, ids in probe_ids.items()},
               "grid_replies": len(grid_requests),
               "prompt_truncated": truncated["prompt_truncated"], "reply_truncated": truncated["reply_truncated"],
               "engine": engine.stats.as_dict(), "wall_seconds": round(time.perf_counter() - started, 1)}
    with tracking.pipeline_run(params, "zero-shot"):  # opened first: a store error leaves no outputs
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            test_replies.write_side(tmp, rows, side)
            test_replies.write_probes(tmp, system, probes.texts, probe_replies)
            test_replies.write_grid(tmp, rows, grid_replies)
        write_json(metrics_path, metrics)
        tracking.log_metrics("zero_shot", metrics)
    print(f"zero-shot: the base model's replies to {len(rows)} test examples and {len(probe_requests)} probes in "
          f"{metrics['wall_seconds']} s -> {out_dir}/")
    return metrics


def system_prompt(manifest_path: Path, params: Params) -> str:
    """The system prompt the splits were rendered with (the one an adapter of them is trained with)."""
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    rendering = manifest.get("split", {}) if isinstance(manifest, dict) else {}
    return rendering.get("system_prompt", params.split.system_prompt) or ""
