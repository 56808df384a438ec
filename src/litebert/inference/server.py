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

Errors are JSON ``{"error": message, "status": code}``: 400 malformed JSON, 404 unknown path, 405 wrong method,
411 no Content-Length, 413 body over ``--max-body-bytes``, more than ``--max-inputs`` inputs, or an input over
``--max-seq-length`` tokens (inputs are never truncated silently), 422 well-formed but unusable (missing or mistyped
fields, unknown parameters, no [MASK]), 503 queue full (with ``Retry-After``), 504 not answered within
``--request-timeout``. Every check runs in the request's own thread before its job is queued: a bad request never
reaches the model, so it cannot fail or stall anyone else's.

Micro-batching: request threads validate and queue jobs; one worker thread takes the first job, then every job
already waiting (and, when the last batch held several jobs, any that arrive within ``--max-wait-ms``) up to
``--max-batch-size`` inputs, runs the pipeline once per set of parameters on the merged inputs (length-bucketed
inside), and hands each job its slice. A lone client is never made to wait; concurrent ones share forward passes.
If a merged call fails on an input error, its jobs are rerun one by one so only the offending request gets the
error. SIGINT / SIGTERM stop accepting, finish what is queued and in flight, then exit.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from tokenizers import Tokenizer

from ..runtime import PRECISIONS
from .memory import bound_kernel_caches, malloc_trim
from .pipeline import Pipeline, pipeline

__all__ = ["MicroBatcher", "ModelServer", "ServeConfig", "load_pipeline", "serve_main"]

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
_DRAIN_LIMIT = 16 << 20  # bodies up to this size are read and discarded before a 413, so the client sees the reply
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

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_inputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.max_seq_length is not None and self.max_seq_length < 3:
            raise ValueError(f"max_seq_length must be >= 3, got {self.max_seq_length}")


class RequestError(Exception):
    """An error answered with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


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
        lengths = [len(enc.ids) for enc in self._tok.encode_batch_fast(pieces, add_special_tokens=True)]
        for i, n in enumerate(lengths):
            if n > self.max_tokens:
                raise RequestError(413, f"input {i} is {n} tokens; the limit is {self.max_tokens} (--max-seq-length)")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    disable_nagle_algorithm = True  # headers and body are two writes; Nagle + delayed ACK would add ~40 ms
    timeout = 30  # seconds a connection may stall mid-request before its thread gives up
    server: _HTTPServer

    # -- routing -----------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    _ROUTES: ClassVar[dict[str, str]] = {"/health": "GET", "/predict": "POST"}

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            allowed = self._ROUTES.get(path)
            if allowed != "POST" or method != "POST":
                self._drain_body()  # a body nobody reads would be parsed as the next request on this connection
            if allowed is None:
                raise RequestError(404, f"no such endpoint {path!r}; endpoints: GET /health, POST /predict")
            if method != allowed:
                raise RequestError(405, f"{path} takes {allowed}, not {method}", {"Allow": allowed})
            if path == "/health":
                self._reply(200, self.server.model_server.health())
            else:
                self._predict()
        except RequestError as err:
            self._reply(err.status, {"error": err.message, "status": err.status}, err.headers)

    # -- predict -----------------------------------------------------------------------------------------------

    def _predict(self) -> None:
        ms = self.server.model_server
        body = self._read_body(ms.config.max_body_bytes)
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"malformed JSON: {err}") from None
        job = ms.checker.job(parsed)
        if not job.items:
            self._reply(200, {"outputs": []})
            return
        with ms.track():
            ms.batcher.submit(job)
            if not job.done.wait(ms.config.request_timeout_s):
                job.cancelled = True
                raise RequestError(504, f"no answer within {ms.config.request_timeout_s:g} s")
        if job.error is not None:
            raise job.error
        self._reply(200, {"outputs": job.outputs})

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            raise RequestError(411, "missing Content-Length")
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {raw!r}")
        return n

    def _read_body(self, limit: int) -> bytes:
        n = self._content_length()
        if n > limit:
            self._drain_body(n)
            raise RequestError(413, f"request body is {n} bytes; the limit is {limit} (--max-body-bytes)")
        return self.rfile.read(n)

    def _drain_body(self, n: int | None = None) -> None:
        """Read and drop a body we will not use, so the client reads our reply instead of a reset connection;
        one too big to be worth reading closes the connection instead."""
        if n is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                return
            try:
                n = max(0, int(self.headers.get("Content-Length", "0")))
            except ValueError:
                n = _DRAIN_LIMIT + 1
        if n > _DRAIN_LIMIT:
            self.close_connection = True
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)

    def handle_expect_100(self) -> bool:
        # A client that asks before sending (curl does for large bodies) learns about the limit without uploading.
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = 0
        if n > self.server.model_server.config.max_body_bytes:
            self.close_connection = True
            self._reply(413, {"error": f"request body is {n} bytes; the limit is "
                                       f"{self.server.model_server.config.max_body_bytes} (--max-body-bytes)",
                              "status": 413})
            return False
        return super().handle_expect_100()

    # -- replies -----------------------------------------------------------------------------------------------

    def _reply(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (bad request line, headers too large, unsupported method) as JSON too.
        self.close_connection = True
        try:
            self._reply(code, {"error": message or self.responses.get(code, ("error",))[0], "status": code})
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up shutdown
    request_queue_size = 128  # listen backlog; socketserver's 5 resets connections when many clients arrive at once
    model_server: ModelServer


class ModelServer:
    """A pipeline served over HTTP: ``ModelServer(pipe, port=0).start()`` serves in background threads;
    ``.url`` is where, ``.stop()`` finishes the queued and in-flight requests and closes."""

    def __init__(self, pipe: Pipeline, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
                 model_name: str = "", backend: str = "torch"):
        self.pipe = pipe
        self.config = config or ServeConfig()
        self.model_name = model_name
        self.backend = backend
        self.checker = InputChecker(pipe, self.config)
        self.batcher = MicroBatcher(pipe, self.config.max_batch_size, self.config.max_wait_ms, self.config.max_queue)
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.model_server = self
        self.started = time.time()
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="litebert-http", daemon=True)

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ModelServer:
        self.batcher.start()
        self._thread.start()
        return self

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Counts a request in flight for the duration (`stop` waits for them)."""
        with self._inflight_cv:
            self._inflight += 1
        try:
            yield
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                self._inflight_cv.notify_all()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "task": self.pipe.task, "model": self.model_name, "backend": self.backend,
                "queue_depth": len(self.batcher.queue), "in_flight": self._inflight,
                "uptime_s": round(time.time() - self.started, 1), **self.batcher.stats,
                "limits": {**asdict(self.config), "max_seq_length": self.checker.max_tokens}}

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting connections, answer every request already in, then close."""
        self.httpd.shutdown()
        with self._inflight_cv:
            self._inflight_cv.wait_for(lambda: self._inflight == 0, timeout)
        self.batcher.stop(timeout)
        self.httpd.server_close()


# ----------------------------------------------------------------------------------------------------------- CLI


def load_pipeline(model_dir: str | Path, task: str | None = None, backend: str = "auto", onnx_file: str | None = None,
                  **kwargs: Any) -> tuple[Pipeline, str]:
    """(pipeline, backend description) for a model directory: eager PyTorch when it has weights, else (or with
    ``backend="onnx"``) an export directory's ONNX file, ``model.int8.onnx`` when present, else ``model.onnx``."""
    from ..checkpoint import WEIGHT_FILES
    from .export import INT8_FILE, ONNX_FILE, onnx_pipeline

    model_dir = Path(model_dir)
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"backend must be auto, torch or onnx, got {backend!r}")
    has_weights = any((model_dir / name).is_file() for name in WEIGHT_FILES)
    if backend == "torch" or (backend == "auto" and has_weights and onnx_file is None):
        return pipeline(task, model=str(model_dir), **kwargs), "torch"
    name = onnx_file or (INT8_FILE if (model_dir / INT8_FILE).is_file() else ONNX_FILE)
    kwargs.pop("precision", None)
    return onnx_pipeline(model_dir, task, onnx_file=name, **kwargs), f"onnx:{name}"


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
    parser.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                        help="auto: PyTorch when the directory has weights, else its ONNX file")
    parser.add_argument("--onnx-file", default=None, help="ONNX file in --model (default: model.int8.onnx if present, "
                                                          "else model.onnx)")
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
    parser.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)

    bound_kernel_caches()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServeConfig(args.max_batch_size, args.max_wait_ms, args.max_queue, args.max_body_bytes, args.max_inputs,
                         args.max_seq_length, args.request_timeout)
    if args.host not in LOOPBACK:
        logger.warning("serving on %s: the API has no authentication; anyone who can reach this address can use it",
                       args.host)
    task = None if args.task == "auto" else args.task
    pipe, backend = load_pipeline(args.model, task, args.backend, args.onnx_file, batch_size=args.batch_size,
                                  precision=args.precision)
    try:  # a model that cannot run here stops the server before it ever reports healthy
        pipe.warm_up()
    except RuntimeError as err:
        print(f"litebert serve: error: {err}", file=sys.stderr)
        return 2
    server = ModelServer(pipe, args.host, args.port, config, model_name=str(args.model), backend=backend)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    # The address on stdout, flushed, so scripts that start the server with --port 0 can read where it is.
    print(json.dumps({"url": server.url, "task": pipe.task, "backend": backend}), flush=True)
    logger.info("serving %s (%s, %s) on %s", args.model, pipe.task, backend, server.url)
    stop.wait()
    logger.info("stopping: finishing queued requests")
    server.stop()
    logger.info("stopped after %d requests (%d inputs, %d batches)", server.batcher.stats["requests"],
                server.batcher.stats["inputs"], server.batcher.stats["batches"])
    return 0
