"""A long prompt arriving while a reply streams: one prefill forward against chunks with decode steps between.

serve's engine prefilled a prompt longer than ``prefill_tokens`` (2,048) in one forward, during which every other
row waited: a 7,000-token prompt held a streaming reply for about 25 s (the Xeon machine). The engine now prefills
such a prompt a chunk of ``prefill_tokens`` per step, the running rows decoding between chunks. Here, in one
process, interleaved, on the trained adapter: a reply streams (its end token banned, so it runs to its limit);
after its first tokens a chat history of ``--long-tokens`` tokens arrives. The baseline is the same engine with
``prefill_tokens`` past the long prompt (one forward, as before). Reported: the streaming reply's longest gap
between two pieces of text while the long prompt is prefilled, the long request's time to its first token, and
whether its greedy reply is the same either way.

On an idle machine, after `make run`:
    .venv/bin/python bench/long_prompt_bench.py --out bench/results/<machine>/long_prompt.json
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from benchlib import environment, write_report


def long_history(tokenizer, rows: list[dict], tokens: int) -> list[dict]:
    """The test split's conversations, one after another, as one chat of about ``tokens`` tokens."""
    from qlora_pipeline.modeling.engine import chat_prompt_ids

    messages: list[dict] = []
    for row in rows:
        turns = [m for m in row["messages"] if m["role"] != "system"] + [{"role": "assistant",
                                                                          "content": row["target"]}]
        messages += turns
        if len(chat_prompt_ids(tokenizer, [messages + [{"role": "user", "content": "so?"}]])[0]) >= tokens:
            break
    return messages + [{"role": "user", "content": "so, what do you think about all that?"}]


def run_once(persona, prefill_tokens: int, short: list[int], long: list[int], short_tokens: int) -> dict:
    from qlora_pipeline.modeling.engine import Engine, Request
    from qlora_pipeline.modeling.sampling import RowDecoding

    engine = Engine(persona.model, persona.tokenizer, persona.row_adapters, lock=persona.lock,
                    autocast=persona.autocast, max_batch_size=8, admit_fraction=0.0, prefill_tokens=prefill_tokens)
    eos = persona.tokenizer.eos_token_id
    stamps: list[float] = []
    first_long: list[float] = []
    started_streaming, done = threading.Event(), threading.Event()
    results: dict = {}

    def on_short_text(_delta: str) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == 4:
            started_streaming.set()

    def finish(key):
        def on_done(result):
            results[key] = result
            if len(results) == 2:
                done.set()
        return on_done

    engine.start()
    try:
        engine.submit(Request(short, "tuned", RowDecoding(logit_bias=((eos, -100.0),)), short_tokens,
                              on_text=on_short_text), finish("short"))
        assert started_streaming.wait(300), "the streaming reply did not start"
        arrived = time.perf_counter()
        engine.submit(Request(long, "tuned", max_new_tokens=8,
                              on_text=lambda _d: first_long.append(time.perf_counter())), finish("long"))
        assert done.wait(900), "the requests did not finish"
    finally:
        engine.stop()
    during = [t for t in stamps if t >= arrived]
    gaps = [b - a for a, b in zip([arrived] + during, during)]
    return {"longest_gap_s": round(max(gaps), 2), "long_first_token_s": round(first_long[0] - arrived, 2),
            "long_reply": results["long"].token_ids, "short_tokens": results["short"].completion_tokens,
            "prefills": engine.stats.prefills}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--adapter", type=Path, default=Path("models/adapter"))
    parser.add_argument("--test", type=Path, default=Path("data/splits/test.jsonl"))
    parser.add_argument("--long-tokens", type=int, default=6000)
    parser.add_argument("--short-tokens", type=int, default=160, help="the streaming reply's limit")
    parser.add_argument("--rounds", type=int, default=2, help="of each way, interleaved")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from qlora_pipeline.io import read_jsonl
    from qlora_pipeline.modeling.engine import chat_prompt_ids
    from qlora_pipeline.serving.models import AdapterSpec, load_persona_model

    persona = load_persona_model(args.base, [AdapterSpec("tuned", str(args.adapter))])
    rows = [row for _, row in read_jsonl(args.test)]
    short = chat_prompt_ids(persona.tokenizer, [rows[0]["messages"]])[0]
    long = chat_prompt_ids(persona.tokenizer, [long_history(persona.tokenizer, rows, args.long_tokens)])[0]
    ways = {"one_forward": len(long) + 1, "chunked": 2048}
    seen: dict[str, list[dict]] = {way: [] for way in ways}
    for round_ in range(args.rounds):
        for way in ways if round_ % 2 == 0 else reversed(list(ways)):
            seen[way].append(run_once(persona, ways[way], short, long, args.short_tokens))
            shown = {k: v for k, v in seen[way][-1].items() if k != "long_reply"}
            print(f"round {round_ + 1}: {way} {shown}", flush=True)
    medians = {way: {key: round(statistics.median(r[key] for r in runs), 2)
                     for key in ("longest_gap_s", "long_first_token_s")} for way, runs in seen.items()}
    report = {
        "machine": environment(),
        "long_prompt_tokens": len(long),
        "prefill_tokens": ways,
        "rounds": {way: [{k: v for k, v in r.items() if k != "long_reply"} for r in runs]
                   for way, runs in seen.items()},
        "median": medians,
        "longest_gap_ratio": round(medians["one_forward"]["longest_gap_s"] / medians["chunked"]["longest_gap_s"], 2),
        "long_first_token_ratio": round(medians["one_forward"]["long_first_token_s"]
                                        / medians["chunked"]["long_first_token_s"], 2),
        "same_long_reply": all(r["long_reply"] == seen["one_forward"][0]["long_reply"]
                               for runs in seen.values() for r in runs),
    }
    for key in ("long_prompt_tokens", "median", "longest_gap_ratio", "long_first_token_ratio", "same_long_reply"):
        print(f"{key}: {report[key]}")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
