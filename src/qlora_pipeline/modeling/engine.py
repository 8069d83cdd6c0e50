"""One generation engine for every stage, chat and serve: continuous batching of rows that each differ.

A row is one request: a prompt, an adapter (``None`` = the base), its own decoding (greedy or
sampled, penalties, n-gram ban, seed), token limit and stop strings. A stage hands the engine its
whole workload at once (:meth:`Engine.run`); chat and serve hand it requests as they come
(:meth:`Engine.start` / :meth:`Engine.submit`). Either way, rows are scheduled per step:

- a row that ends (end-of-turn token, token limit, stop string, client gone) leaves the batch at
  once, and waiting rows are prefilled and join, so no step is spent on finished rows;
- rows that share an adapter and a prompt (a sampled setting's passes, the settings of a grid, a
  greedy and a sampled reply to one prompt) are prefilled once and share the prompt's keys and values;
- each row's adapter applies to that row only, over the one base in memory (``stacked_lora``);
- each row picks its tokens under its own decoding (``sampling``).

The keys and values live in a :class:`SlotCache`: one row of preallocated memory per running
request, written at the request's own length, so joining and leaving move one row, not the batch.

transformers ships continuous batching of its own (``generate_batch``, ``ContinuousBatchingManager``,
what ``transformers serve`` runs on). As of 5.25 it takes per-request temperature, top-k and top-p
only: no per-request adapter (its flattened, paged batch never reaches PEFT's layers per row), no
per-request seed, no repetition penalty or n-gram ban per request, and no stop strings; hence this.

A greedy row gives ``model.generate``'s tokens (tested per adapter); a seeded row gives the same
tokens whatever it is batched with in float32 (not the same bits: CPU matmul kernels change with the
batch's shape, so a near-tie in the logits can still part, rarely: bench/batch_invariance.py); under
bfloat16 the shape of a batch shifts near-ties more often.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from qlora_pipeline.config import DecodingSetting
from qlora_pipeline.data.chat_ids import chat_ids
from qlora_pipeline.modeling.loss import causal_lm_parts
from qlora_pipeline.modeling.sampling import BatchSampler, RowDecoding, RowState
from qlora_pipeline.modeling.stacked_lora import RowAdapters

logger = logging.getLogger(__name__)

_STOP = object()
# A shared prefix shorter than this is run with each prompt: copying it would save less than it costs.
MIN_SHARED_PREFIX = 8
# A prefill forward's fixed cost, in prompt tokens' work, by the dtype it computes in (prefill_overhead). Every
# forward reads each weight once whatever it holds; in 16 bits (AMX, GPUs) a token costs a fraction of float32's
# and a forward's fixed cost does not fall with it. Of 48/128/256/unbounded (docs/benchmarks.md): in float32 (AVX2
# emulated) 48 was best on evaluate's rows and choose-decoding's grid; in bfloat16 (AMX) 256 on evaluate's rows,
# within the noise of unbounded on the grid, where 48 was slowest.
PREFILL_OVERHEAD_TOKENS = {"float32": 48, "16-bit": 256}
# Positions per slot the cache may keep while a running engine waits for work. Every slot grows to the longest row
# (one 7,000-token prompt: 8 slots x 8,192 positions, 1.5 GB in bfloat16 for the 135M model); past this the cache is
# let go once the engine has been idle IDLE_RELEASE_SECONDS, not held for the server's life, and made again at the
# next request's size. Not at once: a client asking for long replies one after another would pay a new cache each.
IDLE_CACHE_POSITIONS = 1024
IDLE_RELEASE_SECONDS = 10.0


def row_decoding(setting: DecodingSetting) -> RowDecoding:
    """A params decoding setting (``decoding.grid``'s rows, the chosen one, ``chat``) as a row's decoding."""
    decay = setting.exponential_decay_length_penalty
    controls = {"repetition_penalty": setting.repetition_penalty, "no_repeat_ngram_size": setting.no_repeat_ngram_size,
                "exponential_decay_length_penalty": None if decay is None else (int(decay[0]), float(decay[1]))}
    if not setting.sampled:  # greedy ignores the sampling keys, as generate() does
        return RowDecoding(**controls)
    return RowDecoding(temperature=setting.temperature, top_p=setting.top_p, top_k=setting.top_k, **controls)


GREEDY = RowDecoding()


@dataclass
class Request:
    """One reply to generate. ``adapter``: a PEFT adapter name, ``None`` = the base."""

    prompt_ids: list[int]
    adapter: str | None = None
    decoding: RowDecoding = GREEDY
    max_new_tokens: int = 48
    seed: int | None = None
    stop: Sequence[str] = ()
    on_text: Callable[[str], None] | None = None  # streamed text, called from the generating thread
    cancelled: threading.Event | None = None
    # Tokens after the prompt whose likelihood is wanted (a reference reply), teacher forced in the
    # prompt's own prefill: no second forward pass over the prompt.
    score_ids: Sequence[int] = ()
    # Log-probabilities of the reply's tokens under the model (its raw distribution: before temperature,
    # penalties and bias, as vLLM reports them): None = none; k = each token's, and the k likeliest beside it.
    logprobs: int | None = None
    # With on_text: the log-probabilities of the tokens whose text the next on_text call carries, just before it;
    # at the reply's end, those of tokens that added no text, with no on_text after them.
    on_logprobs: Callable[[list["TokenLogprob"]], None] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, and the ``k`` likeliest tokens at its step (id, log-probability)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Result:
    token_ids: list[int]  # the reply's tokens, without the end-of-turn token
    text: str  # cut before a stop string
    finish_reason: str  # stop (end of turn or stop string) | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the end-of-turn token included
    error: str | None = None
    score: tuple[float, int] | None = None  # score_ids' summed negative log-likelihood (nats) and count
    logprobs: list[TokenLogprob] | None = None  # the reply's tokens' (request.logprobs), those of its text only

    @property
    def stopped(self) -> bool:
        """Ended its turn (or met a stop string) before the token limit."""
        return self.finish_reason == "stop"


@dataclass
class Reply:
    """A stage's view of a result: the reply text, how many tokens it has, whether it ended its turn."""

    text: str
    new_tokens: int
    stopped: bool


def as_reply(result: Result) -> Reply:
    return Reply(result.text.strip(), len(result.token_ids), result.stopped)


def chat_prompt_ids(tokenizer: Any, conversations: Iterable[list[dict]]) -> list[list[int]]:
    """Each conversation rendered by the chat template with the assistant's turn opened, as token ids, as training
    renders it (``data.chat_ids``: a control token written in a message is text)."""
    return chat_ids(tokenizer, conversations, add_generation_prompt=True)


@dataclass
class Stats:
    """What a run cost: forward passes, rows in them, and where the time went."""

    decode_steps: int = 0
    row_steps: int = 0  # rows decoded, summed over steps (every one a live row)
    prefills: int = 0
    prefill_rows: int = 0
    prefill_tokens: int = 0  # real prompt tokens computed
    prefill_padded_tokens: int = 0
    shared_prefills: int = 0  # rows that took another row's prompt keys/values instead of their own prefill
    shared_prefix_tokens: int = 0  # prompt tokens copied from the workload's shared prefix instead of run
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def as_dict(self) -> dict:
        out = dict(vars(self))
        out["mean_batch"] = round(self.row_steps / self.decode_steps, 2) if self.decode_steps else 0.0
        for key in ("prefill_seconds", "decode_seconds"):
            out[key] = round(out[key], 2)
        return out


# ----------------------------------------------------------------------------------- cache


class SlotCache:
    """Keys and values of up to ``slots`` sequences, each in its own row, written at its own length.

    The model calls :meth:`update` from every attention layer. In ``prefill`` mode a forward of new
    prompts (right-padded) writes their keys and values into their slots and attends within itself.
    In ``decode`` mode each running row (slots ``0..B-1``) writes one token at its own length, and
    attention reads slots ``0..B-1`` up to the longest row: a view, no copy; the engine's mask hides
    each row's unwritten tail.
    """

    def __init__(self, slots: int):
        self.slots = slots
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self.mode = "decode"
        self.offset = 0  # prefill: positions already in the written slots (a shared prefix) before the new ones
        self.write_slots: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.span = 0

    def reserve(self, length: int) -> None:
        """Room for ``length`` tokens per slot: grown by doubling, keeping what is written."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity, 64)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : old.shape[2]] = old
                store[layer] = new
        self.capacity = capacity

    @staticmethod
    def stored_dtype(states: torch.Tensor) -> torch.dtype:
        """The dtype attention reads keys and values in: under autocast its own (attention's products
        cast them to it), so they are kept cast. Kept in float32, they were cast again at every step in
        every layer, the whole cache each time: 4.8 of 16 s in evaluate's rows on the Xeon machine.
        Rotary embeddings promote the keys to float32 under autocast, and a 4-bit layer gives its
        output in its input's dtype, so both arrive in float32 there."""
        device = states.device.type
        if states.is_floating_point() and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return states.dtype

    def _allocate(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        while len(self.keys) <= layer:
            self.keys.append(key_states.new_zeros(
                (self.slots, key_states.shape[1], self.capacity, key_states.shape[3]),
                dtype=self.stored_dtype(key_states)))
            self.values.append(value_states.new_zeros(
                (self.slots, value_states.shape[1], self.capacity, value_states.shape[3]),
                dtype=self.stored_dtype(value_states)))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= len(self.keys):
            self._allocate(layer_idx, key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys.dtype != self.stored_dtype(key_states) or values.dtype != self.stored_dtype(value_states):
            raise RuntimeError("the engine's cache was made for another dtype; use one autocast per engine")
        if self.mode == "prefill":
            start, end = self.offset, self.offset + key_states.shape[2]
            keys[self.write_slots, :, start:end] = key_states.to(keys.dtype)
            values[self.write_slots, :, start:end] = value_states.to(values.dtype)
            if not start:
                return key_states, value_states
            return keys[self.write_slots, :, :end], values[self.write_slots, :, :end]
        rows = torch.arange(key_states.shape[0], device=keys.device)
        keys[rows, :, self.positions] = key_states[:, :, 0].to(keys.dtype)
        values[rows, :, self.positions] = value_states[:, :, 0].to(values.dtype)
        batch = key_states.shape[0]
        return keys[:batch, :, : self.span], values[:batch, :, : self.span]

    def read_prefix(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[slot, :, :length].clone(), v[slot, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    def write_prefix(self, slots: torch.Tensor, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        length = prefix[0][0].shape[1]
        for (keys, values), (k, v) in zip(zip(self.keys, self.values), prefix):
            keys[slots, :, :length] = k
            values[slots, :, :length] = v

    def copy_row(self, source: int, target: int, length: int) -> None:
        for store in (self.keys, self.values):
            for layer in store:
                layer[target, :, :length] = layer[source, :, :length]

    # transformers asks a cache these when it builds masks; the engine passes its own 4D mask.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.span

    def __len__(self) -> int:
        return len(self.keys)


# ------------------------------------------------------------------------------------- rows


class _Row:
    """One request in the batch: its tokens so far, its decoding state, and what was streamed."""

    def __init__(self, index: int, request: Request, tokenizer: Any, eos: frozenset[int]):
        self.index, self.request, self.tokenizer, self.eos = index, request, tokenizer, eos
        self.state = RowState(request.prompt_ids, request.decoding, request.seed)
        self.tokens: list[int] = []
        self.generated = 0
        self.length = len(request.prompt_ids)  # tokens whose keys/values are in the cache
        self.pending: int | None = None  # the last token taken, not yet fed to the model
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.sent = ""
        self.text = ""
        self.score: tuple[float, int] | None = None
        self.stream_error: str | None = None  # what the row's on_text raised: it ends this row, not the batch
        # With request.logprobs: each token's, where its text ends in the reply, and how many were streamed.
        self.logprobs: list[TokenLogprob] = []
        self.token_ends: list[int] = []
        self.logprobs_sent = 0
        self.next_logprob: TokenLogprob | None = None  # the step's, set before accept() takes its token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled is not None and self.request.cancelled.is_set()

    def accept(self, token: int) -> None:
        if self.cancelled:
            self.finish("cancelled")
            return
        self.generated += 1
        if token in self.eos:
            self.finish("stop")
            return
        self.tokens.append(token)
        self.state.push(token)
        self.pending = token
        full = None
        if self.next_logprob is not None:
            full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            self._note_end(len(full))
            self.logprobs.append(self.next_logprob)
        if self.request.stop or self.request.on_text is not None:
            text, stopped = self._text(full)
            if stopped:
                self.finish("stop")
                return
            if self.generated < self.request.max_new_tokens:
                self._emit(_safe_prefix(text, self.request.stop))
                if self.stream_error is not None:
                    self.finish("error")
                    return
        if self.generated >= self.request.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finished:
            return
        self.text = self._text()[0]
        # what was held back: a partial character, a possible stop string's start; and the log-probabilities of
        # tokens that add no text (a special token the text skips)
        self._emit(self.text, final=True)
        if self.stream_error is not None and reason != "cancelled":
            reason, error = "error", error or self.stream_error
        self.finish_reason, self.error = reason, error

    def _text(self, full: str | None = None) -> tuple[str, bool]:
        """The reply so far (``full``: its tokens decoded already), cut before the first stop string; and whether one
        was found."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True) if full is None else full
        cut = min((i for i in (text.find(s) for s in self.request.stop if s) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _emit(self, text: str, final: bool = False) -> None:
        """Stream what ``text`` adds to what was sent, after the log-probabilities of the tokens it is made of (at
        the ``final`` call, those of tokens that added no text too)."""
        if self.request.on_text is None or self.stream_error is not None:  # nothing streams, or no longer
            return
        grows = len(text) > len(self.sent) and text.startswith(self.sent)
        covered = self._logprobs_within(len(text)) if grows or final else self.logprobs_sent
        try:
            if self.request.on_logprobs is not None and covered > self.logprobs_sent:
                self.request.on_logprobs(self.logprobs[self.logprobs_sent:covered])
                self.logprobs_sent = covered
            if grows:
                self.request.on_text(text[len(self.sent):])
                self.sent = text
        except Exception as err:  # a consumer gone (a closed stream): its row ends, the others go on
            self.stream_error = f"streaming the reply failed: {type(err).__name__}: {err}"

    def _note_end(self, end: int) -> None:
        """Where the newest token's text ends in the reply. A byte-fallback tokenizer (Llama-2's) decodes each byte
        of an unfinished character as its own U+FFFD, so an end can fall back below earlier ones: those are lowered
        to it (the character's bytes end together), keeping the ends sorted for ``_logprobs_within``."""
        for j in range(len(self.token_ends) - 1, -1, -1):
            if self.token_ends[j] <= end:
                break
            self.token_ends[j] = end
        self.token_ends.append(end)

    def _logprobs_within(self, length: int) -> int:
        """How many of the tokens' log-probabilities belong to the first ``length`` characters of the reply: the
        tokens whose text ends there (a token cut by a stop string is not the reply's)."""
        return bisect.bisect_right(self.token_ends, length)

    def result(self) -> Result:
        tokens = self.tokens
        if self.finish_reason == "stop" and self.request.stop:  # the tokens of the text kept
            tokens = self.tokenizer(self.text, add_special_tokens=False)["input_ids"] if self.text else []
        logprobs = None if self.request.logprobs is None else self.logprobs[:self._logprobs_within(len(self.text))]
        return Result(list(tokens), self.text, self.finish_reason or "length", len(self.request.prompt_ids),
                      self.generated, self.error, self.score, logprobs)


# The log-probability reported for a token the model gives no chance (OpenAI's floor; JSON has no -inf).
LOGPROB_FLOOR = -9999.0


def _note_logprobs(rows: list[_Row], logits: torch.Tensor, logit_rows: list[int], tokens: torch.Tensor) -> None:
    """Each row that asks for log-probabilities gets its step's (``next_logprob``) before it takes its token: the
    picked token's under the model's raw distribution (``logits[logit_rows[i]]``), and the likeliest ``k``."""
    wanted = [i for i, row in enumerate(rows) if row.request.logprobs is not None]
    if not wanted:
        return
    logprobs = torch.log_softmax(logits[[logit_rows[i] for i in wanted]].float(), dim=-1)
    picked = logprobs.gather(1, tokens[wanted].view(-1, 1).to(logprobs.device)).squeeze(1).tolist()
    k = min(max(rows[i].request.logprobs for i in wanted), logprobs.shape[-1])  # a vocabulary smaller than k
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids, picked_ids = top_values.tolist(), top_ids.tolist(), tokens.tolist()  # one copy of each
    for j, i in enumerate(wanted):
        count = rows[i].request.logprobs
        top = tuple((t, _floored(v)) for t, v in zip(top_ids[j][:count], top_values[j][:count]))
        rows[i].next_logprob = TokenLogprob(picked_ids[i], _floored(picked[j]), top)


def _floored(logprob: float) -> float:
    """``logprob``, or the floor where it is below it, -inf or NaN (a model's NaN logits): JSON has neither."""
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


def _input_length(group: list[_Row]) -> int:
    """Tokens a group's prefill runs: its prompt, and a scored continuation if one of its rows asks for one."""
    return len(group[0].request.prompt_ids) + max(len(row.request.score_ids) for row in group)


def prefill_chunks(widths: Sequence[int], limit: int, overhead: int) -> list[range]:
    """Consecutive runs of ``widths`` (sorted ascending) to prefill together, padding as little as it pays.

    A run is padded to its widest: it costs ``len(run) * run[-1]`` tokens, plus ``overhead`` for its
    forward, and holds at most ``limit`` tokens (a single wider row is a run alone). Cutting where
    the widths jump beats filling each forward to ``limit``: evaluate's prompts were padded by 15%
    that way. Exact, by dynamic programming over the cut points (the runs of an optimal
    partition of sorted widths are consecutive); quadratic in the rows, a few hundred at most.
    """
    count = len(widths)
    best: list[float] = [0] + [math.inf] * count
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        for start in range(end - 1, -1, -1):
            padded = (end - start) * widths[end - 1]
            if padded > limit and end - start > 1:
                break  # longer runs only hold more
            cost = best[start] + padded + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], count
    while end:
        runs.append(range(cut[end], end))
        end = cut[end]
    return runs[::-1]


def prefill_overhead(dtype: torch.dtype) -> int:
    """A prefill forward's fixed cost in prompt tokens when computing in ``dtype`` (``PREFILL_OVERHEAD_TOKENS``)."""
    return PREFILL_OVERHEAD_TOKENS["16-bit" if dtype in (torch.bfloat16, torch.float16) else "float32"]


def _room(request: Request) -> int:
    """Cache positions a request needs: its prompt, then its reply or its scored continuation, whichever is longer."""
    return len(request.prompt_ids) + max(request.max_new_tokens, len(request.score_ids)) + 1


def _safe_prefix(text: str, stops: Sequence[str]) -> str:
    """What can be sent now: no half-decoded character, and nothing that may turn out to start a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return text[: len(text) - hold]


# ----------------------------------------------------------------------------------- engine


def _notify(callback: Callable[[Any], None], value: Any) -> None:
    """Call a request's ``on_done``/``on_error`` on the engine's thread. One that raises (a server's event loop
    already closed, say) is logged: it must not end the thread every other request is waiting on."""
    try:
        callback(value)
    except Exception:
        logger.exception("a generation request's callback raised; the engine goes on")


@dataclass
class _Partial:
    """A prompt longer than a prefill, part of it in ``slot``: ``held`` tokens so far."""

    group: list[_Row]  # its rows: a client's n choices share its prefill
    slot: int
    held: int


class Engine:
    """Generates for many requests over one model, continuously batched.

    Args:
        model: a causal LM, or a ``PeftModel`` whose adapters rows may name.
        tokenizer: its tokenizer (pad and end-of-turn tokens).
        adapters: how rows get their own adapter; built from ``model`` when not given.
        max_batch_size: rows decoded together at most. On a CPU a step costs nearly the same for 8
            rows as for 1 up to the point where the matmuls fill the cores.
        prefill_tokens: prompt tokens (padded) per prefill forward at most.
        admit_fraction: while rows are running, waiting rows are prefilled once this share of the
            batch is free (one prefill for several rows beats one per row); 0 = at once (serving).
        lock: held around every forward (a server's adapters change under it).
        autocast: a context every forward runs in (training's autocast), entered on the engine's thread.
    """

    def __init__(self, model: Any, tokenizer: Any, adapters: RowAdapters | None = None, *,
                 max_batch_size: int = 32, prefill_tokens: int = 2048, admit_fraction: float = 0.25,
                 lock: Any = None, autocast: Callable[[], Any] | None = None,
                 eos_token_ids: Iterable[int] | None = None):
        self.tokenizer = tokenizer
        self.adapters = adapters if adapters is not None else RowAdapters(model)
        self.max_batch_size, self.prefill_tokens, self.admit_fraction = max_batch_size, prefill_tokens, admit_fraction
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.autocast = autocast or contextlib.nullcontext
        ids = {tokenizer.eos_token_id} if eos_token_ids is None else set(eos_token_ids)
        self.eos = frozenset(i for i in ids if i is not None)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self.stats = Stats()
        self.rows: list[_Row] = []
        self.cache = SlotCache(max_batch_size)
        self.sampler: BatchSampler | None = None
        self._parts_of: tuple[int, Any] = (0, None)
        self._device_of: tuple[Any, Any] = (None, None)
        self._head_cast: tuple[Any, torch.Tensor | None] = ((), None)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._callbacks: dict[int, tuple[Callable, Callable]] = {}
        self._next_index = 0
        self._group_sizes: dict[tuple, int] = {}  # a whole workload's groups (run); none for requests as they come
        self._prefix: tuple[int, ...] = ()  # what every prompt of the workload starts with
        self._prefix_cache: dict[str | None, list] = {}  # its keys and values, per adapter
        self.idle_release_seconds = IDLE_RELEASE_SECONDS
        self._partial: _Partial | None = None  # a prompt longer than prefill_tokens, prefilled a chunk a step

    # ------------------------------------------------------------------ a stage's whole workload

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Every request's result, in order. Requests sharing an adapter and a prompt share one prefill.

        The whole workload is known, so it is admitted in the order that costs least: the requests of
        one (adapter, prompt) together (one prefill for all of them), longest prompts first (the
        prompts prefilled together are of a length: little padding).
        """
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.adapter, tuple(request.prompt_ids)), []).append(i)
        order = sorted(groups.values(), key=lambda members: -(len(requests[members[0]].prompt_ids) + max(
            len(requests[i].score_ids) for i in members)))
        self._group_sizes = {key: len(members) for key, members in groups.items()}
        waiting = deque((i, requests[i]) for members in order for i in members)
        self.model.eval()
        if requests:  # room for the longest row at once: growing the cache later copies it
            room = max(_room(r) for r in requests)
            self._fit_slots(room)
            self.cache.reserve(room)
            self._share_prefix(requests)
        results: list[Result | None] = [None] * len(requests)
        try:
            while waiting or self.rows or self._partial:
                for row in self._iterate(waiting):
                    results[row.index] = row.result()
        finally:  # a workload that raised leaves nothing behind for the next (chat runs one per turn)
            self.rows, self._partial = [], None
            self._group_sizes, self._prefix, self._prefix_cache = {}, (), {}
        return results

    def _share_prefix(self, requests: Sequence[Request]) -> None:
        """The tokens every prompt of the workload starts with (a system prompt, the template's opening), computed
        once per adapter: each prefill then copies their keys and values and runs only what follows."""
        first = requests[0].prompt_ids
        length = min(len(r.prompt_ids) for r in requests) - 1  # at least one token of each prompt is run
        for request in requests:
            ids = request.prompt_ids
            length = min(length, next((i for i in range(length) if ids[i] != first[i]), length))
        if length < MIN_SHARED_PREFIX:
            return
        self._prefix = tuple(first[:length])
        with torch.no_grad(), self.autocast():
            for adapter in {r.adapter for r in requests}:
                if adapter is not None and adapter not in self.adapters.names:
                    continue  # refused at admission
                self._prefill_forward([list(self._prefix)], 0, [0], [adapter])
                self._prefix_cache[adapter] = self.cache.read_prefix(0, length)
                self.stats.prefill_tokens += length

    def _fit_slots(self, room: int) -> None:
        """Fewer rows at once when their keys and values (``room`` positions each) would pass a quarter of
        the free memory: a 7B model's cache is ~64x a 135M one's per token."""
        from qlora_pipeline.hardware import free_memory_bytes

        if self.rows or self.cache.keys:
            return
        config = self.model.config
        layers = getattr(config, "num_hidden_layers", 0)
        heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 0)
        head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // max(
            getattr(config, "num_attention_heads", 1), 1)
        per_row = 2 * layers * heads * head_dim * 4 * room  # float32, the widest the cache takes
        if per_row <= 0:
            return
        fits = max(1, int(0.25 * free_memory_bytes() // per_row))
        if fits < self.max_batch_size:
            self.max_batch_size = fits
            self.cache, self.sampler = SlotCache(fits), None

    # ------------------------------------------------------------------ requests as they come

    def start(self) -> "Engine":
        self.model.eval()
        self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        if self._thread:
            self._queue.put(_STOP)
            self._thread.join(timeout=timeout)
            self._thread = None

    def submit(self, request: Request, on_done: Callable[[Result], None],
               on_error: Callable[[BaseException], None] = lambda err: None) -> None:
        """Queue ``request``; ``on_done(result)`` or ``on_error(exception)`` is called from the engine's thread."""
        self.submit_together([(request, on_done, on_error)])

    def submit_together(self, items: Sequence[tuple[Request, Callable[[Result], None],
                                                    Callable[[BaseException], None]]]) -> None:
        """Queue (request, on_done, on_error) triples as one arrival: the engine's thread takes them in the same
        step, so requests of one adapter and prompt (a client's ``n`` choices) share one prefill where the batch
        has room for them."""
        self._queue.put(list(items))

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        waiting: deque = deque()
        while True:
            block = not waiting and not self.rows and self._partial is None
            items = []
            try:
                if block and self.cache.capacity > IDLE_CACHE_POSITIONS:
                    try:
                        items.append(self._queue.get(timeout=self.idle_release_seconds))
                    except queue.Empty:
                        self._release_cache()
                if not items:
                    items.append(self._queue.get(block=block))
                while True:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            stopping = False
            for item in items:
                if item is _STOP:
                    stopping = True
                    continue
                for request, on_done, on_error in item:
                    index, self._next_index = self._next_index, self._next_index + 1
                    self._callbacks[index] = (on_done, on_error)
                    waiting.append((index, request))
            if stopping:
                self._fail([*self.rows, *self._partial_rows()], waiting, RuntimeError("the engine was stopped"))
                return
            try:
                finished = self._iterate(waiting)
            except Exception as err:  # every request in flight must hear of it, not hang
                self._fail([*self.rows, *self._partial_rows()], deque(), err)
                self.rows, self._partial = [], None
                continue
            for row in finished:
                on_done, _ = self._callbacks.pop(row.index)
                _notify(on_done, row.result())

    def _release_cache(self) -> None:
        """A new, empty cache of as many slots (made at the next request's size); a GPU's memory handed back too."""
        self.cache = SlotCache(self.cache.slots)
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail(self, rows: list[_Row], waiting: deque, err: BaseException) -> None:
        for index in [row.index for row in rows] + [index for index, _ in waiting]:
            callbacks = self._callbacks.pop(index, None)
            if callbacks:
                _notify(callbacks[1], err)
        waiting.clear()

    # ------------------------------------------------------------------ one iteration

    def _iterate(self, waiting: deque) -> list[_Row]:
        """Admit waiting rows if it is time (or prefill the next chunk of a long prompt), then one decode step; the
        rows that finished."""
        finished: list[_Row] = []
        # The model's lock over the whole step: an adapter unloaded between the rows' check and the forward
        # failed every row of the batch, other models' rows too (KeyError in the forward's adapter lookup).
        with torch.no_grad(), self.autocast(), self.lock:
            finished += self._drop_cancelled()
            finished += self._admit(waiting) if self._partial is None else self._advance_partial()
            if self.rows:
                finished += self._decode_step()
        return finished

    # ------------------------------------------------------------------ a prompt longer than a prefill

    def _long(self, request: Request) -> bool:
        """A prompt prefilled over several steps: longer than a prefill, where requests come as they come (the
        engine's thread: serve, chat). A stage's workload (``run``) is all known, and waits for no one: its long
        prompts keep one forward each, several admitted at once."""
        return self._thread is not None and len(request.prompt_ids) > self.prefill_tokens

    def _partial_rows(self) -> list[_Row]:
        return list(self._partial.group) if self._partial is not None else []

    def _start_partial(self, group: list[_Row]) -> None:
        """A prompt longer than ``prefill_tokens`` is prefilled a chunk per step, the running rows decoding between
        chunks: in one forward, a 7,000-token prompt held every other row for 25 s (the Xeon machine, serving). Its
        keys and values go to the slot after the running rows; no row is admitted until it runs. (A workload's shared
        prefix is ``run``'s, which does not chunk.)"""
        self._partial = _Partial(group, len(self.rows), 0)

    def _advance_partial(self) -> list[_Row]:
        """The long prompt's next chunk; with its last, its rows join the batch as any prefilled row does."""
        started, partial = time.perf_counter(), self._partial
        adapter = partial.group[0].request.adapter
        gone = [row for row in partial.group if row.cancelled]
        for row in gone:  # a client's choices cancelled: told now, not after the prompt's last chunk
            row.finish("cancelled")
        partial.group = [row for row in partial.group if not row.cancelled]
        if not partial.group:
            self._partial = None
            return gone
        if adapter is not None and adapter not in self.adapters.names:
            self._partial = None
            for row in partial.group:
                row.finish("error", f"adapter {adapter!r} was unloaded")
            return gone + partial.group
        group = partial.group
        # At least one prompt token is left for the last forward: its logits give the rows their first token.
        count = min(self.prefill_tokens, len(group[0].request.prompt_ids) - partial.held - 1)
        if len(group[0].request.prompt_ids) - partial.held > self.prefill_tokens and count > 0:
            self._prefill_part(group[0], partial.slot, partial.held, count)
            partial.held += count
        else:  # the last chunk, with the head's first token: into the slot after the running rows, as any prefill
            if partial.slot != len(self.rows):
                self.cache.copy_row(partial.slot, len(self.rows), partial.held)
            self._prefill_chunk([group], held=partial.held)
            self._partial = None  # after: a forward that raised leaves its rows where _loop's failure finds them
        self.stats.prefill_seconds += time.perf_counter() - started
        return gone + self._remove([i for i, row in enumerate(self.rows) if row.finished])

    def _prefill_part(self, row: _Row, slot: int, held: int, count: int) -> None:
        """``count`` more of ``row``'s prompt into ``slot``, after the ``held`` tokens there; no logits."""
        self._prefill_forward([list(row.request.prompt_ids[held:held + count])], held, [slot], [row.request.adapter])
        self.stats.prefills += 1
        self.stats.prefill_tokens += count
        self.stats.prefill_padded_tokens += count

    def _drop_cancelled(self) -> list[_Row]:
        loaded = self.adapters.names
        gone = [i for i, row in enumerate(self.rows)
                if row.cancelled or (row.request.adapter is not None and row.request.adapter not in loaded)]
        for i in gone:
            row = self.rows[i]
            if row.cancelled:
                row.finish("cancelled")
            else:
                row.finish("error", f"adapter {row.request.adapter!r} was unloaded")
        return self._remove(gone)

    def _admit(self, waiting: deque) -> list[_Row]:
        free = self.max_batch_size - len(self.rows)
        if not waiting or free <= 0:
            return []
        threshold = max(1, int(self.admit_fraction * self.max_batch_size))
        if self.rows and free < threshold and len(waiting) > free:
            return []
        taken: list[tuple[int, Request]] = []
        refused: list[_Row] = []
        loaded = self.adapters.names
        while waiting and len(taken) < free:
            index, request = waiting[0]
            size = self._group_sizes.get((request.adapter, tuple(request.prompt_ids)), 1)
            starts_group = not taken or (taken[-1][1].adapter, taken[-1][1].prompt_ids) != (request.adapter,
                                                                                            request.prompt_ids)
            if taken and starts_group and size > free - len(taken) and size <= self.max_batch_size:
                break  # a group that shares one prefill waits until it fits whole
            if self._long(request) and any(self._long(r) and (r.adapter, r.prompt_ids) != (
                    request.adapter, request.prompt_ids) for _, r in taken):
                break  # one prompt longer than a prefill at a time: it is prefilled over several steps
            waiting.popleft()
            if request.cancelled is not None and request.cancelled.is_set():
                refused.append(_Row(index, request, self.tokenizer, self.eos))
                refused[-1].finish("cancelled")
            elif request.adapter is not None and request.adapter not in loaded:
                refused.append(_Row(index, request, self.tokenizer, self.eos))
                refused[-1].finish("error", f"no adapter named {request.adapter!r} is loaded")
            else:
                taken.append((index, request))
        return refused + (self._prefill(taken) if taken else [])

    def _prefill(self, taken: list[tuple[int, Request]]) -> list[_Row]:
        """Prefill the distinct (adapter, prompt) pairs of ``taken``; every row takes its first token."""
        started = time.perf_counter()
        groups: dict[tuple, list[_Row]] = {}
        for index, request in taken:
            row = _Row(index, request, self.tokenizer, self.eos)
            groups.setdefault((request.adapter, tuple(request.prompt_ids)), []).append(row)
        leaders = sorted(groups.values(), key=_input_length)
        self.cache.reserve(max(_room(r) for _, r in taken))
        long = [group for group in leaders if self._long(group[0].request)]
        leaders = [group for group in leaders if not self._long(group[0].request)]
        overhead = prefill_overhead(self._compute_dtype)
        for run in prefill_chunks([_input_length(group) for group in leaders], self.prefill_tokens, overhead):
            self._prefill_chunk(leaders[run.start:run.stop])
        assert len(long) <= 1, "_admit takes one long prompt at a time"
        if long:
            self._start_partial(long[0])
        self.stats.prefill_seconds += time.perf_counter() - started
        finished = [i for i, row in enumerate(self.rows) if row.finished]
        return self._remove(finished)

    def _prefill_chunk(self, groups: list[list[_Row]], held: int = 0) -> None:
        """Prefill ``groups`` in one forward into the slots after the running rows; ``held``: tokens of the (one)
        group's prompt already in its slot (a long prompt's earlier chunks)."""
        device = self._device
        prompts = [group[0].request.prompt_ids for group in groups]
        adapters = [group[0].request.adapter for group in groups]
        shared = held or (len(self._prefix) if self._prefix and all(
            tuple(p[:len(self._prefix)]) == self._prefix and len(p) > len(self._prefix) and a in self._prefix_cache
            for p, a in zip(prompts, adapters)) else 0)
        # A row that asks for a continuation's likelihood has it run in its prompt's forward (teacher forced).
        scored = [next((row for row in group if row.request.score_ids), None) for group in groups]
        inputs = [list(p[shared:]) + list(row.request.score_ids if row else ()) for p, row in zip(prompts, scored)]
        lengths = torch.tensor([len(p) - shared for p in prompts])
        first = len(self.rows)
        for adapter in set(adapters) if shared and not held else ():
            slots = [first + i for i, a in enumerate(adapters) if a == adapter]
            self.cache.write_prefix(torch.tensor(slots, device=device), self._prefix_cache[adapter])
        hidden = self._prefill_forward(inputs, shared, range(first, first + len(groups)), adapters)
        last = hidden[torch.arange(len(prompts), device=device), (lengths - 1).to(device)]
        logits = self._head(last)
        if any(scored):
            self._score(hidden, inputs, [p[shared:] for p in prompts], scored)
        self.stats.shared_prefix_tokens += 0 if held else shared * len(inputs)
        self.stats.prefills += 1
        self.stats.prefill_rows += len(prompts)
        self.stats.prefill_tokens += sum(map(len, inputs))
        self.stats.prefill_padded_tokens += len(inputs) * max(map(len, inputs))
        # Leaders first, in their slots; then each leader's followers copy its prompt's keys and values.
        rows = [group[0] for group in groups]
        row_logits = [i for i in range(len(groups))]
        for i, group in enumerate(groups):
            for follower in group[1:]:
                self.cache.copy_row(first + i, first + len(rows), follower.length)
                rows.append(follower)
                row_logits.append(i)
                self.stats.shared_prefills += 1
        slots = list(range(first, first + len(rows)))
        self._ensure_sampler(logits.shape[-1])
        for slot, row in zip(slots, rows):
            self.sampler.start_row(slot, row.request.prompt_ids, row.request.decoding)
        tokens = self.sampler.next_tokens(logits[row_logits], [row.state for row in rows], slots)
        self.sampler.record(tokens, slots)
        self.rows.extend(rows)
        _note_logprobs(rows, logits, row_logits, tokens)
        for row, token in zip(rows, tokens.tolist()):
            row.accept(token)
        self.stats.generated_tokens += len(rows)

    def _prefill_forward(self, inputs: list[list[int]], held: int, slots: Sequence[int],
                         adapters: Sequence[str | None]) -> torch.Tensor:
        """One prefill forward: ``inputs[i]`` (right-padded) into slot ``slots[i]`` through adapter ``adapters[i]``,
        after the ``held`` positions each of those slots holds already (every row sees them whole); hidden states."""
        device, width = self._device, max(map(len, inputs))
        ids = torch.full((len(inputs), width), self.pad, dtype=torch.long)
        for i, tokens in enumerate(inputs):
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        valid = torch.tensor([len(tokens) for tokens in inputs])
        positions = (torch.arange(width) + held).expand(len(inputs), width)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = causal[None, None] & (torch.arange(width)[None, :] < valid[:, None])[:, None, None, :]
        if held:
            mask = torch.cat([torch.ones(len(inputs), 1, width, held, dtype=torch.bool), mask], dim=-1)
        self.cache.write_slots = torch.tensor(list(slots), device=device)
        self.cache.mode, self.cache.offset = "prefill", held
        with self.lock, self.adapters.rows(list(adapters)):
            hidden = self._hidden(ids.to(device), mask.to(device), positions.to(device))
        self.cache.offset = 0
        return hidden

    def _score(self, hidden: torch.Tensor, inputs: list[list[int]], prompts: list[list[int]],
               scored: list[_Row | None]) -> None:
        """Each scored row's continuation: its summed negative log-likelihood and token count."""
        from qlora_pipeline.labels import IGNORE_INDEX
        from qlora_pipeline.modeling.loss import target_token_nll

        labels = torch.full(hidden.shape[:2], IGNORE_INDEX, dtype=torch.long)
        for i, (tokens, prompt, row) in enumerate(zip(inputs, prompts, scored)):
            if row is not None:
                labels[i, len(prompt): len(tokens)] = torch.tensor(tokens[len(prompt):], dtype=torch.long)
        head = self._parts[1] if self._parts is not None else None
        if head is None:  # logits already: the model could not be taken apart
            nll = torch.nn.functional.cross_entropy(hidden[:, :-1].float().transpose(1, 2), labels[:, 1:].to(hidden.device),
                                                    ignore_index=IGNORE_INDEX, reduction="none").sum(dim=1)
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
        else:
            nll, counts = target_token_nll(hidden, labels.to(hidden.device), head)
        for i, row in enumerate(scored):
            if row is not None:
                row.score = (float(nll[i]), int(counts[i]))

    def _decode_step(self) -> list[_Row]:
        started = time.perf_counter()
        device = self._device
        rows = self.rows
        ids = torch.tensor([[row.pending] for row in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.length] for row in rows], dtype=torch.long, device=device)
        span = max(row.length for row in rows) + 1
        self.cache.reserve(span)
        self.cache.mode, self.cache.positions, self.cache.span = "decode", positions[:, 0], span
        mask = (torch.arange(span, device=device)[None, :] <= positions).view(len(rows), 1, 1, span)
        with self.lock, self.adapters.rows([row.request.adapter for row in rows]):
            hidden = self._hidden(ids, mask, positions)
        logits = self._head(hidden[:, -1])
        for row in rows:
            row.length += 1
        tokens = self.sampler.next_tokens(logits, [row.state for row in rows])
        self.sampler.record(tokens)
        _note_logprobs(rows, logits, list(range(len(rows))), tokens)
        for row, token in zip(rows, tokens.tolist()):
            row.accept(token)
        self.stats.decode_steps += 1
        self.stats.row_steps += len(rows)
        self.stats.generated_tokens += len(rows)
        self.stats.decode_seconds += time.perf_counter() - started
        return self._remove([i for i, row in enumerate(rows) if row.finished])

    def _remove(self, indices: list[int]) -> list[_Row]:
        """Take the rows at ``indices`` out; the last rows move into the holes (slots stay 0..B-1)."""
        removed = []
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            removed.append(self.rows[i])
            if i != last:
                self.cache.copy_row(last, i, self.rows[last].length)
                if self.sampler is not None:
                    self.sampler.move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
        return removed[::-1]

    # ------------------------------------------------------------------ the model

    @property
    def model(self) -> Any:
        """The model rows run on (a server's base becomes a ``PeftModel`` when its first adapter is loaded)."""
        return self.adapters.model

    @property
    def _parts(self) -> Any:
        if self._parts_of[0] != id(self.model):
            self._parts_of = (id(self.model), causal_lm_parts(self.model))
        return self._parts_of[1]

    @property
    def _device(self) -> torch.device:
        model = self.model
        if self._device_of[0] is not model:
            self._device_of = (model, next(model.parameters()).device)
        return self._device_of[1]

    @property
    def _compute_dtype(self) -> torch.dtype:
        """What the forwards compute in, as near as it can be told: autocast's dtype where it is on (the engine's
        forwards run inside it), else the input embeddings' (the model's own dtype; a 4-bit layer may compute in
        another, its ``compute_dtype``), float32 where a model has none to read."""
        device = self._device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        try:
            weight = getattr(self.model.get_input_embeddings(), "weight", None)
        except (AttributeError, NotImplementedError):  # transformers' default raises NotImplementedError
            weight = None
        return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32

    def _ensure_sampler(self, vocabulary: int) -> None:
        if self.sampler is None or self.sampler.vocabulary != vocabulary:
            self.sampler = BatchSampler(self.max_batch_size, vocabulary, self._device, self.eos)

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states; the head is applied only where a token is picked."""
        if self._parts is None:  # a model that cannot be taken apart: its logits
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                              use_cache=True).logits
        decoder, _ = self._parts
        return decoder(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                       use_cache=True).last_hidden_state

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._parts is None:
            return hidden.float()
        head = self._parts[1]
        weight = self._head_weight_cast(head, hidden.device.type)
        if weight is None:
            return head(hidden).float()
        # What autocast's linear computes: input, weight and bias in its dtype.
        bias = None if head.bias is None else head.bias.to(weight.dtype)
        return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()

    def _head_weight_cast(self, head: Any, device: str) -> torch.Tensor | None:
        """The vocabulary head's weight in autocast's dtype, cast once while the weight is unchanged.

        Autocast keeps the casts of weights that require grad only, so a frozen float32 head (tied
        to the embeddings: 49152 x 576 for SmolLM2) was cast again at every step: 45 ms a step on the
        Xeon machine. None where autocast is off, the weight already has its dtype, or the head is
        not a plain ``Linear`` (an adapter's own head). The cast stays with the engine (about 1 GB for
        a Llama-3-8B head in bfloat16, what autocast allocated at every step) and is made again when
        the weight is edited in place (its version counter); a weight swapped through ``.data`` is
        not seen, and nothing here does that.
        """
        if type(head) is not torch.nn.Linear or not torch.is_autocast_enabled(device):
            return None
        dtype, weight = torch.get_autocast_dtype(device), head.weight
        if weight.dtype == dtype:
            return None
        cast_from = self._head_cast[0]
        if not (cast_from and cast_from[0] is weight and cast_from[1:] == (weight._version, dtype)):
            self._head_cast = ((weight, weight._version, dtype), weight.detach().to(dtype))
        return self._head_cast[1]
