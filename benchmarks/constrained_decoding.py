"""The in-process action grammar on the demo: parse rate and speed of constrained generation.

Runs generation's agent loop (the demo's settings: SmolLM2-135M in-process, temperature 0.7, 64 tokens a
step, the action grammar, few-shot prompts) over the demo math questions (calculator live) and the demo QA
questions (no search tool: every search gets a tool error back, the same for every run), K samples each,
with a fixed seed and no call journal, so every token is generated. It reports the share of steps that parse
as one action, steps/s and generated tokens/s. Only the public API is used, so the same script measures any
checkout (run it from an older one to compare grammar implementations).

    .venv/bin/python benchmarks/constrained_decoding.py [--samples 2] [--max-steps 4] [--repeats 2]
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


async def measure(task: str, samples: int, max_steps: int, limit: int | None) -> dict:
    import torch

    torch.manual_seed(0)
    cfg = ModelConfig(temperature=0.7, concurrency=256)
    client = build_client(cfg, None)  # no journal: nothing replays
    tools = {"math": Calculator()} if task == "math" else {}
    questions = load_seeds(f"demo-{task}", limit=limit).questions
    agent = Agent(client, policy_spec(cfg, task, max_steps, "bench"), tools)
    try:
        await agent.run_many([(questions[0], 99)])  # warm-up: weights, first prefill, grammar compilation
        start = time.perf_counter()
        trajectories = await agent.run_many([(q, k) for q in questions for k in range(samples)])
        wall = time.perf_counter() - start
    finally:
        await client.aclose()
    steps = [s for t in trajectories for s in t.steps]
    return {"task": task, "steps": len(steps), "example": steps[0].message if steps else "", "parsed": sum(s.action.kind != "invalid" for s in steps),
            "tokens": sum(s.completion_tokens or 0 for s in steps), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--questions", type=int, help="the first N demo questions of each task (default: all 12)")
    parser.add_argument("--tasks", nargs="+", default=["math", "qa"], choices=["math", "qa"])
    parser.add_argument("--reasoning-share", type=float,
                        help="the share of a step's tokens the in-process grammar gives reasoning (default: the factory's)")
    args = parser.parse_args()
    if args.reasoning_share is not None:
        import swirl_core.constraints

        swirl_core.constraints.REASONING_SHARE = args.reasoning_share
    for task in args.tasks:
        runs = [asyncio.run(measure(task, args.samples, args.max_steps, args.questions)) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["wall_s"])
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        print(f"{task}: {best['parsed']}/{best['steps']} steps parse ({best['parsed'] / best['steps']:.1%}), "
              f"{best['tokens']} tokens in {best['wall_s']:.1f} s (best of {args.repeats}) = "
              f"{best['steps'] / best['wall_s']:.2f} steps/s, {best['tokens'] / best['wall_s']:.1f} tokens/s; "
              f"all walls: {walls}; e.g. {best['example']!r}", flush=True)


if __name__ == "__main__":
    main()
