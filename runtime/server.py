"""``edge-run serve``: an OpenAI-compatible HTTP API for one loaded model.

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events or not; a vision
model also takes OpenAI ``image_url`` content parts holding ``data:`` URLs — the server
never fetches a URL from the network),
``POST /v1/completions``, ``GET /v1/models``, ``GET /health``. Built on the standard
library's threading HTTP server, so a device needs nothing more than the runtime. This
module is the HTTP side; what OpenAI's JSON means is ``edgephi.runtime.openai_api``.

* It listens on 127.0.0.1 unless told otherwise: a model on a device is not a public service.
  Beyond loopback it wants an API key (``Authorization: Bearer KEY``). A web page the
  user visits cannot use it either: on loopback a request must name a loopback ``Host``
  (DNS rebinding), a browser's ``Origin`` must be loopback, and a POST must say
  ``Content-Type: application/json``, which no page can send without the server's consent
  (a CORS preflight this server never grants).
* One generation runs at a time and at most ``max_queue`` requests wait for it; more get
  503 with ``Retry-After``.
* Each of ``slots`` sessions (``edgephi.runtime.session``; as many as the memory plan holds
  KV caches for) keeps its cache between requests. OpenAI clients resend the whole
  conversation every time; a request goes to the slot whose cache shares the longest prefix
  with its prompt, if that keeps more than half of the slot's cache, else to the slot used
  longest ago (``session.pick``), so only what is new is computed, as llama-server's
  ``cache_prompt`` does. Once a response is sent, its slot re-prefills what the answer's
  decode steps wrote (``Session.settle``), under the gate, giving way after a chunk to a
  request that waits. ``usage.prompt_tokens_details.cached_tokens`` says how many prompt
  tokens came from the cache. A client that goes away stops its answer — mid-stream, or
  while a whole answer is being made (its socket is looked at every ``DROP_CHECK_S``); the
  slot keeps what was computed.
* Bodies over ``max_body`` bytes get 413, malformed JSON or options 400, an unknown model
  404; the error body is OpenAI's ``{"error": {"message", "type", "code"}}``.
* SIGTERM/SIGINT stop accepting connections and let the requests in flight finish; a
  connection still sending its request (however slowly) or idle between requests is closed.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edgephi.core.errors import BadImage, ConfigError, ContextOverflow, EdgeError, TemplateError
from edgephi.runtime import tools
from edgephi.runtime.answer import Answer, Stats
from edgephi.runtime.engine import Engine
from edgephi.runtime.openai_api import CHAT_PATH, COMPLETIONS_PATH, ApiError, ApiRequest, finish_reason, usage
from edgephi.runtime.session import Session, pick

TEXT_MAX_BODY = 1 << 20
VISION_MAX_BODY = 32 << 20  # a phone photo as base64 in a data: URL
DROP_CHECK_S = 0.2  # how often a non-streamed answer looks whether its client is still there


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_body: int = TEXT_MAX_BODY
    max_queue: int = 8
    max_tokens_default: int = 256
    slots: int = 1
    log_requests: bool = True  # one line per request on stderr; never the prompt or answer...
    log_prompts: bool = False  # ...unless asked: then both, JSON-quoted, on the same line
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on every route but /health

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port} is not a TCP port")
        if self.slots < 1:
            raise ConfigError(f"slots must be at least 1, not {self.slots}")
        if self.max_queue < 1 or self.max_body < 1024:
            raise ConfigError("max_queue must be >= 1 and max_body >= 1024 bytes")
        if self.api_key is not None and (len(self.api_key) < 8 or not self.api_key.isprintable()):
            raise ConfigError("--api-key must be at least 8 printable characters")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def _hostname(authority: str) -> str:
    """``host[:port]`` or ``[v6]:port`` → the host."""
    if authority.startswith("["):
        return authority[1:].split("]")[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


_LISTEN_HINTS = {
    errno.EADDRINUSE: "another program is listening there: pick another --port (0 picks a free one)",
    errno.EACCES: "ports below 1024 need privileges: pick a --port above 1023",
    errno.EADDRNOTAVAIL: "--host is not an address of this machine: keep 127.0.0.1, or give one it has",
}


class ModelServer:
    """Serves one ``Engine``; ``serve_forever`` until ``shutdown``."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.slots = [engine.session] + [Session(engine) for _ in range(config.slots - 1)]
        self._used = [0.0] * len(self.slots)
        self._gate = threading.Lock()  # one model run at a time: an answer, or a slot settling
        self._count_lock = threading.Lock()
        self._admitted = 0
        self._waiting = 0  # requests waiting for the gate: a settle gives way to them
        server = self

        class Handler(_Handler):
            owner = server

        try:
            self.httpd = _HTTPServer((config.host, config.port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                hint=_LISTEN_HINTS.get(exc.errno or 0, "pick another --host or --port"),
            ) from None
        self.httpd.daemon_threads = False  # shutdown waits for requests in flight

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host if isinstance(host, str) else host.decode()}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.stop()
        self.httpd.server_close()

    def stop(self) -> None:
        """Accept nothing more; close the connections that have no request in flight."""
        self.httpd.shutdown()
        self.httpd.close_waiting()

    def install_signal_handlers(self) -> None:
        def stop(_signum: int, _frame: object) -> None:
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    # --- admission: the queue in front of the one engine ------------------------------

    def admit(self) -> None:
        with self._count_lock:
            if self._admitted >= self.config.max_queue + 1:
                raise ApiError(503, "the model is busy; try again shortly", kind="server_error", code="busy")
            self._admitted += 1

    def release(self) -> None:
        with self._count_lock:
            self._admitted -= 1

    def generate(self, asked: ApiRequest, outcome: Outcome) -> Answer:
        """Stream under the gate in the best slot (named in ``outcome`` for the settle that
        follows the response); the caller holds an admission."""
        answered: list[Answer] = []  # the slot's answer, once the gate let the request in
        return Answer(
            self._gated(asked, outcome, answered),
            lambda: answered[0].stats if answered else None,
        )

    def _gated(
        self, asked: ApiRequest, outcome: Outcome, answered: list[Answer]
    ) -> Generator[str, None, None]:
        with self._count_lock:
            self._waiting += 1
        with self._gate:
            with self._count_lock:
                self._waiting -= 1
            try:
                start = time.perf_counter()
                request = self.engine.prepare(asked.prompt, asked.images)
                index = pick(self.slots, request.ids, self._used)
                outcome.slot = self.slots[index]
                self._used[index] = time.monotonic()
                answered.append(outcome.slot.generate(request, asked.options, start=start))
                try:
                    yield from answered[0]
                finally:
                    answered[0].close()
            except ContextOverflow as exc:
                raise ApiError(400, str(exc), code="context_length_exceeded") from None
            except BadImage as exc:
                raise ApiError(400, str(exc), code="invalid_image") from None
            except ConfigError as exc:
                raise ApiError(400, str(exc), code="invalid_value") from None

    def settle(self, slot: Session) -> None:
        """Once a response is out, its slot takes in the answer (see the module docstring)."""
        with self._gate:
            slot.settle(give_way=lambda: self._waiting > 0)


@dataclass
class Outcome:
    """What one request's answer left, for the log line (its stats, as the answer gave them)
    and the slot to settle once the response is out."""

    stats: Stats | None = None
    slot: Session | None = None
    prompt: str = ""  # logged only when the server was asked to (--log-prompts)
    answer: str = ""


class _HTTPServer(ThreadingHTTPServer):
    """Knows which connections wait on their client (reading a request, or idle between
    two), so that a shutdown closes those rather than waiting on a slow or idle client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: set[socket.socket] = set()
        self._waiting_lock = threading.Lock()
        self.stopping = False

    def waits(self, connection: socket.socket, on: bool) -> None:
        with self._waiting_lock:
            if on:
                self._waiting.add(connection)
            else:
                self._waiting.discard(connection)
            stopping = self.stopping
        if on and stopping:
            _shut(connection)

    def close_waiting(self) -> None:
        with self._waiting_lock:
            self.stopping = True
            waiting = list(self._waiting)
        for connection in waiting:
            _shut(connection)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that went away mid-stream is not the server's problem


def _shut(connection: socket.socket) -> None:
    # A read blocked on this socket in its handler's thread returns at once, empty.
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RD)


class _Handler(BaseHTTPRequestHandler):
    owner: ModelServer
    server_version = "edgephi"
    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection is closed after this many seconds, so a shutdown never
    # waits on clients that hold connections open between requests.
    timeout = 5

    status = 0  # of the response being sent; kept for the request's log line

    def handle_one_request(self) -> None:
        # Waiting for the client until the request is read (``_busy``): a shutdown may close it.
        self.server.waits(self.connection, True)  # type: ignore[attr-defined]
        try:
            super().handle_one_request()
        finally:
            self.server.waits(self.connection, False)  # type: ignore[attr-defined]

    def _busy(self) -> None:
        """The request is read: from here a shutdown lets it finish."""
        self.server.waits(self.connection, False)  # type: ignore[attr-defined]

    def _client_gone(self) -> bool:
        """Whether the client closed its end: a non-streamed request's only sign of life."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # http.server's own lines: replaced by ``_log_line``, one per request

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status = code
        super().send_response(code, message)

    def _log_line(self, start: float, outcome: Outcome | None = None) -> None:
        """``time client method path status [tokens, TTFT, finish] duration``: no prompt, no answer
        unless the server was started with ``--log-prompts``."""
        if not self.owner.config.log_requests:
            return
        when = time.strftime("%Y-%m-%dT%H:%M:%S")
        parts = [when, str(self.client_address[0]), self.command, self.path.split("?")[0], str(self.status)]
        stats = outcome.stats if outcome is not None else None
        if stats is not None:
            parts += [
                f"prompt={stats.prompt_tokens}",
                f"cached={stats.cached_tokens}",
                f"generated={stats.generated_tokens}",
                f"ttft={stats.ttft_s:.3f}s",
                f"finish={stats.finish_reason}",  # "cancelled": the client went away
            ]
        parts.append(f"total={time.perf_counter() - start:.3f}s")
        if self.owner.config.log_prompts and outcome is not None and outcome.prompt:
            quoted = (
                json.dumps(outcome.prompt, ensure_ascii=False),
                json.dumps(outcome.answer, ensure_ascii=False),
            )
            parts += [f"prompt={quoted[0]}", f"answer={quoted[1]}"]
        print(" ".join(parts), file=sys.stderr, flush=True)

    # --- plumbing ---------------------------------------------------------------------

    def _send_json(
        self, status: int, payload: dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _fail(self, exc: ApiError) -> None:
        headers = {"Retry-After": "1"} if exc.status == 503 else {}
        if exc.status in (411, 413) or self.close_connection:
            # The body was not read: what follows on the connection is not a request.
            headers["Connection"] = "close"
            self.close_connection = True
        self._send_json(exc.status, exc.body(), headers)

    def _read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            size = int(length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if size < 0:
            # rfile.read(-1) would buffer until the client closes: any amount of memory.
            self.close_connection = True
            raise ApiError(400, "Content-Length may not be negative")
        if size > self.owner.config.max_body:
            raise ApiError(413, f"the request body is over {self.owner.config.max_body} bytes")
        try:
            body = json.loads(self.rfile.read(size).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and model != self.owner.config.model_name:
            raise ApiError(
                404,
                f"model {model!r} does not exist; this server has {self.owner.config.model_name!r}",
                code="model_not_found",
            )
        return body

    # --- routes -----------------------------------------------------------------------

    def _refuse(self) -> ApiError | None:
        """Who may ask: the checks every request passes before anything else is read."""
        config = self.owner.config
        if config.loopback:
            host = _hostname(self.headers.get("Host", ""))
            if not is_loopback(host):
                return ApiError(403, f"Host {host!r} is not this loopback server", kind="permission_error")
        origin = self.headers.get("Origin")
        if origin is not None and not is_loopback(_hostname(origin.split("://", 1)[-1])):
            return ApiError(
                403, f"requests from web pages ({origin}) are not served", kind="permission_error"
            )
        if config.api_key is not None and self.path != "/health":
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return ApiError(
                    401,
                    "a valid API key is required (Authorization: Bearer KEY)",
                    kind="authentication_error",
                    code="invalid_api_key",
                )
        if self.command == "POST":
            kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                self.close_connection = True  # its body is not read
                return ApiError(415, "the request body must be JSON, sent as Content-Type: application/json")
        return None

    def do_GET(self) -> None:
        start = time.perf_counter()
        self.status = 0  # a kept-alive connection's handler serves many requests
        self._busy()
        try:
            refused = self._refuse()
            if refused is not None:
                self._fail(refused)
                return
            self._get()
        finally:
            self._log_line(start)

    def _get(self) -> None:
        name = self.owner.config.model_name
        if self.path == "/health":
            engine = self.owner.engine
            health = {
                "status": "ok",
                "model": name,
                "context": engine.context,
                "adapters": engine.adapter_names,
                "inputs": ["text", "image"] if engine.vision else ["text"],
            }
            self._send_json(200, health)
        elif self.path == "/v1/models":
            model = {"id": name, "object": "model", "created": 0, "owned_by": "edgephi"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._fail(ApiError(404, f"no route {self.path}", code="not_found"))

    def do_POST(self) -> None:
        start = time.perf_counter()
        self.status = 0
        outcome = Outcome()
        try:
            self._post(outcome)
        except Exception as exc:
            # A fault of ours: still an OpenAI-shaped answer, if nothing was sent yet.
            self.close_connection = True
            if not self.status:
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                self._fail(
                    ApiError(500, f"internal error: {type(exc).__name__}: {reason}", kind="server_error")
                )
        finally:
            self._log_line(start, outcome)
            if outcome.slot is not None:
                # The response is out; the slot takes in the answer before the next request.
                self.owner.settle(outcome.slot)

    def _post(self, outcome: Outcome) -> None:
        try:
            refused = self._refuse()
            if refused is not None:
                raise refused
            if self.path not in (CHAT_PATH, COMPLETIONS_PATH):
                raise ApiError(404, f"no route {self.path}", code="not_found")
            body = self._read_json()
            request = ApiRequest.parse(
                body, self.path == CHAT_PATH, self.owner.engine, self.owner.config.max_tokens_default
            )
            self._busy()
            self.owner.admit()
            outcome.prompt = request.prompt
        except ApiError as exc:
            self._fail(exc)
            return
        except TemplateError as exc:  # the model's fault, not the request's
            self._fail(ApiError(500, str(exc), kind="server_error", code="chat_template"))
            return
        except EdgeError as exc:
            self._fail(ApiError(400, str(exc)))
            return
        try:
            if request.stream:
                self._stream(request, outcome)
            else:
                self._complete(request, outcome)
        except ApiError as exc:
            self._fail(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except EdgeError as exc:
            self._fail(ApiError(500, str(exc), kind="server_error"))
        finally:
            self.owner.release()

    def _calls(self, text: str, calling: tools.ToolRequest | None) -> list[tools.ToolCall] | None:
        return tools.parse_answer(text, calling, self.owner.engine.tool_format[0]) if calling else None

    def _complete(self, request: ApiRequest, outcome: Outcome) -> None:
        pieces: list[str] = []
        chunks = self.owner.generate(request, outcome)
        looked = time.monotonic()
        try:
            for chunk in chunks:
                pieces.append(chunk)
                if time.monotonic() - looked > DROP_CHECK_S:
                    looked = time.monotonic()
                    if self._client_gone():
                        # No one will read the answer: stop making it (the slot keeps its cache).
                        raise ConnectionResetError("the client went away")
        finally:
            chunks.close()
            outcome.answer = text = "".join(pieces)
            outcome.stats = chunks.stats
        chat = request.chat
        calls = self._calls(text, request.calling)
        out = request.envelope(
            f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", self.owner.config.model_name
        )
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish_reason(outcome.stats, calls),
            "logprobs": None,
        }
        if calls:
            listed = [c.to_openai() for c in calls]
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": listed}
        elif chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out.update(choices=[choice], usage=usage(outcome.stats))
        self._send_json(200, out)

    def _stream(self, request: ApiRequest, outcome: Outcome) -> None:
        chat, calling, model = request.chat, request.calling, self.owner.config.model_name
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        chunks = self.owner.generate(request, outcome)
        # Start generating before the headers, so a bad request still gets a proper status.
        first = next(chunks, None)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(delta: str | dict[str, Any] | None, finish: str | None = None) -> None:
            out = request.envelope(rid, model)
            out["object"] = chunk_kind
            if chat:
                payload: dict[str, Any] = (
                    {} if delta is None else delta if isinstance(delta, dict) else {"content": delta}
                )
                choice: dict[str, Any] = {"index": 0, "delta": payload, "finish_reason": finish}
            else:
                choice = {
                    "index": 0,
                    "text": delta if isinstance(delta, str) else "",
                    "finish_reason": finish,
                }
            out["choices"] = [choice]
            self.wfile.write(b"data: " + json.dumps(out, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()

        if chat:
            out = request.envelope(rid, model)
            out.update(
                object="chat.completion.chunk",
                choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            )
            self.wfile.write(b"data: " + json.dumps(out).encode() + b"\n\n")
        # With tools offered, an answer that opens like a call is held back until it is whole,
        # then sent as one tool_calls delta; text streams as soon as its first character shows.
        held: str | None = "" if calling is not None else None
        answer: list[str] = []
        try:
            for chunk in chunks if first is None else _chain(first, chunks):
                answer.append(chunk)
                if held is None:
                    event(chunk)
                    continue
                held += chunk
                if not tools.may_be_call(held):
                    event(held)
                    held = None
        finally:
            chunks.close()
            outcome.stats = chunks.stats
        outcome.answer = "".join(answer)
        calls = self._calls(held, calling) if held else None
        if calls:
            deltas = [{"index": i, **c.to_openai()} for i, c in enumerate(calls)]
            event({"tool_calls": deltas})
        elif held:
            event(held)
        event(None, finish_reason(outcome.stats, calls))
        if request.usage:
            # OpenAI's stream_options.include_usage: a last chunk with no choices and the usage.
            out = request.envelope(rid, model)
            out.update(object=chunk_kind, choices=[], usage=usage(outcome.stats))
            self.wfile.write(b"data: " + json.dumps(out).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def serve(engine: Engine, config: ServerConfig, ready: Any = None) -> None:
    """Run until SIGTERM/SIGINT, then finish the requests in flight."""
    server = ModelServer(engine, config)
    server.install_signal_handlers()
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.httpd.server_close()
