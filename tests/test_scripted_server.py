"""Tests for the scripted OpenAI-compatible server, driven by the real `openai` SDK and raw HTTP."""
from __future__ import annotations

import hashlib
import http.client
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works whether or not tests/ is a package
from scripted_server import CLIENT_GONE, Faults, ScriptedServer, fetch_stats, start_subprocess  # noqa: E402

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never via a proxy


def _body(text: str, **extra: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}], **extra}).encode()


def _post(base_url: str, data: bytes, path: str = "/chat/completions") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(base_url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _client(base_url: str, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="test", **{"max_retries": 0, **kw})  # type: ignore[arg-type]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_script_replays_steps_after_demo_turns() -> None:
    scripts = {"capital of France": ["<search>France capital</search>", "<answer>Paris</answer>"]}
    with ScriptedServer(scripts=scripts, rules=[(".*", "RULE")]) as srv, _client(srv.base_url) as client:
        messages: list[dict] = [
            {"role": "system", "content": "Answer with tools. Example:"},
            {"role": "user", "content": "Q: what is 2+2?"},  # demo turns: their assistant reply must not count
            {"role": "assistant", "content": "<answer>4</answer>"},
            {"role": "user", "content": "Q: what is the capital of France?"},
        ]
        replies = []
        for step in range(3):
            out = client.chat.completions.create(model="policy", messages=messages, temperature=0.7, seed=step,  # type: ignore[arg-type]
                                                 extra_body={"guided_regex": "<.*>"})
            replies.append(out.choices[0].message.content)
            messages += [{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": f"<result>{step}</result>"}]
        assert replies == ["<search>France capital</search>", "<answer>Paris</answer>", "<answer>Paris</answer>"]
        assert out.model == "policy" and out.choices[0].finish_reason == "stop" and out.id.startswith("chatcmpl-")
        assert out.usage is not None and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens > 0
        assert [(r["seed"], r["temperature"], r["guided_regex"]) for r in srv.requests] == [(i, 0.7, "<.*>") for i in range(3)]


def test_rules_match_last_message_then_default() -> None:
    rules = [(r"Step:.*<search>", "<judgement>GOOD</judgement>"), (r"Step:", "<judgement>BAD</judgement>")]
    with ScriptedServer(rules=rules, default="DEFAULT") as srv, _client(srv.base_url) as client:
        def ask(*contents: str) -> str | None:
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
            return client.chat.completions.create(model="judge", messages=msgs).choices[0].message.content  # type: ignore[arg-type]

        assert ask("Context\nStep:\n<search>x</search>") == "<judgement>GOOD</judgement>"  # DOTALL across lines
        assert ask("Step: <answer>4</answer>") == "<judgement>BAD</judgement>"
        assert ask("Step: <search>x</search>", "ok", "unrelated") == "DEFAULT"  # only the last message counts


def test_responder_wins_and_n_choices() -> None:
    with ScriptedServer(scripts={"hi": ["SCRIPT"]}, responder=lambda b: f"echo {b['model']}") as srv, _client(srv.base_url) as client:
        out = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], n=2)
        assert [(c.index, c.message.content) for c in out.choices] == [(0, "echo x"), (1, "echo x")]


def test_rate_limit_then_success() -> None:
    with ScriptedServer(faults=Faults(rate_limit_first=1, retry_after_s=0.05)) as srv:
        data = _body("q")
        code, headers, raw = _post(srv.base_url, data)
        assert code == 429 and headers["Retry-After"] == "0.05"
        assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        assert _post(srv.base_url, data)[0] == 200
        with _client(srv.base_url, max_retries=2) as client:  # the SDK resends identical bytes and honours Retry-After
            out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "other"}])
        assert out.choices[0].message.content == "<answer>unknown</answer>"
        assert srv.stats()["statuses"] == {429: 2, 200: 2}


def test_server_error_then_success() -> None:
    with ScriptedServer(faults=Faults(server_error_first=2)) as srv, _client(srv.base_url) as client:
        msgs = [{"role": "user", "content": "q"}]
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
        assert client.chat.completions.create(model="m", messages=msgs).choices[0].message.content  # type: ignore[arg-type]
        assert srv.stats()["statuses"] == {500: 2, 200: 1} and srv.stats()["completed"] == 1


def test_malformed_then_success() -> None:
    with ScriptedServer(faults=Faults(malformed_first=1)) as srv:
        data = _body("q")
        code, _, raw = _post(srv.base_url, data)
        assert code == 200
        with pytest.raises(ValueError):
            json.loads(raw)
        code, _, raw = _post(srv.base_url, data)
        assert code == 200 and json.loads(raw)["choices"][0]["message"]["content"]
        assert srv.stats()["completed"] == 1 and srv.stats()["statuses"] == {200: 2}


def test_slow_reply_times_client_out_and_is_not_completed() -> None:
    with ScriptedServer(faults=Faults(slow_first=1, slow_s=1.0)) as srv, _client(srv.base_url, timeout=0.3) as client:
        msgs = [{"role": "user", "content": "q"}]
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
        assert client.chat.completions.create(model="m", messages=msgs).choices[0].message.content  # type: ignore[arg-type]
        deadline = time.monotonic() + 5
        while CLIENT_GONE not in srv.stats()["statuses"] and time.monotonic() < deadline:
            time.sleep(0.05)  # the slow attempt finds its client gone once slow_s has passed
        assert srv.stats()["statuses"] == {200: 1, CLIENT_GONE: 1}
        assert srv.completed_twice() == []


def test_fault_phases_run_in_order() -> None:
    faults = Faults(rate_limit_first=1, server_error_first=1, malformed_first=1, slow_first=1, slow_s=0.2)
    with ScriptedServer(faults=faults) as srv:
        data, seen = _body("q"), []
        for _ in range(5):
            start = time.monotonic()
            code, _, raw = _post(srv.base_url, data)
            seen.append((code, raw.startswith(b'{"id": "chatcmpl-0'), time.monotonic() - start >= 0.2))
        assert seen == [(429, False, False), (500, False, False), (200, False, False), (200, True, True), (200, True, False)]


def test_counts_routes_and_reset() -> None:
    with ScriptedServer() as srv:
        a, b = _body("a"), _body("b")
        assert _post(srv.base_url, a)[0] == 200
        assert _post(srv.base_url.removesuffix("/v1"), b)[0] == 200  # /chat/completions without /v1 too
        assert srv.completed_twice() == []
        assert srv.stats() == {"total": 2, "completed": 2, "by_body": {_sha(a): 1, _sha(b): 1}, "statuses": {200: 2}}
        _post(srv.base_url, a)
        assert srv.completed_twice() == [_sha(a)]

        code, _, raw = _post(srv.base_url, b"{not json")
        assert code == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
        assert _post(srv.base_url, b"{}", path="/nope")[0] == 404
        with _OPENER.open(srv.base_url + "/models", timeout=5) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "scripted"
        assert fetch_stats(srv.base_url) == srv.stats() and srv.stats()["statuses"] == {200: 3, 400: 1}

        assert _post(srv.base_url.removesuffix("/v1"), b"", path="/_reset")[0] == 200
        assert srv.stats() == {"total": 0, "completed": 0, "by_body": {}, "statuses": {}} and srv.requests == []


def test_keep_alive_and_concurrency() -> None:
    with ScriptedServer(default="ok") as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        sockets = []
        for i in range(2):
            conn.request("POST", "/v1/chat/completions", body=_body(f"k{i}"), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read()) and not resp.will_close
            sockets.append(conn.sock)
        assert sockets[0] is sockets[1]  # the same TCP connection served both requests
        conn.close()
        with ThreadPoolExecutor(32) as pool:
            codes = list(pool.map(lambda i: _post(srv.base_url, _body(f"c{i}"))[0], range(200)))
        assert codes == [200] * 200 and srv.stats()["completed"] == 202 and srv.completed_twice() == []


def test_subprocess_mode() -> None:
    proc, base_url = start_subprocess(default="<answer>4</answer>", latency=0.02, rate_limit_first=1,
                                      scripts={"Q1": ["s0", "s1"]}, rules=[["judge me", "GOOD"]])
    try:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        with _client(base_url, max_retries=1) as client:  # each body: one 429, then the retry succeeds
            def ask(text: str) -> str | None:
                return client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}]).choices[0].message.content

            assert [ask("Q1?"), ask("please judge me"), ask("2+2?")] == ["s0", "GOOD", "<answer>4</answer>"]
        stats = fetch_stats(base_url)
        assert stats["total"] == 6 and stats["completed"] == 3 and stats["statuses"] == {429: 3, 200: 3}
    finally:
        proc.terminate()
        rc = proc.wait(timeout=10)
    assert rc == 0
