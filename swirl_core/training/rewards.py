"""Reward functions for SWiRL RL, in the form TRL's GRPOTrainer calls them.

R(a|s) is the process judge's verdict on a *freshly sampled* action a at a stored state s
(the paper's step-wise reward): the judge reads the question, the turns so far and the sampled message, and the
action is never executed — no tool runs during RL. `format_reward` is an optional cheap shaping
term for the tag protocol, computed locally.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swirl_core.judging import JudgeSpec, Judgment, StepJudge, StepToJudge
from swirl_core.llm.client import LLMClient
from swirl_core.llm.config import ModelConfig
from swirl_core.llm.factory import build_client
from swirl_core.protocol import TAGS, parse_action

log = logging.getLogger(__name__)



def _unknown(j: Judgment) -> bool:
    """No verdict and no probability: the judge's reply (or call) gave the reward nothing to go on."""
    return j.verdict == "UNKNOWN" and j.p_good is None


def completion_text(completion: Any) -> str:
    """The sampled message: conversational completions are [{"role": "assistant", "content": …}]."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def _column(kwargs: dict[str, Any], name: str, n: int, default: Any) -> list[Any]:
    values = kwargs.get(name)
    return list(values) if values is not None else [default] * n


class JudgeReward:
    """The process judge as a TRL reward: 1.0 for GOOD, 0.0 for BAD (the fraction of GOOD votes with k samples);
    a judge that reports choice probabilities (in-process) gives its P(GOOD) instead, a graded reward that needs
    no threshold.

    An async reward, as TRL 1.16 runs it: every batch on the trainer's one persistent event loop, so one
    LLM client serves the whole run — one call journal, one rate limiter (`requests_per_minute` holds
    across batches), one connection pool. Every completion of a batch is judged concurrently, so the
    judge calls are cached, rate-limited and journaled (tagged purpose=reward) like curation's.
    The request holds the sampled text itself, so each distinct completion has its own cache key;
    an identical (state, action) pair — a repeat sample, or the stored action re-sampled — is paid
    once and gets the verdict curation gave it when the judge settings are the same.

    `calls`, `sent`, `cache_hits`, `failures` and `wait_s` (wall time blocked on the judge) let a
    benchmark report the share of each RL step spent waiting for rewards.
    """

    def __init__(self, judge: ModelConfig, journal_dir: str | Path | None, *, run_id: str | None = None,
                 samples: int = 1, max_reasks: int = 2, spec: JudgeSpec | None = None, fsync: bool = False) -> None:
        self.__name__ = "judge_reward"  # TRL names the logged metric rewards/<__name__>/mean
        self.judge = judge
        self.journal_dir = journal_dir
        self.fsync = fsync
        self.tags: dict[str, Any] = {"purpose": "reward", **({"run_id": run_id} if run_id else {})}
        self.spec = spec or JudgeSpec.for_model(judge, samples, max_reasks)  # the same judge as curation's
        self.batches = 0
        self.completions = 0
        self.calls = 0  # judge requests, re-asks included (cache hits too)
        self.sent = 0  # requests that reached the backend (retries included)
        self.cache_hits = 0
        self.failures = 0  # samples whose call failed for good
        self.unknown = 0  # samples whose reply never stated a verdict
        self.good = 0
        self.wait_s = 0.0
        self.clients_built = 0
        self._client: LLMClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client_for(self, loop: asyncio.AbstractEventLoop) -> LLMClient:
        # aiohttp sessions belong to the loop that made them: TRL calls every batch on one loop, so this
        # builds once per run; a caller on another loop (a notebook's asyncio.run per batch) gets its own.
        if self._client is None or self._loop is not loop:
            # Every rank of `accelerate launch` judges its own completions: each takes its share of the limits.
            judge = self.judge.shared_by(int(os.environ.get("WORLD_SIZE", "1")))
            self._client = build_client(judge, self.journal_dir, fsync=self.fsync, tags=self.tags)
            self._loop = loop
            self.clients_built += 1
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], task: Sequence[str], question: Sequence[str],
                 history: Sequence[str], **kwargs: Any) -> list[float]:
        n = len(completions)
        ids = _column(kwargs, "trajectory_id", n, "rl")
        steps = _column(kwargs, "step_index", n, 0)
        items = [
            StepToJudge(trajectory_id=str(ids[i]), step_index=int(steps[i]), task=task[i], question=question[i],
                        turns=json.loads(history[i]) if isinstance(history[i], str) else list(history[i]),
                        action_message=completion_text(completions[i]))
            for i in range(n)
        ]
        client = self._client_for(asyncio.get_running_loop())
        before = dict(client.stats)
        start = time.perf_counter()
        judgments = await StepJudge(client, self.spec).judge_many(items)
        waited = time.perf_counter() - start
        stats = {k: v - before.get(k, 0) for k, v in client.stats.items()}

        k = self.spec.samples
        rewards = []
        for i in range(n):
            votes = judgments[i * k:(i + 1) * k]
            # An UNKNOWN or failed sample scores 0.0, like BAD: the judge did not affirm the step,
            # and curation treats such a step the same way (it fails the process filter). A
            # neutral value would need a baseline we do not have; NaN would drop the sample.
            if all(j.p_good is not None for j in votes):  # a calibrated judge: its P(GOOD), a graded reward
                rewards.append(sum(j.p_good for j in votes) / k)
            else:
                rewards.append(sum(j.verdict == "GOOD" for j in votes) / k)
        self._account(judgments, stats, n, waited)
        if (log_metric := kwargs.get("log_metric")) is not None:  # GRPOTrainer averages these per logging step
            log_metric("judge/wait_s", waited)
            log_metric("judge/unknown_frac", sum(map(_unknown, judgments)) / max(len(judgments), 1))
        return rewards

    def _account(self, judgments: list[Judgment], stats: dict[str, int], n: int, waited: float) -> None:
        failed = sum(j.error is not None for j in judgments)
        if failed:
            # A judge outage flattens rewards to 0.0; say so rather than train on it silently.
            log.warning("judge reward: %d of %d judge samples failed; they score 0.0", failed, len(judgments))
        self.batches += 1
        self.completions += n
        self.calls += sum(j.attempts for j in judgments)
        self.sent += stats.get("sent", 0)
        self.cache_hits += stats.get("cache_hits", 0)
        self.failures += failed
        self.unknown += sum(_unknown(j) for j in judgments) - failed
        self.good += sum(j.verdict == "GOOD" for j in judgments)
        self.wait_s += waited

    def summary(self) -> dict[str, Any]:
        return {"batches": self.batches, "completions": self.completions, "calls": self.calls, "sent": self.sent,
                "cache_hits": self.cache_hits, "failures": self.failures, "unknown": self.unknown, "good": self.good,
                "wait_s": round(self.wait_s, 4), "clients_built": self.clients_built}


def _closed(text: str, kind: str) -> bool:
    tag = TAGS[kind]  # type: ignore[index]
    return re.search(rf"<\s*/\s*{tag}\s*>", text, re.IGNORECASE) is not None


def format_reward(completions: Sequence[Any], task: Sequence[str], **kwargs: Any) -> list[float]:
    """0.0 for a message that is exactly one well-formed action of the task, else -1.0.

    Two actions (invalid to the parser), text after the action (`truncated`) or a missing closing tag —
    typically a message cut off at max_completion_length — fail: RL should not teach them.
    """
    rewards = []
    for completion, kind in zip(completions, task, strict=True):
        text = completion_text(completion)
        action = parse_action(text, kind).action  # type: ignore[arg-type]
        ok = action.kind != "invalid" and not action.truncated and _closed(text, action.kind)
        rewards.append(0.0 if ok else -1.0)
    return rewards
