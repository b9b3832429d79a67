"""TLS between Dask machines: certificates made by docker/dask-tls.sh (the README's recipe), a TLS-only
`dask scheduler` and `dask worker` started as separate processes that read them through DASK_CONFIG, and
`swirl generate` / `swirl curate` pointed at its tls:// address, unchanged otherwise. A client without the
cluster's certificate (none, one from another CA, or plain TCP) is refused by the scheduler.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT
from helpers import math_policy, query
from scripted_server import Faults, ScriptedServer
from test_distributed import DaskCluster, _judge, journal_writers

pytestmark = pytest.mark.slow

RECIPE = ROOT / "docker" / "dask-tls.sh"


def make_certificates(folder: Path) -> Path:
    out = subprocess.run(["sh", str(RECIPE), str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert {p.name for p in folder.iterdir()} == {"ca.pem", "cert.pem", "key.pem", "dask.yaml"}
    assert (folder / "key.pem").stat().st_mode & 0o077 == 0  # the key is readable by its owner only
    return folder


@pytest.fixture(scope="module")
def tls_cluster(prefect_api, tmp_path_factory) -> Iterator[DaskCluster]:
    cluster = DaskCluster(tmp_path_factory.mktemp("dask-tls"), n_workers=1,
                          tls_dir=make_certificates(tmp_path_factory.mktemp("dask-certs")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _handshake(address: str, context: ssl.SSLContext) -> str:
    """Open a TLS connection to a tls://HOST:PORT and read: what the scheduler answered a client like this one."""
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"\0" * 8)
                data = tls.recv(1)
                return "accepted" if data else "closed"
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            return f"refused: {exc}"


def test_a_client_without_the_cluster_certificate_is_refused(tls_cluster, tmp_path):
    from distributed import Client
    from distributed.security import Security

    address, certs = tls_cluster.address, tls_cluster.tls_dir
    assert address.startswith("tls://")

    def trusting(cert_dir: Path | None) -> ssl.SSLContext:  # trusts the cluster's CA, so only the scheduler decides
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        ctx.check_hostname = False
        if cert_dir is not None:
            ctx.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
        return ctx

    other = make_certificates(tmp_path / "other-ca")  # a valid certificate, from another cluster's CA
    assert _handshake(address, trusting(None)).startswith("refused"), "no client certificate"
    assert _handshake(address, trusting(other)).startswith("refused"), "a certificate from another CA"
    with pytest.raises(OSError):  # Dask's own client, over plain TCP
        Client(address.replace("tls://", "tcp://"), timeout=5)
    foreign = Security(require_encryption=True, tls_ca_file=str(certs / "ca.pem"),
                       tls_client_cert=str(other / "cert.pem"), tls_client_key=str(other / "key.pem"))
    with pytest.raises(OSError):
        Client(address, security=foreign, timeout=5)
    # The cluster's own certificate is let in, and nothing the strangers tried joined it.
    with Client(address, security=tls_cluster.security, timeout=30) as client:
        info = client.scheduler_info()
        assert len(info["workers"]) == 1 and all(w.startswith("tls://") for w in info["workers"])
    assert "TLS handshake failed" in tls_cluster.diagnostics()


def test_cli_generate_and_curate_on_a_tls_only_scheduler(tls_cluster, tmp_path, record_property):
    from test_faults import report

    db = tmp_path / "tls.duckdb"
    workers = set(tls_cluster.worker_pids.values())
    env = tls_cluster.env  # DASK_CONFIG points at the certificates, as on every machine of the cluster
    common = ["--scheduler-address", tls_cluster.address, "--db", str(db), "--no-progress"]
    timings = {}

    def swirl(name: str, *args: str, environ: dict = env) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=environ, capture_output=True,
                             text=True, timeout=300)
        timings[name] = round(time.perf_counter() - t0, 1)
        return out

    with ScriptedServer(responder=math_policy, faults=Faults(latency_s=0.01)) as srv:
        generate = ["generate", "--dataset", "gsm8k", "--data-files", str(FIXTURES / "gsm8k_test20.jsonl"), "--split",
                    "test", "--limit", "4", "--samples", "1", "--shard-size", "1", "--policy", "openai/policy",
                    "--policy-api-base", srv.base_url, *common]
        # Without the certificates the CLI says what is missing, in one line, before it connects or pays.
        bare = {k: v for k, v in env.items() if k != "DASK_CONFIG"}
        refused = swirl("generate-without-certificates", *generate, environ=bare)
        assert refused.returncode == 2 and srv.stats()["total"] == 0, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines() == [
            "swirl generate: error: a tls:// Dask scheduler needs the cluster's CA and a client certificate in Dask's "
            "config (distributed.comm.tls): export DASK_CONFIG=<the folder docker/dask-tls.sh wrote>"]
        out = swirl("generate", *generate)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + tls_cluster.diagnostics()
        paid = srv.stats()["completed"]
        assert paid == 12 == srv.stats()["total"]  # 4 × (calc, calc, answer)
    writers = journal_writers(db)
    assert {pid for _, pid in writers} == workers and sum(writers.values()) == paid  # the TLS worker paid, not the CLI
    assert query(db, "SELECT count(*) FILTER (WHERE status = 'answered') FROM trajectories") == [(4,)]

    with ScriptedServer(responder=_judge) as judge:
        out = swirl("curate", "curate", "--judge", "openai/judge", "--judge-api-base", judge.base_url, "--grader", "rule",
                    "--shard-size", "4", "--probe-limit", "0", *common)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + tls_cluster.diagnostics()
        assert judge.stats()["completed"] == 12
    assert {pid for _, pid in journal_writers(db)} == workers
    assert query(db, "SELECT verdict, count(*) FROM judgments GROUP BY 1 ORDER BY 1") == [("BAD", 4), ("GOOD", 8)]
    report("dask_tls", {"wall_s": timings, "calls": paid + 12}, record_property)
