"""``litebert serve``: one model's pipeline behind a JSON HTTP API, with dynamic micro-batching.

    litebert serve --model runs/rt/final                  # http://127.0.0.1:8000, loopback only
    curl -s localhost:8000/predict -d '{"inputs": ["a gripping film", "a dull film"]}'
    {"outputs": [{"label": "pos", "score": 0.97}, {"label": "neg", "score": 0.91}]}

Endpoints:

- ``GET /health``: ``{"status": "ok", "task", "model", "backend", "queue_depth", ...limits, counters}``.
- ``POST /predict``: ``{"inputs": INPUT | [INPUT, ...], "parameters": {...}}`` -> ``{"outputs": [RESULT, ...]}``,
  one result per input (a single input gives a list of one). INPUT is what the model's pipeline takes: a text or
  ``{"text", "text_pair"}`` (text- and token-classification, fill-mask, feature-extraction), ``{"question",
  "context"}`` (question-answering). ``parameters`` are the pipeline's call options (``top_k``,
  ``aggregation_strategy``, ``pooling``, ``handle_impossible_answer``...).

Errors are JSON ``{"error": message, "status": code}``: 400 malformed JSON (not UTF-8, a lone surrogate, nesting
deeper than a request needs, a 20+ digit integer, NaN), 404 unknown path, 405 wrong method, 408 headers or body not
received within ``--read-timeout``, 411 no Content-Length, 413 body over ``--max-body-bytes`` (refused on its
Content-Length, unread), more than ``--max-inputs`` inputs, or an input over
``--max-seq-length`` tokens (inputs are never truncated silently), 422 well-formed but unusable (missing or mistyped
fields, unknown or mistyped parameters, no [MASK]), 503 queue full (with ``Retry-After``) or more than
``--max-connections`` connections, 504 not answered within ``--request-timeout``. Every check runs before the job
is queued (character counts before token counts): a bad request never reaches the model, so it cannot fail or stall
anyone else's.

HTTP is uvicorn's asyncio server with its h11 parser (a maintained, fuzzed HTTP/1.1 implementation): a connection
is a coroutine, not a thread, so slow or idle clients cannot exhaust threads; headers and body each have a deadline.
Threads are fixed: the event loop, a few checker threads (parse, validate, count tokens), the batcher's worker.

Micro-batching: checker threads validate and queue jobs; one worker thread takes the first job, then every job
already waiting (and, when the last batch held several jobs, any that arrive within ``--max-wait-ms``) up to
``--max-batch-size`` inputs, runs the pipeline once per set of parameters on the merged inputs (length-bucketed
inside), and hands each job its slice. A lone client is never made to wait; concurrent ones share forward passes.
If a merged call fails on an input error, its jobs are rerun one by one so only the offending request gets the
error. SIGINT / SIGTERM stop accepting, finish what is queued and in flight, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import uvicorn
from tokenizers import Tokenizer
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..runtime import PRECISIONS
from .engines import BACKEND_FILES
from .memory import bound_kernel_caches, malloc_trim
from .pipeline import Pipeline, pipeline

__all__ = ["MicroBatcher", "ModelServer", "ServeConfig", "serve_main"]

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
_DRAIN_LIMIT = 64 << 10  # bodies of endpoints that take none: read and dropped up to this size, else the reply closes
_OVERSIZE_DRAIN = 16 << 20  # an oversize body up to this is read and dropped before its 413; beyond, the reply hangs up
_MAX_DEPTH = 8  # JSON nesting a request needs is 4 ({"inputs": [{"choices": [...]}]}); deeper is refused
_MAX_INT_DIGITS = 20
_CHARS_PER_TOKEN = 32  # an input this many times longer (in characters) than the token limit cannot fit: 413 at once
_QA_WINDOWS = 4  # default QA limit: a context may span about this many windows of max_length tokens


@dataclass
class ServeConfig:
    """Limits and batching of a server. ``max_seq_length`` None: the pipeline's ``max_length`` (x4 for
    question answering, whose contexts are split into overlapping windows)."""

    max_batch_size: int = 32  # inputs merged into one pipeline call
    max_wait_ms: float = 5.0  # how long a batch waits for more jobs, only while several clients are active
    max_queue: int = 256  # jobs waiting; one more is a 503
    max_body_bytes: int = 1 << 20
    max_inputs: int = 64  # inputs per request
    max_seq_length: int | None = None  # tokens per input, special tokens included
    request_timeout_s: float = 30.0
    read_timeout_s: float = 10.0  # headers, then the body, must each arrive within this (slow clients get 408)
    max_connections: int = 512  # connections served at once; a request beyond gets 503
    check_threads: int = 4  # threads that parse, validate and count tokens off the event loop

    def __post_init__(self) -> None:
        if self.read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s must be > 0, got {self.read_timeout_s}")
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_inputs", "max_connections",
                     "check_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.max_seq_length is not None and self.max_seq_length < 3:
            raise ValueError(f"max_seq_length must be >= 3, got {self.max_seq_length}")


class RequestError(Exception):
    """An error answered with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None, close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        if close:  # the request's body is left unread: the connection cannot carry another request
            self.headers["Connection"] = "close"


# ------------------------------------------------------------------------------------------------------ batching


@dataclass
class Job:
    """One request's inputs and parameters, and, once done, its outputs or its error."""

    items: list[Any]
    parameters: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[Any] | None = None
    error: RequestError | None = None
    cancelled: bool = False
    callbacks: list[Callable[[], None]] = field(default_factory=list)  # called (from the worker) once done

    @property
    def key(self) -> str:
        return json.dumps(self.parameters, sort_keys=True)


class _JobQueue:
    """A FIFO of at most ``maxsize`` jobs; ``put`` never blocks (a full queue is the caller's 503), ``close`` wakes
    the consumer for good."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self.closed = False

    def put(self, job: Job) -> bool:
        with self._cv:
            if self.closed or len(self._jobs) >= self.maxsize:
                return False
            self._jobs.append(job)
            self._cv.notify()
            return True

    def get(self, timeout: float | None = None) -> Job | None:
        """The oldest job, or None after ``timeout`` seconds (None: until one comes) or once closed and empty."""
        with self._cv:
            self._cv.wait_for(lambda: self._jobs or self.closed, timeout)
            return self._jobs.popleft() if self._jobs else None

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        return len(self._jobs)


TRIM_EVERY_S = 1.0  # at most one malloc_trim a second, after a batch


class MicroBatcher:
    """One worker thread that runs ``pipe`` on merged jobs (see the module docstring)."""

    def __init__(self, pipe: Pipeline, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256):
        self.pipe = pipe
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue = _JobQueue(max_queue)
        self.stats = {"requests": 0, "inputs": 0, "batches": 0, "errors": 0}
        self._last_jobs = 0
        self._trim, self._trimmed_at = malloc_trim(), time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="litebert-batcher", daemon=True)

    def start(self) -> MicroBatcher:
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        if not self.queue.put(job):
            if self.queue.closed:
                raise RequestError(503, "server is shutting down")
            raise RequestError(503, f"server busy: {self.queue.maxsize} requests already queued; retry shortly",
                               {"Retry-After": "1"})

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then end the worker."""
        self.queue.close()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            jobs = [job]
            n = len(job.items)
            # Wait for company only when recent traffic was concurrent: a lone client gets no added latency.
            deadline = time.monotonic() + (self.max_wait if self._last_jobs > 1 else 0.0)
            while n < self.max_batch_size:
                nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                if nxt is None:
                    break
                jobs.append(nxt)
                n += len(nxt.items)
            self._last_jobs = len(jobs)
            self._run(jobs)
            if time.monotonic() - self._trimmed_at > TRIM_EVERY_S:
                self._trim()
                self._trimmed_at = time.monotonic()

    def _run(self, jobs: list[Job]) -> None:
        groups: dict[str, list[Job]] = {}
        for job in jobs:
            if not job.cancelled:
                groups.setdefault(job.key, []).append(job)
        for group in groups.values():
            self._run_group(group)

    def _run_group(self, group: list[Job]) -> None:
        items = [item for job in group for item in job.items]
        try:
            outputs = self.pipe(items, **group[0].parameters)
        except ValueError as err:
            if len(group) > 1:  # find the request at fault; the others still get answers
                for job in group:
                    self._run_group([job])
                return
            self._finish(group[0], error=RequestError(422, str(err)))
            return
        except Exception:  # a failing model must not take the worker down with it
            logger.exception("pipeline failed on a batch of %d inputs", len(items))
            for job in group:
                self._finish(job, error=RequestError(500, "internal error while running the model (see server log)"))
            return
        self.stats["batches"] += 1
        start = 0
        for job in group:
            self._finish(job, outputs=outputs[start:start + len(job.items)])
            start += len(job.items)

    def _finish(self, job: Job, outputs: list[Any] | None = None, error: RequestError | None = None) -> None:
        job.outputs, job.error = outputs, error
        self.stats["requests"] += 1
        self.stats["inputs"] += len(job.items)
        self.stats["errors"] += error is not None
        job.done.set()
        for callback in job.callbacks:
            callback()


# -------------------------------------------------------------------------------------------------------- checks


class InputChecker:
    """Validates a parsed request body into a `Job` (or raises `RequestError`) without touching the pipeline's
    state: token counts come from a private copy of the tokenizer, since the pipeline switches truncation on and off
    on its own while the worker runs."""

    def __init__(self, pipe: Pipeline, config: ServeConfig):
        self.pipe = pipe
        self.config = config
        self.task = pipe.task
        self.parameters = sorted(k for k in pipe.options if k != "return_tensors")  # JSON has no tensors
        self.max_tokens = config.max_seq_length or pipe.max_length * (_QA_WINDOWS if self.task == "question-answering"
                                                                     else 1)
        self._tok = Tokenizer.from_str(pipe.tokenizer.backend.to_str())  # no truncation, no padding: counts all

    def parse(self, raw: bytes) -> Job:
        """A request body (bytes) -> a validated `Job`, or `RequestError`: 400 for what is not JSON text (invalid
        UTF-8, lone surrogates, nesting deeper than a request needs, integers longer than any count, NaN), then the
        checks of `job`."""
        try:
            text = raw.decode("utf-8")
            body = json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
        except UnicodeDecodeError as err:
            raise RequestError(400, f"malformed JSON: the body is not UTF-8 ({err.reason} at byte {err.start})") from None
        except RecursionError:
            raise RequestError(400, "malformed JSON: nested too deeply") from None
        except ValueError as err:  # JSONDecodeError, and the refusals of _bounded_int / _no_constant
            raise RequestError(400, f"malformed JSON: {str(err)[:200]}") from None
        _check_tree(body)
        return self.job(body)

    def job(self, body: Any) -> Job:
        if not isinstance(body, dict):
            raise RequestError(422, f"expected a JSON object {{\"inputs\": ..., \"parameters\": {{...}}}}, got a "
                                    f"{_json_type(body)}")
        unknown = sorted(set(body) - {"inputs", "parameters"})
        if unknown:
            raise RequestError(422, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                                    f"{_suggest(unknown[0], ['inputs', 'parameters'])}; expected 'inputs' and "
                                    f"optionally 'parameters'")
        if "inputs" not in body:
            raise RequestError(422, "missing field 'inputs'")
        inputs = body["inputs"]
        items = list(inputs) if isinstance(inputs, list) else [inputs]
        if len(items) > self.config.max_inputs:
            raise RequestError(413, f"{len(items)} inputs in one request; the limit is {self.config.max_inputs}")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError(422, f"'parameters' must be an object, got a {_json_type(parameters)}")
        for key in parameters:
            if key not in self.parameters:
                valid = ", ".join(self.parameters) or "none"
                raise RequestError(422, f"unknown {self.task} parameter {key!r}{_suggest(key, self.parameters)}; "
                                        f"valid: {valid}")
        try:
            self.pipe.check_options(parameters)
        except ValueError as err:
            raise RequestError(422, str(err)) from None
        for i, item in enumerate(items):
            try:
                self.pipe.check_input(item)
            except ValueError as err:
                raise RequestError(422, f"input {i}: {err}") from None
        self._check_lengths(items)
        return Job(items, parameters)

    def _check_lengths(self, items: Sequence[Any]) -> None:
        if not items:
            return
        if self.task == "question-answering":
            pieces: list[Any] = [(item["question"], item["context"]) for item in items]
        else:
            pieces = [item if isinstance(item, str) else
                      (item["text"], item["text_pair"]) if item.get("text_pair") is not None else item["text"]
                      for item in items]
        max_chars = self.max_tokens * _CHARS_PER_TOKEN
        for i, piece in enumerate(pieces):
            chars = len(piece) if isinstance(piece, str) else sum(map(len, piece))
            if chars > max_chars:  # cheap, and before any tokenizing: a huge text costs nothing to refuse
                raise RequestError(413, f"input {i} is {chars} characters; inputs over {max_chars} cannot fit the "
                                        f"limit of {self.max_tokens} tokens (--max-seq-length)")
        lengths = [len(enc.ids) for enc in self._tok.encode_batch_fast(pieces, add_special_tokens=True)]
        for i, n in enumerate(lengths):
            if n > self.max_tokens:
                raise RequestError(413, f"input {i} is {n} tokens; the limit is {self.max_tokens} (--max-seq-length)")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits; no field takes more than {_MAX_INT_DIGITS}")
    return int(digits)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_tree(body: Any) -> None:
    """400 for nesting deeper than ``_MAX_DEPTH`` or a string that is not valid Unicode (a lone surrogate such as
    ``"\\ud800"`` parses, but no tokenizer can take it). Iterative: a hostile body cannot exhaust the stack here."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise RequestError(400, f"malformed text: a lone surrogate ({value[err.start]!r}) is not Unicode text"
                                   ) from None
        elif isinstance(value, (list, dict)):
            if depth > _MAX_DEPTH:
                raise RequestError(400, f"malformed request: JSON nested deeper than {_MAX_DEPTH} levels")
            children = list(value.items()) if isinstance(value, dict) else value
            for child in children:
                if isinstance(child, tuple):  # a (key, value) pair: keys are strings too
                    stack.append((child[0], depth))
                    stack.append((child[1], depth + 1))
                else:
                    stack.append((child, depth + 1))


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------------------- HTTP


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading a request's headers: a client that trickles them (a byte
    every few seconds) gets 408 and is disconnected after ``read_timeout`` seconds instead of holding a connection
    for as long as it likes. The body's deadline is the app's (it reads the body itself)."""

    read_timeout: ClassVar[float] = 10.0
    _guard: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
        self._guard = self.loop.call_later(self.read_timeout, self._expire)

    def _expire(self) -> None:
        self._guard = None
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            body = json.dumps({"error": f"request headers not received within {self.read_timeout:g} s",
                               "status": 408}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                                 + body)
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._guard is not None:
            self._guard.cancel()
        super().connection_lost(exc)


class _Disconnected(Exception):
    """The client went away mid-request: nobody to answer."""


_ROUTES = {"/health": "GET", "/predict": "POST"}


class _App:
    """The ASGI application: routing, bounded body reads, and the hand-off to the checker threads and the batcher.

    Parsing, validation and token counting run on a small fixed pool of threads (``check_threads``) so the event
    loop never blocks on them; the model runs on the batcher's one worker thread."""

    def __init__(self, server: ModelServer):
        self.server = server
        self.config = server.config

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"].rstrip("/") or "/"
        method = scope["method"]
        try:
            allowed = _ROUTES.get(path)
            if allowed != "POST" or method != "POST":
                await self._drain(receive, headers)  # an unread body would be parsed as the next request
            if allowed is None:
                raise RequestError(404, f"no such endpoint {path[:100]!r}; endpoints: GET /health, POST /predict")
            if method != allowed:
                raise RequestError(405, f"{path} takes {allowed}, not {method}", {"Allow": allowed})
            if path == "/health":
                await self._reply(send, 200, self.server.health())
            else:
                await self._reply(send, 200, await self._predict(receive, headers))
        except RequestError as err:
            await self._reply(send, err.status, {"error": err.message, "status": err.status}, err.headers)
        except _Disconnected:
            return

    async def _predict(self, receive: Any, headers: Mapping[str, str]) -> dict[str, Any]:
        ms = self.server
        body = await self._read_body(receive, headers, self.config.max_body_bytes)
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(ms.executor, ms.checker.parse, body)
        if not job.items:
            return {"outputs": []}
        done = loop.create_future()
        job.callbacks.append(lambda: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None)))
        with ms.track():
            ms.batcher.submit(job)
            try:
                await asyncio.wait_for(done, ms.config.request_timeout_s)
            except asyncio.TimeoutError:
                job.cancelled = True
                raise RequestError(504, f"no answer within {ms.config.request_timeout_s:g} s") from None
        if job.error is not None:
            raise job.error
        return {"outputs": job.outputs}

    def _content_length(self, headers: Mapping[str, str]) -> int:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length", close=True)
        raw = headers.get("content-length")
        if raw is None:
            raise RequestError(411, "missing Content-Length", close=True)
        if not raw.strip().isdigit() or len(raw) > 18:
            raise RequestError(400, f"bad Content-Length {raw[:40]!r}", close=True)
        return int(raw)

    async def _read_body(self, receive: Any, headers: Mapping[str, str], limit: int) -> bytes:
        n = self._content_length(headers)
        if n > limit:  # refused on the header alone: never parsed, let alone tokenized
            message = f"request body is {n} bytes; the limit is {limit} (--max-body-bytes)"
            if n > _OVERSIZE_DRAIN or "100-continue" in headers.get("expect", "").lower():
                raise RequestError(413, message, close=True)  # not worth reading (or not yet sent): hang up
            # Read and dropped, so that a client busy sending sees the 413 rather than a reset connection.
            await self._receive(receive, n, discard=True)
            raise RequestError(413, message)
        return await self._receive(receive, limit)

    async def _receive(self, receive: Any, limit: int, discard: bool = False) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.read_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise RequestError(408, f"request body not received within {self.config.read_timeout_s:g} s",
                                   close=True) from None
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over {limit} bytes (--max-body-bytes)", close=True)
            if not discard:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _drain(self, receive: Any, headers: Mapping[str, str]) -> None:
        """Read and drop a body nobody uses (small ones only; a big one closes the connection after the reply)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length", close=True)
        raw = headers.get("content-length", "0")
        n = int(raw) if raw.strip().isdigit() and len(raw) <= 18 else _DRAIN_LIMIT + 1
        if n == 0:
            return
        if n > _DRAIN_LIMIT:
            raise RequestError(413, f"request body is {n} bytes; this endpoint takes none", close=True)
        await self._receive(receive, _DRAIN_LIMIT)

    @staticmethod
    async def _reply(send: Any, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8", errors="backslashreplace")
        raw = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(data)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": data})


class ModelServer:
    """A pipeline served over HTTP: ``ModelServer(pipe, port=0).start()`` serves in background threads;
    ``.url`` is where, ``.stop()`` finishes the queued and in-flight requests and closes.

    HTTP is uvicorn's (h11 parser, asyncio): a connection costs a coroutine, not a thread, so slow or idle clients
    cannot exhaust threads; at most ``max_connections`` are served at once (more get 503), headers and body must
    each arrive within ``read_timeout_s``. Threads: the event loop, ``check_threads`` checkers, the batcher."""

    def __init__(self, pipe: Pipeline, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
                 model_name: str = "", backend: str = "torch"):
        self.pipe = pipe
        self.config = config or ServeConfig()
        self.model_name = model_name
        self.backend = backend
        self.checker = InputChecker(pipe, self.config)
        self.batcher = MicroBatcher(pipe, self.config.max_batch_size, self.config.max_wait_ms, self.config.max_queue)
        self.executor = ThreadPoolExecutor(self.config.check_threads, thread_name_prefix="litebert-check")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(self.config.max_connections)
        protocol = type("GuardedH11", (_GuardedH11,), {"read_timeout": self.config.read_timeout_s})
        uv_config = uvicorn.Config(_App(self), http=protocol, lifespan="off", access_log=False, log_level="warning",
                                   limit_concurrency=self.config.max_connections, timeout_keep_alive=5,
                                   timeout_graceful_shutdown=int(self.config.request_timeout_s) + 1,
                                   h11_max_incomplete_event_size=16 << 10)
        self.http = uvicorn.Server(uv_config)
        self.started = time.time()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.http.serve(sockets=[self._sock])),
                                        name="litebert-http", daemon=True)

    @property
    def host(self) -> str:
        return self._sock.getsockname()[0]

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ModelServer:
        self.batcher.start()
        self._thread.start()
        deadline = time.monotonic() + 30
        ready = threading.Event()
        while not self.http.started:  # uvicorn flips this once it accepts connections
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log)")
            ready.wait(0.005)
        return self

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Counts a request in flight for the duration."""
        with self._inflight_lock:
            self._inflight += 1
        try:
            yield
        finally:
            with self._inflight_lock:
                self._inflight -= 1

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "task": self.pipe.task, "model": self.model_name, "backend": self.backend,
                "queue_depth": len(self.batcher.queue), "in_flight": self._inflight,
                "connections": len(self.http.server_state.connections), "threads": threading.active_count(),
                "uptime_s": round(time.time() - self.started, 1), **self.batcher.stats,
                "limits": {**asdict(self.config), "max_seq_length": self.checker.max_tokens}}

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting connections, answer every request already in (uvicorn waits for them), then close."""
        self.http.should_exit = True
        self._thread.join(timeout)
        self.batcher.stop(timeout)
        self.executor.shutdown(wait=False)
        self._sock.close()


# ----------------------------------------------------------------------------------------------------------- CLI


def serve_main(argv: list[str]) -> int:
    """litebert serve --model DIR [--host 127.0.0.1] [--port 8000]: JSON HTTP API with dynamic micro-batching."""
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(prog="litebert serve", description=__doc__.split("\n\n")[0].replace("``", ""),
                                     epilog="POST /predict {\"inputs\": [...], \"parameters\": {...}}; GET /health. "
                                            "See litebert.inference.server for the status codes.")
    parser.add_argument("--model", required=True, help="model directory, or an export directory (ONNX)")
    parser.add_argument("--task", default="auto", help="pipeline task (default: the one the model was trained for)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one and prints it")
    parser.add_argument("--backend", choices=["auto", *BACKEND_FILES], default="auto",
                        help="the engine to serve with, among those in --model (default auto: the fastest for this "
                             "CPU, see docs/engines.md)")
    parser.add_argument("--onnx-file", default=None, help=argparse.SUPPRESS)  # older flag: model.onnx / .int8.onnx
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="PyTorch backend: auto (default; bf16 where the hardware runs it natively, else fp32), "
                             "fp32 or bf16")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help="inputs merged across requests into one pipeline call (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="how long a batch waits for more requests while several clients are active "
                             "(default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="requests waiting for the model before new ones get 503 (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body; larger gets 413 (default: %(default)s)")
    parser.add_argument("--max-inputs", type=int, default=defaults.max_inputs,
                        help="inputs per request; more gets 413 (default: %(default)s)")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="tokens per input, special tokens included; longer gets 413 (default: the pipeline's "
                             "max_length, 4x for question-answering)")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help="seconds before a queued request gets 504 (default: %(default)s)")
    parser.add_argument("--read-timeout", type=float, default=defaults.read_timeout_s,
                        help="seconds a client has to send a request's headers, then its body; slower gets 408 "
                             "(default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="connections served at once; a request beyond gets 503 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)

    bound_kernel_caches()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServeConfig(args.max_batch_size, args.max_wait_ms, args.max_queue, args.max_body_bytes, args.max_inputs,
                         args.max_seq_length, args.request_timeout, read_timeout_s=args.read_timeout,
                         max_connections=args.max_connections)
    if args.host not in LOOPBACK:
        logger.warning("serving on %s: the API has no authentication; anyone who can reach this address can use it",
                       args.host)
    task = None if args.task == "auto" else args.task
    backend = args.backend
    if args.onnx_file:  # the older way to choose an ONNX file
        backend = "onnx-int8" if args.onnx_file == BACKEND_FILES["onnx-int8"] else "onnx"
    pipe = pipeline(task, model=args.model, backend=backend, batch_size=args.batch_size, precision=args.precision)
    try:  # a model that cannot run here stops the server before it ever reports healthy
        pipe.warm_up()
    except RuntimeError as err:
        print(f"litebert serve: error: {err}", file=sys.stderr)
        return 2
    server = ModelServer(pipe, args.host, args.port, config, model_name=str(args.model), backend=pipe.backend)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    # The address on stdout, flushed, so scripts that start the server with --port 0 can read where it is.
    print(json.dumps({"url": server.url, "task": pipe.task, "backend": pipe.backend}), flush=True)
    logger.info("serving %s (%s, %s) on %s", args.model, pipe.task, pipe.backend, server.url)
    stop.wait()
    logger.info("stopping: finishing queued requests")
    server.stop()
    logger.info("stopped after %d requests (%d inputs, %d batches)", server.batcher.stats["requests"],
                server.batcher.stats["inputs"], server.batcher.stats["batches"])
    return 0
