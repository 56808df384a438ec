"""Hostile clients (issue 17): every malformed payload class gets its 4xx, huge inputs are refused before any
tokenizing, slow clients get 408 within the read timeout, and connections do not cost threads."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch

import litebert
from conftest import minilm_dir
from litebert.inference.pipeline import pipeline
from litebert.inference.server import ModelServer, ServeConfig
from litebert.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tok = load_tokenizer(minilm_dir())
    out = {}
    for task, cls, extra in (("text-classification", litebert.EncoderForSequenceClassification,
                              {"id2label": {0: "neg", 1: "pos"}}),
                             ("question-answering", litebert.EncoderForQuestionAnswering, {})):
        torch.manual_seed(0)
        path = cls(litebert.preset("bert-test", vocab_size=30522, **extra)).save_pretrained(
            tmp_path_factory.mktemp(task.split("-")[0]), tokenizer=tok)
        out[task] = pipeline(task, model=str(path))
    return out


@pytest.fixture(scope="module")
def servers(pipes):
    config = ServeConfig(read_timeout_s=1.0)
    started = {task: ModelServer(pipe, port=0, config=config).start() for task, pipe in pipes.items()}
    yield started
    for server in started.values():
        server.stop()


def post(server, raw):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request("POST", "/predict", body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


QA = {"question": "who?", "context": "alice lives in paris"}


@pytest.mark.parametrize("task,raw,status,message", [
    ("text-classification", b'{"inputs": ["a\\ud800b"]}', 400, "lone surrogate"),
    ("text-classification", b"[" * 100_000, 400, "nested too deeply"),
    ("text-classification", b'{"inputs": ' + b"[" * 20 + b'"x"' + b"]" * 20 + b"}", 400, "nested deeper than"),
    ("text-classification", b'{"inputs": "x", "parameters": {"top_k": ' + b"7" * 5000 + b"}}", 400, "5000 digits"),
    ("text-classification", b'{"inputs": "x", "parameters": {"top_k": NaN}}', 400, "NaN is not JSON"),
    ("text-classification", b'{"inputs": "x", "parameters": {"top_k": true}}', 422, "top_k must be a positive int"),
    ("text-classification", b'{"inputs": "x", "parameters": {"top_k": "3"}}', 422, "top_k must be a positive int"),
    ("question-answering", json.dumps({"inputs": QA, "parameters": {"doc_stride": "x"}}).encode(), 422,
     "doc_stride must be an int >= 0"),
    ("question-answering", json.dumps({"inputs": QA, "parameters": {"doc_stride": -1}}).encode(), 422,
     "doc_stride must be an int >= 0"),
    ("question-answering", json.dumps({"inputs": QA, "parameters": {"doc_stride": 10**6}}).encode(), 422,
     "doc_stride must be an int >= 0 (at most"),
    ("question-answering", json.dumps({"inputs": QA, "parameters": {"handle_impossible_answer": "yes"}}).encode(),
     422, "handle_impossible_answer must be true or false"),
])
def test_each_malformed_payload_class_gets_its_4xx(servers, task, raw, status, message):
    got, body = post(servers[task], raw)
    assert (got, body["status"]) == (status, status) and message in body["error"], body
    assert post(servers[task], json.dumps({"inputs": [QA if task == "question-answering" else "fine"]}).encode())[0] \
        == 200  # and the server is fine


def test_huge_input_is_refused_before_tokenizing(servers, monkeypatch):
    server = servers["text-classification"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized")

    monkeypatch.setattr(server.checker, "_tok", type("T", (), {"encode_batch_fast": must_not_run})())
    status, body = post(server, json.dumps({"inputs": ["word " * 200_000]}).encode())
    assert status == 413 and "characters" in body["error"]


def _slow_socket(server, first: bytes) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(first)
    return sock


def _reply_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else -1


def test_slow_headers_and_slow_bodies_get_408_and_cost_no_thread(servers):
    server = servers["text-classification"]
    threads_before = threading.active_count()
    started = time.monotonic()
    heads = [_slow_socket(server, b"POST /predict HTTP/1.1\r\nHost: x\r\n") for _ in range(40)]
    bodies = [_slow_socket(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"in")
              for _ in range(40)]
    assert post(server, b'{"inputs": ["still served"]}')[0] == 200  # while 80 slow clients are connected
    assert threading.active_count() <= threads_before + 1  # a connection is a coroutine, not a thread
    statuses = [_reply_status(s) for s in heads + bodies]
    assert statuses == [408] * 80 and time.monotonic() - started < 10
    for s in heads + bodies:
        s.close()
