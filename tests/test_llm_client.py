"""The LLM client over real HTTP: retries, Retry-After, timeouts, the call cache, cost, limits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from scripted_server import Faults, ScriptedServer

from swirl_core.config import ModelConfig
from swirl_core.llm.base import ChatRequest, LLMError
from swirl_core.llm.cache import _OPEN_READERS, JOURNAL_GLOB, REPLAY_FIELDS, CallJournal
from swirl_core.llm.factory import build_client
from swirl_core.llm.limits import ProcessSemaphore, RateLimiter

MESSAGES = [{"role": "user", "content": "Question: what is 2+2?"}]


def _client(server, journal_dir, **overrides):
    cfg = ModelConfig(model=overrides.pop("model", "openai/scripted"), api_base=server.base_url, **overrides)
    return build_client(cfg, journal_dir, tags={"run_id": "r1", "purpose": "policy"})


def _request(**kw) -> ChatRequest:
    return ChatRequest(model=kw.pop("model", "openai/scripted"), messages=kw.pop("messages", MESSAGES), **kw)


async def test_retry_after_is_honoured_then_succeeds(tmp_path):
    with ScriptedServer(default="<answer>4</answer>", faults=Faults(rate_limit_first=2, retry_after_s=0.4)) as srv:
        client = _client(srv, tmp_path)
        started = time.perf_counter()
        response = await client.complete(_request())
        elapsed = time.perf_counter() - started
        await client.aclose()
        assert response.text == "<answer>4</answer>"
        assert srv.stats()["statuses"] == {429: 2, 200: 1}
        assert elapsed >= 0.8  # two waits of the server's Retry-After, not the client's own backoff
        assert client.stats["retries"] == 2


async def test_5xx_malformed_and_slow_are_retried(tmp_path):
    faults = Faults(server_error_first=1, malformed_first=1, slow_first=1, slow_s=3.0)
    with ScriptedServer(default="<answer>4</answer>", faults=faults) as srv:
        client = _client(srv, tmp_path, timeout_s=0.5)
        response = await client.complete(_request())
        await client.aclose()
        assert response.text == "<answer>4</answer>"
        statuses = srv.stats()["statuses"]
        assert statuses[500] == 1 and statuses[200] == 2  # malformed 200, then the good one
        assert srv.completed_twice() == []


async def test_gives_up_with_a_clear_error_after_max_retries(tmp_path):
    with ScriptedServer(faults=Faults(server_error_first=10)) as srv:
        client = _client(srv, tmp_path, max_retries=2)
        with pytest.raises(LLMError, match="gave up after 3 attempts.*HTTP 500"):
            await client.complete(_request())
        await client.aclose()
        assert srv.stats()["total"] == 3


async def test_client_errors_are_not_retried(tmp_path):
    with ScriptedServer(responder=lambda body: "x") as srv:
        client = _client(srv, tmp_path)
        client.backend.url = srv.base_url + "/no-such-endpoint"
        with pytest.raises(LLMError, match="HTTP 404"):
            await client.complete(_request())
        await client.aclose()
        assert srv.stats()["total"] == 0


async def test_cache_is_durable_before_use_and_never_pays_twice(tmp_path):
    with ScriptedServer(default="<answer>4</answer>") as srv:
        client = _client(srv, tmp_path)
        first = await client.complete(_request())
        journal_lines = [json.loads(line) for p in tmp_path.glob("calls-*.jsonl") for line in p.open()]
        assert [r["key"] for r in journal_lines] == [first.key]  # on disk by the time the caller has it
        assert "api_key" not in journal_lines[0]
        # A new process (a new journal object) replays the answer without sending it again.
        fresh = build_client(ModelConfig(model="openai/scripted", api_base=srv.base_url), None)
        fresh.journal = CallJournal(tmp_path)
        again = await fresh.complete(_request())
        assert again.cached and again.text == first.text
        other_sample = await fresh.complete(_request(sample_index=1, seed=1))
        assert not other_sample.cached
        await client.aclose()
        await fresh.aclose()
        assert srv.stats()["completed"] == 2 and srv.completed_twice() == []


async def test_identical_concurrent_requests_are_sent_once(tmp_path):
    with ScriptedServer(default="<answer>4</answer>", faults=Faults(latency_s=0.2)) as srv:
        client = _client(srv, tmp_path)
        results = await asyncio.gather(*(client.complete(_request()) for _ in range(5)))
        await client.aclose()
        assert {r.text for r in results} == {"<answer>4</answer>"}
        assert srv.stats()["total"] == 1


def test_torn_journal_line_is_ignored(tmp_path):
    good = {"key": "k1", "text": "a"}
    (tmp_path / "calls-host-1-x.jsonl").write_text(json.dumps(good) + "\n" + '{"key": "k2", "te')
    journal = CallJournal(tmp_path)
    assert journal.get("k1")["text"] == "a" and journal.get("k2") is None


def test_journal_index_reads_each_response_from_its_line(tmp_path):
    writer = CallJournal(tmp_path)
    for i in range(50):
        writer.append({"key": f"k{i}", "text": f"answer {i}" * (i + 1), "model": "m"})
    assert writer.get("k7")["text"] == "answer 7" * 8  # its own journal, just written
    reader = CallJournal(tmp_path)
    assert len(reader) == 50 and reader.get("k49")["text"] == "answer 49" * 50
    writer.append({"key": "late", "text": "z"})
    assert reader.get("late") is None and reader.refresh() == 1 and reader.get("late")["text"] == "z"
    assert set(reader.get("k3")) == set(REPLAY_FIELDS)  # a replay gets its fields, not the ledger's
    writer.close()
    reader.close()


def test_journal_replays_from_more_journals_than_it_keeps_open(tmp_path):
    for i in range(_OPEN_READERS + 8):  # one journal per process, as a work directory gains over runs
        writer = CallJournal(tmp_path)
        writer.append({"key": f"k{i}", "text": str(i)})
        writer.close()
    reader = CallJournal(tmp_path)
    for _ in range(2):
        assert [reader.get(f"k{i}")["text"] for i in range(_OPEN_READERS + 8)] == [str(i) for i in range(_OPEN_READERS + 8)]
    reader.close()


def test_journal_index_survives_a_writer_killed_mid_append(tmp_path):
    # A writer appending as fast as it can is killed at a random moment: every whole line is indexed and
    # replays its own response; a line torn by the kill is not there.
    script = (
        "import sys\nfrom swirl_core.llm.cache import CallJournal\nj = CallJournal(sys.argv[1])\n"
        "print('ready', flush=True)\ni = 0\n"
        "while True:\n    j.append({'key': f'k{i}', 'text': str(i) * 500})\n    i += 1\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline() == b"ready\n"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (path,) = tmp_path.glob(JOURNAL_GLOB)
    whole = path.read_bytes().count(b"\n")
    journal = CallJournal(tmp_path)
    assert whole > 0 and len(journal) == whole
    assert all(journal.get(f"k{i}")["text"] == str(i) * 500 for i in range(whole))
    assert journal.get(f"k{whole}") is None
    journal.close()


async def test_concurrency_bound_and_cost(tmp_path):
    with ScriptedServer(default="<answer>4</answer>", faults=Faults(latency_s=0.2)) as srv:
        client = _client(srv, tmp_path, model="openai/gpt-4o-mini", concurrency=2)
        started = time.perf_counter()
        results = await asyncio.gather(*(client.complete(_request(model="openai/gpt-4o-mini", sample_index=i, seed=i)) for i in range(6)))
        elapsed = time.perf_counter() - started
        await client.aclose()
        assert elapsed >= 0.6  # 6 calls, 2 at a time, 0.2 s each
        # gpt-4o-mini has a known price in litellm's bundled table: cost = tokens × price.
        r = results[0]
        assert r.cost_usd == pytest.approx(r.prompt_tokens * 0.15e-6 + r.completion_tokens * 0.6e-6)


async def test_unknown_price_is_null_not_zero(tmp_path):
    with ScriptedServer(default="<answer>4</answer>") as srv:
        client = _client(srv, tmp_path, model="openai/no-such-model-xyz")
        response = await client.complete(_request(model="openai/no-such-model-xyz"))
        await client.aclose()
        assert response.cost_usd is None


async def test_requests_per_minute_limit_measured_at_the_server(tmp_path):
    with ScriptedServer(default="<answer>4</answer>") as srv:
        client = _client(srv, tmp_path, requests_per_minute=120)  # 2 per second, a burst of one second's worth
        await asyncio.gather(*(client.complete(_request(sample_index=i, seed=i)) for i in range(5)))
        await client.aclose()
        arrived = sorted(a["arrived"] for a in srv.attempt_log())
    offsets = [t - arrived[0] for t in arrived]
    assert len(offsets) == 5 and offsets[1] < 0.2  # the burst: two at once
    assert all(offsets[k] >= 0.5 * (k - 1) - 0.02 for k in range(2, 5)), offsets  # then one each half second
    assert offsets[4] < 2.5, offsets


def test_a_fresh_rate_limiter_bursts_one_second_not_a_minute():
    limiter = RateLimiter(600)  # 10 per second
    waits = [limiter.reserve() for _ in range(30)]
    assert waits[:10] == [0.0] * 10
    assert waits[10:] == pytest.approx([0.1 * k for k in range(1, 21)], abs=0.01)
    tokens = RateLimiter(60_000)  # 1,000 tokens per second
    assert tokens.reserve(3_000) == pytest.approx(2.0, abs=0.01)  # larger than the burst: it waits, it is not cut


def test_limits_split_evenly_across_the_processes_of_a_run():
    cfg = ModelConfig(model="openai/x", concurrency=64, requests_per_minute=600, tokens_per_minute=90_000)
    share = cfg.shared_by(2)
    assert (share.concurrency, share.requests_per_minute, share.tokens_per_minute) == (32, 300, 45_000)
    assert cfg.shared_by(1) is cfg
    assert ModelConfig(model="openai/x", concurrency=3).shared_by(2).concurrency == 1  # never more than the total
    assert ModelConfig(model="openai/x").shared_by(4).requests_per_minute is None


def test_requests_in_flight_hold_across_the_event_loops_of_one_process(tmp_path):
    """Each shard runs its own event loop: two at once in one process (threads) share its one bound."""
    with ScriptedServer(default="<answer>4</answer>", faults=Faults(latency_s=0.1)) as srv:
        cfg = ModelConfig(model="openai/scripted", api_base=srv.base_url, concurrency=3)

        def shard(first: int) -> None:
            async def main() -> None:
                client = build_client(cfg, None)
                await asyncio.gather(*(client.complete(_request(sample_index=first + i, seed=first + i)) for i in range(9)))
                await client.aclose()

            asyncio.run(main())

        threads = [threading.Thread(target=shard, args=(n * 100,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        log = srv.attempt_log()
    assert len(log) == 18 and all(a["completed"] for a in log)
    in_flight = [sum(1 for b in log if b["arrived"] <= a["arrived"] < b["replied"]) for a in log]
    assert max(in_flight) == 3


async def test_a_cancelled_waiter_gives_its_slot_on():
    slots = ProcessSemaphore(1)
    await slots.__aenter__()
    waiter = asyncio.create_task(slots.__aenter__())
    await asyncio.sleep(0.01)
    waiter.cancel()
    await slots.__aexit__()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(slots.__aenter__(), 1)  # the slot came back
    await slots.__aexit__()


async def test_litellm_backend_over_real_http(tmp_path, monkeypatch):
    monkeypatch.setenv("SWIRL_TEST_KEY", "sk-test-secret-123")
    with ScriptedServer(default="<answer>4</answer>", faults=Faults(rate_limit_first=1, retry_after_s=0.1)) as srv:
        client = _client(srv, tmp_path, backend="litellm", api_key_env="SWIRL_TEST_KEY")
        assert client.backend.name == "litellm"
        response = await client.complete(_request())
        await client.aclose()
        assert response.text == "<answer>4</answer>" and response.prompt_tokens
        assert srv.stats()["statuses"] == {429: 1, 200: 1}
    assert "sk-test-secret-123" not in "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))


async def test_structured_outputs_and_seed_reach_a_served_model(tmp_path):
    from swirl_core.agent import PolicySpec

    spec = PolicySpec(model="hosted_vllm/m", task="math", max_steps=3, constraint="regex", server_kind="vllm")
    with ScriptedServer(default="<answer>4</answer>") as srv:
        client = _client(srv, tmp_path, model="hosted_vllm/m")
        await client.complete(spec.request(MESSAGES, sample_index=3))
        await client.aclose()
        body = srv.requests[-1]
        assert body["model"] == "m" and body["seed"] == 3 and "<math_exp>" in body["structured_outputs"]["regex"]


@pytest.mark.parametrize("name", ["openai/scripted", "hosted_vllm/scripted", "ollama/scripted", "ollama_chat/scripted"])
async def test_local_server_names_send_the_same_request_on_both_paths(name):
    with ScriptedServer(default="<answer>4</answer>") as srv:
        # Ollama is named by its root address (litellm's habit); its OpenAI API is under /v1.
        api_base = srv.base_url.removesuffix("/v1") if name.startswith("ollama") else srv.base_url
        bodies = {}
        for backend in ("auto", "litellm"):
            cfg = ModelConfig(model=name, api_base=api_base, backend=backend)
            assert cfg.resolved_identity == f"{name}@{srv.base_url}"
            client = build_client(cfg, None)
            assert client.backend.name == ("openai_compat" if backend == "auto" else "litellm")
            response = await client.complete(_request(model=name, seed=1))
            await client.aclose()
            assert response.text == "<answer>4</answer>"
            bodies[backend] = {k: srv.requests[-1][k] for k in ("model", "messages", "temperature", "max_tokens", "seed")}
        assert bodies["auto"] == bodies["litellm"] and bodies["auto"]["model"] == "scripted"


def test_ollama_defaults_to_its_local_openai_endpoint():
    cfg = ModelConfig(model="ollama/llama3.2")
    assert cfg.resolved_backend == "openai_compat" and cfg.served_endpoint == "http://localhost:11434/v1"
    assert ModelConfig(model="openai/gpt-4o-mini").resolved_backend == "litellm"  # OpenAI itself: litellm
    assert ModelConfig(model="anthropic/claude", api_base="http://h/v1").served_endpoint is None  # not OpenAI's protocol
