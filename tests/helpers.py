"""Shared helpers for tests and benchmarks."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from pathlib import Path


def query(db: Path, sql: str) -> list[tuple]:
    """Rows of `sql` on a DuckDB file, opened read-only and closed again (a flow may open it next)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def build_tiny_model(target: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from swirl_core.llm.local_models import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def math_policy(body: dict) -> str:
    """A scripted math policy: two calculator steps, then the answer; keyed on the question's numbers."""
    messages = body["messages"]
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user" and "Question:" in m["content"])
    anchor = max(i for i, m in enumerate(messages) if m["content"] == question)
    step = sum(1 for m in messages[anchor:] if m["role"] == "assistant")
    numbers = re.findall(r"\d+", question.rsplit("Question:", 1)[1])[:2] or ["1", "1"]
    if step == 0:
        return f"First add. <math_exp>{numbers[0]} + {numbers[-1]}</math_exp>"
    if step == 1:
        return f"Then double it. <math_exp>({numbers[0]} + {numbers[-1]}) * 2</math_exp>"
    return "<answer>42</answer>"


def build_labeled_db(path: Path) -> None:
    """Four 2-step QA trajectories with hand-set labels:
    t0 process ✓ outcome ✓; t1 process ✓ outcome ✗; t2 process ✗ outcome ✓; t3 process ✗ (UNKNOWN) outcome ✗."""
    import pyarrow as pa

    from swirl_core.records import Action, Question, Step, Trajectory
    from swirl_core.store import Store

    with Store(path) as store:
        q = Question(question_id="q", dataset="hotpotqa", split="train", source_id="1", task="qa",
                     question="Which river flows through the birthplace of Marie Curie?", answer="Vistula")
        store.upsert_questions([q], "r")
        trajs = []
        for n in range(4):
            steps = [Step(step_index=0, message="<search_query>Marie Curie birthplace</search_query>",
                          action=Action(kind="search", content="Marie Curie birthplace"),
                          observation="Marie Curie birthplace → Warsaw: on the Vistula.", model="m", prompt_version="v"),
                     Step(step_index=1, message="<answer>Vistula</answer>", action=Action(kind="answer", content="Vistula"),
                          model="m", prompt_version="v")]
            trajs.append(Trajectory(trajectory_id=f"t{n}", question_id="q", sample_index=n, model="m", prompt_version="v",
                                    prompt_messages=[{"role": "user", "content": "Question: " + q.question}],
                                    steps=steps, status="answered", final_answer="Vistula"))
        store.write_trajectories(trajs, "r", "fp")
        verdicts = {"t0": ["GOOD", "GOOD"], "t1": ["GOOD", "GOOD"], "t2": ["GOOD", "BAD"], "t3": ["UNKNOWN", "GOOD"]}
        store.upsert("judgments", pa.Table.from_pylist([
            {"judgment_id": f"{t}{i}", "trajectory_id": t, "step_index": i, "sample_index": 0, "judge_model": "j",
             "judge_fingerprint": "f", "prompt_version": "v", "verdict": v}
            for t, vs in verdicts.items() for i, v in enumerate(vs)]))
        store.upsert("grades", pa.Table.from_pylist([
            {"trajectory_id": t, "method": "exact_match", "correct": c}
            for t, c in [("t0", True), ("t1", False), ("t2", True), ("t3", False)]]))


class FreezeGate:
    """A TCP forwarder in front of a (scripted) HTTP server that can stop passing requests on while replies
    still flow back: what a test needs to SIGKILL a client at a moment when no paid reply is on the wire.

    A server counts a request as completed when it writes the reply; a client killed between that write and
    its journal append never had the reply, and resending it is no double payment. So a kill goes:
    `freeze()`, wait until the server has answered everything it already received (`drain`), give the client
    a moment to journal those replies, kill, then `thaw()`. Request bytes held while frozen are dropped, never
    forwarded, when their client is gone by the thaw (a killed process); a live client's are passed on.

        gate = FreezeGate(server_base_url).start()   # clients use gate.base_url
        gate.freeze(); drain(...); os.killpg(pid, SIGKILL); proc.wait(); gate.thaw()
    """

    def __init__(self, upstream_base_url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(upstream_base_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._path = parts.path
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()  # held while a request chunk is checked and forwarded: freeze() is atomic
        self._listener: socket.socket | None = None
        self.port = 0
        self.dropped = 0  # held request chunks of dead clients, never forwarded

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self._path}"

    def start(self) -> FreezeGate:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="freeze-gate", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> FreezeGate:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def freeze(self) -> None:
        with self._lock:
            self._open.clear()

    def thaw(self) -> None:
        with self._lock:
            self._open.set()

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _alive(sock: socket.socket) -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True  # nothing to read, not closed
        except OSError:
            return False

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                held = False
                while True:
                    with self._lock:
                        if self._open.is_set():
                            if held and not self._alive(client):
                                self.dropped += 1  # held while frozen, and its client died meanwhile: never sent
                                return
                            upstream.sendall(data)
                            break
                    held = True
                    self._open.wait(0.05)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    @staticmethod
    def _replies(upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)


def wait_drained(server_base_url: str, settle_s: float = 0.3, timeout_s: float = 30.0) -> int:
    """Wait until a scripted server has answered every request it received and nothing new arrived for
    `settle_s` (use behind a frozen `FreezeGate`); returns the number of attempts it has seen."""
    import time

    from scripted_server import fetch_attempts

    deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        log = fetch_attempts(server_base_url)
        if any(e["replied"] is None for e in log) or len(log) != last:
            last, since = len(log), time.monotonic()
        elif time.monotonic() - since >= settle_s:
            return last
        time.sleep(0.05)
    raise TimeoutError(f"server {server_base_url} still busy after {timeout_s}s")


def _tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_calling_policy(gold: dict[str, str]):
    """A scripted function-calling policy over the demo seeds (`gold`: question → answer). By the question's
    position it takes one of these paths, so the database holds every kind of step the export must carry:
    0 a clean calculation (or search) then the right answer; 1 arguments that are not JSON, then a clean call
    and the right answer; 2 an unknown tool, a reply with no call, then a wrong answer; 3 two calls in one
    message, then the right answer."""
    import json

    questions = list(gold)

    def respond(body: dict) -> dict:
        task_tool = next(t["function"]["name"] for t in body["tools"] if t["function"]["name"] != "answer")
        argument = {"calculator": "expression", "search": "query"}[task_tool]
        question = body["messages"][0]["content"].rsplit("Question: ", 1)[1]
        step = sum(m["role"] == "assistant" for m in body["messages"])
        value = " * ".join(re.findall(r"\d+", question)[:2]) if task_tool == "calculator" else question[:40]
        use = _tool_call(f"call_{step}", task_tool, json.dumps({argument: value}))
        answer = _tool_call(f"call_{step}", "answer", f'{{"answer": "{gold[question]}"}}')
        paths = [
            [("Let me look this up.", [use]), ("", [answer])],
            [("", [_tool_call(f"call_{step}", task_tool, f'{{"{argument}": ')]), ("", [use]), ("", [answer])],
            [("", [_tool_call(f"call_{step}", "python", '{"code": "print(1)"}')]), ("I think I know it.", None),
             ("", [_tool_call(f"call_{step}", "answer", '{"answer": "0"}')])],
            [("Two at once.", [use, _tool_call(f"call_{step}b", task_tool, f'{{"{argument}": "again"}}')]), ("", [answer])],
        ]
        path = paths[questions.index(question) % len(paths)]
        content, calls = path[min(step, len(path) - 1)]
        return {"content": content or None, "tool_calls": calls} if calls else {"content": content}

    return respond


def build_tools_db(path: Path) -> list[dict]:
    """A database of tools-protocol trajectories made through the real path: `generate --protocol tools` over HTTP
    against a scripted server answering with `tool_calls` (4 demo-math and 2 demo-qa questions, so calculator and
    search calls with their different argument names), then `curate` with a judge that finds every step GOOD.
    Returns the requests the policy got. Needs a Prefect API (the `prefect_api` fixture)."""
    import json

    from scripted_server import ScriptedServer

    from flows.curate import run_curate
    from flows.generate import run_generate
    from swirl_core.config import ClusterConfig, CurateConfig, GenerateConfig, ModelConfig
    from swirl_core.records import StepProtocol
    from swirl_core.seeds import load_seeds

    runs = {"demo-math": 4, "demo-qa": 2}
    gold = {q.question: q.answer for name, limit in runs.items() for q in load_seeds(name, limit=limit).questions}
    with ScriptedServer(responder=tool_calling_policy(gold)) as srv:
        for name, limit in runs.items():
            result = run_generate(GenerateConfig(
                dataset=name, limit=limit, samples=1, protocol=StepProtocol.TOOLS, db=str(path), progress=False,
                policy=ModelConfig(model="openai/policy", api_base=srv.base_url), cluster=ClusterConfig(n_workers=1)))
            assert result["trajectories"] == limit, json.dumps(result, default=str)
        requests = list(srv.requests)
    with ScriptedServer(default="Each step follows.\nGOOD") as srv:
        run_curate(CurateConfig(db=str(path), judge=ModelConfig(model="openai/judge", api_base=srv.base_url),
                                grader="rule", probe_limit=0, progress=False, cluster=ClusterConfig(n_workers=1)))
    return requests
