"""A scripted OpenAI-compatible Chat Completions server for tests and benchmarks (standard library only).

It plays a policy model (step scripts) and a judge model (regex rules), injects faults per distinct
request body, and counts what it answered, so tests can drive the real LLM client over real HTTP.
Given `alternatives(body, token)` (a token's top alternatives as (token, probability) pairs, or None for
the token alone at p=1), it is a server that returns `logprobs` when asked: one token per word, with its
leading whitespace. Without it, it ignores the request for logprobs, as some servers do. `rejects` names body fields it answers
400 to, as servers that validate strictly do (e.g. a hosted API that does not offer logprobs).

    with ScriptedServer(scripts={"capital of France": ["<search>France</search>", "<answer>Paris</answer>"]}) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test")

    proc, base_url = start_subprocess(latency=0.2, default="<answer>4</answer>")  # own process, own GIL
    ...; fetch_stats(base_url); proc.terminate(); proc.wait()

CLI: python tests/scripted_server.py --port 0 --latency 0.2 --default "<answer>4</answer>" \
        [--scripts-json FILE] [--rules-json FILE] [--rate-limit-first N ...] [--p-rate-limit 0.3 --seed 7 ...] \
        [--stamp-replies]  -> prints "READY <base_url>"

Faults come in two forms. Phases (`rate_limit_first`, ... `truncated_first`) walk every distinct body through
the same sequence of attempts. Rates (`p_rate_limit`, ... `p_truncated`) draw each attempt's fault from an RNG
seeded with (seed, body digest, attempt number): a reproducible fault matrix however requests interleave. Every
chat-completion attempt is logged (`attempt_log()`, GET /_attempts) with its arrival and reply times, status,
fault and Retry-After, so tests can check a client's retry budget and backoff at the server.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import math
import os
import queue
import random
import re
import select
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CLIENT_GONE = 499  # nginx's "client closed request": after a sleep the client had hung up, so nothing was sent
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
_MALFORMED = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "mess'


def _models(owned_by: str) -> bytes:  # vLLM, SGLang and llama.cpp name themselves in `owned_by`
    return json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0, "owned_by": owned_by}]}).encode()


@dataclass
class Faults:
    latency_s: float = 0.0  # sleep before every chat-completion reply
    rate_limit_first: int = 0  # per distinct body: the first N attempts get 429 + Retry-After
    retry_after_s: float = 0.05  # Retry-After value in seconds (fractional allowed)
    server_error_first: int = 0  # then the next N attempts get 500
    malformed_first: int = 0  # then the next N get a 200 whose body is not valid JSON
    slow_first: int = 0  # then the next N sleep slow_s before answering (to trigger client timeouts)
    slow_s: float = 5.0
    truncated_first: int = 0  # then the next N get a 200 head whose body stops short of its Content-Length
    # Per-attempt random faults, drawn in this order from an RNG keyed on (seed, body digest, attempt number);
    # they apply once the phases above are used up. A hang sleeps slow_s, a truncated reply is cut off mid-body.
    p_rate_limit: float = 0.0
    p_server_error: float = 0.0
    p_hang: float = 0.0
    p_malformed: float = 0.0
    p_truncated: float = 0.0
    seed: int = 0
    retry_after_max_s: float = 0.0  # > retry_after_s: each random 429's Retry-After is drawn from [retry_after_s, this]


def _text(content: Any) -> str:
    """Message content as text: None on tool-call turns, a list of parts in the multimodal form."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _error(message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 512  # listen() runs in __init__; the default backlog of 5 drops connections under load
    daemon_threads = True  # idle keep-alive connections and slow faults never block shutdown or exit
    block_on_close = False
    owner: ScriptedServer

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's getfqdn(): a reverse-DNS lookup that can stall with no network.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # hang-ups are normal with faults
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a benchmark must not pay a TCP handshake per request
    disable_nagle_algorithm = True  # no Nagle / delayed-ACK stalls on small replies
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # per-request logging would cost more than the reply
        pass

    def _send(self, code: int, body: bytes, extra: str = "", cut: int | None = None) -> None:
        # Head and body in one write: one syscall, and always a Content-Length so keep-alive works.
        # `cut`: send only that many body bytes, then hang up (a reply truncated on the wire).
        if cut is not None:
            self.close_connection = True
        close = "Connection: close\r\n" if self.close_connection else ""
        head = f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}{close}\r\n"
        self.wfile.write(head.encode() + (body if cut is None else body[:cut]))

    def _route(self) -> str:
        path = self.path.split("?", 1)[0]
        return path[3:] if path.startswith("/v1/") else path  # serve both /v1/x and /x

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return b""
        chunks = []  # streamed uploads (aiohttp with a generator body) arrive chunked
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _client_gone(self) -> bool:
        """True when the client hung up (EOF or reset) while we slept, e.g. after its timeout fired."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def do_GET(self) -> None:
        route = self._route()
        if route == "/models":
            self._send(200, _models(self.server.owner.owned_by))
        elif route == "/_stats":
            self._send(200, json.dumps(self.server.owner.stats()).encode())
        elif route == "/_attempts":
            self._send(200, json.dumps(self.server.owner.attempt_log()).encode())
        else:
            self._send(404, _error(f"no route GET {self.path}", "invalid_request_error", "not_found"))

    def do_POST(self) -> None:
        route, raw = self._route(), self._read_body()
        if route == "/chat/completions":
            code, body, extra, cut = self.server.owner._complete(raw, self._client_gone)
            if code == CLIENT_GONE:
                self.close_connection = True
            else:
                self._send(code, body, extra, cut)
        elif route == "/_reset":
            self.server.owner.reset_stats()
            self._send(200, b"{}")
        else:
            self._send(404, _error(f"no route POST {self.path}", "invalid_request_error", "not_found"))


class ScriptedServer:
    """Scripted Chat Completions server on 127.0.0.1; see the module docstring. Counters are thread-safe."""

    def __init__(self, *, scripts: dict[str, list[str]] | None = None, rules: list[tuple[str, str]] | None = None,
                 default: str = "<answer>unknown</answer>", faults: Faults | None = None, port: int = 0,
                 responder: Callable[[dict], str | dict] | None = None, stamp_replies: bool = False,
                 alternatives: Callable[[dict, str], list[tuple[str, float]] | None] | None = None,
                 owned_by: str = "tests", rejects: tuple[str, ...] = ()) -> None:
        self.scripts = dict(scripts or {})
        self._keys = list(self.scripts)
        self._rules = [(re.compile(rx, re.DOTALL), reply) for rx, reply in (rules or [])]
        self.default, self.responder, self.alternatives, self.owned_by = default, responder, alternatives, owned_by
        self.rejects = rejects
        # Prefix every reply with "[req:<16 hex of the body's sha256>]": a stored reply then names the request
        # that paid for it (replies stay deterministic per body, so a replayed conversation is unchanged).
        self.stamp_replies = stamp_replies
        self.faults = faults or Faults()  # read per request, so a test may swap it while running
        self.port = port
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._first_key_cache: dict[str, int] = {}  # message text -> index of first script key in it (-1: none)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset_stats()

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ScriptedServer:
        if self._httpd is None:
            self._httpd = _HTTPServer(("127.0.0.1", self.port), _Handler)
            self._httpd.owner = self
            self.port = int(self._httpd.server_address[1])
            # A short poll interval makes stop() return quickly.
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"scripted-server-{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd = self._thread = None

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- counters ------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget everything seen: counters, the request log and the per-body fault attempt history."""
        with self._lock:
            self._total = self._completed = 0
            self._by_body: collections.Counter[str] = collections.Counter()
            self._statuses: collections.Counter[int] = collections.Counter()
            self._attempts: dict[str, int] = {}
            self._requests: collections.deque[dict] = collections.deque(maxlen=10_000)
            self._log: collections.deque[dict] = collections.deque(maxlen=200_000)

    def stats(self) -> dict:
        with self._lock:
            return {"total": self._total, "completed": self._completed, "by_body": dict(self._by_body),
                    "statuses": dict(self._statuses)}

    def completed_twice(self) -> list[str]:
        with self._lock:
            return [h for h, n in self._by_body.items() if n > 1]

    def attempt_log(self) -> list[dict]:
        """One entry per chat-completion attempt, in arrival order: digest (sha256 of the body), attempt
        (1-based, per body), arrived / replied (time.time() when the body was read / the reply was ready),
        status (CLIENT_GONE when the client had hung up), fault (None, "rate_limit", "server_error",
        "malformed", "hang", "truncated"), retry_after (seconds, on 429s) and completed (a whole, valid reply
        was sent: what `stats()["completed"]` counts)."""
        with self._lock:
            return [dict(e) for e in self._log]

    @property
    def requests(self) -> list[dict]:
        """Parsed bodies of the last 10,000 chat-completion requests, oldest first."""
        with self._lock:
            return list(self._requests)

    # -- replies -------------------------------------------------------------------------------------
    def _first_key(self, text: str) -> int:
        # Memoised: a trajectory resends its system prompt, demos and question on every step.
        hit = self._first_key_cache.get(text)
        if hit is None:
            hit = next((i for i, k in enumerate(self._keys) if k in text), -1)
            if len(self._first_key_cache) > 50_000:
                self._first_key_cache.clear()
            self._first_key_cache[text] = hit
        return hit

    def _reply(self, body: dict, messages: list, texts: list[str]) -> str | dict:
        if self.responder is not None:
            return self.responder(body)
        if self._keys:
            best = min((h for h in map(self._first_key, texts) if h >= 0), default=-1)
            if best >= 0:
                key = self._keys[best]
                roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
                # Anchor on the first *user* message holding the key, so demo turns before it don't count.
                anchor = next((i for i, t in enumerate(texts) if roles[i] == "user" and key in t), None)
                if anchor is None:
                    anchor = next(i for i, t in enumerate(texts) if key in t)
                step = roles[anchor + 1:].count("assistant")
                script = self.scripts[key]
                return script[min(step, len(script) - 1)] if script else self.default
        last = texts[-1] if texts else ""
        return next((reply for rx, reply in self._rules if rx.search(last)), self.default)

    def _count(self, status: int, digest: str | None = None) -> int:
        with self._lock:
            self._statuses[status] += 1
            if digest is not None:  # counted before the write, so a client that has its reply sees the count
                self._completed += 1
                self._by_body[digest] += 1
        return status

    def _fault(self, digest: str, k: int) -> tuple[str | None, float | None]:
        """The fault of 0-based attempt k of a body, and the Retry-After of a 429: phases first, then rates."""
        f, attempt = self.faults, k
        for kind, n in (("rate_limit", f.rate_limit_first), ("server_error", f.server_error_first),
                        ("malformed", f.malformed_first), ("hang", f.slow_first), ("truncated", f.truncated_first)):
            if k < n:
                return kind, (f.retry_after_s if kind == "rate_limit" else None)
            k -= n
        rates = (("rate_limit", f.p_rate_limit), ("server_error", f.p_server_error), ("hang", f.p_hang),
                 ("malformed", f.p_malformed), ("truncated", f.p_truncated))
        if not any(p > 0 for _, p in rates):
            return None, None
        rng = random.Random(f"{f.seed}:{digest}:{attempt}")  # str seeds hash with sha512: stable across processes
        u, edge = rng.random(), 0.0
        for kind, p in rates:
            edge += p
            if u < edge:
                if kind != "rate_limit":
                    return kind, None
                hi = max(f.retry_after_s, f.retry_after_max_s)
                return kind, round(rng.uniform(f.retry_after_s, hi), 3)
        return None, None

    def _complete(self, raw: bytes, client_gone: Callable[[], bool]) -> tuple[int, bytes, str, int | None]:
        """(status, body, extra header lines, body bytes to send or None for all) for one chat-completion
        attempt; faults apply per distinct body."""
        try:
            body = json.loads(raw)
            messages = body["messages"]
            if not isinstance(messages, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            with self._lock:
                self._total += 1
            return self._count(400), _error("request body must be JSON with a 'messages' list", "invalid_request_error"), "", None
        digest = hashlib.sha256(raw).hexdigest()
        arrived = time.time()
        with self._lock:
            self._total += 1
            k = self._attempts[digest] = self._attempts.get(digest, 0) + 1
            self._requests.append(body)
            entry = {"digest": digest, "attempt": k, "arrived": arrived, "replied": None, "status": None,
                     "fault": None, "retry_after": None, "completed": False}
            self._log.append(entry)
        code, payload, extra, cut = self._attempt(body, messages, digest, k - 1, client_gone, entry)
        with self._lock:
            entry["status"], entry["replied"] = code, time.time()
        return code, payload, extra, cut

    def _attempt(self, body: dict, messages: list, digest: str, k: int, client_gone: Callable[[], bool],
                 entry: dict) -> tuple[int, bytes, str, int | None]:
        f = self.faults
        if f.latency_s > 0:
            time.sleep(f.latency_s)
        fault, retry_after = self._fault(digest, k)
        with self._lock:
            entry["fault"], entry["retry_after"] = fault, retry_after
        if fault == "rate_limit":
            return (self._count(429), _error("scripted rate limit", "requests", "rate_limit_exceeded"),
                    f"Retry-After: {retry_after:g}\r\n", None)
        if fault == "server_error":
            return self._count(500), _error("scripted server error", "server_error"), "", None
        if refused := [f for f in self.rejects if f in body]:
            return self._count(400), _error(f"unsupported parameter: {refused[0]}", "invalid_request_error"), "", None
        if fault == "malformed":
            return self._count(200), _MALFORMED, "", None
        if fault == "hang":
            time.sleep(f.slow_s)
        if (f.latency_s > 0 or fault == "hang") and client_gone():
            return self._count(CLIENT_GONE), b"", "", None  # not "completed": nobody was there to receive it
        texts = [_text(m.get("content")) if isinstance(m, dict) else "" for m in messages]
        try:
            reply = self._reply(body, messages, texts)
        except Exception as exc:  # a broken responder should fail the request visibly, not kill the connection
            return self._count(500), _error(f"responder failed: {exc!r}", "server_error"), "", None
        # A responder may script a function-calling reply: {"content": ..., "tool_calls": [...]}, sent as given
        # (malformed arguments included).
        message = {"role": "assistant", "content": reply} if isinstance(reply, str) else {"role": "assistant", **reply}
        text = message.get("content") or ""
        if self.stamp_replies:
            text = message["content"] = f"[req:{digest[:16]}] {text}"
        n = body.get("n")
        n = n if isinstance(n, int) and n > 1 else 1
        prompt_tokens, completion_tokens = sum(len(t.split()) for t in texts), len(text.split()) * n
        payload = json.dumps({
            "id": f"chatcmpl-{next(self._ids):012d}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "scripted"),
            "choices": [{"index": i, "message": message,
                         "logprobs": self._logprobs(body, text) if body.get("logprobs") and self.alternatives else None,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"} for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }).encode()
        if fault == "truncated":  # a 200 head, half the body, then a hang-up: never a completed request
            return self._count(200), payload, "", len(payload) // 2
        with self._lock:
            entry["completed"] = True
        return self._count(200, digest), payload, "", None


    def _logprobs(self, body: dict, text: str) -> dict:
        """OpenAI's logprobs object: one token per word, top alternatives from `alternatives` (at most top_logprobs)."""
        top = body.get("top_logprobs") or 0
        content = []
        for token in re.findall(r"\s*\S+", text):
            alts = self.alternatives(body, token) or [(token, 1.0)]
            lp = dict((t, math.log(p)) for t, p in alts)
            content.append({"token": token, "logprob": lp.get(token, math.log(1e-6)),
                            "top_logprobs": [{"token": t, "logprob": v} for t, v in list(lp.items())[:top]]})
        return {"content": content}


# -- separate-process mode (the server must not share a benchmark client's GIL) ------------------------
def _fault_flags(f: Any) -> list[str]:
    flags = ["--" + f.name.replace("_", "-")]  # --latency-s, --rate-limit-first, ...
    if f.name.endswith("_s"):
        flags.append("--" + f.name[:-2].replace("_", "-"))  # short forms: --latency, --retry-after, --slow
    return flags


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Scripted OpenAI-compatible Chat Completions server.")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--default", default="<answer>unknown</answer>")
    p.add_argument("--scripts-json", help='file with {"substring": ["step 0 reply", "step 1 reply", ...]}')
    p.add_argument("--rules-json", help='file with [["regex", "reply"], ...]')
    p.add_argument("--stamp-replies", action="store_true", help="prefix every reply with [req:<body digest>]")
    for f in fields(Faults):
        p.add_argument(*_fault_flags(f), dest=f.name, type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    scripts = json.loads(Path(args.scripts_json).read_text()) if args.scripts_json else None
    rules = [tuple(r) for r in json.loads(Path(args.rules_json).read_text())] if args.rules_json else None
    faults = Faults(**{f.name: getattr(args, f.name) for f in fields(Faults)})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    srv = ScriptedServer(scripts=scripts, rules=rules, default=args.default, faults=faults, port=args.port,
                         stamp_replies=args.stamp_replies).start()
    print(f"READY {srv.base_url}", flush=True)
    while not stop.is_set():
        time.sleep(0.1)  # sleeping in the main thread keeps it free to run the signal handler
    srv.stop()


def start_subprocess(ready_timeout_s: float = 20.0, **cli_args: Any) -> tuple[subprocess.Popen[str], str]:
    """Launch this module as a server process; returns (proc, base_url). The caller terminates proc.

    Keyword arguments become flags (latency=0.2 -> --latency 0.2; True -> bare flag; None/False -> omitted);
    scripts=dict / rules=list are written to temporary JSON files for --scripts-json / --rules-json.
    """
    cmd, tmp = [sys.executable, str(Path(__file__).resolve())], []
    for key, value in cli_args.items():
        if value is None or value is False:
            continue
        if key in ("scripts", "rules"):
            fd, path = tempfile.mkstemp(suffix=".json", prefix=f"scripted-{key}-")
            with os.fdopen(fd, "w") as fh:
                json.dump(value, fh)
            tmp.append(path)
            cmd += [f"--{key}-json", path]
        else:
            cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        line = lines.get(timeout=ready_timeout_s)
    except queue.Empty:
        line = ""
    finally:
        for path in tmp:  # the child read them before printing READY (or failed)
            os.unlink(path)
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"scripted server did not start (rc={proc.returncode}, first line={line!r}): {cmd}")
    return proc, line.split(None, 1)[1].strip()


def fetch_stats(base_url: str, timeout_s: float = 5.0) -> dict:
    """GET /_stats of a (subprocess) server; statuses keys come back as ints, as from ScriptedServer.stats()."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never route 127.0.0.1 via a proxy
    with opener.open(base_url.rstrip("/") + "/_stats", timeout=timeout_s) as resp:
        stats = json.loads(resp.read())
    stats["statuses"] = {int(k): v for k, v in stats["statuses"].items()}
    return stats


def fetch_attempts(base_url: str, timeout_s: float = 5.0) -> list[dict]:
    """GET /_attempts of a (subprocess) server: its `attempt_log()`."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(base_url.rstrip("/") + "/_attempts", timeout=timeout_s) as resp:
        return json.loads(resp.read())


if __name__ == "__main__":
    main()
