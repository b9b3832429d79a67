"""Local-model evaluation throughput: batched across questions vs one sequence at a time, on CPU.

Runs the evaluation's agent loop (greedy, tools live, the action grammar) with the offline default
SmolLM2-135M in-process over the demo math questions, once with request batching across questions
and once with batches of one, and reports generated tokens per second. No call cache: every token
is generated.

    .venv/bin/python benchmarks/eval_local_batching.py [--questions 12] [--max-steps 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swirl_core.agent import Agent  # noqa: E402
from swirl_core.config import ModelConfig  # noqa: E402
from swirl_core.generation import policy_spec  # noqa: E402
from swirl_core.llm.factory import build_client  # noqa: E402
from swirl_core.seeds import load_seeds  # noqa: E402
from swirl_core.tools.calculator import Calculator  # noqa: E402


async def measure(batch: int, questions, max_steps: int, max_tokens: int) -> dict:
    cfg = ModelConfig(temperature=0.0, local_batch_size=batch, max_tokens=max_tokens, concurrency=256)
    client = build_client(cfg, None)  # no journal: nothing replays
    agent = Agent(client, policy_spec(cfg, "math", max_steps, "bench"), {"math": Calculator()})
    try:
        await agent.run_many([(questions[0], 0)])  # warm-up: load weights, first prefill
        start = time.perf_counter()
        trajectories = await agent.run_many([(q, 0) for q in questions])
        wall = time.perf_counter() - start
    finally:
        await client.aclose()
    tokens = sum(s.completion_tokens or 0 for t in trajectories for s in t.steps)
    steps = sum(len(t.steps) for t in trajectories)
    return {"batch": batch, "questions": len(questions), "steps": steps, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "answers": [t.final_answer for t in trajectories]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    questions = load_seeds("demo-math", limit=args.questions).questions
    batched = asyncio.run(measure(args.batch, questions, args.max_steps, args.max_tokens))
    single = asyncio.run(measure(1, questions, args.max_steps, args.max_tokens))
    for r in (single, batched):
        print(f"batch={r['batch']:>3}: {r['questions']} questions, {r['steps']} steps, {r['tokens']} tokens "
              f"in {r['wall_s']:.1f} s = {r['tokens_per_s']:.1f} tokens/s")
    same = batched["answers"] == single["answers"]
    print(f"speed-up {batched['tokens_per_s'] / single['tokens_per_s']:.2f}x; identical greedy answers: {same}")


if __name__ == "__main__":
    main()
