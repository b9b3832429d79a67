"""Seconds per SWiRL RL step and the share spent waiting for the judge (and SFT step time).

The policy is the tiny random Llama the tests use (SmolLM2's real tokenizer) on CPU, the states come
from a small curated DuckDB, and the reward judge is the scripted OpenAI-compatible server in its own
process with a fixed latency, reached over real HTTP through the project's LLM client.

SWiRL runs twice: with the judge reward as it is (async, one persistent client for the run, on TRL's
event loop) and with the previous design, a client built and closed for every reward batch.

    .venv/bin/python benchmarks/training_step.py [--steps 4] [--judge-latency 0.2] [--generations 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import build_labeled_db, build_tiny_model  # noqa: E402
from scripted_server import start_subprocess  # noqa: E402

from swirl_core.config import ModelConfig  # noqa: E402
from swirl_core.store import Store  # noqa: E402
from swirl_core.training.data import rl_dataset, sft_dataset  # noqa: E402
from swirl_core.training.rewards import JudgeReward, format_reward  # noqa: E402
from swirl_core.training.trainers import TrainSettings, sft_trainer, swirl_trainer  # noqa: E402


class PerBatchJudgeReward(JudgeReward):
    """The previous design, for comparison: a new client (connection pool, rate limiter) for every batch."""

    async def __call__(self, *args, **kwargs):
        try:
            return await super().__call__(*args, **kwargs)
        finally:
            await self.aclose()


class StepTimer:
    """A TrainerCallback-like timer: wall time of each optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, *args, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self._t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--judge-latency", type=float, default=0.2)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--completion-tokens", type=int, default=32)
    args = p.parse_args()
    from transformers import TrainerCallback

    tmp = Path(tempfile.mkdtemp(prefix="swirl-bench-train-"))
    build_labeled_db(tmp / "db.duckdb")
    model_dir = build_tiny_model(tmp / "tiny")
    proc, base_url = start_subprocess(latency=args.judge_latency, default="Sensible step. GOOD")
    try:
        with Store(tmp / "db.duckdb", read_only=True) as store:
            rl = rl_dataset(store.con, "none", out_dir=tmp / "rl").dataset
            sft = sft_dataset(store.con, "none", out_dir=tmp / "sft").dataset
        rows = []
        for method, reward_class in (("swirl", JudgeReward), ("swirl", PerBatchJudgeReward), ("sft", None)):
            settings = TrainSettings(method=method, base_model=str(model_dir), output_dir=str(tmp / method),
                                     max_steps=args.steps, per_device_batch_size=args.generations,
                                     num_generations=args.generations, max_completion_length=args.completion_tokens)
            timer = StepTimer()
            cb = type("Timer", (TrainerCallback,), {"on_step_begin": timer.on_step_begin, "on_step_end": timer.on_step_end})()
            if method == "swirl":
                # No journal: every sampled step is a paid call in both runs (no cache hits from the first).
                reward = reward_class(ModelConfig(model="openai/judge", api_base=base_url, temperature=0.0), None)
                trainer = swirl_trainer(settings, rl, [reward, format_reward])
            else:
                reward = None
                trainer = sft_trainer(settings, sft)
            trainer.add_callback(cb)
            trainer.train()
            if reward is not None and trainer.async_loop is not None:
                asyncio.run_coroutine_threadsafe(reward.aclose(), trainer.async_loop).result()
            steady = timer.times[1:] or timer.times  # the first step pays one-off set-up
            per_step = statistics.median(steady)
            judge_share = (reward.wait_s / sum(timer.times)) if reward else 0.0
            client = {JudgeReward: "persistent", PerBatchJudgeReward: "per-batch", None: ""}[reward_class]
            rows.append((f"{method} {client}".strip(), len(timer.times), per_step, judge_share, reward.summary() if reward else {}))
    finally:
        proc.terminate()
        proc.wait()
    print(f"\ntraining step time on CPU, tiny Llama (SmolLM2 tokenizer); judge latency {args.judge_latency:.2f} s, "
          f"{args.generations} generations × {args.completion_tokens} tokens per state")
    print(f"{'method (judge client)':<22} {'steps':>5} {'s/step (median)':>16} {'judge wait share':>17}")
    for method, n, per_step, share, summary in rows:
        print(f"{method:<22} {n:>5} {per_step:>16.2f} {share:>16.1%}" + (f"   judge: {summary}" if summary else ""))


if __name__ == "__main__":
    main()
