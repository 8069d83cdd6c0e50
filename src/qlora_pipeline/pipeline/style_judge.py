"""style-judge stage: the persona's style judge, fitted once per run on the train split, for every stage that scores a voice.

choose-decoding (on validation) and evaluate (on test) read the judge and the training chats'
vocabulary from this stage's folder instead of fitting their own: one judge per run, the same in
every stage, its held-out quality on the validation split recorded here.

One persona: the judge learns the persona's replies against the other speakers' in the same
conversations. A group's voice (``split.persona: all``): every chat turn is the group's, so it
learns the chat's replies against the base model's own greedy replies to training prompts
(``evaluate.group_judge_prompts`` of them): only then is the base model loaded.
"""

from __future__ import annotations

import time
from pathlib import Path

from qlora_pipeline import fidelity, tracking
from qlora_pipeline.config import Params
from qlora_pipeline.data.sampling import cap_examples, read_split
from qlora_pipeline.io import remove_outputs, write_json
from qlora_pipeline.data.canary_ids import without_canaries


def run_style_judge(params: Params, train_path: Path, val_path: Path, base_dir: Path, out_dir: Path,
                    metrics_path: Path) -> dict:
    """Fit the judge on ``train_path``, measure it on ``val_path``; write ``out_dir`` and ``metrics_path``."""
    remove_outputs(out_dir, metrics_path)
    train_rows = read_split(train_path, "add data or raise split.max_examples.train and re-run split",
                            keep=without_canaries)
    val_rows = read_split(val_path, "raise split.ratios.val or split.max_examples.val and re-run split",
                          keep=without_canaries)
    started = time.perf_counter()
    group = fidelity.is_group_voice(train_rows)
    contrast, held_contrast = base_replies(params, base_dir, train_rows, val_rows) if group else (None, None)
    judge, info = fidelity.fit_judge(train_rows, params.seed, contrast)
    if group:
        held_texts, held_labels = fidelity.group_judge_examples(val_rows, held_contrast)
    else:
        held_texts, held_labels = fidelity.judge_examples(val_rows)
    vocabulary = fidelity.vocabulary(train_rows)
    info = {**info, "group_voice": group, "vocabulary_words": len(vocabulary)}
    metrics = {**info, "val": fidelity.judge_quality(judge, held_texts, held_labels),
               "wall_seconds": round(time.perf_counter() - started, 1)}
    with tracking.pipeline_run(params, "style-judge"):  # opened first: a store error leaves no outputs
        fidelity.save_judge(out_dir, judge, info, vocabulary)
        write_json(metrics_path, metrics)
        tracking.log_metrics("judge", {k: v for k, v in metrics.items() if k != "contrast"})
    quality = metrics["val"]
    print(f"style-judge: fitted on {info['train_replies']} training replies ({info['contrast']}); on validation: "
          f"accuracy {quality['accuracy']}, AUC {quality['auc']} ({quality['replies']} replies) -> {out_dir}/")
    return metrics


def base_replies(params: Params, base_dir: Path, train_rows: list[dict], val_rows: list[dict]
                 ) -> tuple[list[str], list[str]]:
    """The base model's greedy replies to some training prompts (the judge's contrast) and to the validation prompts."""
    from qlora_pipeline.modeling.adapters import autocast_like_training, load_base_for_params
    from qlora_pipeline.modeling.engine import Engine, Request, chat_prompt_ids

    cfg = params.evaluate
    model, tokenizer, resolved = load_base_for_params(params, base_dir, cfg.dequantize_4bit)
    engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size, autocast=lambda: autocast_like_training(resolved))
    prompts = cap_examples(train_rows, cfg.group_judge_prompts, params.seed) + val_rows
    ids = chat_prompt_ids(tokenizer, [row["messages"] for row in prompts])
    texts = [r.text.strip() for r in engine.run([Request(i, max_new_tokens=cfg.max_new_tokens) for i in ids])]
    return texts[: len(texts) - len(val_rows)], texts[len(texts) - len(val_rows):]
