"""On a GPU machine: SFT, TRL's plain GRPO and SWiRL's judge-rewarded GRPO, vLLM sampling, seconds per step.

Run through benchmarks/gpu_check.sh (it installs a vLLM-capable environment first). The model is the
largest causal LM in the local Hugging Face cache (offline), else the converted SmolLM2; `--model`
names another. The data is the tests' small curated DuckDB; the judge is the scripted OpenAI-compatible
server in its own process with a fixed latency (or a real one: --judge-api-base), over real HTTP.
Plain GRPO and SWiRL GRPO run the same config (model, batch, group, completion length, vLLM); only the
reward differs: a local format check alone, or the judge's P(GOOD)/verdict plus the format check.

    bash benchmarks/gpu_check.sh [--steps 6] [--judge-latency 0.2] [--model PATH_OR_HUB_ID] [--no-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import build_labeled_db  # noqa: E402
from scripted_server import start_subprocess  # noqa: E402

from swirl_core.config import ModelConfig  # noqa: E402
from swirl_core.store import Store  # noqa: E402
from swirl_core.training.data import rl_dataset, sft_dataset  # noqa: E402
from swirl_core.training.rewards import JudgeReward, format_reward  # noqa: E402
from swirl_core.training.trainers import TrainSettings, sft_trainer, swirl_trainer  # noqa: E402


def largest_cached_model() -> str:
    """The biggest model repo in the local HF cache that has a config (offline), else SmolLM2."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = [r for r in scan_cache_dir().repos if r.repo_type == "model"
                 and any(f.file_name == "config.json" for rev in r.revisions for f in rev.files)]
    except Exception:  # no cache folder at all
        repos = []
    return max(repos, key=lambda r: r.size_on_disk).repo_id if repos else "smollm2"


def step_times(trainer) -> list[float]:
    from transformers import TrainerCallback

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Timer())
    trainer.train()
    for func in getattr(trainer, "reward_funcs", []):  # the judge's one client lives on TRL's event loop
        if hasattr(func, "aclose"):
            asyncio.run_coroutine_threadsafe(func.aclose(), trainer.async_loop).result()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the largest model in the local HF cache")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="completions per device per step")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--completion-tokens", type=int, default=256)
    p.add_argument("--judge-latency", type=float, default=0.2)
    p.add_argument("--judge-api-base", help="a real OpenAI-compatible judge instead of the scripted one")
    p.add_argument("--judge-model", default="openai/judge")
    p.add_argument("--vllm-mode", choices=["colocate", "server"], default="colocate")
    p.add_argument("--no-vllm", action="store_true", help="sample with transformers (a CPU smoke run)")
    p.add_argument("--lora", action="store_true")
    args = p.parse_args()
    import torch

    model = args.model or largest_cached_model()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    tmp = Path(tempfile.mkdtemp(prefix="swirl-gpu-check-"))
    build_labeled_db(tmp / "db.duckdb")
    with Store(tmp / "db.duckdb", read_only=True) as store:
        rl = rl_dataset(store.con, "none", out_dir=tmp / "rl").dataset
        sft = sft_dataset(store.con, "none", out_dir=tmp / "sft").dataset
    proc, base_url = (None, args.judge_api_base) if args.judge_api_base else \
        start_subprocess(latency=args.judge_latency, default="The step follows from the question. GOOD")
    rows = []
    try:
        common = {"base_model": model, "max_steps": args.steps, "per_device_batch_size": args.batch,
                  "save_steps": args.steps, "use_lora": args.lora}
        timer = step_times(sft_trainer(TrainSettings(method="sft", output_dir=str(tmp / "sft-out"), **common), sft))
        rows.append(("SFT", timer, None))
        rl_settings = TrainSettings(method="swirl", num_generations=args.generations,
                                    max_completion_length=args.completion_tokens, use_vllm=not args.no_vllm,
                                    vllm_mode=args.vllm_mode, output_dir=str(tmp / "grpo-out"), **common)
        # The test data are QA states: sampled under generation's action constraint (regex with vLLM).
        plain = swirl_trainer(rl_settings, rl, [format_reward], sampling_task="qa")
        rows.append(("TRL GRPO (format reward)", step_times(plain), None))
        del plain
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        judge = JudgeReward(ModelConfig(model=args.judge_model, api_base=base_url, temperature=0.0), None)
        swirl = swirl_trainer(rl_settings.model_copy(update={"output_dir": str(tmp / "swirl-out")}), rl,
                              [judge, format_reward], sampling_task="qa")
        rows.append(("SWiRL GRPO (judge reward)", step_times(swirl), judge))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    sampler = "transformers" if args.no_vllm else f"vLLM {args.vllm_mode}"
    print(f"\n{device}; model {model}; {args.batch} completions/step ({args.generations} per state) × "
          f"{args.completion_tokens} tokens; sampling: {sampler}; judge latency {args.judge_latency:.2f} s")
    print(f"{'run':<28} {'steps':>5} {'s/step (median, after the 1st)':>31} {'judge wait share':>17}")
    for name, times, reward in rows:
        steady = times[1:] or times
        share = f"{reward.wait_s / sum(times):.1%}" if reward else "–"
        print(f"{name:<28} {len(times):>5} {statistics.median(steady):>31.2f} {share:>17}")
    judge = rows[-1][2]
    print("judge:", json.dumps(judge.summary()))


if __name__ == "__main__":
    main()
