"""``litebert serve``: every pipeline task round-trips over HTTP with the answers the pipeline gives directly;
concurrent requests share forward passes; bad requests get clean 4xx without disturbing anyone else; the CLI
serves on a free port and stops cleanly on SIGTERM.

Where a test needs requests to pile up it holds the worker at a gate (an event), never a sleep."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import litebert
from conftest import minilm_dir
from litebert.inference.pipeline import pipeline
from litebert.inference.server import Job, MicroBatcher, ModelServer, ServeConfig
from litebert.tokenizer import load_tokenizer

NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
HEADS = {
    "text-classification": (litebert.EncoderForSequenceClassification, {"id2label": {0: "neg", 1: "pos"}}),
    "token-classification": (litebert.EncoderForTokenClassification, {"id2label": NER_LABELS}),
    "question-answering": (litebert.EncoderForQuestionAnswering, {}),
    "fill-mask": (litebert.EncoderForMaskedLM, {}),
    "feature-extraction": (litebert.BertModel, {}),
}
INPUTS = {
    "text-classification": ["a gripping, beautifully made film", "dull", {"text": "one", "text_pair": "two"}],
    "token-classification": ["Angela Merkel visited Washington yesterday.", "Hi there"],
    "question-answering": [{"question": "Who visited?", "context": "Angela Merkel visited Washington in May."},
                           {"question": "When?", "context": "It rained all day in Paris, then in June it stopped."}],
    "fill-mask": ["The capital of France is [MASK].", "[MASK] is a [MASK] day."],
    "feature-extraction": ["a sentence to embed", "another, somewhat longer sentence to embed here"],
}



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread: with two, OpenMP's barriers cost more CPU than the work (measured: 0.85 s
    vs 0.014 s of CPU for the three check batches on the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    tokenizer = load_tokenizer(minilm_dir())
    dirs = {}
    for task, (cls, config) in HEADS.items():
        torch.manual_seed(0)
        model = cls(litebert.preset("bert-test", vocab_size=30522, **config))
        if hasattr(model, "classifier"):
            with torch.no_grad():
                model.classifier.weight.mul_(200.0)
        dirs[task] = model.save_pretrained(tmp_path_factory.mktemp(task.split("-")[0]), tokenizer=tokenizer)
    return dirs


@pytest.fixture(scope="module")
def pipes(model_dirs):
    return {task: pipeline(task, model=str(path)) for task, path in model_dirs.items()}


@pytest.fixture(scope="module")
def servers(pipes):
    started = {task: ModelServer(pipe, port=0, model_name=task).start() for task, pipe in pipes.items()}
    yield started
    for server in started.values():
        server.stop()


def request(server, method, path, body=None, headers=None, raw=None):
    """(status, parsed JSON body, response headers) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null"), dict(resp.getheaders())
    finally:
        conn.close()


def _close(a, b, tol=1e-5):
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("task", list(HEADS))
def test_round_trip_each_task(task, servers, pipes):
    server = servers[task]
    status, body, _ = request(server, "POST", "/predict", {"inputs": INPUTS[task]})
    assert status == 200, body
    assert _close(body["outputs"], pipes[task](INPUTS[task]))
    status, single, _ = request(server, "POST", "/predict", {"inputs": INPUTS[task][0]})
    assert status == 200 and _close(single["outputs"], [pipes[task](INPUTS[task][0])])


def test_parameters_reach_the_pipeline(servers, pipes):
    status, body, _ = request(servers["text-classification"], "POST", "/predict",
                              {"inputs": ["fine"], "parameters": {"top_k": "all"}})
    assert status == 200 and _close(body["outputs"], pipes["text-classification"](["fine"], top_k="all"))
    status, body, _ = request(servers["fill-mask"], "POST", "/predict",
                              {"inputs": "a [MASK] day", "parameters": {"top_k": 2}})
    assert status == 200 and len(body["outputs"][0]) == 2


def test_health(servers):
    status, body, _ = request(servers["question-answering"], "GET", "/health")
    assert status == 200
    assert body["status"] == "ok" and body["task"] == "question-answering" and body["backend"] == "torch"
    assert body["queue_depth"] == 0 and body["limits"]["max_seq_length"] == 4 * 64  # QA: 4 windows of 64 positions


def test_empty_inputs(servers):
    assert request(servers["text-classification"], "POST", "/predict", {"inputs": []})[:2] == (200, {"outputs": []})


# --------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("raw,status,message", [
    (b"{not json", 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"[1, 2]", 422, "expected a JSON object"),
    (b"{}", 422, "missing field 'inputs'"),
    (b'{"input": ["x"]}', 422, "did you mean 'inputs'"),
    (b'{"inputs": [3]}', 422, "input 0: expected a string"),
    (b'{"inputs": ["ok", {"txt": "x"}]}', 422, "input 1: field 'text' is missing"),
    (b'{"inputs": "x", "parameters": {"topk": 1}}', 422, "did you mean 'top_k'"),
    (b'{"inputs": "x", "parameters": {"return_tensors": true}}', 422, "unknown text-classification parameter"),
    (b'{"inputs": "x", "parameters": [1]}', 422, "'parameters' must be an object"),
    (b'{"inputs": "x", "parameters": {"top_k": 0}}', 422, "top_k must be a positive int"),
])
def test_bad_payloads_get_4xx(servers, raw, status, message):
    got, body, _ = request(servers["text-classification"], "POST", "/predict", raw=raw)
    assert got == status and message in body["error"] and body["status"] == status


def test_fill_mask_without_mask_is_422(servers):
    status, body, _ = request(servers["fill-mask"], "POST", "/predict", {"inputs": ["no mask here"]})
    assert status == 422 and "no mask token" in body["error"]


def test_size_limits_are_413(pipes):
    config = ServeConfig(max_body_bytes=2000, max_inputs=3, max_seq_length=20)
    with_server = ModelServer(pipes["text-classification"], port=0, config=config).start()
    try:
        status, body, _ = request(with_server, "POST", "/predict", raw=json.dumps({"inputs": ["x" * 3000]}).encode())
        assert status == 413 and "2000" in body["error"]
        status, body, _ = request(with_server, "POST", "/predict", {"inputs": ["a", "b", "c", "d"]})
        assert status == 413 and "4 inputs" in body["error"]
        status, body, _ = request(with_server, "POST", "/predict", {"inputs": ["short", "word " * 30]})
        assert status == 413 and "input 1 is 32 tokens; the limit is 20" in body["error"]
        assert request(with_server, "POST", "/predict", {"inputs": ["word " * 18]})[0] == 200  # 18 + [CLS] + [SEP]
    finally:
        with_server.stop()


def test_wrong_path_and_method(servers):
    server = servers["text-classification"]
    assert request(server, "GET", "/nope")[0] == 404
    status, _, headers = request(server, "GET", "/predict")
    assert status == 405 and headers["Allow"] == "POST"
    assert request(server, "POST", "/health", {"x": 1})[0] == 405
    assert request(server, "DELETE", "/predict")[0] == 405


def test_keep_alive_survives_errors(servers, pipes):
    """Errors leave the connection usable: an unread body is never mistaken for the next request."""
    server = servers["text-classification"]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        for path, body, status in [("/nope", b'{"inputs": "x"}', 404), ("/health", b'{"inputs": "x"}', 405),
                                   ("/predict", b"{bad", 400), ("/predict", b'{"inputs": "fine"}', 200)]:
            conn.request("POST", path, body=body)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == status
    finally:
        conn.close()


def test_missing_content_length_is_411(servers):
    server = servers["text-classification"]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.putrequest("POST", "/predict")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ batching and the queue


class Gate:
    """A pipeline that holds the worker until released, so that requests pile up behind it."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, items, **options):
        self.calls.append(len(items))
        self.entered.set()
        assert self.release.wait(30)
        return self.pipe(items, **options)


def _wait_for(predicate, timeout=30.0):
    """Poll ``predicate`` until it holds (requests sent from threads reach the queue at their own pace)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        tick.wait(0.005)


def _post_in_thread(server, body, results, key):
    thread = threading.Thread(target=lambda: results.__setitem__(key, request(server, "POST", "/predict", body)))
    thread.start()
    return thread


def test_queued_requests_share_one_batch_and_bad_ones_stay_apart(pipes):
    gate = Gate(pipes["text-classification"])
    server = ModelServer(gate, port=0, config=ServeConfig(max_batch_size=64)).start()
    try:
        results = {}
        threads = [_post_in_thread(server, {"inputs": ["first"]}, results, "first")]
        assert gate.entered.wait(30)
        texts = [f"text number {i}" for i in range(8)]
        threads += [_post_in_thread(server, {"inputs": [t]}, results, t) for t in texts]
        threads.append(_post_in_thread(server, {"inputs": ["x"], "parameters": {"top_k": -1}}, results, "bad"))
        threads[-1].join(30)  # a bad parameter is answered before queuing, while the worker is still held
        _wait_for(lambda: len(server.batcher.queue) == 8)
        gate.release.set()
        for thread in threads:
            thread.join(30)
        assert gate.calls == [1, 8]  # 8 good ones in one call; the bad one never reached the model
        expected = pipes["text-classification"](texts)
        assert all(results[t][0] == 200 and _close(results[t][1]["outputs"], [e]) for t, e in zip(texts, expected))
        assert results["bad"][0] == 422 and "top_k" in results["bad"][1]["error"]
    finally:
        gate.release.set()
        server.stop()


def test_full_queue_is_503_and_queued_requests_still_succeed(pipes):
    gate = Gate(pipes["text-classification"])
    server = ModelServer(gate, port=0, config=ServeConfig(max_queue=1, max_batch_size=1)).start()
    try:
        results = {}
        threads = [_post_in_thread(server, {"inputs": ["a"]}, results, "a")]
        assert gate.entered.wait(30)
        threads.append(_post_in_thread(server, {"inputs": ["b"]}, results, "b"))
        _wait_for(lambda: len(server.batcher.queue) == 1)
        status, body, headers = request(server, "POST", "/predict", {"inputs": ["c"]})
        assert status == 503 and "busy" in body["error"] and headers["Retry-After"] == "1"
        assert request(server, "GET", "/health")[1]["queue_depth"] == 1
        gate.release.set()
        for thread in threads:
            thread.join(30)
        assert results["a"][0] == 200 and results["b"][0] == 200
    finally:
        gate.release.set()
        server.stop()


def test_micro_batcher_isolates_the_failing_job():
    """A merged call that fails on one job's input is rerun job by job: only that job gets the error."""
    calls = []

    def pipe(items, **options):
        calls.append(list(items))
        if "boom" in items:
            raise ValueError("cannot handle boom")
        return [item.upper() for item in items]

    batcher = MicroBatcher(pipe, max_batch_size=8)
    jobs = [Job(["a", "b"], {}), Job(["boom"], {}), Job(["c"], {})]
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    batcher.stop(30)
    assert calls[0] == ["a", "b", "boom", "c"] and calls[1:] == [["a", "b"], ["boom"], ["c"]]
    assert jobs[0].outputs == ["A", "B"] and jobs[2].outputs == ["C"]
    assert jobs[1].error.status == 422 and "boom" in jobs[1].error.message


# ------------------------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_serve_main_on_free_port_stops_on_sigterm(model_dirs):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import sys; from litebert.inference.server import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", str(model_dirs["text-classification"]),
                             "--port", "0", "--threads", "1"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        info = json.loads(proc.stdout.readline())
        host, port = info["url"].removeprefix("http://").split(":")
        assert host == "127.0.0.1" and info["task"] == "text-classification"
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/predict", body=json.dumps({"inputs": ["works"]}))
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["outputs"][0]["label"] in ("neg", "pos")
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_load_test_script_runs_and_passes(model_dirs):
    """bench/serve_load.py end to end on a tiny model with a handful of requests: every figure is reported and the
    pass criteria hold (no failed valid request, every bad one its 4xx, a clean stop)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(model_dirs["text-classification"]), "--levels",
                           "1,4", "--requests", "12", "--warmup", "4", "--abuse-rounds", "1", "--threads", "1",
                           "--slow", "10", "--read-timeout", "1", "--slow-every", "0.2"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["passed"] and [r["clients"] for r in result["levels"]] == [1, 4]
    assert all(r["failed"] == 0 and r["p50_ms"] > 0 and r["req_per_s"] > 0 for r in result["levels"])
    assert all(b["all_expected"] for b in result["bad_requests"].values()) and len(result["bad_requests"]) == 13
    assert result["slow_connections"]["all_408"] and result["server_threads_max"] <= 32
    assert result["memory"]["start_mib"] > 0 and result["server_exit_code"] == 0


def test_kernel_caches_are_bounded_unless_the_user_chose(monkeypatch):
    from litebert.inference import memory

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    memory.bound_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(memory.KERNEL_CACHE_CAPACITY)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"  # the user's setting wins
    memory.malloc_trim()()  # glibc's malloc_trim, or nothing where there is none; never an error
    assert memory.keep_freed_memory() is (memory._libc_function("mallopt") is not None)
