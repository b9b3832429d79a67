"""Throughput of the factory's multi-step generation vs. a raw aiohttp client, against the scripted server.

What it measures
----------------
For each scenario one scripted OpenAI-compatible server (``tests/scripted_server.py``) runs in its own
process (its own GIL) with a fixed reply latency, and two clients take turns against it, in one process
(raw, factory, raw, factory, ... after a warm-up):

* raw      -- one ``aiohttp.ClientSession`` (``TCPConnector(limit=C)``), C coroutines each looping single
              POSTs of one fixed small chat body until N calls are done. This is the physical limit of
              server + machine: nothing the factory does can beat it. calls/s = N / wall.
* factory  -- the real generation path: ``build_client(ModelConfig(...))`` (openai_compat backend, call
              journal in a FRESH directory, so nothing is a cache hit) driving ``Agent.run_many`` over N/3
              synthetic math questions, one sample each. The server answers every step with
              ``<math_exp>2+2</math_exp>`` and the step cap is 3, so every trajectory makes exactly 3
              calls with the calculator running between them: multi-step generation through the agent
              loop. calls/s = calls actually sent / wall.

After each factory run the script checks that the server saw every request body exactly once and that
the journal holds one line per call. Once per scenario it also replays the last factory workload on the
same journal directory (a fresh journal object, loaded from disk as a rerun would) and asserts that no
request reaches the server; that figure is the cache-replay rate.

Scenarios (issue goals: factory >= 0.95 of raw at (a), >= 0.8 of raw at (b)):

    (a) latency 200 ms, concurrency 64   -- latency-bound; ideal 64 / 0.2 s = 320 calls/s
    (b) latency 0,      concurrency 32   -- CPU-bound: server and client share the machine's cores

Reference figures from the issue (same machine): raw ~255 and ~717 req/s; Bespoke Curator ~0.90 / ~0.65 of
raw; litellm alone ~0.84 / ~0.48; distilabel ~0.25 / ~0.17.

How to read the output
----------------------
Progress goes to stderr; the table to stdout. It gives the best and median of the repeats for both
clients and the ratio factory/raw (median over median; best over best in brackets); "result" compares
the median ratio with the goal (the exit status is 1 when a goal is missed). Below the table, per
scenario:

* client CPU/call -- this process's CPU time / calls. raw vs factory is the factory's own overhead per
  call; "of which GC" is time in the cyclic garbage collector (gc.callbacks).
* server CPU/call -- from /proc (Linux only). Factory bodies carry the whole prompt, so they cost the
  server a little more than the raw client's small body (``--raw-body matched`` gives raw the same body).
* cores busy -- (client + server CPU) / wall. At zero latency throughput is CPU-bound:
  calls/s ~= available cores / (client CPU/call + server CPU/call), so at (b) the ratio is decided by
  the client's CPU per call, not by concurrency.
* other processes' load -- CPU used on the machine by everything else during the runs. Above ~0.25
  cores the figures are low and noisy (the machine is shared); compare ratios, not absolute rates.
* cache replay -- all calls answered from the journal, zero requests to the server (asserted).

``--profile`` appends a cProfile of one factory run at zero latency (only the client is profiled; the
server runs in its own process).

    cd /work/main && .venv/bin/python benchmarks/generation_throughput.py            # both scenarios, ~1.5 min
    .venv/bin/python benchmarks/generation_throughput.py --quick                       # small N, ~20 s
    .venv/bin/python benchmarks/generation_throughput.py --scenario b --repeats 3 --calls 9000 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch anything

import aiohttp  # noqa: E402
from scripted_server import fetch_stats, start_subprocess  # noqa: E402

from swirl_core.agent import Agent, PolicySpec  # noqa: E402
from swirl_core.config import ModelConfig  # noqa: E402
from swirl_core.llm import cache as llm_cache  # noqa: E402
from swirl_core.llm.factory import build_client, tune_gc  # noqa: E402
from swirl_core.records import Question  # noqa: E402
from swirl_core.tools.calculator import Calculator  # noqa: E402

MODEL = "openai/bench"
STEPS = 3
TURNS = STEPS + 1  # calls per trajectory: the prompt allows STEPS tool calls and one more message for the answer
REPLY = "<math_exp>2+2</math_exp>"  # a calculator step: the loop never answers, so each trajectory hits the cap
RAW_BODY = json.dumps({
    "model": "bench", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0.7, "max_tokens": 64,
}).encode()


@dataclass(frozen=True)
class Scenario:
    name: str
    latency_s: float
    concurrency: int
    calls: int
    goal: float


SCENARIOS = {
    "a": Scenario("a", 0.2, 64, 3000, 0.95),
    "b": Scenario("b", 0.0, 32, 6000, 0.80),
}
QUICK_CALLS = {"a": 600, "b": 1200}


@dataclass
class Run:
    kind: str
    calls: int
    wall_s: float
    cpu_s: float  # this process's CPU time (all threads)
    server_cpu_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.calls / self.wall_s

    @property
    def cpu_us_per_call(self) -> float:
        return 1e6 * self.cpu_s / self.calls

    @property
    def server_cpu_us_per_call(self) -> float | None:
        return None if self.server_cpu_s is None else 1e6 * self.server_cpu_s / self.calls


# -- server helpers ---------------------------------------------------------------------------------
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never via a proxy
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def reset_server(base_url: str) -> None:
    req = urllib.request.Request(base_url.rstrip("/") + "/_reset", data=b"{}", method="POST")
    with _OPENER.open(req, timeout=5) as resp:
        resp.read()


def machine_busy_s() -> float | None:
    """CPU seconds all processes of the machine have spent busy (user+nice+system+irq+softirq+steal), from /proc/stat."""
    try:
        parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return sum(int(parts[i]) for i in (1, 2, 3, 6, 7, 8)) / _TICK
    except (OSError, IndexError, ValueError):
        return None


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process, from /proc (None where there is no /proc)."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


class _GCTimer:
    """Time spent in the cyclic garbage collector of this process (gc.callbacks)."""

    def __init__(self) -> None:
        self.total_s, self.collections, self._start = 0.0, 0, 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._start
            self.collections += 1


GC_TIMER = _GCTimer()


class Measure:
    """Wall, own CPU, server CPU, GC time and other processes' CPU (foreign load) across a block."""

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid

    def __enter__(self) -> Measure:
        gc.collect()
        self.s0 = proc_cpu_s(self.pid) if self.pid else None
        self.m0, self.o0 = machine_busy_s(), proc_cpu_s(os.getpid())
        self.g0 = GC_TIMER.total_s
        self.c0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.gc_s = GC_TIMER.total_s - self.g0
        s1 = proc_cpu_s(self.pid) if self.pid else None
        m1, o1 = machine_busy_s(), proc_cpu_s(os.getpid())
        self.server_cpu = None if self.s0 is None or s1 is None else s1 - self.s0
        self.foreign_cores = None
        if None not in (self.m0, m1, self.o0, o1) and self.server_cpu is not None:
            busy = m1 - self.m0 - (o1 - self.o0) - self.server_cpu  # type: ignore[operator]
            self.foreign_cores = max(0.0, busy) / self.wall

    def extra(self) -> dict:
        return {"gc_s": self.gc_s, "foreign_cores": self.foreign_cores}


# -- the two clients --------------------------------------------------------------------------------
async def raw_run(base_url: str, n: int, concurrency: int, server_pid: int | None, body: bytes = RAW_BODY) -> Run:
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    remaining, errors = n, 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1

    with Measure(server_pid) as m:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    if errors:
        raise AssertionError(f"raw client: {errors} of {n} calls failed")
    return Run("raw", n, m.wall, m.cpu, m.server_cpu, m.extra())


def make_questions(n: int) -> list[Question]:
    out = []
    for i in range(n):
        text = f"A crate holds {i} apples and {i % 7 + 2} pears. How many pieces of fruit are in {i % 5 + 2} crates?"
        out.append(Question(
            question_id=Question.make_id("bench", "train", str(i), text), dataset="bench", split="train",
            source_id=str(i), task="math", question=text, answer=str((i + i % 7 + 2) * (i % 5 + 2)),
        ))
    return out


def factory_parts(base_url: str, concurrency: int, journal_dir: Path):
    cfg = ModelConfig(model=MODEL, api_base=base_url, concurrency=concurrency, max_retries=2)
    client = build_client(cfg, journal_dir=journal_dir, tags={"run_id": "bench", "purpose": "policy"})
    spec = PolicySpec(model=MODEL, task="math", max_steps=STEPS, max_tokens=64)
    return client, Agent(client, spec, {"math": Calculator()})


def forget_journal(journal_dir: Path) -> None:
    """Close and drop this process's shared journal for the directory, so the next client loads it from disk."""
    j = llm_cache._journals.pop(journal_dir.resolve(), None)
    if j is not None:
        j.close()


async def factory_run(base_url: str, questions: list[Question], concurrency: int, journal_dir: Path,
                      server_pid: int | None, *, replay: bool = False, verify: bool = True) -> Run:
    n_expected = TURNS * len(questions)
    work = [(q, 0) for q in questions]
    if verify:
        reset_server(base_url)
    tune_gc()  # as run_shard does in every Dask worker
    t_load = time.perf_counter()
    client, agent = factory_parts(base_url, concurrency, journal_dir)  # a replay loads the journal here
    load_s = time.perf_counter() - t_load
    try:
        with Measure(server_pid) as m:
            trajectories = await agent.run_many(work)
    finally:
        await client.aclose()
    journal = client.journal
    assert journal is not None
    extra: dict = {"journal_load_s": load_s, **m.extra()}
    bad = [t for t in trajectories if t.status != "step_cap" or len(t.steps) != TURNS or t.error]
    if bad:
        raise AssertionError(f"{len(bad)} trajectories did not make {TURNS} steps, e.g. {bad[0]!r:.500}")
    sent, hits = client.stats["sent"], client.stats["cache_hits"]
    if client.stats["retries"] or client.stats["failures"]:
        raise AssertionError(f"factory client retried or failed: {client.stats}")
    if replay:
        if sent != 0 or hits != n_expected:
            raise AssertionError(f"replay was not all cache hits: {client.stats}")
        if verify:
            stats = fetch_stats(base_url)
            if stats["total"] != 0:
                raise AssertionError(f"replay reached the server: {stats['total']} requests")
        calls = hits
    else:
        if sent != n_expected or hits != 0:
            raise AssertionError(f"expected {n_expected} sent calls and no cache hits: {client.stats}")
        if verify:
            stats = fetch_stats(base_url)
            by_body = stats["by_body"]
            twice = sum(1 for v in by_body.values() if v != 1)
            if stats["completed"] != sent or len(by_body) != sent or twice or stats["statuses"] != {200: sent}:
                raise AssertionError(f"server did not see each body exactly once: completed={stats['completed']} "
                                     f"distinct={len(by_body)} repeated={twice} statuses={stats['statuses']} sent={sent}")
            with open(journal.path, encoding="utf-8") as fh:
                lines = sum(1 for _ in fh)
            if lines != sent:
                raise AssertionError(f"journal has {lines} lines for {sent} calls")
        calls = sent
    forget_journal(journal_dir)
    return Run("replay" if replay else "factory", calls, m.wall, m.cpu, m.server_cpu, extra)


# -- one scenario -----------------------------------------------------------------------------------
@dataclass
class Result:
    scenario: Scenario
    calls: int
    raw: list[Run]
    factory: list[Run]
    replay: Run | None


def _best(runs: list[Run]) -> float:
    return max(r.rate for r in runs)


def _median(runs: list[Run]) -> float:
    return statistics.median(r.rate for r in runs)


def matched_body(question: Question) -> bytes:
    """The factory's own middle-step request body (same size and shape), for a raw client on equal bodies."""
    from swirl_core.llm.openai_compat import OpenAICompatBackend
    from swirl_core.protocol import policy_messages

    spec = PolicySpec(model=MODEL, task="math", max_steps=STEPS, max_tokens=64)
    messages = policy_messages("math", question.question, STEPS) + [
        {"role": "assistant", "content": REPLY}, {"role": "user", "content": "2+2 → 4"}]
    backend = OpenAICompatBackend("http://127.0.0.1/v1", model_name=MODEL.split("/", 1)[1], api_key=None, concurrency=1)
    return json.dumps(backend.payload(spec.request(messages, 0))).encode()


async def run_scenario(sc: Scenario, calls: int, repeats: int, tmp: Path, log, raw_body: str = "small") -> Result:
    calls = max(TURNS, calls - calls % TURNS)
    questions = make_questions(calls // TURNS)
    body = RAW_BODY if raw_body == "small" else matched_body(questions[len(questions) // 2])
    warm_questions = make_questions(max(1, 2 * sc.concurrency // TURNS + 1))
    proc, base_url = start_subprocess(latency=sc.latency_s, default=REPLY)
    pid = proc.pid
    raws: list[Run] = []
    facts: list[Run] = []
    replay = None
    try:
        # Warm-up: imports, the price table, connection set-up paths, the server's thread pool.
        await raw_run(base_url, 2 * sc.concurrency, sc.concurrency, pid, body)
        await factory_run(base_url, warm_questions, sc.concurrency, tmp / f"{sc.name}-warm", pid)
        for r in range(repeats):
            raws.append(await raw_run(base_url, calls, sc.concurrency, pid, body))
            log(f"  [{sc.name}] repeat {r + 1}/{repeats}  raw      {raws[-1].rate:8.1f} calls/s  ({raws[-1].wall_s:.2f} s)")
            jdir = tmp / f"{sc.name}-run{r}"
            facts.append(await factory_run(base_url, questions, sc.concurrency, jdir, pid))
            log(f"  [{sc.name}] repeat {r + 1}/{repeats}  factory  {facts[-1].rate:8.1f} calls/s  ({facts[-1].wall_s:.2f} s)")
        replay = await factory_run(base_url, questions, sc.concurrency, tmp / f"{sc.name}-run{repeats - 1}", pid, replay=True)
        log(f"  [{sc.name}] replay             {replay.rate:8.1f} calls/s  (all cache hits, 0 requests reached the server)")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()
    return Result(sc, calls, raws, facts, replay)


# -- profiling --------------------------------------------------------------------------------------
async def profile_factory(calls: int, concurrency: int, tmp: Path) -> str:
    """cProfile one factory run at zero latency (server in its own process, so only the client is profiled)."""
    questions = make_questions(max(1, calls // TURNS))
    proc, base_url = start_subprocess(latency=0.0, default=REPLY)
    try:
        await factory_run(base_url, make_questions(30), concurrency, tmp / "prof-warm", proc.pid)
        prof = cProfile.Profile()
        prof.enable()
        run = await factory_run(base_url, questions, concurrency, tmp / "prof", proc.pid, verify=False)
        prof.disable()
    finally:
        proc.terminate()
        proc.wait()
    out = io.StringIO()
    out.write(f"cProfile of one factory run: {run.calls} calls, {run.rate:.0f} calls/s under the profiler\n")
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(45)
    return out.getvalue()


# -- report -----------------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    head = ("scen", "latency", "C", "calls", "raw req/s best|med", "factory calls/s best|med",
            "ratio med (best)", "goal", "result")
    rows = []
    for res in results:
        sc = res.scenario
        ratio_m = _median(res.factory) / _median(res.raw)
        ratio_b = _best(res.factory) / _best(res.raw)
        rows.append((
            sc.name, f"{sc.latency_s * 1000:.0f} ms", str(sc.concurrency), str(res.calls),
            f"{_best(res.raw):7.1f} | {_median(res.raw):7.1f}",
            f"{_best(res.factory):7.1f} | {_median(res.factory):7.1f}",
            f"{ratio_m:.3f} ({ratio_b:.3f})", f">= {sc.goal:.2f}", "PASS" if ratio_m >= sc.goal else "FAIL",
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows), ""]
    out.append("per-call CPU (median of repeats) and the cache-replay rate:")
    for res in results:
        sc = res.scenario
        raw_cpu = statistics.median(r.cpu_us_per_call for r in res.raw)
        fac_cpu = statistics.median(r.cpu_us_per_call for r in res.factory)
        srv = [r.server_cpu_us_per_call for r in res.raw + res.factory]
        srv_txt = ""
        if all(s is not None for s in srv):
            srv_raw = statistics.median(r.server_cpu_us_per_call for r in res.raw)  # type: ignore[misc]
            srv_fac = statistics.median(r.server_cpu_us_per_call for r in res.factory)  # type: ignore[misc]
            util_raw = statistics.median(r.server_cpu_s / r.wall_s for r in res.raw)  # type: ignore[operator]
            util_fac = statistics.median(r.server_cpu_s / r.wall_s for r in res.factory)  # type: ignore[operator]
            srv_txt = (f"; server CPU/call raw {srv_raw:.0f} us ({util_raw:.2f} core), "
                       f"factory {srv_fac:.0f} us ({util_fac:.2f} core)")
        gc_us = statistics.median(1e6 * r.extra["gc_s"] / r.calls for r in res.factory)
        out.append(f"  ({sc.name}) client CPU/call: raw {raw_cpu:.0f} us, factory {fac_cpu:.0f} us "
                   f"(factory overhead {fac_cpu - raw_cpu:+.0f} us/call, of which GC {gc_us:.0f} us){srv_txt}")
        if all(r.server_cpu_s is not None for r in res.raw + res.factory):
            busy = lambda runs: statistics.median((r.cpu_s + r.server_cpu_s) / r.wall_s for r in runs)  # type: ignore[operator]  # noqa: E731
            out.append(f"      cores busy (client + server): raw {busy(res.raw):.2f}, factory {busy(res.factory):.2f}")
        foreign = [r.extra.get("foreign_cores") for r in res.raw + res.factory]
        if all(f is not None for f in foreign):
            worst = max(foreign)  # type: ignore[type-var]
            warn = "  <-- the machine was not idle: figures are low and noisy" if worst > 0.25 else ""
            out.append(f"      other processes' load during the runs: up to {worst:.2f} cores{warn}")
        if res.replay is not None:
            rp = res.replay
            out.append(f"      cache replay: {rp.rate:.0f} calls/s ({rp.calls} hits, 0 requests to the server, "
                       f"{rp.cpu_us_per_call:.0f} us CPU/call; journal load {rp.extra['journal_load_s'] * 1000:.0f} ms "
                       f"for {rp.calls} lines)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["a", "b", "all"], default="all")
    p.add_argument("--repeats", type=int, default=3, help="raw/factory pairs per scenario (default 3)")
    p.add_argument("--raw-body", choices=["small", "matched"], default="small",
                   help="raw client's body: a fixed small chat (default) or the factory's own step-2 body (~1 KB)")
    p.add_argument("--calls", type=int, default=None, help="calls per run (default: a=3000, b=6000; --quick: 600/1200)")
    p.add_argument("--quick", action="store_true", help="small N, for a smoke test")
    p.add_argument("--profile", action="store_true", help="also cProfile one in-process factory run at zero latency")
    p.add_argument("--profile-calls", type=int, default=3000)
    args = p.parse_args(argv)

    names = ["a", "b"] if args.scenario == "all" else [args.scenario]
    tmp = Path(tempfile.mkdtemp(prefix="swirl-bench-"))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    t0 = time.perf_counter()
    try:
        for name in names:
            sc = SCENARIOS[name]
            calls = args.calls or (QUICK_CALLS[name] if args.quick else sc.calls)
            log(f"scenario ({name}): latency {sc.latency_s * 1000:.0f} ms, concurrency {sc.concurrency}, {calls} calls per run")
            results.append(asyncio.run(run_scenario(sc, calls, args.repeats, tmp, log, args.raw_body)))
        print()
        print(f"generation throughput vs raw aiohttp ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
              f"aiohttp {aiohttp.__version__}, {args.repeats} repeats, raw body {args.raw_body}, "
              f"{time.perf_counter() - t0:.0f} s)")
        print(table(results))
        if args.profile:
            print()
            print(asyncio.run(profile_factory(args.profile_calls, 32, tmp)))
    finally:
        for name in list(llm_cache._journals):
            if str(name).startswith(str(tmp.resolve())):
                forget_journal(name)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(_median(r.factory) / _median(r.raw) >= r.scenario.goal for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
