"""What serving several persona adapters over one base costs, and whether mixed batches are right.

Adapters: the trained ``models/adapter`` and seeded perturbations of it (its LoRA weights plus
Gaussian noise of the same scale, saved as adapters of the same base): the same shapes and size
on disk as a real second or tenth experiment, with different outputs.

1. Mixed batches are right (in this process): the first ``--prompts`` test prompts, spread over
   base + 3 adapters, generated greedily as one mixed batch vs each prompt alone with its adapter.
   Reported: the share of rows with identical tokens, and the largest prefill-logit difference.
2. Memory: a ``qlora-pipeline serve`` process per count (base alone, 1, 3, 10 adapters), resident
   memory (RSS) after one request; growth per adapter against the adapter's size on disk
   (target <= 1.2x).
3. Throughput against one server with 3 adapters: 8 concurrent streaming clients spread over the
   3 adapters vs 8 clients on 1 adapter vs the same requests one at a time; the mixed traffic again
   on a server whose mixed batches take PEFT's ``adapter_names`` path instead of the stacked one.
   Each pattern ``--repeats`` times, interleaved; the median round is reported. Completion tokens per
   second of wall time, and time to first token p50/p95. Targets: mixed >= 70% of single-adapter
   throughput; batching >= 3x one at a time.
4. Loops: share of replies to the test prompts that repeat a word or phrase 3+ times in a row,
   greedy (the evaluate stage's decoding) vs the chat section's defaults.

Run after `make run`, on an idle machine (one heavy process at a time; servers are started here,
on 127.0.0.1, and stopped at the end):
    .venv/bin/python bench/serve_bench.py --out bench/results/<machine>/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import mixed_batch_check, write_report
from qlora_pipeline.launching import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOP = re.compile(r"\b(\w+(?:\W+\w+){0,3})(?:\W+\1\b){2,}", re.IGNORECASE)


def perturbed_adapters(source: Path, folder: Path, count: int) -> list[Path]:
    """``count`` adapters: the trained one, then copies whose LoRA weights get seeded noise of their own scale."""
    import torch
    from safetensors.torch import load_file, save_file

    made = [source]
    weights = load_file(source / "adapter_model.safetensors")
    for index in range(1, count):
        out = folder / f"variant{index}"
        shutil.copytree(source, out)
        generator = torch.Generator().manual_seed(index)
        noisy = {name: (w + torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.dtype) * w.float().std()
                        ).contiguous() for name, w in weights.items()}
        save_file(noisy, out / "adapter_model.safetensors", metadata={"format": "pt"})
        made.append(out)
    return made


def test_prompts(path: Path, count: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["messages"] for row in rows[:count]]


# ----------------------------------------------------------------------- 1. mixed batches


def mixed_batch(base: Path, adapters: list[Path], conversations: list[list[dict]], tokens: int) -> dict:
    """benchlib's check on the trained adapter and two perturbed copies over the base, as ``serve`` loads them."""
    from qlora_pipeline.serving.models import AdapterSpec, load_persona_model

    persona = load_persona_model(base, [AdapterSpec(f"a{i}", str(p)) for i, p in enumerate(adapters[:3])])
    return mixed_batch_check(persona, conversations, tokens)


# ----------------------------------------------------------------------- servers


def decoding_for(code: Path) -> tuple[Path, dict]:
    """The workspace's reports/decoding.json as the other checkout can read it: the chosen setting with only the
    keys its ``DecodingSetting`` has (one added since, such as the length decay, it would refuse as unknown).
    Written into that checkout (the keys left out listed under ``bench_dropped``); its path and those keys."""
    probe = ("import dataclasses, json, sys; sys.path.insert(0, sys.argv[1]); "
             "from qlora_pipeline.config import DecodingSetting as D; "
             "print(json.dumps(list(getattr(D, 'model_fields', None) or [f.name for f in dataclasses.fields(D)])))")
    known = json.loads(subprocess.run([sys.executable, "-c", probe, str(code)], check=True, capture_output=True,
                                      text=True).stdout)
    report = json.loads((ROOT / "reports/decoding.json").read_text())
    chosen = report.get("chosen") or {}
    report["bench_dropped"] = {key: value for key, value in chosen.items() if key not in known}
    report["chosen"] = {key: value for key, value in chosen.items() if key in known}
    path = code.parent / "reports" / "decoding.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path, report["bench_dropped"]


class Server:
    """``qlora-pipeline serve`` in a child process on 127.0.0.1, stopped on exit.

    ``code``: the ``src`` folder of another checkout (``--baseline-ref``) to run instead of this one,
    with the same packages; its server batched statically and took ``--batch-wait-ms``.
    """

    def __init__(self, base: Path, adapters: list[Path], max_batch_size: int = 8, mixed_batches: str = "stacked",
                 code: Path | None = None, decoding: Path | None = None):
        self.port = free_port()
        if code is None:
            cmd = [str(BIN / "qlora-pipeline"), "serve"]
        else:
            cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(code)!r}); "
                   "from qlora_pipeline.cli import main; sys.exit(main())", "serve", "--batch-wait-ms", "30"]
        if decoding is not None:  # where the chosen decoding is read from (default: the workspace's reports/)
            cmd += ["--decoding", str(decoding)]
        cmd += ["--base", str(base), "--port", str(self.port), "--max-batch-size", str(max_batch_size),
                # the other checkout reads its own params.yaml: keys added since would be unknown to it
                "--params", str((code.parent if code else ROOT) / "params.yaml"), "--mixed-batches", mixed_batches]
        for i, path in enumerate(adapters):
            cmd += ["--adapter", f"a{i}={path}"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        import httpx2 as httpx

        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not start in 300 s")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss


def ask(url: str, model: str, messages: list[dict], max_tokens: int, seed: int) -> dict:
    """One streamed request: time to first token, total time, completion tokens."""
    import httpx2 as httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "seed": seed,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first if first is not None else time.perf_counter() - started,
            "seconds": time.perf_counter() - started, "tokens": tokens}


def traffic(url: str, plan: list[list[tuple[str, list[dict], int]]], max_tokens: int) -> dict:
    """Each inner list is one client's requests, sent one after another; clients run at once."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(requests):
        for model, messages, seed in requests:
            result = ask(url, model, messages, max_tokens, seed)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(requests,)) for requests in plan]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "completion_tokens": tokens, "wall_seconds": wall,
            "tokens_per_second": tokens / wall, "ttfts": [r["ttft"] for r in results]}


def summary(rounds: list[dict], clients: int) -> dict:
    """Median tokens/s over the rounds; time to first token percentiles over every request of every round."""
    ttfts = sorted(t for r in rounds for t in r["ttfts"])
    return {"clients": clients, "rounds": len(rounds), "requests_per_round": rounds[0]["requests"],
            "completion_tokens_per_round": [r["completion_tokens"] for r in rounds],
            "tokens_per_second_per_round": [round(r["tokens_per_second"], 2) for r in rounds],
            "tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in rounds), 2),
            "ttft_p50": round(statistics.median(ttfts), 3),
            "ttft_p95": round(ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))], 3)}


def throughput(base: Path, adapters: list[Path], conversations: list[list[dict]], clients: int, per_client: int,
               max_tokens: int, repeats: int, baseline: Path | None = None) -> dict:
    """Each traffic pattern ``repeats`` times, interleaved, against the same server; medians reported.

    With ``baseline`` (another checkout's ``src``), the mixed traffic also against that code's server:
    the same requests, the same packages, one server at a time.
    """
    requests = [(conversations[i % len(conversations)], 1000 + i) for i in range(clients * per_client)]
    mixed = [[(f"a{c % 3}", *requests[c * per_client + k]) for k in range(per_client)] for c in range(clients)]
    single = [[("a0", *requests[c * per_client + k]) for k in range(per_client)] for c in range(clients)]
    serial = [[("a0", *request) for request in requests]]
    rounds: dict[str, list[dict]] = {"mixed_3_adapters": [], "single_adapter": [], "one_at_a_time": [],
                                     "mixed_3_adapters_peft": []}
    if baseline is not None:  # first: a checkout that cannot serve this workspace fails before the long rounds
        # Both servers decode alike: the baseline's code may lack keys of the chosen setting (decoding_for), so
        # the mixed traffic runs once more here on this code with the same reduced setting.
        reduced, dropped = decoding_for(baseline)
        for name, code in (("mixed_3_adapters_baseline", baseline), ("mixed_3_adapters_baseline_decoding", None)):
            rounds[name] = []
            with Server(base, adapters[:3], code=code, decoding=reduced) as server:
                ask(server.url, "a0", conversations[0], 4, 0)
                for _ in range(repeats):
                    rounds[name].append(traffic(server.url, mixed, max_tokens))
    with Server(base, adapters[:3]) as server:
        ask(server.url, "a0", conversations[0], 4, 0)  # warm-up
        for _ in range(repeats):
            rounds["mixed_3_adapters"].append(traffic(server.url, mixed, max_tokens))
            rounds["single_adapter"].append(traffic(server.url, single, max_tokens))
            rounds["one_at_a_time"].append(traffic(server.url, serial, max_tokens))
    with Server(base, adapters[:3], mixed_batches="peft") as server:  # the reference path, same traffic
        ask(server.url, "a0", conversations[0], 4, 0)
        for _ in range(repeats):
            rounds["mixed_3_adapters_peft"].append(traffic(server.url, mixed, max_tokens))
    out = {name: summary(r, 1 if name == "one_at_a_time" else clients) for name, r in rounds.items()}
    rate = {name: out[name]["tokens_per_second"] for name in out}
    out["mixed_vs_single"] = round(rate["mixed_3_adapters"] / rate["single_adapter"], 3)
    out["mixed_peft_vs_single"] = round(rate["mixed_3_adapters_peft"] / rate["single_adapter"], 3)
    out["batched_vs_one_at_a_time"] = round(rate["single_adapter"] / rate["one_at_a_time"], 3)
    out["targets"] = {"mixed_vs_single": ">= 0.70", "batched_vs_one_at_a_time": ">= 3.0"}
    if baseline is not None:
        old, new = out["mixed_3_adapters_baseline"], out["mixed_3_adapters_baseline_decoding"]
        out["vs_baseline"] = {"decoding_without": dropped,
                              "ttft_p50_improvement": round(old["ttft_p50"] / new["ttft_p50"], 2),
                              "ttft_p50_improvement_vs_full_decoding": round(
                                  old["ttft_p50"] / out["mixed_3_adapters"]["ttft_p50"], 2),
                              "tokens_per_second_ratio": round(new["tokens_per_second"] / old["tokens_per_second"], 2),
                              "target_ttft_p50_improvement": ">= 3"}
    return out


def server_rss(base: Path, adapters: list[Path], counts: list[int], conversation: list[dict]) -> dict:
    """Resident memory of a real ``serve`` process with 0, 1, 3, 10 adapters (what a CPU host pays);
    gpu_serve.py's ``cuda_allocated`` measures the GPU's allocations in-process instead.
    """
    rss = {}
    for count in counts:
        with Server(base, adapters[:count]) as server:
            ask(server.url, "a0" if count else "base", conversation, 8, 0)
            time.sleep(1.0)
            rss[count] = server.rss_bytes()
    on_disk = (adapters[0] / "adapter_model.safetensors").stat().st_size
    top, one = max(counts), min(c for c in counts if c >= 1)
    per_adapter = (rss[top] - rss[one]) / (top - one)
    return {"rss_mb": {str(c): round(v / 2**20, 1) for c, v in rss.items()},
            "adapter_on_disk_mb": round(on_disk / 2**20, 2),
            "growth_per_adapter_mb": round(per_adapter / 2**20, 2),
            "growth_vs_disk": round(per_adapter / on_disk, 3), "target": "<= 1.2"}


# ----------------------------------------------------------------------- 4. loops


def loops(base: Path, adapter: Path, conversations: list[list[dict]], tokens: int, seed: int) -> dict:
    from qlora_pipeline.config import ChatConfig, load_params
    from qlora_pipeline.serving.engine import Engine, Job, Sampling
    from qlora_pipeline.serving.models import AdapterSpec, load_persona_model
    from qlora_pipeline.serving.prompts import prompt_ids, with_system_prompt

    chat = load_params(ROOT / "params.yaml").chat
    persona = load_persona_model(base, [AdapterSpec("tuned", str(adapter))])
    ids = [prompt_ids(persona.tokenizer, with_system_prompt(m, persona.system_prompt("tuned"))) for m in conversations]
    greedy = ChatConfig(temperature=0.0, top_k=0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    out = {}
    for label, defaults, sampling in (
            ("greedy", greedy, lambda i: Sampling(0.0)),
            ("chat_defaults", chat, lambda i: Sampling(chat.temperature, chat.top_p, chat.top_k, seed + i))):
        engine = Engine(persona, defaults)
        replies = []
        for start in range(0, len(ids), 16):
            replies += [c.text for c in engine.run_batch([Job(ids[i], "tuned", tokens, sampling(i))
                                                          for i in range(start, min(start + 16, len(ids)))])]
        looping = [r for r in replies if LOOP.search(r)]
        out[label] = {"replies": len(replies), "looping": len(looping), "share": round(len(looping) / len(replies), 3),
                      "examples": looping[:3]}
    out["definition"] = "a word or phrase of up to 4 words repeated 3+ times in a row"
    out["chat"] = {k: getattr(chat, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty",
                                                 "no_repeat_ngram_size")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT / "models/base")
    parser.add_argument("--adapter", type=Path, default=ROOT / "models/adapter")
    parser.add_argument("--test", type=Path, default=ROOT / "data/splits/test.jsonl")
    parser.add_argument("--prompts", type=int, default=16, help="rows of the mixed-batch check")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each traffic pattern (median)")
    parser.add_argument("--loop-prompts", type=int, default=100)
    parser.add_argument("--skip", nargs="*", default=[], choices=("mixed", "memory", "throughput", "loops"))
    parser.add_argument("--baseline-ref", default=None,
                        help="a git ref whose server the mixed traffic also runs against (e.g. the commit before "
                             "the engine), from a temporary worktree of this repository")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qlora_pipeline import hardware

    conversations = test_prompts(args.test, max(args.prompts, args.loop_prompts))
    report: dict = {"machine": hardware.capability_line(), "hardware": hardware.capability()}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = perturbed_adapters(args.adapter, Path(tmp), 10)
        if "mixed" not in args.skip:
            report["mixed_batch"] = mixed_batch(args.base, adapters, conversations[:args.prompts], 24)
            print("mixed batch:", json.dumps(report["mixed_batch"]), flush=True)
        if "loops" not in args.skip:
            report["loops"] = loops(args.base, args.adapter, conversations[:args.loop_prompts], 48, 0)
            print("loops:", json.dumps({k: v for k, v in report["loops"].items() if k != "examples"}), flush=True)
        if "memory" not in args.skip:
            report["memory"] = server_rss(args.base, adapters, [0, 1, 3, 10], conversations[0])
            print("memory:", json.dumps(report["memory"]), flush=True)
        if "throughput" not in args.skip:
            baseline = None
            if args.baseline_ref:
                baseline = Path(tmp) / "baseline"
                subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline_ref], cwd=ROOT,
                               check=True, capture_output=True)
                report["baseline_ref"] = subprocess.run(["git", "rev-parse", args.baseline_ref], cwd=ROOT, check=True,
                                                        capture_output=True, text=True).stdout.strip()
            try:
                report["throughput"] = throughput(args.base, adapters, conversations[:24], args.clients,
                                                  args.requests_per_client, args.max_tokens, args.repeats,
                                                  baseline / "src" if baseline else None)
            finally:
                if baseline is not None:
                    subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False)
            print("throughput:", json.dumps(report["throughput"]), flush=True)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
