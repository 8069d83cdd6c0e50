"""``qlora-pipeline chat``: talk to the trained persona in this terminal, switching adapters as you go.

    qlora-pipeline chat --adapter persona=models/adapter [--adapter older=runs:/<run_id>/adapter]
                        [--use NAME] [--seed N] [--params params.yaml]

Each line typed is a user turn; the reply streams as it is generated, after the model's name.
Lines that start with ``/`` are commands (``/help`` lists them). The conversation is rendered as
training rendered it (chat template + the active adapter's trained system prompt), and its oldest
turns are dropped once it outgrows the context. Ctrl-C stops a reply; at the prompt, Ctrl-C or
Ctrl-D leaves.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from qlora_pipeline.config import ChatConfig, ConfigError, section_from
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import write_jsonl
from qlora_pipeline.serving.engine import Completion, Engine, Job, Sampling
from qlora_pipeline.serving.models import Defaults, PersonaModel, load_from_args
from qlora_pipeline.serving.prompts import fit_history, prompt_ids, with_system_prompt
from qlora_pipeline.serving.specs import BASE, check_command_line, check_model, first_model

PROMPT = "you> "
# What /set may change: the chat section's decoding keys, and the seed of the next reply.
SETTABLE = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size", "seed")
_SETTING_TYPES = typing.get_type_hints(ChatConfig)
RANDOM_SEED = ("none", "random")
# Their text after a space was dropped, and the command run: "/reset please" cleared the conversation.
NO_ARGUMENT = ("/quit", "/exit", "/base", "/adapters", "/reset", "/help")

HELP = f"""commands:
  /use NAME        talk to model NAME; the conversation is kept
  /base            talk to the base model with no adapter (= /use base)
  /adapters        list the models and their sources; * marks the active one
  /reset           start a new conversation
  /system TEXT     use TEXT as the system prompt; /system alone restores the trained one
  /set KEY=VALUE   change the current model's decoding; /set alone shows it. KEY: {', '.join(SETTABLE)}
  /save FILE       write this conversation (since /reset) as JSONL, with each reply's model and settings
  /quit            leave (also Ctrl-D, or Ctrl-C at the prompt; Ctrl-C during a reply stops the reply)
  /help            this list"""


@dataclass
class Session:
    """One terminal conversation: the model, who is talking, the turns so far, and the next reply's settings."""

    persona: PersonaModel
    engine: Engine
    defaults: Defaults  # each model's decoding settings; /set changes the active model's
    active: str
    seed: int | None  # the next reply's; +1 per reply, so a session started with --seed replays
    history: list[dict] = field(default_factory=list)  # the turns the model still sees: role and content
    transcript: list[dict] = field(default_factory=list)  # every turn since /reset, replies with model and settings
    system_override: str | None = None  # set by /system; None = the active adapter's trained prompt
    told_of_drops: bool = False

    @property
    def settings(self) -> ChatConfig:
        return self.defaults.of(self.active)

    @property
    def system_prompt(self) -> str | None:
        if self.system_override is not None:
            return self.system_override
        return self.persona.system_prompt(self.active)


# ----------------------------------------------------------------------------- start


def main(args: Any) -> None:
    # Ctrl-C must work even when the chat was started by a process that ignores SIGINT (a test runner,
    # nohup, a job control wrapper): Python keeps an inherited "ignore", and Ctrl-C at the prompt did nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    specs = check_command_line(args.adapter, args.use)  # before the load: a typo costs no load time
    active = first_model([BASE, *(spec.name for spec in specs)], args.use)
    try:
        persona, defaults = load_from_args(args)
    except KeyboardInterrupt:  # Ctrl-C while loading: leave as a shell expects, without a traceback
        raise SystemExit(130) from None
    session = Session(persona, Engine(persona, defaults.chat), defaults, active, args.seed)
    enable_line_editing()
    print(banner(session))
    run_session(session)


def enable_line_editing() -> None:
    """Arrow keys and a recall of earlier lines in input(): importing readline is all it takes."""
    with contextlib.suppress(ImportError):  # not on every platform (Windows); plain input() still works
        import readline  # noqa: F401


def banner(session: Session) -> str:
    return (f"models: {', '.join(session.persona.names)} | talking to {session.active} | "
            f"context {session.persona.context_length} tokens\n/help for commands, /quit to leave")


# ------------------------------------------------------------------------------ loop


def run_session(session: Session) -> None:
    """Read and answer lines until the user leaves; an error in one turn is reported and the chat goes on."""
    while True:
        line = read_line()
        if line is None:
            return
        try:
            if not handle_line(session, line):
                return
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C outside a reply (e.g. while the prompt is tokenized)
            print("\n(interrupted)")
        except Exception as err:  # a chat outlives any one failed turn; the message says what went wrong
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr)


def read_line() -> str | None:
    """The next line typed, or None when the user leaves (Ctrl-D, or Ctrl-C at the prompt)."""
    try:
        return input(PROMPT)
    except (EOFError, KeyboardInterrupt):
        print()  # end the prompt's line, so the shell's prompt starts on a fresh one
        return None


def handle_line(session: Session, line: str) -> bool:
    """Answer one line; False when the session should end."""
    text = line.strip()
    if not text:
        return True
    if text.startswith("/"):
        return run_command(session, text)
    reply(session, text)
    return True


# ----------------------------------------------------------------------------- reply


def reply(session: Session, text: str) -> None:
    """The active model's answer to ``text``, streamed to the terminal; both turns join the conversation."""
    user = {"role": "user", "content": text}
    kept, ids = fit_prompt(session, [*session.history, user])
    decoding = {**session.settings.model_dump(), "seed": session.seed}
    print(f"{session.active}> ", end="", flush=True)
    completion = generate(session, ids)
    print(" [stopped]" if completion.finish_reason == "cancelled" else "", flush=True)
    if session.seed is not None:
        session.seed += 1
    remember(session, kept, completion, decoding)


def fit_prompt(session: Session, conversation: list[dict]) -> tuple[list[dict], list[int]]:
    """The turns that fit the context with room for the reply, and their prompt ids.

    Dropped turns leave the history for good (the next prompt would drop them again anyway);
    the user hears of it once per conversation, as from then on it happens on most turns.
    """
    context = session.persona.context_length
    messages = with_system_prompt(conversation, session.system_prompt)
    try:
        kept, ids, dropped = fit_history(session.persona.tokenizer, messages,
                                         context - session.settings.max_new_tokens)
    except PipelineError:  # it blames the message; where no message could fit, say what leaves no room
        problem = no_room(session, session.system_prompt, session.settings.max_new_tokens)
        if problem:
            raise PipelineError(f"no message fits: {problem}") from None
        raise
    if dropped and not session.told_of_drops:
        print(f"(the conversation outgrew the {context}-token context: its {dropped} oldest turn(s) were dropped, "
              "and older turns keep being dropped as it grows; /reset starts afresh)")
        session.told_of_drops = True
    return [m for m in kept if m["role"] != "system"], ids


def no_room(session: Session, system_prompt: str | None, max_new_tokens: int) -> str:
    """Why no message fits beside ``system_prompt`` and a reply of ``max_new_tokens``; "" when one does."""
    context = session.persona.context_length
    # What every prompt takes before the message's own tokens: the system prompt in the chat template's turns
    empty = with_system_prompt([{"role": "user", "content": ""}], system_prompt)
    taken = len(prompt_ids(session.persona.tokenizer, empty))
    if taken + max_new_tokens < context:
        return ""
    if taken + 1 >= context:  # even a one-token reply leaves no token for a message
        return (f"the system prompt takes {taken} tokens of the {context}-token context, leaving none for a "
                "message and a reply; give a shorter one with /system TEXT")
    return (f"the system prompt takes {taken} tokens and max_new_tokens={max_new_tokens} keeps that many of the "
            f"{context}-token context for the reply, leaving none for a message; lower it, e.g. "
            f"/set max_new_tokens={(context - taken) // 2}, or give a shorter system prompt with /system TEXT")


def generate(session: Session, ids: list[int]) -> Completion:
    """One reply for prompt ``ids`` with the session's settings, each piece printed as soon as it is decoded."""
    pieces: list[str] = []
    failures: list[BaseException] = []

    def show(delta: str) -> None:
        pieces.append(delta)
        print(delta, end="", flush=True)

    settings = session.settings
    job = Job(ids, session.persona.peft_name(session.active), settings.max_new_tokens,
              Sampling(settings.temperature, settings.top_p, settings.top_k, session.seed),
              on_text=show, on_error=failures.append, defaults=settings)
    try:
        with cancel_on_interrupt(job):
            completions = session.engine.run_batch([job])
    except KeyboardInterrupt:  # the second Ctrl-C left generate() mid-step: keep what was shown
        return Completion("".join(pieces), "cancelled", len(ids), len(pieces))
    if not completions:
        print()
        raise PipelineError(f"generation failed: {failures[0]!r}")
    return completions[0]


@contextlib.contextmanager
def cancel_on_interrupt(job: Job) -> Iterator[None]:
    """Ctrl-C ends ``job`` after its current token; a second Ctrl-C (say, in a long prefill) interrupts at once.

    Setting ``cancelled`` rather than raising lets generate() return normally, so no model state
    (the active adapter, autocast) is left half-switched.
    """
    def interrupt(signum: int, frame: Any) -> None:
        if job.cancelled.is_set():
            raise KeyboardInterrupt
        job.cancelled.set()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def remember(session: Session, kept: list[dict], completion: Completion, decoding: dict) -> None:
    """Add the user turn (last of ``kept``) and the reply to the history and the transcript."""
    if completion.finish_reason == "cancelled" and not completion.text:
        return  # stopped before a word: as if the message had not been sent
    user = kept[-1]
    assistant = {"role": "assistant", "content": completion.text}
    session.history = [*kept, assistant]
    session.transcript += [user, {**assistant, "model": session.active, "system_prompt": session.system_prompt,
                                  "decoding": decoding, "finish_reason": completion.finish_reason}]


# -------------------------------------------------------------------------- commands


def run_command(session: Session, text: str) -> bool:
    """Run one /command; False when the session should end."""
    name, _, rest = text.partition(" ")
    if name in NO_ARGUMENT and rest.strip():
        raise PipelineError(f"{name} takes no argument; type {name} alone (nothing was done)")
    if name in ("/quit", "/exit"):
        return False
    command = COMMANDS.get(name)
    if command is None:
        print(f"unknown command {name}\n{HELP}")
    else:
        command(session, rest.strip())
    return True


def use_model(session: Session, name: str) -> None:
    if not name:
        raise PipelineError(f"/use: give a model name, one of {', '.join(session.persona.names)}")
    before = session.settings
    session.active = check_model(session.persona.names, name, "/use")
    kept = " (your /system prompt stays)" if session.system_override is not None else ""
    print(f"now talking to {name}{kept}")
    if session.settings != before:  # each model decodes as chosen for it (serving.models.Defaults)
        print(f"its decoding: {describe_settings(session)}")


def use_base(session: Session, _: str) -> None:
    use_model(session, BASE)


def list_models(session: Session, _: str) -> None:
    persona = session.persona
    width = max(map(len, persona.names))
    for name in persona.names:
        mark = "*" if name == session.active else " "
        source = persona.adapters[name].source if name in persona.adapters else f"{persona.base_dir} (no adapter)"
        print(f"{mark} {name:<{width}}  {source}")


def reset(session: Session, _: str) -> None:
    session.history, session.transcript, session.told_of_drops = [], [], False
    print("(new conversation)")


def set_system(session: Session, text: str) -> None:
    problem = no_room(session, text, session.settings.max_new_tokens) if text else ""
    if problem:  # else every message after it failed, each blamed on the message
        raise PipelineError(f"/system: {problem} (the system prompt is unchanged)")
    session.system_override = text or None
    if text:
        print("system prompt set; /system alone restores the trained one")
    else:
        print(f"system prompt: the one {session.active} was trained with ({session.system_prompt!r})")


def change_setting(session: Session, text: str) -> None:
    if not text:
        print(describe_settings(session))
        return
    key, value = parse_setting(text)
    if key == "seed":
        session.seed = value
    else:
        changed = with_setting(session.settings, key, value, session.persona.context_length)
        problem = no_room(session, session.system_prompt, changed.max_new_tokens) if key == "max_new_tokens" else ""
        if problem:
            raise PipelineError(f"/set {key}={value}: {problem} (the setting is unchanged)")
        session.defaults.own[session.active] = changed
    print(f"{key} = {value}")


def describe_settings(session: Session) -> str:
    values = {**session.settings.model_dump(), "seed": session.seed}
    return " ".join(f"{key}={values[key]}" for key in SETTABLE) + " (seed None = random)"


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of /set as the key and a value of its type; a clear error for anything else."""
    key, sep, raw = (part.strip() for part in text.partition("="))
    if not sep or not raw:
        raise PipelineError(f"/set {text}: write KEY=VALUE, e.g. /set temperature=0.7; KEY is one of "
                            f"{', '.join(SETTABLE)}")
    if key not in SETTABLE:
        raise PipelineError(f"/set {text}: unknown key {key!r}; KEY is one of {', '.join(SETTABLE)}")
    if key == "seed":
        return key, parse_seed(raw)
    return key, parse_number(key, raw, _SETTING_TYPES[key])


def parse_number(key: str, raw: str, kind: type) -> int | float:
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        what = "a whole number" if kind is int else "a number"
        raise PipelineError(f"/set {key}={raw}: {key} takes {what}, e.g. /set {key}={getattr(ChatConfig(), key)}")
    return value


def parse_seed(raw: str) -> int | None:
    if raw.lower() in RANDOM_SEED:
        return None
    if not raw.isdigit():
        raise PipelineError(f"/set seed={raw}: the seed is a whole number >= 0, or 'none' for a random one")
    return int(raw)


def with_setting(settings: ChatConfig, key: str, value: int | float, context_length: int) -> ChatConfig:
    """``settings`` with ``key`` changed, checked as params.yaml's chat section is; unchanged on an error."""
    try:
        changed, problems = section_from(ChatConfig, {**settings.model_dump(), key: value}, "/set", "chat"), []
    except ConfigError as err:
        changed, problems = settings, err.problems
    if changed.max_new_tokens >= context_length:  # no room would be left for the prompt
        problems.append(f"chat.max_new_tokens: must be below the model's context of {context_length} tokens, "
                        f"got {changed.max_new_tokens}")
    if problems:
        raise PipelineError(f"/set {key}={value}: {'; '.join(problems)} (the setting is unchanged)")
    return changed


def save_transcript(session: Session, text: str) -> None:
    if not text:
        raise PipelineError("/save: give a file name, e.g. /save chat.jsonl")
    if "\0" in text:  # no file name can hold one; the OS call's ValueError was shown raw
        shown = text.replace("\0", "\\0")  # the character itself shows as nothing in a terminal
        raise PipelineError(f"/save {shown}: a file name cannot hold a NUL character (\\0, often a stray paste); "
                            "type the name again")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~user of no user here, or ~ where no home folder is known
        home = text.split("/", 1)[0]
        raise PipelineError(f"/save {text}: {home} names no home folder here; write the folder out, e.g. "
                            f"/save ./{Path(text).name if '/' in text else 'chat.jsonl'}") from None
    try:
        check_save_path(text, path)
        count = write_jsonl(path, session.transcript)
    except OSError as err:
        raise PipelineError(f"/save {text}: {err.strerror or err}; choose a file you can write") from None
    print(f"saved {count} turns to {path}")


def check_save_path(text: str, path: Path) -> None:
    """A clear error where ``path`` cannot take a new file; OSError where the folders cannot even be looked at."""
    if path.is_dir():  # atomic_path replaces what is at the path: never a whole folder
        raise PipelineError(f"/save {text}: that is a folder; give a file name, e.g. /save {path / 'chat.jsonl'}")
    if path.parent.is_dir():
        return
    there = next((folder for folder in (path.parent, *path.parent.parents) if folder.exists()), None)
    if there is not None and not there.is_dir():  # "no folder x/y" read as if a folder could be made there
        raise PipelineError(f"/save {text}: {there} is a file, not a folder; give a path in a folder")
    # a mistyped folder was made, and the transcript left where no one looks
    raise PipelineError(f"/save {text}: there is no folder {path.parent}; make it first, or give another path")


def show_help(session: Session, _: str) -> None:
    print(HELP)


COMMANDS: dict[str, Callable[[Session, str], None]] = {
    "/use": use_model, "/base": use_base, "/adapters": list_models, "/reset": reset, "/system": set_system,
    "/set": change_setting, "/save": save_transcript, "/help": show_help,
}
