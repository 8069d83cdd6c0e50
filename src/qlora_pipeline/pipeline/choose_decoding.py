"""choose-decoding stage: each setting of ``decoding.grid`` scored on the validation split; the best is kept.

Only the validation split (what the tuned model says) and the train split (what the style judge
learns from) are read: the test split never takes part in the choice, so evaluate's chosen row
on test is an honest estimate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qlora_pipeline import decoding, evaluation, tracking
from qlora_pipeline.config import Params
from qlora_pipeline.data.sampling import cap_examples
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import read_jsonl, remove_outputs, write_json
from qlora_pipeline.pipeline.common import without_canaries

EXAMPLES = 5  # replies of each setting kept in the report, to read beside the numbers


def read_split(path: Path, cap: int | None, seed: int, fix: str) -> list[dict]:
    rows = [row for _, row in read_jsonl(path)]
    if not rows:
        raise PipelineError(f"{path}: the split is empty; {fix}")
    return cap_examples(rows, cap, seed)


def run_choose_decoding(params: Params, base_dir: Path, adapter_dir: Path, val_path: Path, train_path: Path,
                        out_path: Path, metrics_path: Path) -> dict:
    """Score every grid setting on ``val_path``; write the grid and the choice to ``out_path``, the choice to ``metrics_path``."""
    from qlora_pipeline import fidelity
    from qlora_pipeline.modeling.adapters import (adapter_digest, autocast_like_training, load_tuned_for_generation,
                                                  read_training_config)

    cfg, grid_cfg = params.evaluate, params.decoding
    remove_outputs(out_path, metrics_path)
    read_training_config(adapter_dir)  # fail fast, naming the missing stage
    rows = read_split(val_path, grid_cfg.max_samples, params.seed,
                      "raise split.ratios.val or split.max_examples.val and re-run split")
    train_rows = without_canaries([row for _, row in read_jsonl(train_path)])
    known_words = fidelity.vocabulary(train_rows)
    started = time.perf_counter()
    model, tokenizer, resolved = load_tuned_for_generation(base_dir, adapter_dir, cfg.dequantize_4bit)
    contexts, references = [row["messages"] for row in rows], [row["target"] for row in rows]
    indices = evaluation.bootstrap_indices(len(rows), cfg.bootstrap_samples, params.seed)
    results = []
    with autocast_like_training(resolved):
        judge, judge_info = fit_judge(params, train_rows, model, tokenizer, resolved, base_dir)
        # The marks: the person's own replies on this split, as the judge and the vocabulary see them.
        reference = decoding.reference_scores(judge, references, known_words)
        for setting in grid_cfg.grid:
            replies = decoding.generate_passes(model, tokenizer, contexts, setting, cfg.samples_per_prompt,
                                               cfg.batch_size, cfg.max_new_tokens, params.seed)
            scores = decoding.prompt_scores(judge, [[r.text for r in run] for run in replies], references,
                                            known_words)
            results.append(decoding.setting_result(setting, scores, reference, grid_cfg.objective, indices,
                                                   cfg.confidence_level, cfg.samples_per_prompt,
                                                   [r.text for r in replies[0][:EXAMPLES]]))
            print(f"choose-decoding: {results[-1]['setting']} -> objective {results[-1]['objective']}")
    best = decoding.choose(results)
    report = {"chosen": results[best]["setting"], "chosen_index": best, "split": "val", "samples": len(rows),
              "judge": judge_info, "reference": reference,
              "samples_per_prompt": cfg.samples_per_prompt, "objective_weights": vars(grid_cfg.objective),
              "adapter_sha256": adapter_digest(adapter_dir), "grid": results,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    metrics = chosen_metrics(report)
    with tracking.pipeline_run(params, "choose-decoding"):  # opened first: a store error leaves no outputs
        write_json(out_path, report)
        write_json(metrics_path, metrics)
        tracking.log_metrics("decoding", {k: v for k, v in metrics.items() if k != "chosen"})
        tracking.log_params("decoding.chosen", metrics["chosen"])
        tracking.log_artifact(out_path)
    print(f"choose-decoding: chosen {report['chosen']} (grid row {best}) on {len(rows)} validation examples")
    return report


def fit_judge(params: Params, train_rows: list[dict], model: Any, tokenizer: Any, resolved: dict,
              base_dir: Path) -> tuple[Any, dict]:
    """The style judge on the train split; for a group's voice it needs the base's replies to train prompts."""
    from qlora_pipeline import fidelity

    cfg = params.evaluate
    assistant = None
    if fidelity.is_group_voice(train_rows):
        prompts = cap_examples(train_rows, cfg.group_judge_prompts, params.seed)
        assistant = decoding.base_replies(model, tokenizer, resolved, base_dir, [row["messages"] for row in prompts],
                                          cfg.batch_size, cfg.max_new_tokens)
    return fidelity.fit_judge(train_rows, params.seed, assistant)


def chosen_metrics(report: dict) -> dict:
    """The choice and its validation scores: what `dvc metrics show` and `dvc exp show` list."""
    row = report["grid"][report["chosen_index"]]
    return {"chosen": report["chosen"], "chosen_index": report["chosen_index"],
            **{f"val_{name}": row[name] for name in (*decoding.SCORES, "persona_gap", "unknown_words_gap")},
            **{f"val_{name}_reference": value for name, value in report["reference"].items()},
            "val_objective": row["objective"],
            "wall_seconds": report["wall_seconds"]}
