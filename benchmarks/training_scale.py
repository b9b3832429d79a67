"""CPU seconds per training step with 1 and 2 processes (`accelerate launch`, gloo), and what a SIGKILL costs.

Each run is a fresh process training the tiny random Llama the tests use (SmolLM2's real tokenizer) on a
small curated DuckDB with SFT (no judge: the step is all model work). CPU seconds count every process
of the run (the launcher and both ranks). Resume overhead: a run killed right after its checkpoint at
`--kill-after`, then the same run again; the overhead is the restarted run's time to its first step beyond
a fresh run's time to its first step (loading the checkpoint's optimizer, scheduler and RNG states and
skipping the consumed batches); the kill comes right after the checkpoint, so no step is redone.

    .venv/bin/python benchmarks/training_scale.py [--steps 8] [--batch 4] [--kill-after 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import build_labeled_db, build_tiny_model  # noqa: E402

from swirl_core.training.run import TrainConfig  # noqa: E402
from swirl_core.training.trainers import TrainSettings, last_checkpoint  # noqa: E402

SCRIPT = """
import json, sys, time
from swirl_core.training.run import TrainConfig, run_training
config = TrainConfig.model_validate_json(open(sys.argv[1]).read())
def show(event):
    print("EVENT", json.dumps({**event, "t": time.time()}), flush=True)
result = run_training(config, "bench", on_progress=show)
print("RESULT", json.dumps({k: result[k] for k in ("steps", "seconds_per_step", "resumed_from", "world_size")}), flush=True)
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(config: TrainConfig, tmp: Path, kill_after: int | None = None) -> dict:
    spec = tmp / f"spec-{time.monotonic_ns()}.json"
    spec.write_text(config.model_dump_json())
    (tmp / "script.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cpu0, t0 = _children_cpu(), time.time()
    proc = subprocess.Popen([sys.executable, str(tmp / "script.py"), str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    if kill_after is not None:
        out = Path(config.settings.output_dir)
        while (ck := last_checkpoint(out)) is None or int(ck.name.split("-")[1]) < kill_after:
            time.sleep(0.02)
        os.killpg(proc.pid, 9)  # SIGKILL, the whole process group
        proc.wait()
        return {"wall_s": time.time() - t0, "cpu_s": _children_cpu() - cpu0}
    stdout, _ = proc.communicate()
    events = [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("EVENT ")]
    result = json.loads(next(line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")))
    return result | {"wall_s": time.time() - t0, "cpu_s": _children_cpu() - cpu0,
                     "first_step_s": events[0]["t"] - t0, "step_at_s": {e["step"]: e["t"] - t0 for e in events}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--kill-after", type=int, default=4, help="SIGKILL once this step's checkpoint is written")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="swirl-bench-scale-"))
    build_labeled_db(tmp / "db.duckdb")
    model = build_tiny_model(tmp / "tiny")

    def config(name: str, processes: int, save_steps: int) -> TrainConfig:
        return TrainConfig(db=str(tmp / "db.duckdb"), filter="none", progress=False, settings=TrainSettings(
            method="sft", base_model=str(model), output_dir=str(tmp / name), max_steps=args.steps,
            per_device_batch_size=args.batch, save_steps=save_steps, num_processes=processes, learning_rate=1e-4))

    print(f"SFT on the tiny Llama, {args.steps} steps, {args.batch} examples per process per step, 2 CPU cores")
    print(f"{'processes':>9} {'s/step':>7} {'examples/s':>10} {'CPU s/step':>10} {'run wall s':>10} {'run CPU s':>9}")
    for n in (1, 2):
        r = run(config(f"p{n}", n, save_steps=args.steps), tmp)
        per_step = r["seconds_per_step"]
        print(f"{n:>9} {per_step:>7.3f} {n * args.batch / per_step:>10.1f} {r['cpu_s'] / r['steps']:>10.2f} "
              f"{r['wall_s']:>10.1f} {r['cpu_s']:>9.1f}")

    fresh = run(config("fresh", 1, save_steps=args.kill_after), tmp)
    killed = run(config("killed", 1, save_steps=args.kill_after), tmp, kill_after=args.kill_after)
    resumed = run(config("killed", 1, save_steps=args.kill_after), tmp)
    step = fresh["seconds_per_step"]
    overhead = resumed["first_step_s"] - fresh["first_step_s"]
    print(f"\nresume after SIGKILL at the step-{args.kill_after} checkpoint: resumed from step {resumed['resumed_from']}, "
          f"ended at {resumed['steps']}")
    print(f"  fresh run: {fresh['first_step_s']:.1f} s to its first step, {fresh['wall_s']:.1f} s in all")
    print(f"  resumed run: {resumed['first_step_s']:.1f} s to its first step → resume overhead {overhead:+.2f} s "
          f"({overhead / step:+.1f} steps of {step:.3f} s)")
    print(f"  killed run {killed['wall_s']:.1f} s + resumed run {resumed['wall_s']:.1f} s = "
          f"{killed['wall_s'] + resumed['wall_s']:.1f} s vs {fresh['wall_s']:.1f} s uninterrupted (killed right after "
          "its checkpoint: no step is redone; the start-up is paid twice)")

if __name__ == "__main__":
    main()
