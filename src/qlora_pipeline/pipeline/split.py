"""split stage: cleaned conversations -> train/val/test persona examples, the canaries record, metrics."""

from __future__ import annotations

import sys
from pathlib import Path

from qlora_pipeline import tracking
from qlora_pipeline.config import Params
from qlora_pipeline.data.splitting import SPLITS, split_examples
from qlora_pipeline.io import atomic_path, read_json, remove_outputs, sha256_file, write_json, write_jsonl
from qlora_pipeline.layout import CONVERSATIONS, MANIFEST
from qlora_pipeline.pipeline.common import read_conversations
from qlora_pipeline.risk.canaries import insert_canaries, make_canaries

# Below this many examples a val or test split is warned of: intervals over them cannot tell tuned from base.
FEW_EXAMPLES = 20


def run_split(params: Params, clean_dir: Path, out_dir: Path, metrics_path: Path, canaries_path: Path) -> dict:
    """Build persona examples from ``clean_dir`` into ``out_dir/{train,val,test}.jsonl``.

    ``risk.canaries`` > 0 adds that many canaries to train (``risk.canary_repeats`` examples each),
    after the caps so that no cap drops one. ``canaries_path`` gets their record, and the fresh
    ones' (``{"canaries": []}`` when off, so the DVC out always exists).
    """
    remove_outputs(out_dir, metrics_path, canaries_path)
    source = clean_dir / CONVERSATIONS
    splits, metrics = split_examples(read_conversations(source), params.split, params.seed, str(source))
    # The split metrics describe the persona's own examples; the canaries are counted apart.
    splits["train"], canaries = insert_canaries(splits["train"], make_canaries(params.risk.canaries, params.seed),
                                                params.risk.canary_repeats, params.seed)
    metrics["canary_examples"] = sum(canary["repeats"] for canary in canaries["canaries"])
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", splits[name])
        files = {f"{name}.jsonl": sha256_file(tmp / f"{name}.jsonl") for name in SPLITS}
        # The rendering keys travel with the data, so training can record what chat must reproduce.
        rendering = {"system_prompt": params.split.system_prompt, "context_turns": params.split.context_turns}
        write_json(tmp / MANIFEST, {**read_json(clean_dir / MANIFEST), "persona": metrics["persona"], "files": files,
                                    "split": rendering})
    write_json(canaries_path, canaries)
    write_json(metrics_path, metrics)
    with tracking.pipeline_run(params, "split"):
        tracking.log_metrics("split", metrics)
    sizes = ", ".join(f"{name} {metrics[name]['examples']}" for name in SPLITS)
    print(f"split: persona {metrics['persona']}; examples {sizes} (+{metrics['canary_examples']} canary) "
          f"-> {out_dir}/, {canaries_path}, {metrics_path}")
    if metrics["canary_examples"] > metrics["train"]["examples"]:
        # Allowed (a small test run may want it), but then the adapter learns the canaries more than the person.
        print(f"warning: {metrics['canary_examples']} canary examples (risk.canaries x risk.canary_repeats) outnumber "
              f"the {metrics['train']['examples']} real train examples: the persona learns the canaries more than the "
              "person; lower risk.canaries or risk.canary_repeats", file=sys.stderr)
    empty = [f"{name}.jsonl" for name in ("val", "test") if getattr(params.split.ratios, name) > 0 and not splits[name]]
    if empty:  # the data stages run on, but train-adapter and the stages after it refuse an empty split
        having = sum(metrics[name]["conversations"] for name in SPLITS)
        print(f"warning: {' and '.join(empty)} {'hold' if len(empty) > 1 else 'holds'} no examples: each split takes "
              f"whole conversations, and only {having} have persona replies; train-adapter needs val, the "
              "evaluation test: add data (3 conversations at least)", file=sys.stderr)
    few = {name: len(splits[name]) for name in ("val", "test") if 0 < len(splits[name]) < FEW_EXAMPLES}
    if few:  # a 14-conversation export split 19/1/1, and evaluate reported intervals over one example
        print(f"warning: {', '.join(f'{name}.jsonl holds {n}' for name, n in few.items())} example(s): "
              "choose-decoding picks on val, and evaluate's and risk's intervals over so few are too wide to tell "
              "the tuned model from the base; add data, or raise split.ratios for them", file=sys.stderr)
    return metrics
