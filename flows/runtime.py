"""How flows run: the Dask task runner and a Prefect API when no server is configured."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from swirl_core.config import ClusterConfig, ModelConfig
from swirl_core.hashing import content_hash

# Offline-safe defaults: no telemetry, no outbound calls, time for a server to start on 2 cores.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "DASK_LOGGING__DISTRIBUTED": "warning",  # worker/scheduler chatter drowns the progress bar
}


def apply_quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def task_runner(cluster: ClusterConfig, model: ModelConfig, local_directory: Path):
    """The Dask task runner of a stage that calls `model`."""
    from prefect_dask import DaskTaskRunner

    from swirl_core.stage import default_workers, shards_per_worker

    if cluster.address:
        if cluster.address.startswith("tls://"):
            _check_tls_client()
        return DaskTaskRunner(address=cluster.address)
    kwargs = {"n_workers": default_workers(cluster, model), "threads_per_worker": shards_per_worker(cluster, model), "processes": True,
              "dashboard_address": ":0", "local_directory": str(local_directory)}
    kwargs.update(cluster.cluster_kwargs)
    return DaskTaskRunner(cluster_class=cluster.cluster_class or "distributed.LocalCluster", cluster_kwargs=kwargs)


class PrefectAPIAccessError(ValueError):
    """The configured Prefect API refuses this process: its basic-auth credential is missing or wrong."""


def _check_access(url: str) -> None:
    """One authenticated request before any flow starts, so that a missing credential is a one-line error."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING

    with get_client(sync_client=True) as client:
        try:
            client.api_version()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 401:
                raise
            problem = "does not match the server's" if PREFECT_API_AUTH_STRING.value() else "is not set"
            raise PrefectAPIAccessError(f"the Prefect API at {url} requires authentication and "
                                        f"PREFECT_API_AUTH_STRING {problem} (user:password)") from exc


class DaskTLSConfigError(ValueError):
    """A tls:// scheduler address, but no certificate for this process in Dask's configuration."""


def _check_tls_client() -> None:
    """A TLS-only scheduler refuses a client without the cluster's certificate: say so before connecting."""
    from distributed.security import Security

    security = Security()  # Dask's configuration: DASK_CONFIG, distributed.comm.tls
    if not (security.tls_ca_file and security.tls_client_cert):
        raise DaskTLSConfigError("a tls:// Dask scheduler needs the cluster's CA and a client certificate in Dask's "
                                 "config (distributed.comm.tls): export DASK_CONFIG=<the folder docker/dask-tls.sh wrote>")


UVICORN_PORT_TAKEN = 3  # uvicorn's exit code when it cannot start, e.g. bind its port (so Prefect's launcher reads it)


class TemporaryAPI:
    """A Prefect API server for one command and its Dask workers: Prefect's own app under uvicorn, as Prefect's
    `SubprocessASGIServer` runs it (UI off, ephemeral services), launched by a plain `Popen` the moment the
    command knows it needs one. Importing Prefect's server module to launch it would cost this process 1.7 s
    and 80 MB (measured on 2 cores), and launching early lets the server start while the command imports its
    flows and checks its inputs. Every user of a shared host reaches 127.0.0.1, and the API serves Secret blocks: it requires a
    credential of its own, which only this process and its workers (the environment) present."""

    def __init__(self) -> None:
        self.credential = "swirl:" + secrets.token_urlsafe(24)
        self._launch()

    def _launch(self) -> None:
        with socket.socket() as probe:  # a free port: taken again by the server a moment later
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               "PREFECT_SERVER_API_AUTH_STRING": self.credential}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL)  # its errors reach this command's stderr, as Prefect's own launch does

    def wait(self, timeout_s: float) -> None:
        """Until the server answers its health check (which needs no credential)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never route 127.0.0.1 via a proxy
        deadline, relaunches = time.monotonic() + timeout_s, 2
        while time.monotonic() < deadline:
            if self.process.poll() == UVICORN_PORT_TAKEN and relaunches:  # the port was taken meanwhile: another
                relaunches -= 1
                self._launch()
            elif self.process.returncode is not None:
                raise RuntimeError(f"the temporary Prefect API exited with code {self.process.returncode} (its error is above)")
            with contextlib.suppress(OSError):
                with opener.open(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the temporary Prefect API did not answer within {timeout_s:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def prefect_api() -> Iterator[Callable[[], str]]:
    """The Prefect API of one command: the exported one (PREFECT_API_URL, or the Prefect profile's), or a
    temporary server started now, in the background. Yields `ready()`, to call just before the first flow: it
    waits until the API answers (a configured one: that this process is let in) and points this process and
    the Dask workers it starts (the environment) at it; leaving stops a temporary server.

    Without an exported API URL each Dask worker would start its own temporary server.
    """
    existing = os.environ.get("PREFECT_API_URL") or _profile_api_url()
    if existing:
        def check() -> str:
            _check_access(existing)
            return existing

        yield check
        return
    server = TemporaryAPI()
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)

        def ready() -> str:
            from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

            server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
            saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
            stack.callback(_restore_env, saved)
            os.environ.update({"PREFECT_API_URL": server.url, "PREFECT_API_AUTH_STRING": server.credential})
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.url,
                                                            PREFECT_API_AUTH_STRING: server.credential}))
            stack.callback(_drain_logs)  # first on the way out: while the server is still up
            return server.url

        yield ready


def _profile_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _drain_logs() -> None:
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)  # ship buffered run logs while the server is still up


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def database_limit_name(db: str | Path) -> str:
    """The Prefect global concurrency limit of one database file (Prefect names may not contain '/')."""
    path = Path(db).resolve()
    return f"swirl-db-{path.stem}-{content_hash('database', str(path))[:12]}"


# Without renewal (the holder crashed) a database's slot returns this long after the last renewal.
DATABASE_LEASE_S = 60


@contextlib.contextmanager
def database_slot(db: str | Path) -> Iterator[None]:
    """In a deployment run, hold the database's one slot while this flow has the file open.

    DuckDB admits one process per file, and Prefect's deployment-level limits cannot be keyed by a parameter,
    so such a run takes a global concurrency limit (limit 1) named after the file: a second run on the same
    database waits its turn, runs on other databases do not. A crashed holder's lease expires on the server
    (its lease service). Runs outside a deployment (the CLI, which holds the file for its whole command and
    fails clearly when it is taken; in-process calls) take no slot: their temporary API runs no lease service,
    so a killed run's slot would never come back.
    """
    from prefect.runtime import deployment

    if deployment.id is None:
        yield
        return
    import httpx
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = database_limit_name(db)
    with get_client(sync_client=True) as client:
        try:  # read first: the server logs a traceback for every create that conflicts
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it a moment ago
                pass
    with contextlib.ExitStack() as held:
        try:  # one try without waiting, so that a run that has to wait says so
            held.enter_context(concurrency(name, strict=True, max_retries=0, lease_duration=DATABASE_LEASE_S))
        except ConcurrencySlotAcquisitionError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423):  # 423: taken
                raise
            get_run_logger().info("database %s is in use by another run: waiting for it (concurrency limit %s)", db, name)
            held.enter_context(concurrency(name, strict=True, lease_duration=DATABASE_LEASE_S))
        yield
