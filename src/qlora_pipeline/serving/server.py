"""``qlora-pipeline serve``: an OpenAI-compatible server, every adapter a model over one base in memory.

The routes and shapes are OpenAI's (``/v1/models``, ``/v1/chat/completions`` with SSE streaming and
``usage``), and runtime adapters use vLLM's names (``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``), so any OpenAI client, and tools written for vLLM or LoRAX, talk to it
unchanged. Requests are continuously batched by the library's generation engine: one joins the
running batch at the next step and leaves the moment it ends, adapters mixed per row (see ``engine.py``). Errors come in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from qlora_pipeline.config import ChatConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.modeling.engine import TokenLogprob
from qlora_pipeline.serving.admission import Admission
from qlora_pipeline.serving.engine import Completion, Engine, GenerationError, Job, Sampling, describe
from qlora_pipeline.serving.metrics import ServerMetrics
from qlora_pipeline.serving.models import Adapter, Defaults, PersonaModel, adopt_chosen_decoding
from qlora_pipeline.serving.prompts import prompt_ids, with_system_prompt
from qlora_pipeline.serving.specs import BASE, AdapterSpec, check_name

API_KEY_ENV = "QLORA_PIPELINE_API_KEY"
OWNER = "qlora-pipeline"


@dataclass
class Settings:
    defaults: Defaults | ChatConfig  # each model's decoding defaults; one ChatConfig = every model's
    api_key: str | None = None
    allow_runtime_adapters: bool = False
    max_adapters: int = 16  # adapters served at most; a runtime load past it is refused (each holds memory)
    adapter_roots: list[Path] = field(default_factory=lambda: [Path("models")])
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    max_context: int | None = None
    max_queue: int = 64  # requests admitted beyond the running batch; more get 429 with Retry-After
    request_timeout: float = 300.0  # seconds from arrival to the last token; then 408 (or an error event)
    body_timeout: float = 30.0  # seconds for the whole body once the headers are in; then 408
    decoding_file: Path | None = None  # the workspace's choose-decoding report, for adapters loaded at run time

    def __post_init__(self) -> None:
        if not isinstance(self.defaults, Defaults):
            self.defaults = Defaults(self.defaults)


class APIError(Exception):
    """An error the client caused (or may fix), answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: a response's body, or a stream's error event."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _valid_text(text: str) -> str:
    """Text a tokenizer can take: a lone surrogate (valid JSON as an escape, not Unicode) is the client's mistake."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"holds a lone surrogate (U+{ord(err.object[err.start]):04X} at character {err.start}); "
                         "send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_text)]
# OpenAI's API takes seeds that fit in 64 bits.
Seed = Annotated[int, Field(ge=-(1 << 63), le=(1 << 64) - 1)]


# ------------------------------------------------------------------------------- requests


# Strict types, as OpenAI's API checks them: "4" is no max_tokens, true no temperature, "yes" no stream. A float
# still takes a whole number (temperature 1).
STRICT = ConfigDict(strict=True)


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, Annotated[list[TextPart], Field(min_length=1)]]  # [] is no turn (OpenAI refuses it)
    name: Optional[Text] = None

    def as_turn(self) -> dict:
        # parts joined by a line break, as vLLM joins them: "Hello" and "world" are not "Helloworld"
        text = self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # json_schema's schema, which is refused anyway

    type: Text


class ChatCompletionRequest(BaseModel):
    # Keys other clients send that change nothing here (user, metadata, ...) are accepted and ignored;
    # keys that would change the answer and are not supported are refused below.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Text
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    stop: Union[Text, list[Text], None] = None
    seed: Optional[Seed] = None
    stream: Optional[bool] = None  # null: OpenAI's default, no stream
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(default=None, ge=1)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's extension, as its clients send it: -1 (or 0) = off; any k past the vocabulary keeps every token
    top_k: Optional[int] = Field(default=None, ge=-1, le=(1 << 31) - 1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # OpenAI's bounds
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    user: Optional[Text] = None  # OpenAI's end-user id: ignored here, but a string as there


class LoadAdapterRequest(BaseModel):
    model_config = STRICT

    lora_name: Text
    lora_path: Text


class UnloadAdapterRequest(BaseModel):
    model_config = STRICT

    lora_name: Text


# ------------------------------------------------------------------------------- the app


def create_app(persona: PersonaModel, engine: Engine, settings: Settings) -> FastAPI:
    app = FastAPI(title="qlora-pipeline persona server", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    admission = Admission(engine.max_batch_size, settings.max_queue, settings.request_timeout)
    metrics = ServerMetrics(engine, persona, admission)
    # Outermost last: every completion request counted, whoever answers it; the key checked before the body is
    # read (a client without it hears 401, not what is wrong with its JSON); then the body's size and deadline.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, seconds=settings.body_timeout)
    app.add_middleware(RequireKey, api_key=settings.api_key)
    app.add_middleware(CountCompletions, metrics=metrics)
    # Prompts are rendered and tokenized off the event loop (a 1 MB message took a second there, and every
    # stream and /health waited), on one thread: a burst of long messages waits its turn there, not the loop.
    prompt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompts")
    app.state.admission = admission  # the stop signal sets admission.draining (main)
    adapter_changes = asyncio.Lock()  # one runtime load or unload at a time

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = _closest_error(err.errors())
        where = ".".join(str(part) for part in first["loc"] if _is_field(part))
        if first["type"] == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        # form data, plain text, a JSON list; or no body at all (FastAPI: "body: Field required")
        if not where and first["type"] in ("model_attributes_type", "missing"):
            return error_response(400, "the request body must be a JSON object, sent with Content-Type: "
                                       "application/json", code="invalid_json")
        return error_response(400, f"{where or 'body'}: {first['msg']}", param=where or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (no route, wrong method, a body it cannot parse) in OpenAI's shape."""
        if isinstance(err, BodyRefused):
            return err.response()
        if err.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")
        if err.status_code == 405:  # with the Allow header Starlette gives
            return error_response(405, f"{request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed", headers=err.headers)
        if err.status_code == 400:  # e.g. JSON nested past the parser's depth
            return error_response(400, f"the request body could not be parsed: {err.detail}", code="invalid_json")
        return error_response(err.status_code, str(err.detail), code="http_error", headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        """A fault of ours: still OpenAI's shape, and logged with its traceback."""
        import traceback

        traceback.print_exception(err, file=sys.stderr)
        return error_response(500, f"internal error: {type(err).__name__}", type_="server_error")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def chat_page() -> Any:
        return static_file("chat.html")

    @app.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static(name: str) -> Any:
        if name not in STATIC_FILES:
            raise APIError(404, f"no file /static/{name}", code="not_found")
        return static_file(name)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request) -> dict:
        if not key_given(settings.api_key, request):  # the names may be people's: behind the key, as /v1/models
            return {"status": "ok"}
        return {"status": "ok", "models": persona.names, "engine": describe(engine)}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict:
        return {"object": "list", "data": model_cards(persona, started, settings.defaults)}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(model: str) -> dict:
        """One model's card (the OpenAI client's models.retrieve)."""
        card = next((c for c in model_cards(persona, started, settings.defaults) if c["id"] == model), None)
        if card is None:
            raise unknown_model(model, persona)
        return card

    @app.get("/metrics")
    async def prometheus() -> Any:
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        request.state.model = body.model  # the model label CountCompletions counts the answer under
        choices = choice_count(body, engine.max_batch_size)
        refusal = admission.admit(choices)
        if refusal is not None:
            raise APIError(refusal.status, refusal.message, type_="server_error" if refusal.status == 503 else
                           "rate_limit_error", code=refusal.code, headers={"Retry-After": str(refusal.retry_after)})
        timing = Timing(metrics, admission, choices)
        try:
            jobs, meta = await asyncio.get_running_loop().run_in_executor(prompt_pool, build_jobs, persona,
                                                                          settings, body)
            if body.stream:
                return await stream_completion(engine, jobs, meta, body, request, timing)
            return await complete(engine, jobs, meta, settings.request_timeout, timing, request)
        except BaseException:
            timing.release()
            raise

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest) -> dict:
        _require_runtime(settings)
        folder = allowed_adapter_folder(settings, body.lora_path)
        try:
            check_name(body.lora_name, "lora_name")
        except PipelineError as err:
            raise APIError(400, str(err), param="lora_name", code="invalid_value") from None
        async with adapter_changes:  # two clients loading one name: the second hears 409, not a loader's error
            if body.lora_name in persona.adapters:
                raise APIError(409, f"adapter '{body.lora_name}' is already loaded; unload it first",
                               param="lora_name", code="adapter_exists")
            if len(persona.adapters) >= settings.max_adapters:  # each holds its weights and slows every load
                raise APIError(409, f"{len(persona.adapters)} adapters are loaded, --max-adapters "
                                    f"{settings.max_adapters}; unload one first", param="lora_name",
                               code="adapter_limit_reached")
            try:  # its own decoding first, where choose-decoding picked one for these weights (--decoding)
                await asyncio.to_thread(adopt_chosen_decoding, settings.defaults,
                                        Adapter(body.lora_name, str(folder), folder, {}), settings.decoding_file)
            except Exception as err:  # a report damaged since the start: the params' chat section
                print(f"serve: {body.lora_name}: {err}; it decodes by the params' chat section", file=sys.stderr)
            try:
                await asyncio.to_thread(persona.load_adapter, AdapterSpec(body.lora_name, str(folder)))
            except Exception as err:
                settings.defaults.own.pop(body.lora_name, None)  # the decoding of an adapter not loaded
                # PipelineError: ours, told with the client's path; else PEFT on a folder it cannot read (a config
                # value of the wrong type, ...)
                message = client_message(err, folder, body.lora_path, persona) if isinstance(err, PipelineError) else (
                    f"lora_path {shown(body.lora_path)}: PEFT could not load this adapter ({type(err).__name__}); "
                    "check its adapter_config.json, or copy the folder again from training")
                raise APIError(400, message, param="lora_path", code="invalid_adapter") from None
            return {"object": "adapter", "id": body.lora_name, "status": "loaded", "models": persona.names}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest) -> dict:
        _require_runtime(settings)
        if body.lora_name == BASE:
            raise APIError(400, f"'{BASE}' is the base model every adapter runs on, not an adapter; it stays loaded",
                           param="lora_name", code="invalid_value")
        async with adapter_changes:
            if body.lora_name not in persona.adapters:
                raise APIError(404, f"no adapter '{shown(body.lora_name)}' is loaded; loaded: "
                                    f"{', '.join(persona.adapters) or 'none'}", param="lora_name",
                               code="model_not_found")
            await asyncio.to_thread(persona.unload_adapter, body.lora_name)
            settings.defaults.own.pop(body.lora_name, None)
            metrics.forget(body.lora_name)
            return {"object": "adapter", "id": body.lora_name, "status": "unloaded", "models": persona.names}

    return app


def _closest_error(errors: Sequence[dict]) -> dict:
    """The error to name: of the first bad field's errors, the one deepest into the body. A value that fits no
    member of a union (``content`` as a string or a list of parts) has an error per member; the member that
    took the value furthest is the one the client meant (``messages.0.content.0.text``, not ``content``)."""
    root = errors[0]["loc"][:2]
    return max((e for e in errors if e["loc"][:2] == root), key=lambda e: sum(map(_is_field, e["loc"])))


def _is_field(part: Any) -> bool:
    """A field name or list index of a validation error's location, not pydantic's tag of a union member
    ("str", "list[TextPart]", "function-after[...]") or the body itself."""
    if isinstance(part, int):
        return True
    return part not in ("body", "str", "int", "float", "bool", "list", "dict") and str(part).isidentifier()


def key_given(api_key: str | None, request: Any) -> bool:
    """Whether the request may pass: no key is set, or it sends 'Authorization: Bearer <key>'."""
    if api_key is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


# What a client without the key may fetch: the health check (without the models' names) and the chat page, which
# asks its user for the key.
PUBLIC_PATHS = re.compile(r"/(health|static/[^/]*)?")


class RequireKey:
    """401 for every route but the public ones unless the request carries the API key, before anything reads the
    body (FastAPI reads it before a route's dependencies run)."""

    def __init__(self, app: Any, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.requests import HTTPConnection

        if (scope["type"] == "http" and not PUBLIC_PATHS.fullmatch(scope["path"])
                and not key_given(self.api_key, HTTPConnection(scope))):
            await error_response(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")(scope, receive, send)
            return
        await self.app(scope, receive, send)


COMPLETIONS = "/v1/chat/completions"
CLIENT_GONE = 499  # nginx's status for a client that closed the connection before its answer


class CountCompletions:
    """Counts every completion request by the HTTP status it was answered with, whoever answered it (a refused key,
    a body too large or not JSON, a bad field, the route itself), under the model it asked for where its body was
    read; one that got no answer, its client gone, as 499."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != COMPLETIONS:
            await self.app(scope, receive, send)
            return
        status: int | None = None
        ended = False

        async def counted(message: dict) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            await send(message)

        code = CLIENT_GONE  # no answer, or a stream its client left (its status line had gone out, not its end)
        try:
            await self.app(scope, receive, counted)
        except Exception:  # a fault of ours: Starlette's outermost middleware answers it 500, after this one
            code = 500
            raise
        finally:
            self.metrics.answered(scope.get("state", {}).get("model", ""),
                                  status if status is not None and ended else code)


def _require_runtime(settings: Settings) -> None:
    if not settings.allow_runtime_adapters:
        raise APIError(403, "loading adapters at run time is off; restart the server with --allow-runtime-adapters",
                       type_="permission_error", code="runtime_adapters_disabled")


def shown(text: str, limit: int = 200) -> str:
    """What a client sent, as an error names it: a 1 MB path or name is not sent back whole."""
    return text if len(text) <= limit else text[:limit] + "…"


def allowed_adapter_folder(settings: Settings, path: str) -> Path:
    """``path`` resolved (links followed), refused unless it lies under an ``--adapter-root``."""
    sent = shown(path)
    try:  # a NUL byte, a name too long, a link loop: the client's path, not our fault
        # "~" is the server's own home; "~name" is not expanded: "no such user" against 403 told which users exist.
        folder = (Path(path).expanduser() if path == "~" or path.startswith("~/") else Path(path)).resolve()
        roots = [root.expanduser().resolve() for root in settings.adapter_roots]
        inside = any(folder == root or folder.is_relative_to(root) for root in roots)
        is_dir = inside and folder.is_dir()
    except (ValueError, RuntimeError, OSError) as err:  # named without the server's paths its text holds
        why = err.strerror if isinstance(err, OSError) and err.strerror else (
            "a symbolic link loop" if isinstance(err, RuntimeError) else str(err))
        raise APIError(400, f"lora_path {sent!r} is not a usable path ({why})", param="lora_path",
                       code="invalid_adapter") from None
    if not inside:
        raise APIError(403, f"lora_path {sent} is outside the allowed adapter roots; start the server with "
                            "--adapter-root for its folder", type_="permission_error", param="lora_path",
                       code="path_not_allowed")
    if not is_dir:
        raise APIError(400, f"lora_path {sent}: no such folder", param="lora_path", code="invalid_adapter")
    # The folder is inside; each file read from it must be too: a link inside the folder led out of the roots.
    try:
        out = sorted(entry.name for entry in folder.iterdir()
                     if not any(entry.resolve().is_relative_to(root) for root in roots))
    except (RuntimeError, OSError) as err:  # a link loop, a folder it may not read
        raise APIError(400, f"lora_path {sent} is not a usable folder ({type(err).__name__})", param="lora_path",
                       code="invalid_adapter") from None
    if out:
        raise APIError(403, f"lora_path {sent}: {', '.join(out)} link(s) outside the allowed adapter roots",
                       type_="permission_error", param="lora_path", code="path_not_allowed")
    return folder


def client_message(err: Exception, folder: Path, lora_path: str, persona: PersonaModel) -> str:
    """``err``'s message with the server's own paths put as the client knows them: the lora_path it sent (not
    where links resolve to) and the base by name."""
    return str(err).replace(str(folder), shown(lora_path)).replace(str(persona.base_dir), BASE)


def public_source(source: str) -> str:
    """Where a model came from, as a client may see it: a run's URI, or a folder's name (not a path on the server)."""
    return source if source.startswith("runs:/") else Path(source).name


def model_cards(persona: PersonaModel, created: int, defaults: Defaults) -> list[dict]:
    """OpenAI's model objects, plus what the chat page shows: the trained system prompt, the decoding defaults."""
    cards = [{"id": BASE, "object": "model", "created": created, "owned_by": OWNER, "root": persona.base_dir.name,
              "parent": None, "system_prompt": persona.system_prompt(BASE),
              "default_decoding": default_decoding(defaults.of(BASE))}]
    for name, adapter in persona.adapters.items():
        cards.append({"id": name, "object": "model", "created": created, "owned_by": OWNER,
                      "root": public_source(adapter.source), "parent": BASE,
                      "system_prompt": persona.system_prompt(name),
                      "default_decoding": default_decoding(defaults.of(name))})
    return cards


def default_decoding(defaults: ChatConfig) -> dict:
    return {"temperature": defaults.temperature, "top_p": defaults.top_p, "top_k": defaults.top_k,
            "repetition_penalty": defaults.repetition_penalty, "no_repeat_ngram_size": defaults.no_repeat_ngram_size,
            "max_tokens": defaults.max_new_tokens}


# The chat page: plain files shipped in the package, nothing from elsewhere. The policy lets the
# page load only its own files and talk only to this server, whatever a reply or a file holds.
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"chat.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
                "chat.css": "text/css; charset=utf-8"}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def static_file(name: str) -> Any:
    from fastapi.responses import Response

    return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name],
                    headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                             "Cache-Control": "no-cache"})


# ------------------------------------------------------------------------------- completions


@dataclass
class Meta:
    id: str
    model: str
    created: int


def unknown_model(name: str, persona: PersonaModel) -> APIError:
    return APIError(404, f"the model '{shown(name)}' does not exist; available: {', '.join(persona.names)}",
                    param="model", code="model_not_found")


def choice_count(body: ChatCompletionRequest, limit: int) -> int:
    """How many choices the request asks for (``n``): at most ``limit``, the rows the engine decodes at once."""
    choices = body.n or 1
    if choices > limit:
        raise APIError(400, f"n {choices} is above this server's {limit} choices per request (--max-batch-size: "
                            "the rows decoded at once); ask for fewer, or send several requests", param="n",
                       code="invalid_value")
    return choices


def build_jobs(persona: PersonaModel, settings: Settings, body: ChatCompletionRequest) -> tuple[list[Job], Meta]:
    """Check a request against the model and limits, and turn it into one generation job per choice (``n``).

    Choice ``i`` of a seeded request draws with seed ``seed + i``: the reply a request with that seed alone
    gets. The choices share the prompt, so the engine prefills it once for as many as the batch has room for."""
    try:  # looked up once: an unload between a check and a second lookup answered 500
        peft_name = persona.peft_name(body.model)
    except KeyError:
        raise unknown_model(body.model, persona) from None
    refuse_unsupported(body)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options: only with stream: true", param="stream_options", code="invalid_value")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: up to 4 non-empty strings", param="stop", code="invalid_value")
    messages = with_system_prompt([m.as_turn() for m in body.messages], persona.system_prompt(body.model))
    ids = prompt_ids(persona.tokenizer, messages)
    defaults = settings.defaults.of(body.model)
    max_tokens = _max_tokens(persona, settings, body, len(ids), defaults.max_new_tokens)
    sampling = Sampling(temperature=defaults.temperature if body.temperature is None else body.temperature,
                        top_p=defaults.top_p if body.top_p is None else body.top_p, seed=body.seed,
                        top_k=None if body.top_k is None else max(body.top_k, 0),
                        logit_bias=parse_logit_bias(body.logit_bias, vocabulary(persona)),
                        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs = [Job(ids, peft_name, max_tokens, sampling if body.seed is None else replace(sampling, seed=body.seed + i),
                stop=stops, logprobs=logprobs, defaults=defaults) for i in range(body.n or 1)]
    return jobs, Meta(f"chatcmpl-{uuid.uuid4().hex}", body.model, int(time.time()))


# OpenAI's bounds: a bias from -100 (the token is never picked) to 100 (it always is), on up to 300 tokens.
LOGIT_BIAS_LIMIT, LOGIT_BIAS_TOKENS = 100.0, 300


def vocabulary(persona: PersonaModel) -> int:
    """How many token ids the model scores (its config's vocabulary, else the tokenizer's)."""
    return getattr(persona.model.config, "vocab_size", None) or len(persona.tokenizer)


def parse_logit_bias(logit_bias: dict[str, float] | None, vocabulary: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token id as a string -> bias) as the sampler takes it, each entry checked."""
    if not logit_bias:
        return ()
    if len(logit_bias) > LOGIT_BIAS_TOKENS:
        raise APIError(400, f"logit_bias names {len(logit_bias)} tokens; at most {LOGIT_BIAS_TOKENS}",
                       param="logit_bias", code="invalid_value")
    pairs = []
    for key, bias in logit_bias.items():
        # The length first: int() refuses a string of over 4,300 digits (a 500, and two tracebacks in the log).
        if not (key.isascii() and key.isdigit() and len(key) <= 20 and int(key) < vocabulary):
            raise APIError(400, f"logit_bias: {key[:40]!r} is no token id of this model (0 to {vocabulary - 1})",
                           param="logit_bias", code="invalid_value")
        if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:  # NaN fails too
            raise APIError(400, f"logit_bias: the bias of token {key} is {bias}; give -100 to 100",
                           param="logit_bias", code="invalid_value")
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """A 400 naming the first key that asks for what this server does not do: each would change the answer, so
    taking it and answering without it would mislead the client. Their "off" values pass."""
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"response_format {body.response_format.type!r} is not supported: this is a persona chat "
                            "model; only 'text'", param="response_format", code="unsupported_value")
    for key in ("tools", "functions"):
        if getattr(body, key):
            raise APIError(400, f"{key} are not supported: this is a persona chat model", param=key,
                           code="unsupported_value")
    for key in ("tool_choice", "function_call"):
        if getattr(body, key) not in (None, "none"):
            raise APIError(400, f"{key} is not supported: this is a persona chat model (only 'none')", param=key,
                           code="unsupported_value")


def _max_tokens(persona: PersonaModel, settings: Settings, body: ChatCompletionRequest, prompt_tokens: int,
                default: int) -> int:
    """The reply's token limit: the one asked, else ``default`` (the model's decoding defaults'), as far as the
    context allows."""
    context = settings.max_context or persona.context_length
    if prompt_tokens >= context:
        raise APIError(400, f"the messages take {prompt_tokens} tokens; this model's context is {context} tokens",
                       param="messages", code="context_length_exceeded")
    asked = body.max_completion_tokens or body.max_tokens
    if asked is None:
        return min(default, settings.max_tokens_limit, context - prompt_tokens)
    if asked > settings.max_tokens_limit:
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"  # the one the client sent
        raise APIError(400, f"{field} {asked} is above this server's limit {settings.max_tokens_limit}",
                       param=field, code="invalid_value")
    if prompt_tokens + asked > context:
        raise APIError(400, f"this model's context is {context} tokens; the request asks for {prompt_tokens + asked} "
                            f"({prompt_tokens} in the messages, {asked} in the completion); lower max_tokens or "
                            "shorten the messages", param="messages", code="context_length_exceeded")
    return asked


def usage(completions: Sequence[Completion]) -> dict:
    """OpenAI's usage of a request: its prompt once, the tokens of every choice."""
    prompt, generated = completions[0].prompt_tokens, sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


class Timing:
    """One completion request's clock: metrics when it ends, its place released exactly once."""

    def __init__(self, metrics: ServerMetrics, admission: Admission, rows: int = 1):
        self.metrics, self.admission, self.rows = metrics, admission, rows
        self.arrived = time.monotonic()
        self.first_token: float | None = None
        self._released = False

    def watch(self, job: Job) -> None:
        relay = job.on_text

        def on_text(delta: str) -> None:
            if self.first_token is None:
                self.first_token = time.monotonic()
            relay(delta)

        job.on_text = on_text

    def remaining(self) -> float:
        return self.admission.request_timeout - (time.monotonic() - self.arrived)

    def finished(self, completions: Sequence[Completion]) -> None:
        self.metrics.finished([c.finish_reason for c in completions], completions[0].prompt_tokens,
                              [c.completion_tokens for c in completions], self.arrived, self.first_token,
                              time.monotonic())
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.admission.release(time.monotonic() - self.arrived, self.rows)


def timeout_error(timeout: float) -> APIError:
    return APIError(408, f"the request took longer than this server's limit of {timeout:g} s (--request-timeout); "
                         "ask for fewer max_tokens or retry when the server is less busy", code="request_timeout")


async def client_gone(request: Request) -> None:
    """Returns once the client has closed its connection: with the body read, uvicorn's next message is that."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0)  # a server that answered at once with empty bodies would not hold the loop


async def complete(engine: Engine, jobs: list[Job], meta: Meta, timeout: float, timing: Timing,
                   request: Request) -> Any:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future] = [loop.create_future() for _ in jobs]
    for job, future in zip(jobs, futures):
        job.on_done = lambda c, f=future: loop.call_soon_threadsafe(_settle, f, c, None)
        job.on_error = lambda e, f=future: loop.call_soon_threadsafe(_settle, f, None, e)
        timing.watch(job)
    engine.submit_together(jobs)
    replies, gone = asyncio.gather(*futures), asyncio.ensure_future(client_gone(request))
    try:  # a client that leaves stops its rows: they decoded on to their limit, holding places in the batch
        await asyncio.wait({replies, gone}, timeout=max(timing.remaining(), 0.001),
                           return_when=asyncio.FIRST_COMPLETED)
        if gone.done() and not replies.done():
            timing.release()  # its places in the batch and the queue: kept, they filled up until all got 429
            return error_response(CLIENT_GONE, "the client closed the connection", code="client_gone")
        if not replies.done():
            raise timeout_error(timeout)
        completions = replies.result()
    except APIError:
        raise
    except Exception as err:
        raise generation_error(meta.model, err) from err
    finally:  # a choice that failed, a deadline or a client gone: the others stop too (a no-op once all ended)
        for job in jobs:
            job.cancelled.set()
        gone.cancel()
        if not replies.done():
            replies.cancel()
            replies.add_done_callback(lambda f: f.cancelled() or f.exception())  # read: no "never retrieved"
    timing.finished(completions)
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "system_fingerprint": engine.persona.fingerprint[:24],
            "choices": [{"index": i, "message": {"role": "assistant", "content": completion.text},
                         "logprobs": logprobs_body(engine.persona.tokenizer, completion.logprobs),
                         "finish_reason": completion.finish_reason}
                        for i, completion in enumerate(completions)],
            "usage": usage(completions)}


def logprobs_body(tokenizer: Any, logprobs: Sequence[TokenLogprob] | None) -> dict | None:
    """OpenAI's ``logprobs`` of a choice (or of a stream chunk's tokens): each token as text, its UTF-8 bytes and
    log-probability, and the likeliest tokens at its step; None where the request asked for none."""
    if logprobs is None:
        return None

    def token(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])  # as vLLM shows a token: part of a character is U+FFFD
        return {"token": text, "logprob": logprob, "bytes": token_bytes(tokenizer, token_id, text)}

    return {"content": [{**token(entry.token_id, entry.logprob), "top_logprobs": [token(*top) for top in entry.top]}
                        for entry in logprobs], "refusal": None}


def token_bytes(tokenizer: Any, token_id: int, text: str) -> list[int]:
    """A token's own UTF-8 bytes, as OpenAI gives them: where a character is split over tokens (SmolLM2's tokenizer
    writes an emoji as three), each carries its part, and a client joins consecutive tokens' bytes to get it back.
    ``text`` is the token decoded alone, U+FFFD for such a part; vLLM sends U+FFFD's bytes there, which no join
    turns back into the character. Byte-level BPE tokens (GPT-2's kind: SmolLM2, Llama 3, Qwen) map back through
    their byte alphabet, byte-fallback tokens (``<0xE4>``: Llama 2, Mistral) are their byte; a token that decodes
    whole, or of a tokenizer of another kind, is its text's bytes."""
    if "\ufffd" in text:
        raw = _raw_token_bytes(tokenizer, token_id)
        if raw is not None:
            return list(raw)
    return list(text.encode("utf-8", errors="replace"))


def _raw_token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    kind, piece = _byte_decoder(tokenizer), tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return None
    if kind == "ByteLevel":
        table = _byte_level_bytes()
        return bytes(table[c] for c in piece) if all(c in table for c in piece) else None
    byte = _BYTE_TOKEN.fullmatch(piece) if kind == "ByteFallback" else None
    return bytes([int(byte.group(1), 16)]) if byte else None


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_bytes() -> dict[str, int]:
    """Byte-level BPE's alphabet back to bytes (GPT-2's table, as transformers builds it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _byte_decoder(tokenizer: Any) -> str | None:
    """"ByteLevel" or "ByteFallback" where the tokenizer's decoder (or one in its sequence) is one, else None."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        return _decoder_kind(decoder.__getstate__()) if decoder is not None else None
    except Exception:  # a decoder that does not serialize: its text's bytes, as before
        return None


@functools.cache  # these run on the event loop, per token and per top logprob: each decoder read once
def _decoder_kind(state: bytes) -> str | None:
    spec = json.loads(state)
    kinds = {spec.get("type")} | {part.get("type") for part in spec.get("decoders") or []}
    return next((kind for kind in ("ByteLevel", "ByteFallback") if kind in kinds), None)


def generation_error(model: str, err: BaseException) -> APIError:
    """What a request hears of a generation that failed: 404 if its model was unloaded while it ran, else 500."""
    if isinstance(err, GenerationError):
        return APIError(404, f"the model '{model}' was unloaded while this request ran ({err}); ask another model",
                        param="model", code="model_not_found")
    return APIError(500, f"generation failed: {err}", type_="server_error")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def stream_completion(engine: Engine, jobs: list[Job], meta: Meta, body: ChatCompletionRequest,
                            request: Request, timing: Timing) -> Any:
    """Server-sent events: each choice's role, its text as it comes and its finish reason, in chunks that name the
    choice's ``index`` (the choices' chunks interleave as the engine makes them); then the usage if asked, and
    ``[DONE]``."""
    from sse_starlette.sse import EventSourceResponse

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    for index, job in enumerate(jobs):
        if job.logprobs is not None:  # the tokens of the text that follows: queued before it
            job.on_logprobs = lambda entries, i=index: loop.call_soon_threadsafe(events.put_nowait,
                                                                                   ("logprobs", i, entries))
        job.on_text = lambda delta, i=index: loop.call_soon_threadsafe(events.put_nowait, ("text", i, delta))
        timing.watch(job)  # around the stream's own on_text: set before, it was replaced and no stream was timed
        job.on_done = lambda c, i=index: loop.call_soon_threadsafe(events.put_nowait, ("done", i, c))
        job.on_error = lambda e, i=index: loop.call_soon_threadsafe(events.put_nowait, ("error", i, e))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        data = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                "system_fingerprint": engine.persona.fingerprint[:24],
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            data["usage"] = None
        return json.dumps(data)

    async def produce():
        engine.submit_together(jobs)
        done: dict[int, Completion] = {}
        tokens: dict[int, list[TokenLogprob]] = {}  # each choice's log-probabilities for its next text chunk
        try:
            for index in range(len(jobs)):
                yield {"data": chunk(index, {"role": "assistant", "content": ""})}
            while len(done) < len(jobs):
                try:
                    kind, index, value = await asyncio.wait_for(events.get(), max(timing.remaining(), 0.001))
                except asyncio.TimeoutError:
                    yield {"data": json.dumps(timeout_error(timing.admission.request_timeout).body())}
                    break
                if kind == "logprobs":
                    tokens.setdefault(index, []).extend(value)
                elif kind == "text":
                    logprobs = logprobs_body(engine.persona.tokenizer, tokens.pop(index, [])) \
                        if jobs[index].logprobs is not None else None
                    yield {"data": chunk(index, {"content": value}, logprobs=logprobs)}
                elif kind == "error":
                    yield {"data": json.dumps(generation_error(meta.model, value).body())}
                    break
                else:  # with the log-probabilities of tokens that added no text, if any
                    done[index] = value
                    logprobs = logprobs_body(engine.persona.tokenizer, tokens.pop(index)) if index in tokens else None
                    yield {"data": chunk(index, {}, value.finish_reason, logprobs=logprobs)}
            else:
                completions = [done[index] for index in range(len(jobs))]
                timing.finished(completions)
                if include_usage:
                    yield {"data": json.dumps({"id": meta.id, "object": "chat.completion.chunk",
                                               "created": meta.created, "model": meta.model, "choices": [],
                                               "usage": usage(completions)})}
            yield {"data": "[DONE]"}
        finally:  # the client went away (or the stream ended): stop generating for it
            for job in jobs:
                job.cancelled.set()
            timing.release()

    from starlette.background import BackgroundTask

    # The place is released when the stream ends, and also if it never started (the client left first).
    return EventSourceResponse(produce(), ping=15, background=BackgroundTask(timing.release))


# ------------------------------------------------------------------------------- body limit


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (declared or streamed) with 413, bodies not in within ``seconds``
    of the headers with 408 (a client that sent part of one and waited held a connection as long as it liked), and
    bodies in a content coding with 415 (a gzip body was read as JSON and called not valid JSON; a brotli one the
    same), before anything parses them."""

    def __init__(self, app: Any, limit: int, seconds: float):
        self.app, self.limit, self.seconds = app, limit, seconds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await BodyTooLarge(self.limit).response()(scope, receive, send)
            return
        # Every Content-Encoding header, not the last one's alone: "gzip" then "identity" is a gzip body.
        codings = [value for name, value in headers if name == b"content-encoding"]
        if any(value.strip().lower() not in (b"identity", b"") for value in codings):
            await BodyEncoded(b", ".join(codings).decode("latin-1")).response()(scope, receive, send)
            return
        received, complete, deadline = 0, False, time.monotonic() + self.seconds

        async def limited() -> dict:
            nonlocal received, complete
            if complete:  # the body is in: what comes next is the client leaving, whenever it does
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise BodyTooSlow(self.seconds) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        try:
            await self.app(scope, limited, send)
        except BodyRefused as err:  # raised where no route's handler turned it into its answer
            await err.response()(scope, receive, send)


class BodyRefused(StarletteHTTPException):
    """A body refused while it streamed in. An HTTP error, so that FastAPI, reading the body for a route, passes it
    on to the app's handler (:func:`create_app`'s ``http_error``) rather than calling it a body it could not parse
    (400)."""

    code = "invalid_request"

    def response(self) -> JSONResponse:
        # The rest of the body is never read: the connection closes, or a client trickling bytes held it open.
        return error_response(self.status_code, self.detail, code=self.code, headers={"Connection": "close"})


class BodyTooLarge(BodyRefused):
    code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)")


class BodyEncoded(BodyRefused):
    code = "unsupported_content_encoding"

    def __init__(self, coding: str):
        super().__init__(415, f"Content-Encoding {shown(coding)!r}: this server reads bodies uncompressed; send the "
                              f"body as it is, without a Content-Encoding header")


class BodyTooSlow(BodyRefused):
    code = "request_timeout"

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} s of its headers; send it whole")


# ------------------------------------------------------------------------------- command


def api_key_from_args(args: Any) -> str | None:
    """--api-key, else the environment's; refused where given empty ('' turned the key off without a word) or with
    spaces around it (a key no client's header matches)."""
    # An empty variable is an unset one, as shells and CI files write it; an empty flag is a mistake.
    for where, key in (("--api-key", args.api_key), (API_KEY_ENV, os.environ.get(API_KEY_ENV) or None)):
        if key is not None and (not key.strip() or key != key.strip()):
            raise PipelineError(f"{where}: empty, or with spaces around it; give the key itself, or leave --api-key "
                                f"out and {API_KEY_ENV} unset to serve without one")
        if key is not None:
            return key
    return None


def settings_from_args(args: Any, defaults: Defaults) -> Settings:
    api_key = api_key_from_args(args)
    for name in ("max_batch_size", "max_tokens_limit", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    for name in ("max_queue", "request_timeout", "grace_seconds"):
        if getattr(args, name) < 0 or (name == "request_timeout" and args.request_timeout == 0):
            raise PipelineError(f"--{name.replace('_', '-')}: must be {'>' if name == 'request_timeout' else '>='} 0, "
                                f"got {getattr(args, name)}")
    return Settings(defaults=defaults, api_key=api_key, allow_runtime_adapters=args.allow_runtime_adapters,
                    max_adapters=args.max_adapters,
                    adapter_roots=list(args.adapter_root) or [Path("models")], max_tokens_limit=args.max_tokens_limit,
                    max_body_bytes=args.max_body_bytes, max_context=args.max_context, max_queue=args.max_queue,
                    request_timeout=args.request_timeout, decoding_file=getattr(args, "decoding", None))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on before the model loads, not after (uvicorn binds last).

    A check, not a reservation: the port is bound and let go at once, as uvicorn binds it (SO_REUSEADDR)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise PipelineError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise PipelineError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); stop what "
                                "listens there, or pick another port") from None


def main(args: Any) -> None:
    from qlora_pipeline.serving.models import load_from_args

    api_key_from_args(args)  # before the model loads: a mistake in the command is told at once
    check_port_free(args.host, args.port)
    persona, defaults = load_from_args(args)
    settings = settings_from_args(args, defaults)
    if not _is_loopback(args.host) and settings.api_key is None:
        print(f"warning: listening on {args.host} with no API key: anyone who reaches this port can use the model; "
              f"set --api-key or {API_KEY_ENV}", file=sys.stderr)
    engine = Engine(persona, defaults.chat, max_batch_size=args.max_batch_size).start()
    app = create_app(persona, engine, settings)
    print(f"serving {', '.join(persona.names)} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if settings.api_key else ''}", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.grace_seconds)
    from sse_starlette.sse import AppStatus

    # sse-starlette ends every stream the moment the server is told to stop; a drain lets them finish
    # (uvicorn cancels what is left after --grace-seconds).
    AppStatus.disable_automatic_graceful_drain()
    try:
        DrainingServer(config, app.state.admission).run()
    finally:
        engine.stop()
    print("serve: stopped", flush=True)


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains: no new requests (503 on open connections; the port closes), those in flight
    finish within --grace-seconds, then the process exits 0 (plain uvicorn re-raises the signal: status 143)."""

    def __init__(self, config: Any, admission: Admission):
        super().__init__(config)
        self.admission = admission

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.admission.draining = True
        if sig == signal.SIGTERM:
            self.should_exit = True
            return
        super().handle_exit(sig, frame)
