"""Live progress of one sharded stage: what each shard's client has done, reported while the shard runs, and the
stage's view of it (units done, calls paid and replayed, tokens, cost, calls/s), rendered at most once a second.

A shard reports from wherever it runs, by the cheapest channel that reaches the flow from there:
- in the flow's own process (a threads runner): a direct call;
- on a Dask worker: Dask's event API (`Worker.log_event`, the flow subscribes with `Client.subscribe_topic`), which
  travels the worker's and client's existing connections to the scheduler, so it works on a remote cluster with
  no shared storage and opens nothing new;
- anywhere else (a process pool): lines appended to a file beside the call journals, which the flow must see anyway.

Reports are cumulative per shard attempt, and each attempt's last one is marked final, so a late or lost report is
corrected by the next and the stage's totals at its end are exact once every ended shard's final one arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import orjson
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from swirl_core.stage import Shard

REPORT_INTERVAL_S = 0.5  # a shard publishes at most this often (and once more when it ends)
RENDER_INTERVAL_S = 1.0  # the terminal bar and the stage's sinks (the Prefect artifact) move at most this often
FINAL_WAIT_S = 5.0  # at the stage's end, how long to wait for the final reports still on their way
SPOOL_DIR = "progress"  # beside the journal directory: the file channel's reports

log = logging.getLogger(__name__)
T = TypeVar("T")


async def notify(work: Awaitable[T], on_done: Callable[[T], None] | None) -> T:
    """`work`'s result, shown to `on_done` the moment it is there (how a job counts its finished units)."""
    result = await work
    if on_done is not None:
        on_done(result)
    return result


@dataclass
class CallTally:
    """Calls of a shard or a stage: paid at the server, or replayed for free (from the journal, or shared with an
    identical request already in flight)."""

    paid: int = 0
    replayed: int = 0
    prompt_tokens: int = 0  # of paid calls
    completion_tokens: int = 0
    cost_usd: float = 0.0  # of paid calls with a known price
    unpriced: int = 0  # paid calls whose price is unknown: not in cost_usd
    replayed_cost_usd: float = 0.0  # what the replayed calls cost when they were paid

    def add(self, other: CallTally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def describe(self) -> str:
        cost = f"${self.cost_usd:.4f}" + (f" + {self.unpriced} unpriced" if self.unpriced else "")
        return (f"{self.paid} calls paid ({self.tokens:,} tokens, {cost}), {self.replayed} replayed from the journal "
                f"for free (${self.replayed_cost_usd:.4f} saved)")


@dataclass
class ShardReport:
    """One shard attempt's progress so far; sent as a plain dict (Dask events must be msgpack-serializable)."""

    shard_id: int
    attempt: str  # a retried shard reports under a new attempt: its calls add up, its units do not
    units: int
    calls: CallTally
    final: bool = False

    def message(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, message: dict) -> ShardReport:
        # Only its own fields: Dask's event API adds the sending worker's address to a dict message.
        own = {f.name: message[f.name] for f in fields(cls)}
        return cls(**(own | {"calls": CallTally(**own["calls"])}))


Publish = Callable[[dict], None]


class ShardMeter:
    """Counts what one shard attempt's client does (called from its event loop) and publishes it, throttled."""

    def __init__(self, shard_id: int = 0, publish: Publish | None = None, interval_s: float = REPORT_INTERVAL_S) -> None:
        self.report = ShardReport(shard_id=shard_id, attempt=uuid.uuid4().hex[:12], units=0, calls=CallTally())
        self._publish = publish
        self._interval_s = interval_s
        self._last = 0.0
        self._pending: asyncio.TimerHandle | None = None  # a flush due at the end of the interval

    @property
    def calls(self) -> CallTally:
        return self.report.calls

    def paid(self, prompt_tokens: int | None, completion_tokens: int | None, cost_usd: float | None) -> None:
        calls = self.calls
        calls.paid += 1
        calls.prompt_tokens += prompt_tokens or 0
        calls.completion_tokens += completion_tokens or 0
        if cost_usd is None:
            calls.unpriced += 1
        else:
            calls.cost_usd += cost_usd
        self._changed()

    def replayed(self, cost_usd: float | None) -> None:
        self.calls.replayed += 1
        self.calls.replayed_cost_usd += cost_usd or 0.0
        self._changed()

    def unit_done(self, *_: object) -> None:
        """One unit of the shard's work finished (usable as an `on_done` callback: its arguments are ignored)."""
        self.report.units += 1
        self._changed()

    def _changed(self) -> None:
        if self._publish is None or self._pending is not None:
            return
        wait = self._interval_s - (time.monotonic() - self._last)
        if wait <= 0:
            self.flush()
            return
        # Later, not at the next change: a shard whose remaining calls are slow would show a stale count meanwhile.
        with contextlib.suppress(RuntimeError):  # outside an event loop: the next change or the final flush sends it
            self._pending = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self, final: bool = False) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._publish is None:
            return
        self._last = time.monotonic()
        self.report.final = final
        try:
            self._publish(self.report.message())
        except Exception as exc:  # progress is a view: losing a report must never fail the shard's work
            log.warning("progress report of shard %d lost: %s", self.report.shard_id, exc)


_live: dict[str, StageProgress] = {}  # the stages running in this process, by topic


def live_stage(topic: str) -> StageProgress:
    """The running stage that publishes under `topic` in this process (the flow's)."""
    return _live[topic]


def spool_dir(journal_dir: str | Path) -> Path:
    return Path(journal_dir).parent / SPOOL_DIR


def publisher(topic: str, journal_dir: str | Path) -> Publish:
    """Where a shard's reports go from the process it runs in (see the module's docstring)."""
    if (stage := _live.get(topic)) is not None:
        return stage.receive
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # ValueError: not on a Dask worker
        return _SpoolWriter(spool_dir(journal_dir) / f"{topic}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl").write
    return lambda message: worker.log_event(topic, message)


class _SpoolWriter:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, message: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as fh:  # one whole line per write: the reader skips a torn last line
            fh.write(orjson.dumps(message) + b"\n")


@dataclass
class ProgressSnapshot:
    """A stage's progress at one moment."""

    stage: str
    unit: str
    units: int
    total: int
    shards_ended: int
    shards: int
    elapsed_s: float
    calls: CallTally = field(default_factory=CallTally)

    @property
    def percent(self) -> float:
        return 100.0 * self.units / self.total if self.total else 100.0

    @property
    def paid_per_s(self) -> float:
        return self.calls.paid / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.stage}: {self.units} of {self.total} {self.unit} in {self.shards} shards "
                f"({self.shards_ended} ended); {self.paid_per_s:.1f} calls/s; {self.calls.describe()}")

    def postfix(self) -> str:
        """The terminal bar's tail: its head already shows the units."""
        c = self.calls
        return (f"{self.paid_per_s:.1f} calls/s, {c.paid} paid, {c.tokens:,} tok, ${c.cost_usd:.4f}"
                f"{'+?' if c.unpriced else ''}, {c.replayed} replayed free")


Sink = Callable[[ProgressSnapshot], None]


class StageProgress:
    """The flow's view of one stage while it runs: takes the shards' reports, knows which shards ended, and
    renders the terminal bar and every sink at most once per `interval_s` from a thread of its own."""

    def __init__(self, shards: Sequence[Shard], *, bar: bool = False, interval_s: float = RENDER_INTERVAL_S) -> None:
        job = shards[0].job
        self.topic = f"swirl-progress-{job.stage}-{uuid.uuid4().hex[:12]}"
        self.stage, self.unit = job.stage, job.unit
        self._sizes = {s.shard_id: s.job.size for s in shards}
        self._spool = spool_dir(shards[0].journal_dir)
        self._interval_s = interval_s
        self._reports: dict[str, ShardReport] = {}  # by attempt
        self._written: dict[int, int] = {}  # units the writer stored, by shard
        self._ended: set[int] = set()
        self._failed: set[int] = set()
        self._final: set[int] = set()  # shards with a final report
        self._spool_offsets: dict[Path, int] = {}
        self._sinks: list[Sink] = []
        self._lock = threading.Condition()
        self._version = 0  # bumped by every change: a tick with nothing new renders nothing
        self._rendered = -1
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._bar = tqdm(total=sum(self._sizes.values()), desc=self.stage, unit=self.unit, disable=not bar)
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StageProgress:
        _live[self.topic] = self
        # The renderer runs in this context (the flow run's settings and client), as sinks may call its API.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._render_loop,), name=self.topic, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.await_finals()
        self._render(force=True)
        self._bar.close()
        _live.pop(self.topic, None)
        for path in self._spool_offsets:
            path.unlink(missing_ok=True)

    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def receive(self, message: dict) -> None:
        report = ShardReport.of(message)
        with self._lock:
            self._reports[report.attempt] = report
            if report.final:
                self._final.add(report.shard_id)
            self._version += 1
            self._lock.notify_all()

    def landed(self, shard: Shard, units: int) -> None:
        """The writer stored `units` of the shard's results (the shard ended, or one batch of it arrived)."""
        with self._lock:
            self._written[shard.shard_id] = self._written.get(shard.shard_id, 0) + units
            if self._written[shard.shard_id] >= shard.job.size:
                self._ended.add(shard.shard_id)
            self._version += 1

    def failed(self, shard: Shard) -> None:
        """The shard raised: the run moved past all of it."""
        with self._lock:
            self._ended.add(shard.shard_id)
            self._failed.add(shard.shard_id)
            self._version += 1

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            live: dict[int, int] = {}
            calls = CallTally()
            for report in self._reports.values():
                live[report.shard_id] = max(live.get(report.shard_id, 0), report.units)
                calls.add(report.calls)
            units = sum(size if shard_id in self._failed else
                        min(size, max(live.get(shard_id, 0), self._written.get(shard_id, 0)))
                        for shard_id, size in self._sizes.items())
            return ProgressSnapshot(stage=self.stage, unit=self.unit, units=units, total=sum(self._sizes.values()),
                                    shards_ended=len(self._ended), shards=len(self._sizes),
                                    elapsed_s=time.monotonic() - self._started, calls=calls)

    def await_finals(self) -> None:
        """Until every ended shard's final report is in (at most FINAL_WAIT_S: a killed worker sends none)."""
        deadline = time.monotonic() + FINAL_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            self._poll_spool()
            with self._lock:
                if self._ended <= self._final or self._lock.wait_for(lambda: self._ended <= self._final,
                                                                    timeout=min(left, 0.1)):
                    return

    def _poll_spool(self) -> None:
        """Take in what the file channel's shards appended since the last poll (a line read twice by two callers
        at once changes nothing: reports are cumulative)."""
        for path in self._spool.glob(f"{self.topic}-*.jsonl") if self._spool.is_dir() else ():
            start = self._spool_offsets.get(path, 0)
            with open(path, "rb") as fh:
                fh.seek(start)
                for line in fh:
                    if not line.endswith(b"\n"):
                        break  # being written: read it next time
                    start += len(line)
                    self.receive(orjson.loads(line))
            self._spool_offsets[path] = start

    def _render_loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._render()

    def _render(self, force: bool = False) -> None:
        self._poll_spool()
        with self._lock:
            if self._version == self._rendered and not force:
                return
            self._rendered = self._version
            sinks = list(self._sinks)
        snapshot = self.snapshot()
        self._bar.n = snapshot.units
        self._bar.set_postfix_str(snapshot.postfix(), refresh=False)
        self._bar.refresh()
        for sink in sinks:
            try:
                sink(snapshot)
            except Exception as exc:  # a view that fails (an API hiccup) must not stop the stage
                log.warning("progress of %s not shown: %s: %s", self.stage, type(exc).__name__, exc)
