"""Chat and serve's side of the library's generation engine: requests as jobs, over their model's defaults.

Generation itself is :mod:`qlora_pipeline.modeling.engine`, the engine every stage uses: requests
are continuously batched (a request joins the running batch at the next step and leaves the moment
it ends), each row through its own adapter over the one base in memory, with its own sampling,
seed, stop strings and token limit, and its text streamed as it comes. Here a :class:`Job` (what
the HTTP server and the terminal chat build) becomes an engine request: the OpenAI keys a
request may set (temperature, top-p, seed, penalties) over its model's decoding defaults for the rest
(top-k, repetition penalty, no-repeat n-gram size, the length decay).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from qlora_pipeline.config import ChatConfig
from qlora_pipeline.modeling import engine as core
from qlora_pipeline.modeling.sampling import RowDecoding
from qlora_pipeline.serving.models import PEFT_BASE, PersonaModel


@dataclass
class Sampling:
    temperature: float  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None  # None = the server's default; 0 = off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); RowDecoding's


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[core.TokenLogprob] | None = None  # the job's logprobs: each token of the text's


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
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest (core.Request)
    defaults: ChatConfig | None = None  # its model's decoding defaults (models.Defaults); None: the engine's
    # before the on_text they belong to (core.Request)
    on_logprobs: Callable[[list[core.TokenLogprob]], None] | None = None
    on_text: Callable[[str], None] = lambda delta: None
    on_done: Callable[[Completion], None] = lambda completion: None
    on_error: Callable[[BaseException], None] = lambda err: None
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerationError(RuntimeError):
    """A request the engine ended without a reply (its adapter was unloaded while it ran)."""


class Engine:
    """Runs jobs on one :class:`PersonaModel`, continuously batched; ``submit`` from any thread.

    ``max_batch_size`` rows decode together; a request that arrives while others run is prefilled
    at the next step and joins them.
    """

    def __init__(self, persona: PersonaModel, defaults: ChatConfig, max_batch_size: int = 8):
        self.persona, self.defaults = persona, defaults
        self.core = core.Engine(persona.model, persona.tokenizer, persona.row_adapters, max_batch_size=max_batch_size,
                                admit_fraction=0.0, lock=persona.lock, autocast=persona.autocast)
        self.max_batch_size = max_batch_size

    @property
    def stats(self) -> core.Stats:
        return self.core.stats

    def start(self) -> "Engine":
        self.core.start()
        return self

    def stop(self) -> None:
        self.core.stop()

    def request(self, job: Job) -> core.Request:
        """The engine request of ``job``: its own keys over its model's defaults."""
        sampling = job.sampling
        defaults = self.defaults if job.defaults is None else job.defaults
        top_k = defaults.top_k if sampling.top_k is None else sampling.top_k
        decoding = RowDecoding(temperature=sampling.temperature, top_p=sampling.top_p,
                               top_k=top_k, repetition_penalty=defaults.repetition_penalty,
                               no_repeat_ngram_size=defaults.no_repeat_ngram_size,
                               exponential_decay_length_penalty=core.row_decoding(defaults).exponential_decay_length_penalty,
                               presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
                               logit_bias=sampling.logit_bias)
        return core.Request(list(job.prompt_ids), None if job.adapter == PEFT_BASE else job.adapter, decoding,
                            job.max_new_tokens, sampling.seed, tuple(job.stop), on_text=job.on_text,
                            cancelled=job.cancelled, logprobs=job.logprobs, on_logprobs=job.on_logprobs)

    def submit(self, job: Job) -> None:
        self.submit_together([job])

    def submit_together(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` as one arrival (a request's ``n`` choices): jobs of one adapter and prompt share a prefill."""
        def done(job: Job) -> Callable[[core.Result], None]:
            def report(result: core.Result) -> None:
                if result.finish_reason == "error":
                    job.on_error(GenerationError(result.error or "generation failed"))
                else:
                    job.on_done(completion(result))
            return report

        self.core.submit_together([(self.request(job), done(job), job.on_error) for job in jobs])

    def run_batch(self, jobs: list[Job]) -> list[Completion]:
        """Every job's reply, generated here and now (continuously batched among themselves); also reported to each job."""
        if not jobs:
            return []
        try:
            results = self.core.run([self.request(job) for job in jobs])
        except BaseException as err:  # every waiting caller must hear of it, not hang
            for job in jobs:
                job.on_error(err)
            if not isinstance(err, Exception):
                raise
            return []
        completions = [completion(result) for result in results]
        for job, done in zip(jobs, completions):
            job.on_done(done)
        return completions


def completion(result: core.Result) -> Completion:
    reason = result.finish_reason if result.finish_reason in ("stop", "length", "cancelled") else "stop"
    return Completion(result.text, reason, result.prompt_tokens, result.completion_tokens, result.logprobs)


def describe(engine: Engine) -> dict[str, Any]:
    """What the engine has done so far, for ``/health``."""
    stats = engine.stats
    return {"decode_steps": stats.decode_steps, "mean_batch": stats.as_dict()["mean_batch"],
            "prefills": stats.prefills, "generated_tokens": stats.generated_tokens}
