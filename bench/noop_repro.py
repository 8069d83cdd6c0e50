"""How long DVC's everyday commands take when nothing changed, and what libyaml's parser saves them.

Timed in the same run, `--repeats` times each, medians reported, each command once per way and the
order alternating:
- `dvc version`: the CLI's own start-up, which no pipeline change can remove (the floor);
- `dvc status`, `dvc repro` on an up-to-date workspace (the script fails if repro runs a stage: that
  would time real work) and `dvc exp show`, each two ways:
  - as installed: DVC reads dvc.yaml, dvc.lock and params.yaml with ruamel.yaml's `safe` loader,
    which uses libyaml's C parser where `ruamel.yaml.clib` is installed (a project dependency:
    ruamel.yaml 0.19 no longer pulls it in);
  - the baseline: the same commands with ruamel.yaml's pure-Python parser, as without that package.

Run (after `make run`; nothing else busy on the machine):
    .venv/bin/python bench/noop_repro.py --out bench/results/<machine>/noop_repro.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# DVC's CLI with ruamel.yaml's C parser and emitter taken away: what every load falls back to without libyaml.
PURE_DVC = """
import sys
import ruamel.yaml.main
ruamel.yaml.main.CParser = ruamel.yaml.main.CEmitter = None
from dvc.cli import main
sys.exit(main(sys.argv[1:]))
"""
COMMANDS = {"status": ["status"], "noop_repro": ["repro"], "exp_show": ["exp", "show", "--no-pager", "--csv"]}


def timed(command: list[str], repo: Path = ROOT) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=ROOT, help="an up-to-date DVC workspace (default: this one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import hardware

    import ruamel.yaml.main

    if ruamel.yaml.main.CParser is None:
        raise SystemExit("ruamel.yaml.clib is not installed: run `make setup` (pyproject.toml lists it)")
    dvc = str(Path(sys.executable).parent / "dvc")
    # -P: the current folder stays off sys.path, as for the `dvc` script
    ways = {"libyaml": [dvc], "pure_python": [sys.executable, "-P", "-c", PURE_DVC]}
    startup = []
    seconds = {(way, name): [] for way in ways for name in COMMANDS}
    outputs = {}
    for repeat in range(args.repeats):
        startup.append(timed([dvc, "version"], args.repo)[0])
        order = list(ways.items())
        for way, prefix in order if repeat % 2 == 0 else order[::-1]:  # alternating: neither always goes first
            for name, command in COMMANDS.items():
                spent, output = timed([*prefix, *command], args.repo)
                if name == "noop_repro" and "Running stage" in output:
                    raise SystemExit("dvc repro ran a stage: the workspace was not up to date; run `dvc repro` first")
                outputs.setdefault(name, {})[way] = output
                seconds[way, name].append(spent)
    for name in ("status", "exp_show"):  # the same answer both ways
        if outputs[name]["libyaml"] != outputs[name]["pure_python"]:
            raise SystemExit(f"dvc {' '.join(COMMANDS[name])} answers differently with the pure-Python parser")
    result = {"machine_line": hardware.capability_line(), "repeats": args.repeats,
              "dvc_version_seconds": round(statistics.median(startup), 2)}
    for (way, name), values in seconds.items():
        result[f"{name}_{way}_seconds"] = round(statistics.median(values), 2)
    for name in COMMANDS:
        result[f"{name}_pure_python_vs_libyaml"] = round(
            result[f"{name}_pure_python_seconds"] / result[f"{name}_libyaml_seconds"], 2)
    result["noop_repro_vs_startup"] = round(result["noop_repro_libyaml_seconds"] / result["dvc_version_seconds"], 2)
    print(f"machine: {result['machine_line']}")
    print(f"dvc version (start-up floor): {result['dvc_version_seconds']} s; median of {args.repeats}:")
    for name, command in COMMANDS.items():
        print(f"  dvc {' '.join(command)}: {result[f'{name}_libyaml_seconds']} s with libyaml's parser, "
              f"{result[f'{name}_pure_python_seconds']} s with the pure-Python one "
              f"({result[f'{name}_pure_python_vs_libyaml']}x)")
    print(f"no-op dvc repro: {result['noop_repro_libyaml_seconds']} s, {result['noop_repro_vs_startup']}x the floor "
          "(target <= 5 s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
