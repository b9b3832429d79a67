"""Scale-out on a real distributed Dask cluster: a `dask scheduler` and two `dask worker` processes on
loopback, started from the CLI as an operator would, and the flows pointed at it by its address alone.

What is checked at the source: every paid call is journaled by the process that paid for it, in a file
named `calls-{hostname}-{pid}-….jsonl`, so the journal names tell which processes ran shards; the worker
processes' open files are sampled during the runs, so a worker that opened the DuckDB file would be seen;
and the scripted server counts every request it received, so a rerun that paid for anything would show.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import FIXTURES, ROOT
from helpers import math_policy, query
from scripted_server import Faults, ScriptedServer

from swirl_core.config import ClusterConfig, CurateConfig, GenerateConfig, ModelConfig
from swirl_core.llm.cache import JOURNAL_GLOB, SEGMENT_PREFIX, segment_header

pytestmark = pytest.mark.slow

GSM8K = str(FIXTURES / "gsm8k_test20.jsonl")
DASK = str(Path(sys.executable).with_name("dask"))
WRITER = re.compile(r"calls-(?P<host>.+)-(?P<pid>\d+)")  # a journal's name without its own suffix


class DaskCluster:
    """`dask scheduler` + `dask worker` processes (one nanny and one worker process each); with `tls_dir` (a folder
    written by docker/dask-tls.sh) every member reads its Dask config there and speaks TLS only."""

    def __init__(self, base: Path, *, n_workers: int = 2, tls_dir: Path | None = None) -> None:
        self.base = base
        self.n_workers, self.tls_dir = n_workers, tls_dir
        self.scheduler_file = base / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.address = ""
        self.worker_pids: dict[str, int] = {}  # worker address -> pid of the process that runs tasks
        # The session's Prefect API (tests report their task runs to it) and the checkout on the path:
        # exactly what an operator exports on a worker machine.
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        assert self.env.get("PREFECT_API_URL"), "start the cluster after the prefect_api fixture"
        self.security = None  # how this (test) process connects as a client
        if tls_dir is not None:
            from distributed.security import Security

            self.env["DASK_CONFIG"] = str(tls_dir)
            files = {"tls_ca_file": "ca.pem", "tls_client_cert": "cert.pem", "tls_client_key": "key.pem"}
            self.security = Security(require_encryption=True, **{k: str(tls_dir / v) for k, v in files.items()})

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.base / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(args, cwd=self.base, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        assert Path(DASK).exists(), f"the dask CLI is missing at {DASK} (it ships with distributed)"
        protocol = ["--protocol", "tls"] if self.tls_dir is not None else []
        scheduler = self._spawn("scheduler", [DASK, "scheduler", *protocol, "--host", "127.0.0.1", "--port", "0",
                                              "--no-dashboard", "--scheduler-file", str(self.scheduler_file)])
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists() or not self.scheduler_file.read_text().strip():
            if scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start (rc={scheduler.poll()}):\n{self.diagnostics()}")
            time.sleep(0.2)
        time.sleep(0.1)  # the file is written in one go, but give a partial write a moment to finish
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        for n in range(self.n_workers):
            local = self.base / f"worker-{n}"
            local.mkdir()
            self._spawn(f"worker-{n}", [DASK, "worker", "--scheduler-file", str(self.scheduler_file), "--host", "127.0.0.1",
                                        "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--name", f"w{n}",
                                        "--local-directory", str(local)])
        from distributed import Client

        with Client(self.address, timeout=60, security=self.security) as client:
            client.wait_for_workers(self.n_workers, timeout=90)
            self.worker_pids = client.run(os.getpid)
        assert len(set(self.worker_pids.values())) == self.n_workers, self.worker_pids

    def all_pids(self) -> set[int]:
        """Every process the cluster consists of: scheduler, nannies and the worker processes they spawned."""
        pids = set()
        for proc in self.procs:
            try:
                parent = psutil.Process(proc.pid)
                pids |= {parent.pid, *(c.pid for c in parent.children(recursive=True))}
            except psutil.NoSuchProcess:
                continue
        return pids

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, then the scheduler
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=10)

    def diagnostics(self) -> str:
        return "\n".join(f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                         for p in self.logs if p.exists())


@pytest.fixture(scope="module")
def dask_cluster(prefect_api, tmp_path_factory) -> Iterator[DaskCluster]:
    cluster = DaskCluster(tmp_path_factory.mktemp("dask-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    leftover = [p for p in cluster.procs if p.poll() is None]
    assert not leftover, f"cluster processes still running: {[p.pid for p in leftover]}"


class OpenFileWatch:
    """Samples, every 20 ms, which of the watched processes hold a file under `prefix` open (via /proc)."""

    def __init__(self, pids: set[int], prefix: str) -> None:
        self.pids, self.prefix = pids, prefix
        self.seen: dict[int, set[str]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except OSError:
                        continue
                    if target.startswith(self.prefix):
                        self.seen.setdefault(pid, set()).add(target)
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> OpenFileWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def journal_writers(db: Path) -> dict[tuple[str, int], int]:
    """(hostname, pid) of each process that journaled calls under <db>.work/journal -> the calls it paid (the
    journals folded into a segment are counted from its header)."""
    writers: Counter[tuple[str, int]] = Counter()
    for path in (db.with_suffix(".work") / "journal").glob(JOURNAL_GLOB):
        if path.name.startswith(SEGMENT_PREFIX):
            counts = segment_header(path).writers
        else:
            counts = {path.name.rsplit("-", 1)[0]: sum(b'"key"' in line for line in path.read_bytes().splitlines())}
        for name, calls in counts.items():
            m = WRITER.fullmatch(name)
            assert m, name
            writers[m["host"], int(m["pid"])] += calls
    return dict(writers)


def _judge(body: dict) -> str:
    last = body["messages"][-1]["content"].rsplit("Last message to evaluate:", 1)[-1]
    return "A sensible calculation. GOOD" if "<math_exp>" in last else "The answer is a guess. BAD"


def test_generate_and_curate_scale_out_to_a_dask_scheduler(dask_cluster, tmp_path):
    from flows.curate import run_curate
    from flows.generate import run_generate

    db = tmp_path / "swirl.duckdb"
    host, me = socket.gethostname(), os.getpid()
    workers = set(dask_cluster.worker_pids.values())
    cluster = ClusterConfig(address=dask_cluster.address)  # the only change from a local run
    # 8 questions in shards of one, 30 ms per reply: each shard takes a while, so both workers get some.
    with ScriptedServer(responder=math_policy, faults=Faults(latency_s=0.03)) as srv:
        config = GenerateConfig(
            dataset="gsm8k", data_files=[GSM8K], split="test", limit=8, samples=1, shard_size=1,
            policy=ModelConfig(model="openai/policy", api_base=srv.base_url, concurrency=2),
            db=str(db), cluster=cluster, progress=False,
        )
        watched = dask_cluster.all_pids() | {me}
        with OpenFileWatch(watched, str(db)) as watch:
            result = run_generate(config)
        assert result["status"] == "completed", (result, dask_cluster.diagnostics())
        assert result["trajectories"] == 8 and result["shard_failures"] == []
        paid = srv.stats()["completed"]
        assert paid == 24 == srv.stats()["total"] and srv.completed_twice() == []  # 8 × (calc, calc, answer)

        # Both workers ran shards, and only they paid for calls: the flow process sent nothing itself.
        writers = journal_writers(db)
        assert {pid for _, pid in writers} == workers, (writers, dask_cluster.worker_pids)
        assert {h for h, _ in writers} == {host} and sum(writers.values()) == paid
        assert all(n > 0 for n in writers.values())
        # One DuckDB writer: the flow process held the database; no cluster process ever opened it.
        assert watch.samples > 10 and me in watch.seen, (watch.samples, watch.seen)
        assert set(watch.seen) == {me}, watch.seen

        # Rows are complete and unique.
        assert query(db, "SELECT count(*), count(DISTINCT (question_id, sample_index)), count(*) FILTER (WHERE status = 'answered') "
                      "FROM trajectories") == [(8, 8, 8)]
        assert query(db, "SELECT count(*), count(DISTINCT (trajectory_id, step_index)) FROM steps") == [(24, 24)]
        assert query(db, "SELECT count(*), count(DISTINCT call_key) FROM llm_calls") == [(24, 24)]

        # A rerun on the cluster is free: nothing is sent, nothing is duplicated, the same run resumes.
        again = run_generate(config)
        assert again["run_id"] == result["run_id"] and again["trajectories"] == 8
        assert srv.stats()["total"] == paid
        assert query(db, "SELECT count(*) FROM trajectories") == [(8,)]
        assert query(db, "SELECT status, attempts FROM runs") == [("completed", 2)]

    with ScriptedServer(responder=_judge, faults=Faults(latency_s=0.03)) as judge:
        curate = CurateConfig(db=str(db), judge=ModelConfig(model="openai/judge", api_base=judge.base_url, concurrency=2),
                              grader="rule", cluster=cluster, shard_size=3, progress=False, probe_limit=0)
        with OpenFileWatch(dask_cluster.all_pids() | {me}, str(db)) as watch:
            result = run_curate(curate)
        assert result["status"] == "completed" and result["judged_steps"] == 24, (result, dask_cluster.diagnostics())
        judged = judge.stats()["completed"]
        assert judged == 24 == judge.stats()["total"]
        assert set(watch.seen) == {me}, watch.seen

        after = journal_writers(db)
        assert {pid for _, pid in after} == workers and sum(after.values()) == paid + judged
        judge_calls = {k: after[k] - writers.get(k, 0) for k in after}
        assert all(n > 0 for n in judge_calls.values()), judge_calls  # both workers judged too
        assert query(db, "SELECT verdict, count(*), count(DISTINCT (trajectory_id, step_index)) FROM judgments "
                      "GROUP BY 1 ORDER BY 1") == [("BAD", 8, 8), ("GOOD", 16, 16)]

        again = run_curate(curate)
        assert again["judged_steps"] == 0 and judge.stats()["total"] == judged
    assert query(db, "SELECT count(*) FROM judgments") == [(24,)]


def test_cli_generate_with_a_scheduler_address(dask_cluster, tmp_path):
    db = tmp_path / "cli.duckdb"
    workers = set(dask_cluster.worker_pids.values())
    with ScriptedServer(responder=math_policy, faults=Faults(latency_s=0.03)) as srv:
        args = [sys.executable, "-m", "flows.cli", "generate", "--dataset", "gsm8k", "--data-files", GSM8K,
                "--split", "test", "--limit", "6", "--samples", "1", "--shard-size", "1", "--concurrency", "2",
                "--policy", "openai/policy", "--policy-api-base", srv.base_url, "--db", str(db),
                "--scheduler-address", dask_cluster.address, "--no-progress"]
        proc = subprocess.Popen(args, cwd=ROOT, env=dask_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with OpenFileWatch(dask_cluster.all_pids() | {proc.pid}, str(db)) as watch:
            out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-4000:] + dask_cluster.diagnostics()
        assert set(watch.seen) == {proc.pid}, watch.seen  # the CLI process is the one DuckDB writer
        assert srv.stats()["completed"] == 18 == srv.stats()["total"]
        writers = journal_writers(db)
        assert {pid for _, pid in writers} == workers, writers  # the CLI process paid for nothing itself
        assert sum(writers.values()) == 18

        rerun = subprocess.run(args, cwd=ROOT, env=dask_cluster.env, capture_output=True, text=True, timeout=240)
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
        assert srv.stats()["total"] == 18
    assert query(db, "SELECT count(*), count(DISTINCT (question_id, sample_index)), count(*) FILTER (WHERE status = 'answered') "
                  "FROM trajectories") == [(6, 6, 6)]
    assert query(db, "SELECT status, attempts FROM runs") == [("completed", 2)]
