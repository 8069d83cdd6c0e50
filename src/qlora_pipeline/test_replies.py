"""One side's replies to the test split, as evaluate scores them: greedy, with the reference's likelihood.

The base model's side does not depend on any adapter: the zero-shot stage computes it once per
base and test split, and evaluate computes the tuned side the same way (this module), so the two
sides are comparable row for row.

The reference reply's likelihood is computed in the prompt's own prefill (teacher forced, the
engine's ``score_ids``), except for examples whose prompt training cut to ``train.max_length``:
those are scored apart, cut as training cut them (:func:`score_cut`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qlora_pipeline.errors import PipelineError

TEST_FILE = "test.jsonl"
PROBES_FILE = "probes.json"
GRID_FILE = "grid.json"


def read_test(path: Path, cap: int | None, seed: int) -> list[dict]:
    """The test examples evaluate scores: a seeded sample of ``cap`` (the zero-shot stage takes the same)."""
    from qlora_pipeline.data.sampling import read_split

    return read_split(path, "raise split.ratios.test or split.max_examples.test (or add data) and re-run split",
                      cap, seed)


def greedy_requests(tokenizer: Any, rows: Sequence[dict], max_new_tokens: int, max_length: int
                    ) -> tuple[list[Any], list[int], Counter]:
    """Greedy requests for ``rows`` (adapter unset) scoring each reference reply; the rows scored apart; cut counts."""
    from qlora_pipeline.data.formatting import encode_example
    from qlora_pipeline.modeling.engine import Request, chat_prompt_ids

    prompt_ids = chat_prompt_ids(tokenizer, [row["messages"] for row in rows])
    truncated: Counter = Counter()
    requests, cut = [], []
    for i, (row, ids) in enumerate(zip(rows, prompt_ids)):
        encoded = encode_example(tokenizer, row["messages"], row["target"], max_length, truncated)
        whole = encoded.input_ids[:len(ids)] == ids  # the prompt as training saw it
        if not whole:
            cut.append(i)
        requests.append(Request(ids, max_new_tokens=max_new_tokens,
                                score_ids=encoded.input_ids[len(ids):] if whole else ()))
    return requests, cut, truncated


def outputs(results: Sequence[Any]) -> dict[str, Any]:
    """Replies, whether each ended its turn, and the reference's summed NLL and token count (0 until scored)."""
    from qlora_pipeline.modeling.engine import as_reply

    replies = [as_reply(r) for r in results]
    return {"replies": [r.text for r in replies], "stopped": [r.stopped for r in replies],
            "nll": np.array([r.score[0] if r.score else 0.0 for r in results]),
            "tokens": np.array([r.score[1] if r.score else 0 for r in results])}


def score_cut(model: Any, tokenizer: Any, rows: Sequence[dict], cut: Sequence[int], max_length: int,
              batch_size: int, side: dict[str, Any]) -> None:
    """The reference NLL of the rows whose prompt training cut, in a forward pass of their own."""
    from qlora_pipeline import evaluation

    if cut:
        nll, tokens = evaluation.reference_nll(model, tokenizer, [rows[i] for i in cut], max_length, batch_size)
        side["nll"][list(cut)], side["tokens"][list(cut)] = nll, tokens


def write_side(folder: Path, rows: Sequence[dict], side: dict[str, Any]) -> None:
    from qlora_pipeline.io import write_jsonl

    records = [{"id": row["id"], "reply": reply, "stopped": stopped, "nll": float(nll), "tokens": int(tokens)}
               for row, reply, stopped, nll, tokens in zip(rows, side["replies"], side["stopped"], side["nll"],
                                                          side["tokens"])]
    if "on_topic" in side:  # per example: each set's on-topic scores, and against how many other contexts
        for i, record in enumerate(records):
            record["on_topic"] = {"contexts": side["on_topic_contexts"], **{
                name: {score: float(values[i]) for score, values in scores.items()}
                for name, scores in side["on_topic"].items()}}
    write_jsonl(folder / TEST_FILE, records)


def read_side(folder: Path, rows: Sequence[dict]) -> dict[str, Any]:
    """The zero-shot stage's replies and NLL for exactly ``rows`` (in their order), or the stage to re-run."""
    from qlora_pipeline.io import read_jsonl

    path = Path(folder) / TEST_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: no zero-shot replies; run the zero-shot stage first (dvc repro zero-shot)")
    found = {record["id"]: record for _, record in read_jsonl(path)}
    missing = [row["id"] for row in rows if row["id"] not in found]
    if missing or len(found) != len(rows):
        raise PipelineError(f"{path}: holds the base model's replies to other test examples than evaluate scores "
                            f"({len(found)} there, {len(rows)} here); re-run the zero-shot stage (dvc repro zero-shot)")
    records = [found[row["id"]] for row in rows]
    side = {"replies": [r["reply"] for r in records], "stopped": [r["stopped"] for r in records],
            "nll": np.array([r["nll"] for r in records]), "tokens": np.array([r["tokens"] for r in records])}
    if records and all("on_topic" in r for r in records):
        side["on_topic_contexts"] = records[0]["on_topic"]["contexts"]
        names = [name for name in records[0]["on_topic"] if name != "contexts"]
        side["on_topic"] = {name: {score: np.array([r["on_topic"][name][score] for r in records])
                                   for score in records[0]["on_topic"][name]} for name in names}
    return side


def write_probes(folder: Path, system: str, texts: dict[str, list[str]], replies: dict[str, list[str]]) -> None:
    from qlora_pipeline.io import write_json

    write_json(folder / PROBES_FILE, {"system_prompt": system, "sets": {
        name: [{"prompt": prompt, "reply": reply} for prompt, reply in zip(texts[name], replies[name])]
        for name in texts}})


def read_probes(folder: Path, system: str, texts: dict[str, list[str]]) -> dict[str, list[str]]:
    """The base model's replies to exactly these probes under this system prompt, or the stage to re-run."""
    from qlora_pipeline.io import read_json

    path = Path(folder) / PROBES_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: no zero-shot probe replies; run the zero-shot stage first (dvc repro zero-shot)")
    data = read_json(path)
    sets = data.get("sets", {}) if isinstance(data, dict) else {}
    if data.get("system_prompt") != system or {n: [e["prompt"] for e in sets.get(n, [])] for n in texts} != texts:
        raise PipelineError(f"{path}: the base model's replies are to other probes or another system prompt than "
                            "the adapter was trained with; re-run the zero-shot stage (dvc repro zero-shot)")
    return {name: [entry["reply"] for entry in sets[name]] for name in texts}


def write_grid(folder: Path, rows: Sequence[dict], runs: dict[str, list[list[Any]]]) -> None:
    """Per setting of the grid but plain greedy (keyed by :func:`setting_key`), the replies of each pass, in row order."""
    from qlora_pipeline.io import write_json

    write_json(folder / GRID_FILE, {"ids": [row["id"] for row in rows], "settings": {
        key: {"replies": [[r.text for r in run] for run in passes], "stopped": [[r.stopped for r in run] for run in passes]}
        for key, passes in runs.items()}})


def read_grid(folder: Path, rows: Sequence[dict], setting: Any, passes: int) -> dict[str, Any] | None:
    """The zero-shot stage's replies to ``rows`` under ``setting`` (``passes`` of them), or None when it has none."""
    from qlora_pipeline.io import read_json

    path = Path(folder) / GRID_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    found = data.get("settings", {}).get(setting_key(setting))
    if found is None or data.get("ids") != [row["id"] for row in rows] or len(found["replies"]) != passes:
        return None
    return found


def setting_key(setting: Any) -> str:
    """A decoding setting as a stable text key."""
    import json

    return json.dumps(setting.model_dump(), sort_keys=True)
