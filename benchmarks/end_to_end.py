"""End to end: `swirl generate` through the CLI vs a raw aiohttp client, against one fast scripted server.

What it measures
----------------
Per row (trajectories x server latency) one aiohttp OpenAI-compatible server runs in its own process and
answers every call: the first step of a trajectory with a calculator call, the next with the answer, so
every trajectory takes exactly 2 calls (10k trajectories = 20k calls). Against it, one after the other:

* raw -- one ``aiohttp.ClientSession`` (``TCPConnector(limit=64)``), 64 coroutines each looping POSTs of a
  small chat body until as many calls as the CLI will make are done: the physical limit of server + machine.
* cli -- ``swirl generate`` in a subprocess, the way users run it: defaults, ``--workers 2`` (local Dask),
  ``--concurrency 64``, a synthetic GSM8K-format seed file of N/5 questions, ``--samples 5``, a fresh
  database. Its wall time includes starting the temporary Prefect API and the Dask cluster. calls/s =
  calls the server answered / wall.

Peak RSS is sampled (psutil, every 0.2 s) over the CLI's whole process tree (flow process, Dask workers,
Prefect API): the largest single process, and the largest sum. The server is measured separately.

Measured on branch i16b (2 cores shared with other jobs, load average 16-21 during the runs, so absolute
rates are low; compare the ratio):

| trajectories | latency | raw calls/s | CLI calls/s | CLI/raw | CLI wall s | peak RSS one / all MB |
|---:|---:|---:|---:|---:|---:|---:|
| 10,000 | 0 ms   | 573 | 74 | 0.13 | 270 | 461 / 1,311 |
| 10,000 | 200 ms | 270 | 42 | 0.15 | 479 | 467 / 1,343 |

Then, on the same loaded machine (load average 6-19; each row's raw client and CLI in one run), before and after
the shards of a worker shared one event loop and one kept client, were sized large first and small last, and the
trajectory writes became plain inserts (the 0 ms "after" raw figure is low: a test ran beside its raw client):

| trajectories | latency | | raw calls/s | CLI calls/s | CLI/raw | CLI wall s | peak RSS one / all MB |
|---:|---:|---|---:|---:|---:|---:|---:|
| 10,000 | 0 ms   | before | 685 | 89  | 0.13 | 226 | 419 / 1,182 |
| 10,000 | 0 ms   | after  | 230 | 113 | 0.49 | 177 | 442 / 1,199 |
| 10,000 | 200 ms | before | 242 | 74  | 0.30 | 272 | 426 / 1,191 |
| 10,000 | 200 ms | after  | 308 | 170 | 0.55 | 118 | 448 / 1,209 |
| 10,000 | 0 ms   | after, load 1-5 | 3,625 | 330 | 0.09 | 60.5 | 446 / 1,199 |
| 10,000 | 200 ms | after, load 2-4 | 302 | 208 | 0.69 | 95.9 | 431 / 1,189 |

What is left is mostly fixed: at 200 ms the raw client needs 66 s for the 20k calls and the CLI 30 s more (the
Prefect API, the Dask cluster and its workers' imports before the first call, the ingest and artifacts after the
last); at 0 ms that start-up alone is several times the raw client's 5.5 s.

    .venv/bin/python benchmarks/end_to_end.py                       # 10k trajectories at 0 and 200 ms
    .venv/bin/python benchmarks/end_to_end.py --full                # adds the 100k rows (long)
    .venv/bin/python benchmarks/end_to_end.py --trajectories 1000 --latency 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 5
CALLS_PER_TRAJECTORY = 2
CONCURRENCY = 64
WORKERS = 2
DEFAULT_ROWS = (10_000,)
FULL_ROWS = (10_000, 100_000)
DEFAULT_LATENCIES_MS = (0, 200)
RSS_PERIOD_S = 0.2
TOOL_STEP = "Add them. <math_exp>2 + 2</math_exp>"
ANSWER_STEP = "<answer>4</answer>"
RAW_BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "What is 2+2?"}],
                       "max_tokens": 64}).encode()


# -- the server (its own process) ----------------------------------------------------------------------
def _completion(text: str) -> bytes:
    return json.dumps({
        "id": "bench", "object": "chat.completion", "created": 0, "model": "bench",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }).encode()


def serve(port: int, latency_s: float) -> None:
    """Answer a conversation without an assistant turn with a tool call, any later one with the answer."""
    tool, answer = _completion(TOOL_STEP), _completion(ANSWER_STEP)
    count = {"completed": 0}

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        if latency_s:
            await asyncio.sleep(latency_s)
        later = any(m.get("role") == "assistant" for m in body.get("messages", []))
        count["completed"] += 1
        return web.Response(body=answer if later else tool, content_type="application/json")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(count)

    async def reset(_: web.Request) -> web.Response:
        count["completed"] = 0
        return web.json_response(count)

    app = web.Application(client_max_size=64 * 2**20)
    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models),
                    web.get("/_stats", stats), web.post("/_reset", reset)])
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Server:
    def __init__(self, latency_s: float) -> None:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.port), str(latency_s)])
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.completed()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the benchmark server did not start")

    def _get(self, path: str, method: str = "GET") -> dict:
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(self.url + path, data=b"{}" if method == "POST" else None, method=method)
        with opener.open(req, timeout=5) as resp:
            return json.loads(resp.read())

    def completed(self) -> int:
        return self._get("/_stats")["completed"]

    def reset(self) -> None:
        self._get("/_reset", "POST")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- RSS sampling -----------------------------------------------------------------------------------------
class RSSSampler(threading.Thread):
    """Peak RSS of one process tree: the largest process and the largest sum over the tree."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak_one, self.peak_all, self._done = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                root = psutil.Process(self.root)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            self.peak_one, self.peak_all = max(self.peak_one, max(rss, default=0)), max(self.peak_all, sum(rss))
            self._done.wait(RSS_PERIOD_S)

    def stop(self) -> None:
        self._done.set()
        self.join()


# -- the two clients ---------------------------------------------------------------------------------------
async def _raw(url: str, calls: int) -> float:
    left = calls

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url + "/v1/chat/completions", data=RAW_BODY,
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
        return time.perf_counter() - t0


def write_seeds(path: Path, questions: int) -> None:
    with path.open("w") as f:
        for i in range(questions):
            f.write(json.dumps({"question": f"Question {i}: what is {i} + 2?", "answer": f"#### {i + 2}"}) + "\n")


@dataclass
class Row:
    trajectories: int
    latency_ms: int
    raw_rate: float
    cli_rate: float
    cli_wall_s: float
    cli_calls: int
    peak_one_mb: float
    peak_all_mb: float
    server_mb: float

    @property
    def ratio(self) -> float:
        return self.cli_rate / self.raw_rate


def run_row(trajectories: int, latency_ms: int, workdir: Path) -> Row:
    calls = trajectories * CALLS_PER_TRAJECTORY
    seeds = workdir / f"seeds-{trajectories}.jsonl"
    write_seeds(seeds, trajectories // SAMPLES)
    server = Server(latency_ms / 1000)
    try:
        raw_wall = asyncio.run(_raw(server.url, calls))
        server.reset()
        db = workdir / f"swirl-{trajectories}-{latency_ms}.duckdb"
        args = [sys.executable, "-m", "flows.cli", "generate", "--dataset", "gsm8k", "--data-files", str(seeds),
                "--samples", str(SAMPLES), "--policy", "openai/bench", "--policy-api-base", server.url + "/v1",
                "--db", str(db), "--concurrency", str(CONCURRENCY), "--workers", str(WORKERS), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = RSSSampler(proc.pid)
        sampler.start()
        out, _ = proc.communicate()
        cli_wall = time.perf_counter() - t0
        sampler.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"swirl generate failed ({proc.returncode}):\n{out[-4000:]}")
        cli_calls = server.completed()
        server_mb = psutil.Process(server.proc.pid).memory_info().rss / 2**20
    finally:
        server.stop()
    return Row(trajectories, latency_ms, calls / raw_wall, cli_calls / cli_wall, cli_wall, cli_calls,
               sampler.peak_one / 2**20, sampler.peak_all / 2**20, server_mb)


def table(rows: list[Row]) -> str:
    lines = ["| trajectories | latency | raw calls/s | CLI calls/s | CLI/raw | CLI wall s | CLI calls "
             "| peak RSS one process MB | peak RSS all processes MB | server RSS MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.trajectories:,} | {r.latency_ms} ms | {r.raw_rate:,.0f} | {r.cli_rate:,.0f} | {r.ratio:.2f} "
                     f"| {r.cli_wall_s:.1f} | {r.cli_calls:,} | {r.peak_one_mb:,.0f} | {r.peak_all_mb:,.0f} "
                     f"| {r.server_mb:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--serve", nargs=2, metavar=("PORT", "LATENCY_S"), help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true", help="add the 100k-trajectory rows")
    p.add_argument("--trajectories", type=int, nargs="+", help=f"sizes (multiples of {SAMPLES})")
    p.add_argument("--latency", type=int, nargs="+", default=list(DEFAULT_LATENCIES_MS), help="server latencies, ms")
    a = p.parse_args(argv)
    if a.serve:
        serve(int(a.serve[0]), float(a.serve[1]))
        return 0
    sizes = a.trajectories or (FULL_ROWS if a.full else DEFAULT_ROWS)
    if any(n % SAMPLES for n in sizes):
        p.error(f"--trajectories: each size must be a multiple of {SAMPLES}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="swirl-e2e-") as tmp:
        for n in sizes:
            for ms in a.latency:
                print(f"running {n:,} trajectories at {ms} ms ...", file=sys.stderr, flush=True)
                rows.append(run_row(n, ms, Path(tmp)))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
