"""Is `auto`'s float type the fast one on this CPU? The model's linear layers in float32 and in bfloat16, same run.

`auto` (``hardware.native_dtype``) picks bfloat16 wherever oneDNN runs it natively: AVX-512 BF16 or AMX. With
AMX that is several times float32's speed; without it, bfloat16 runs on AVX-512 BF16's dot products, and on the
Xeon machine with oneDNN capped there (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``) they ran *slower* than float32
through MKL (docs/benchmarks.md, "Float32 or bfloat16 without AMX"). The stages spend most of their time in these
layers, so this is the first thing to measure on a machine with AVX-512 BF16 and no AMX (AMD Zen 4, Intel
Cooper Lake) before trusting `auto` there.

For each of SmolLM2-135M's linear shapes (attention 576 -> 576 and 576 -> 192, MLP 576 -> 1536 and 1536 -> 576, the
vocabulary head 576 -> 49152) and each row count M (1: a lone decode step, 16: the former static batches, 110:
evaluate's mean decode batch, 3,000: a prefill chunk): the median time of ``torch.nn.functional.linear`` in each
dtype, rounds interleaved (float32 and bfloat16 first in turn), and bfloat16's speed as a multiple of float32's. The
layers weighted as one decoder layer has them (one each, the MLP's up projection twice: gate and up) give one
figure per M; the head is reported beside.

Run on an idle machine, threads as the stages use them (all cores):
    .venv/bin/python bench/dtype_bench.py --out bench/results/<machine>/dtype.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchlib import environment, write_report

ROOT = Path(__file__).resolve().parents[1]
# (in, out, how many of them one decoder layer has): SmolLM2-135M, 9 query and 3 key/value heads of 64
LAYER = {"q_proj/o_proj 576->576": (576, 576, 2), "k_proj/v_proj 576->192": (576, 192, 2),
         "gate_proj/up_proj 576->1536": (576, 1536, 2), "down_proj 1536->576": (1536, 576, 1)}
HEAD = ("lm_head 576->49152", (576, 49152, 1))
ROWS = (1, 16, 110, 3000)


def seconds(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def measure(shape: tuple[int, int, int], rows: int, rounds: int) -> dict:
    import torch

    fan_in, fan_out, _ = shape
    generator = torch.Generator().manual_seed(0)
    x32 = torch.randn(rows, fan_in, generator=generator)
    w32 = torch.randn(fan_out, fan_in, generator=generator) / fan_in ** 0.5
    operands = {"float32": (x32, w32), "bfloat16": (x32.bfloat16(), w32.bfloat16())}
    flops = 2 * rows * fan_in * fan_out
    calls = max(3, min(200, int(2e9 / flops)))  # about 2 GFLOP a timing (fewer at M=1, where 200 calls cap it)
    timings: dict[str, list[float]] = {name: [] for name in operands}
    for name, (x, w) in operands.items():  # warm-up: kernel choice and packing caches
        torch.nn.functional.linear(x, w)
    order = list(operands)
    for round_ in range(rounds):  # float32 first in even rounds, bfloat16 first in odd ones
        for name in order if round_ % 2 == 0 else order[::-1]:
            x, w = operands[name]
            timings[name].append(seconds(lambda: torch.nn.functional.linear(x, w), calls))
    median = {name: statistics.median(values) for name, values in timings.items()}
    return {"gflops": {name: round(flops / t / 1e9, 1) for name, t in median.items()},
            "seconds": median,
            "bfloat16_speed_vs_float32": round(median["float32"] / median["bfloat16"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape and row count (median)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from qlora_pipeline import hardware

    report: dict = {"environment": environment(), "hardware": hardware.capability(),
                    "auto_dtype": hardware.native_dtype(), "threads": torch.get_num_threads(), "rows": {}}
    for rows in ROWS:
        shapes = {name: measure(shape, rows, args.rounds) for name, shape in LAYER.items()}
        layer = {name: sum(shapes[key]["seconds"][name] * LAYER[key][2] for key in LAYER)
                 for name in ("float32", "bfloat16")}
        head = measure(HEAD[1], rows, args.rounds)
        report["rows"][rows] = {
            "decoder_layer_bfloat16_speed_vs_float32": round(layer["float32"] / layer["bfloat16"], 3),
            "decoder_layer_ms": {name: round(t * 1e3, 3) for name, t in layer.items()},
            "head_bfloat16_speed_vs_float32": head["bfloat16_speed_vs_float32"],
            "shapes": {name: {"gflops": m["gflops"], "bfloat16_speed_vs_float32": m["bfloat16_speed_vs_float32"]}
                       for name, m in {**shapes, HEAD[0]: head}.items()}}
        line = report["rows"][rows]
        print(f"M={rows:>5}: a decoder layer's linears {line['decoder_layer_ms']['float32']:.3f} ms float32, "
              f"{line['decoder_layer_ms']['bfloat16']:.3f} ms bfloat16: bfloat16 at "
              f"{line['decoder_layer_bfloat16_speed_vs_float32']:.2f}x float32's speed "
              f"(the head: {line['head_bfloat16_speed_vs_float32']:.2f}x)", flush=True)
    print(f"auto picks {report['auto_dtype']} here ({hardware.capability_line()})")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
