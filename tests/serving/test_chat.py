"""``qlora-pipeline chat`` in a real terminal (pexpect): streamed replies equal the engine's, commands, exits."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pexpect
import pytest
import yaml

from conftest import BIN, set_dotted
from qlora_pipeline.config import ChatConfig, load_params
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.serving.chat import PROMPT, parse_setting, with_setting
from qlora_pipeline.serving.engine import Engine, Job, Sampling
from qlora_pipeline.serving.models import AdapterSpec, load_persona_model
from qlora_pipeline.serving.prompts import prompt_ids, with_system_prompt

pytestmark = pytest.mark.slow

MESSAGE = "hey, how was your weekend?"
TIMEOUT = 120
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # readline's terminal codes (e.g. bracketed paste on/off)


@pytest.fixture(scope="module")
def chat_params(tmp_path_factory, base_params_dict) -> Path:
    """The repository's params.yaml with greedy 12-token replies, so a reply can be pinned."""
    folder = tmp_path_factory.mktemp("chat-params")
    raw = set_dotted(copy.deepcopy(base_params_dict), {"chat.temperature": 0.0, "chat.max_new_tokens": 12,
                                                       "mlflow.tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def engine_reply(small_base, small_adapters, chat_params):
    """``reply(name, conversation)``: the engine's answer in this process, as chat should give it."""
    specs = [AdapterSpec(name, str(small_adapters[name])) for name in ("alice", "bob")]
    persona = load_persona_model(small_base, specs, dequantize=True)
    settings = load_params(chat_params).chat
    engine = Engine(persona, settings)

    def reply(name: str, conversation: list[dict]) -> str:
        ids = prompt_ids(persona.tokenizer, with_system_prompt(conversation, persona.system_prompt(name)))
        job = Job(ids, persona.peft_name(name), settings.max_new_tokens,
                  Sampling(settings.temperature, settings.top_p, settings.top_k))
        return engine.run_batch([job])[0].text

    return reply


def chat_command(small_base: Path, small_adapters: dict, params: Path, *extra: str) -> list[str]:
    return ["chat", "--base", str(small_base), "--adapter", f"alice={small_adapters['alice']}",
            "--adapter", f"bob={small_adapters['bob']}", "--params", str(params), "--dequantize", "true", *extra]


def spawn_chat(args: list[str], cwd: Path, parent_ignores_sigint: bool = False) -> pexpect.spawn:
    """The chat in a pseudo-terminal, as a user runs it; waits for its first prompt and returns the banner.

    ``parent_ignores_sigint``: started as by nohup or a runner that ignores SIGINT (children inherit that).
    """
    import signal

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if parent_ignores_sigint else None
    child = pexpect.spawn(str(BIN / "qlora-pipeline"), args, cwd=str(cwd), env=env, encoding="utf-8",
                          timeout=TIMEOUT, dimensions=(40, 300), preexec_fn=ignore)
    child.expect_exact(PROMPT)
    return child


def printed(child: pexpect.spawn) -> str:
    """What the chat printed before the prompt just matched, without the echo of the line typed."""
    text = ESCAPES.sub("", child.before).replace("\r\n", "\n")
    return text.partition("\n")[2]


def send(child: pexpect.spawn, line: str) -> str:
    """Type ``line``; what the chat printed in answer, up to its next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return printed(child)


def say(child: pexpect.spawn, message: str, name: str) -> str:
    """Send a user turn; the reply text, checked to come after the model's name."""
    out = send(child, message)
    assert out.startswith(f"{name}> ") and out.endswith("\n"), out
    return out[len(f"{name}> "):-1]


def test_a_chat_session_streams_the_engines_replies_and_obeys_commands(
        small_base, small_adapters, chat_params, engine_reply, tmp_path):
    child = spawn_chat(chat_command(small_base, small_adapters, chat_params), tmp_path)
    banner = ESCAPES.sub("", child.before)
    assert "models: base, alice, bob" in banner and "talking to alice" in banner and "/help" in banner

    listing = send(child, "/adapters").splitlines()
    assert listing[0].startswith("  base ") and str(small_base) in listing[0]
    assert listing[1].startswith("* alice ") and listing[1].endswith(str(small_adapters["alice"]))
    assert listing[2].startswith("  bob ") and listing[2].endswith(str(small_adapters["bob"]))

    user = {"role": "user", "content": MESSAGE}
    alice = say(child, MESSAGE, "alice")
    assert alice == engine_reply("alice", [user])

    assert "temperature takes a number" in send(child, "/set temperature=abc")
    unknown = send(child, "/set nosuchkey=1")
    assert "unknown key 'nosuchkey'" in unknown and "temperature, top_p, top_k" in unknown
    assert "unknown command /bogus" in send(child, "/bogus") and "/save FILE" in child.before

    assert send(child, "/use bob").startswith("now talking to bob")
    bob = say(child, MESSAGE, "bob")  # the conversation is kept across the switch
    assert bob == engine_reply("bob", [user, {"role": "assistant", "content": alice}, user])
    assert bob != alice
    assert "* bob " in send(child, "/adapters")

    assert "saved 4 turns" in send(child, "/save talk.jsonl")
    turns = [json.loads(line) for line in (tmp_path / "talk.jsonl").read_text().splitlines()]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert [t.get("model") for t in turns] == [None, "alice", None, "bob"]
    assert [t["content"] for t in turns] == [MESSAGE, alice, MESSAGE, bob]
    assert turns[3]["decoding"]["temperature"] == 0.0 and turns[3]["decoding"]["max_new_tokens"] == 12
    assert turns[3]["system_prompt"] == "You are bob. Reply in your own voice."

    assert "new conversation" in send(child, "/reset")
    send(child, "/system Talk like a pirate.")  # a fresh conversation under the user's own system prompt
    pirate = {"role": "system", "content": "Talk like a pirate."}
    assert say(child, MESSAGE, "bob") == engine_reply("bob", [pirate, user])
    assert "You are bob. Reply in your own voice." in send(child, "/system")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_save_writes_the_transcript_where_asked_and_makes_no_folder(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.serving.chat import save_transcript

    monkeypatch.chdir(tmp_path)
    session = SimpleNamespace(transcript=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(PipelineError, match=r"/save tlks/talk.jsonl: there is no folder tlks; make it first"):
        save_transcript(session, "tlks/talk.jsonl")  # it was made, the typo with it
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PipelineError, match=r"/save \.: that is a folder; give a file name"):
        save_transcript(session, ".")
    (tmp_path / "talks").mkdir()
    save_transcript(session, "talks/talk.jsonl")
    assert "saved 2 turns to talks/talk.jsonl" in capsys.readouterr().out
    assert [json.loads(line) for line in (tmp_path / "talks/talk.jsonl").read_text().splitlines()] == \
        session.transcript


def test_set_changes_the_active_models_decoding_and_each_model_keeps_its_own(capsys):
    """One set of settings served every model: /use bob kept alice's /set, and bob's own choice was never used."""
    from types import SimpleNamespace

    from qlora_pipeline.config import ChatConfig
    from qlora_pipeline.serving.chat import Session, change_setting, use_model
    from qlora_pipeline.serving.models import Defaults

    bob_chosen = ChatConfig(temperature=0.0, repetition_penalty=1.2, no_repeat_ngram_size=3)
    session = Session(SimpleNamespace(names=["base", "alice", "bob"], context_length=2048), None,
                      Defaults(ChatConfig(), {"bob": bob_chosen}), "alice", None)
    change_setting(session, "temperature=0.2")
    assert session.settings.temperature == 0.2
    use_model(session, "bob")
    assert session.settings == bob_chosen and "its decoding: temperature=0.0" in capsys.readouterr().out
    use_model(session, "alice")
    assert session.settings == ChatConfig(temperature=0.2)
    use_model(session, "base")
    assert session.settings == ChatConfig() and "its decoding: temperature=0.7" in capsys.readouterr().out


def test_errors_and_ctrl_c_stop_a_reply_not_the_session(small_base, small_adapters, chat_params, tmp_path):
    child = spawn_chat(chat_command(small_base, small_adapters, chat_params, "--use", "bob", "--seed", "7"),
                       tmp_path, parent_ignores_sigint=True)  # Ctrl-C must work all the same
    assert "talking to bob" in child.before

    send(child, "/set max_new_tokens=8100")
    too_long = send(child, "tell me about your day " * 30)
    assert "error:" in too_long and "shorten it" in too_long

    send(child, "/set max_new_tokens=4000")
    send(child, "/set temperature=0.8")
    child.sendline(MESSAGE)
    child.expect_exact("bob> ")
    child.expect(r"\S")  # text streams in while the reply goes on
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    assert "seed=8" in send(child, "/set")  # one reply made: the next one gets the next seed

    child.sendintr()  # Ctrl-C at the prompt leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_the_base_alone_starts_on_base_and_ctrl_d_leaves(small_base, chat_params, tmp_path):
    child = spawn_chat(["chat", "--base", str(small_base), "--params", str(chat_params)], tmp_path)
    assert "models: base | talking to base" in child.before
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("extra, message", [
    (["--use", "carol"], "error: --use carol: no such model; the models are base, alice, bob"),
    (["--adapter", "ghost=no/such/folder"], "error: no/such/folder: no such adapter folder"),
])
def test_a_bad_command_line_exits_1_with_a_clear_error(small_base, small_adapters, chat_params, tmp_path,
                                                      extra, message):
    proc = subprocess.run([str(BIN / "qlora-pipeline"), *chat_command(small_base, small_adapters, chat_params),
                           *extra], cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr


def test_set_checks_values_as_params_yaml_does():
    assert parse_setting("top_k = 20") == ("top_k", 20)
    assert parse_setting("seed=none") == ("seed", None)
    with pytest.raises(PipelineError, match="top_k takes a whole number"):
        parse_setting("top_k=2.5")
    with pytest.raises(PipelineError, match=r"chat.top_p: must be in \(0, 1\]"):
        with_setting(ChatConfig(), "top_p", 1.5, context_length=2048)
    with pytest.raises(PipelineError, match="below the model's context of 2048"):
        with_setting(ChatConfig(), "max_new_tokens", 2048, context_length=2048)


def _session(tokenizer, context_length: int = 128):
    """A chat session on alice with no engine: for what is decided before a reply is generated."""
    from types import SimpleNamespace

    from qlora_pipeline.serving.chat import Session
    from qlora_pipeline.serving.models import Defaults

    persona = SimpleNamespace(names=["base", "alice"], context_length=context_length, tokenizer=tokenizer,
                              system_prompt=lambda name: "You are alice. Reply in your own voice.")
    return Session(persona, None, Defaults(ChatConfig()), "alice", None)


@pytest.fixture(scope="module")
def small_tokenizer(small_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_base)


def test_commands_that_take_no_argument_refuse_one_and_do_nothing(capsys):
    """Their argument was dropped and the command run: "/reset please" cleared the conversation, "/quit now" left."""
    from qlora_pipeline.serving.chat import run_command

    session = _session(None)
    session.history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for text in ("/reset please", "/base now", "/adapters extra", "/help me", "/quit now", "/exit now"):
        name = text.split()[0]
        with pytest.raises(PipelineError, match=f"^{name} takes no argument; type {name} alone"):
            run_command(session, text)
    assert len(session.history) == 2 and session.active == "alice" and capsys.readouterr().out == ""
    assert run_command(session, "/quit") is False


def test_save_says_what_is_wrong_with_a_path_and_how_to_mend_it(tmp_path):
    """A NUL, a ~user of no user and a file taken for a folder gave Python's own errors, or "no folder"."""
    from types import SimpleNamespace

    from qlora_pipeline.serving.chat import save_transcript

    session = SimpleNamespace(transcript=[{"role": "user", "content": "hi"}])
    with pytest.raises(PipelineError, match=r"a\\0b.jsonl: a file name cannot hold a NUL character"):
        save_transcript(session, f"{tmp_path}/a\0b.jsonl")
    with pytest.raises(PipelineError, match=r"^/save ~nosuchuser-q7/c.jsonl: ~nosuchuser-q7 names no home folder "
                                            r"here; write the folder out, e.g. /save ./c.jsonl$"):
        save_transcript(session, "~nosuchuser-q7/c.jsonl")
    (tmp_path / "notes.csv").write_text("a,b\n")
    for text in (f"{tmp_path}/notes.csv/x.jsonl", f"{tmp_path}/notes.csv/more/x.jsonl"):
        with pytest.raises(PipelineError, match=f"^/save {text}: {tmp_path}/notes.csv is a file, not a folder"):
            save_transcript(session, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.csv"]


def test_a_system_prompt_or_max_new_tokens_that_leaves_no_room_is_named_not_the_message(small_tokenizer):
    """A /system prompt longer than the context was taken, and then every message was refused as too long;
    after /set max_new_tokens=context-1, "hi" was "more than the 1 the context leaves; shorten it"."""
    from qlora_pipeline.serving.chat import change_setting, fit_prompt, set_system

    session = _session(small_tokenizer)  # a 128-token context, a 96-token reply (the chat section's)
    with pytest.raises(PipelineError, match=r"^/system: the system prompt takes \d+ tokens of the 128-token "
                                            r"context, leaving none for a message and a reply; give a shorter one"):
        set_system(session, "word " * 200)
    with pytest.raises(PipelineError, match=r"^/system: .* max_new_tokens=96 keeps that many .* lower it, e.g. "
                                            r"/set max_new_tokens=\d+, or give a shorter system prompt"):
        set_system(session, "word " * 40)
    assert session.system_override is None
    with pytest.raises(PipelineError, match=r"^/set max_new_tokens=120: .* leaving none for a message; lower it"):
        change_setting(session, "max_new_tokens=120")
    assert session.settings.max_new_tokens == 96

    hello = [{"role": "user", "content": "hi"}]
    session.defaults.own["alice"] = ChatConfig(max_new_tokens=120)  # as after /use of a model decoding so
    with pytest.raises(PipelineError, match=r"^no message fits: .* max_new_tokens=120 .* /set max_new_tokens="):
        fit_prompt(session, hello)
    session.defaults.own.clear()
    session.system_override = "word " * 200  # past /system's check (a trained prompt is not checked)
    with pytest.raises(PipelineError, match=r"^no message fits: the system prompt takes \d+ tokens"):
        fit_prompt(session, hello)
    session.system_override = None
    assert fit_prompt(session, hello)[0] == hello
    with pytest.raises(PipelineError, match="shorten it"):  # where the message is what does not fit, it is named
        fit_prompt(session, [{"role": "user", "content": "word " * 100}])


def test_a_negative_seed_flag_is_refused_as_set_seed_is(capsys):
    from qlora_pipeline.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["chat", "--seed", "-5"])
    assert exited.value.code == 2
    assert "argument --seed: '-5' is not a whole number of at least 0" in capsys.readouterr().err
    assert build_parser().parse_args(["chat", "--seed", "0"]).seed == 0
    with pytest.raises(PipelineError, match="the seed is a whole number >= 0"):
        parse_setting("seed=-1")
