"""What reading the style judge costs a stage process: its terms and numbers (safetensors) against skops.

choose-decoding and evaluate each start as a process of their own and read the judge the style-judge
stage wrote. Both ways of saving it are timed in the same run, each in `--repeats` fresh processes
(medians reported, the order of the two alternating): each process first imports evaluate's stage
module (torch, transformers, PEFT, MLflow, the engine: what the stage has loaded before it reads the
judge; not timed), then times what reading adds: importing what it needs, reading the judge, scoring a
few replies. The judge is fitted once here on a train split (the default run's,
`data/splits/train.jsonl`, after `make run`) and saved both ways; the script fails unless both read
back give the same probabilities as the fitted one.

skops is no longer one of the project's dependencies: install it into the environment to compare
(`.venv/bin/python -m pip install skops`); without it only the current way is timed.

Run (nothing else busy on the machine):
    .venv/bin/python bench/judge_bench.py --out bench/results/<machine>/judge.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPLIES = ["haha yeah", "Certainly! Here is a helpful answer.", "see you saturday", "lol no way"]

# Each reader, after the stage's own imports: import what reading needs, read, score; prints the seconds that
# took and the probabilities, as JSON.
STAGE = """
import json, sys, time
import qlora_pipeline.pipeline.evaluate  # what the stage imports before it reads the judge
from qlora_pipeline import fidelity
started = time.perf_counter()
"""
READ_SAVED = STAGE + """
judge, _, _ = fidelity.load_judge(sys.argv[1])
scores = fidelity.persona_probabilities(judge, json.loads(sys.argv[2])).tolist()
print(json.dumps([time.perf_counter() - started, scores]))
"""
READ_SKOPS = STAGE + """
import skops.io
judge = skops.io.load(sys.argv[1])  # as the pipeline read it: scikit-learn's own types only
scores = fidelity.persona_probabilities(judge, json.loads(sys.argv[2])).tolist()
print(json.dumps([time.perf_counter() - started, scores]))
"""


def timed(script: str, path: Path) -> tuple[float, list[float]]:
    done = subprocess.run([sys.executable, "-c", script, str(path), json.dumps(REPLIES)], capture_output=True,
                          text=True, check=True)
    seconds, probabilities = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, default=ROOT / "data/splits/train.jsonl")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import fidelity, hardware
    from qlora_pipeline.io import read_jsonl

    rows = [row for _, row in read_jsonl(args.train)]
    judge, info = fidelity.fit_judge(rows, args.seed)
    expected = fidelity.persona_probabilities(judge, REPLIES).tolist()
    ways = {"terms_and_safetensors": READ_SAVED}
    with tempfile.TemporaryDirectory() as tmp:
        fidelity.save_judge(Path(tmp) / "judge", judge, info, set())
        paths = {"terms_and_safetensors": Path(tmp) / "judge"}
        if importlib.util.find_spec("skops") is not None:
            import skops.io

            paths["skops"] = Path(tmp) / "judge.skops"
            skops.io.dump(judge, paths["skops"])
            ways["skops"] = READ_SKOPS
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for repeat in range(args.repeats):
            order = list(ways.items())
            for name, script in order if repeat % 2 == 0 else order[::-1]:  # alternating: neither always goes first
                spent, probabilities = timed(script, paths[name])
                if probabilities != expected:
                    raise SystemExit(f"{name}: read back, the judge gives {probabilities}, fitted {expected}")
                seconds[name].append(spent)
    result = {"machine_line": hardware.capability_line(), "repeats": args.repeats,
              "train_replies": info["train_replies"],
              **{f"{name}_seconds": round(statistics.median(values), 2) for name, values in seconds.items()}}
    print(f"machine: {result['machine_line']}")
    print(f"judge fitted on {info['train_replies']} replies; what reading it and scoring {len(REPLIES)} replies adds "
          f"to a stage process, median of {args.repeats}:")
    for name in ways:
        print(f"  {name}: {result[f'{name}_seconds']} s")
    if "skops" in ways:
        result["skops_vs_terms_and_safetensors"] = round(
            result["skops_seconds"] / result["terms_and_safetensors_seconds"], 2)
        print(f"  skops takes {result['skops_vs_terms_and_safetensors']}x as long")
    else:
        print("  (skops not installed: `.venv/bin/python -m pip install skops` to time it too)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
