"""choose-decoding stage: each setting of ``decoding.grid`` scored on the validation split; the best is kept.

Only the validation split (what the tuned model says) and the style judge (fitted on the train
split by the style-judge stage) are read: the test split never takes part in the choice, so
evaluate's chosen row on test is an honest estimate.
"""

from __future__ import annotations

import time
from pathlib import Path
from qlora_pipeline import decoding, intervals, tracking
from qlora_pipeline.config import Params
from qlora_pipeline.data.sampling import read_split
from qlora_pipeline.io import remove_outputs, write_json

EXAMPLES = 5  # replies of each setting kept in the report, to read beside the numbers
# The chosen row's scores in metrics/decoding.json (val_<name>)
VALIDATION_SCORES = ("persona_score", "rougeL", "repeated_3gram", "unknown_words", "persona_gap", "unknown_words_gap",
                     "end_of_turn_rate", "median_words", "length_gap")


def run_choose_decoding(params: Params, base_dir: Path, adapter_dir: Path, val_path: Path, judge_dir: Path,
                        out_path: Path, metrics_path: Path) -> dict:
    """Score every grid setting on ``val_path``; write the grid and the choice to ``out_path``, the choice to ``metrics_path``.

    The whole grid is one workload for the engine: every setting's passes over every prompt,
    continuously batched, each prompt prefilled once for all of them.
    """
    from qlora_pipeline import fidelity
    from qlora_pipeline.modeling.adapters import adapter_digest, load_sides, read_training_config
    from qlora_pipeline.modeling.engine import as_reply, chat_prompt_ids

    cfg, grid_cfg = params.evaluate, params.decoding
    remove_outputs(out_path, metrics_path)
    read_training_config(adapter_dir)  # fail fast, naming the missing stage
    rows = read_split(val_path, "raise split.ratios.val or split.max_examples.val and re-run split",
                      grid_cfg.max_samples, params.seed)
    judge, judge_info, known_words = fidelity.load_judge(judge_dir)
    started = time.perf_counter()
    sides = load_sides(base_dir, adapter_dir, cfg.dequantize_4bit, cfg.batch_size)
    references = [row["target"] for row in rows]
    prompt_ids = chat_prompt_ids(sides.tokenizer, [row["messages"] for row in rows])
    indices = intervals.bootstrap_indices(len(rows), cfg.bootstrap_samples, params.seed)
    passes = [decoding.pass_requests(prompt_ids, setting, cfg.samples_per_prompt, cfg.max_new_tokens, params.seed)
              for setting in grid_cfg.grid]
    workload = [("tuned", request) for setting in passes for run in setting for request in run]
    replies = iter([as_reply(result) for result in sides.run(workload)])
    engine_stats = sides.engines["tuned"].stats.as_dict()
    # The marks: the person's own replies on this split, as the judge and the vocabulary see them.
    reference = decoding.reference_scores(judge, references, known_words)
    results = []
    for setting, runs in zip(grid_cfg.grid, passes):
        made = [[next(replies) for _ in run] for run in runs]
        texts = [[reply.text for reply in run] for run in made]
        scores = decoding.prompt_scores(judge, texts, references, known_words,
                                        [[reply.stopped for reply in run] for run in made])
        results.append(decoding.setting_result(setting, scores, reference, grid_cfg.objective, indices,
                                               cfg.confidence_level, cfg.samples_per_prompt, texts[0][:EXAMPLES]))
        print(f"choose-decoding: {results[-1]['setting']} -> objective {results[-1]['objective']}")
    best = decoding.choose(results)
    report = {"chosen": results[best]["setting"], "chosen_index": best, "split": "val", "samples": len(rows),
              "judge": judge_info, "reference": reference,
              "samples_per_prompt": cfg.samples_per_prompt, "objective_weights": grid_cfg.objective.model_dump(),
              "adapter_sha256": adapter_digest(adapter_dir), "grid": results, "engine": engine_stats,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    metrics = chosen_metrics(report)
    with tracking.pipeline_run(params, "choose-decoding"):  # opened first: a store error leaves no outputs
        write_json(out_path, report)
        write_json(metrics_path, metrics)
        tracking.log_metrics("decoding", {k: v for k, v in metrics.items() if k != "chosen"})
        tracking.log_params("decoding.chosen", metrics["chosen"])
        tracking.log_artifact(out_path)
    print(f"choose-decoding: chosen {report['chosen']} (grid row {best}) on {len(rows)} validation examples "
          f"({len(workload)} replies in {engine_stats['decode_steps']} decode steps)")
    return report


def chosen_metrics(report: dict) -> dict:
    """The choice and its validation scores: what `dvc metrics show` and `dvc exp show` list."""
    row = report["grid"][report["chosen_index"]]
    return {"chosen": report["chosen"], "chosen_index": report["chosen_index"],
            **{f"val_{name}": row[name] for name in VALIDATION_SCORES},
            **{f"val_{name}_reference": value for name, value in report["reference"].items()},
            "val_objective": row["objective"],
            "wall_seconds": report["wall_seconds"]}
