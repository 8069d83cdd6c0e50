"""Generation for chat and serve: several requests, each with its own adapter and sampling, in one batch.

Requests that arrive together run as one ``generate`` call. When their adapters differ, each row's
LoRA applies to that row only, over the one base in memory: through ``stacked_lora.py`` (two
matmuls per layer), or PEFT's mixed-batch inference (``adapter_names=[...]``, ``"__base__"`` for
the base) where that cannot be used. Each row keeps its own temperature, top-p, seed, stop
strings and token limit: a logits processor samples every row with the row's own generator (so a
seeded request draws the same random numbers whatever it is batched with), a stopping criterion
ends rows one by one, and a streamer hands each row's new text to its request as it comes. Batch-wide keys (repetition penalty, no-repeat n-gram size, top-k) are the server's.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qlora_pipeline.config import ChatConfig
from qlora_pipeline.serving.models import PEFT_BASE, PersonaModel

_STOP = object()


@dataclass
class Sampling:
    temperature: float  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    """One request: prompt ids, the adapter's PEFT name (``__base__`` = none), limits, and where text goes.

    ``on_text(delta)`` and ``on_done(completion)`` / ``on_error(exception)`` are called from the
    generating thread.
    """

    prompt_ids: list[int]
    adapter: str
    max_new_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] = lambda delta: None
    on_done: Callable[[Completion], None] = lambda completion: None
    on_error: Callable[[BaseException], None] = lambda err: None
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Row:
    """One job's progress inside a batch: its ids, the text sent so far, and whether it has ended."""

    def __init__(self, job: Job, tokenizer: Any):
        self.job, self.tokenizer = job, tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.finish_reason: str | None = None
        self.tokens = 0
        seed = job.sampling.seed if job.sampling.seed is not None else int(torch.randint(0, 2**62, (1,)))
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        if self.finished:
            return
        if self.job.cancelled.is_set():  # the client went away: stop spending compute on it
            self.finish_reason = "cancelled"
            return
        self.tokens += 1
        if token == self.tokenizer.eos_token_id:
            self.end("stop")
            return
        self.ids.append(token)
        text, stopped = self._text()
        if stopped:
            self.end("stop")
        elif self.tokens >= self.job.max_new_tokens:
            self.end("length")
        else:
            self._emit(_safe_prefix(text, self.job.stop))

    def end(self, reason: str) -> None:
        """Send what was held back (a partial character or stop-string prefix) and mark the row done."""
        if not self.finished:
            self._emit(self._text()[0])
            self.finish_reason = reason

    def _text(self) -> tuple[str, bool]:
        """The reply so far, cut before the first stop string; and whether one was found."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.job.stop if s) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.on_text(text[len(self.sent):])
            self.sent = text

    def completion(self) -> Completion:
        return Completion(self.sent, self.finish_reason or "length", len(self.job.prompt_ids), self.tokens)


def _safe_prefix(text: str, stops: list[str]) -> str:
    """What can be sent now: no half-decoded character, and nothing that may turn out to start a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return text[: len(text) - hold]


def _per_row_processor(rows: list[_Row]) -> Any:
    from transformers import LogitsProcessor

    class PerRowSampling(LogitsProcessor):
        """Penalties, temperature, top-k/top-p and the draw of every row at once, each with its own settings.

        Vectorised over the batch (one sort, one small host-to-device copy per step, no per-row
        synchronisation on a GPU). Each row's uniform draw comes from the row's own seeded
        generator, so a seeded request draws the same numbers whatever it is batched with (its tokens
        match exactly in float32; under bfloat16, padding and batch shape can shift a near-tie).
        Returns scores with only the chosen token left, so generate's greedy pick takes it.
        """

        def __init__(self) -> None:
            self.counts: torch.Tensor | None = None

        def _setup(self, scores: torch.Tensor) -> None:
            device, settings = scores.device, [row.job.sampling for row in rows]

            def column(values: list[float]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

            self.greedy = torch.tensor([s.temperature <= 0 for s in settings], device=device)
            self.sampling = not bool(self.greedy.all())
            self.temperature = column([s.temperature if s.temperature > 0 else 1.0 for s in settings])
            self.top_p = column([s.top_p for s in settings])
            vocabulary = scores.shape[-1]
            self.kth = torch.tensor([[min(s.top_k, vocabulary) - 1 if s.top_k else vocabulary - 1] for s in settings],
                                    device=device)
            self.use_top_k = any(s.top_k for s in settings)
            self.presence = column([s.presence_penalty for s in settings])
            self.frequency = column([s.frequency_penalty for s in settings])
            if any(s.presence_penalty or s.frequency_penalty for s in settings):
                self.counts = torch.zeros_like(scores, dtype=torch.float32)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            scores = scores.float()
            if not hasattr(self, "greedy"):
                self._setup(scores)
            elif self.counts is not None:  # the token each row generated in the previous step
                self.counts.scatter_add_(1, input_ids[:, -1:], torch.ones_like(self.counts[:, :1]))
            if self.counts is not None:
                scores = scores - self.frequency * self.counts - self.presence * (self.counts > 0).float()
            tokens = scores.argmax(dim=-1)
            if self.sampling:
                tokens = torch.where(self.greedy, tokens, self._draw(scores / self.temperature))
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, tokens.unsqueeze(1), 0.0)

        def _draw(self, logits: torch.Tensor) -> torch.Tensor:
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            if self.use_top_k:  # ties with the k-th logit stay, as in transformers' TopKLogitsWarper
                ordered = ordered.masked_fill(ordered < ordered.gather(1, self.kth), float("-inf"))
            probs = torch.softmax(ordered, dim=-1)
            # top-p: the smallest head of the sorted distribution whose mass reaches top_p (at least one token)
            probs = probs * ((torch.cumsum(probs, dim=-1) - probs) < self.top_p)
            cumulative = torch.cumsum(probs, dim=-1)
            uniform = torch.tensor([[float(torch.rand(1, generator=row.generator))] for row in rows],
                                   device=logits.device) * cumulative[:, -1:]
            picked = torch.searchsorted(cumulative, uniform, right=True).clamp(max=logits.shape[-1] - 1)
            return order.gather(1, picked).squeeze(1)

    return PerRowSampling()


def _stopper(rows: list[_Row]) -> Any:
    from transformers import StoppingCriteria

    class RowsFinished(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            return torch.tensor([row.finished for row in rows], device=input_ids.device)

    return RowsFinished()


def _streamer(rows: list[_Row]) -> Any:
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        """generate() puts the prompt first, then one token per row per step."""

        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for row, token in zip(rows, value.view(-1).tolist()):
                row.add(token)

        def end(self) -> None:
            pass

    return RowStreamer()


class Engine:
    """Runs jobs in batches on one :class:`PersonaModel`; ``submit`` from any thread."""

    def __init__(self, persona: PersonaModel, defaults: ChatConfig, max_batch_size: int = 8,
                 batch_wait_seconds: float = 0.02):
        self.persona, self.defaults = persona, defaults
        self.max_batch_size, self.batch_wait_seconds = max_batch_size, batch_wait_seconds
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches: list[int] = []  # size of every batch run (for /health and the bench)

    # ------------------------------------------------------------------ worker thread

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, deadline = [first], time.monotonic() + self.batch_wait_seconds
            stop = False
            while len(batch) < self.max_batch_size:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                batch.append(job)
            self.run_batch([job for job in batch if not job.cancelled.is_set()])
            if stop:
                return

    # ------------------------------------------------------------------ one batch

    def run_batch(self, jobs: list[Job]) -> list[Completion]:
        """Generate every job's reply in one ``generate`` call; report to each job, and return the completions."""
        if not jobs:
            return []
        try:
            rows = self._generate(jobs)
        except BaseException as err:  # every waiting request must hear of it, not hang
            for job in jobs:
                job.on_error(err)
            if not isinstance(err, Exception):
                raise
            return []
        self.batches.append(len(jobs))
        completions = [row.completion() for row in rows]
        for job, completion in zip(jobs, completions):
            job.on_done(completion)
        return completions

    def _generate(self, jobs: list[Job]) -> list[_Row]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        persona, tokenizer = self.persona, self.persona.tokenizer
        rows = [_Row(job, tokenizer) for job in jobs]
        # Left padding (every row's next token at the last position), passed per call: the tokenizer is shared.
        batch = tokenizer.pad({"input_ids": [job.prompt_ids for job in jobs]}, padding_side="left",
                              return_tensors="pt")
        config = GenerationConfig(max_new_tokens=max(job.max_new_tokens for job in jobs), do_sample=False,
                                  repetition_penalty=self.defaults.repetition_penalty,
                                  no_repeat_ngram_size=self.defaults.no_repeat_ngram_size,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if self.defaults.top_k:
            for job in jobs:
                job.sampling.top_k = job.sampling.top_k or self.defaults.top_k
        adapters = {job.adapter for job in jobs}
        with persona.lock, persona.autocast(), torch.no_grad():
            model = persona.model
            kwargs: dict[str, Any] = {}
            if len(adapters) > 1 and persona.stacked is not None:  # each row its adapter, in two matmuls a layer
                context = persona.stacked.mixed([job.adapter for job in jobs])
            elif len(adapters) > 1:  # PEFT's mixed batch: each row through its own adapter
                kwargs["adapter_names"] = [job.adapter for job in jobs]
                context = contextlib.nullcontext()
            else:  # one adapter for the whole batch: the plain (faster) forward
                name = adapters.pop()
                context = persona.using("base" if name == PEFT_BASE else name)
            with context:
                model.generate(**batch.to(model.device), generation_config=config,
                               logits_processor=LogitsProcessorList([_per_row_processor(rows)]),
                               stopping_criteria=StoppingCriteriaList([_stopper(rows)]), streamer=_streamer(rows),
                               **kwargs)
        for row in rows:  # rows still open ran into the batch's token limit
            row.end("length")
        return rows
