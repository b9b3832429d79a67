"""Several training processes under `accelerate launch` (DDP, DeepSpeed ZeRO or FSDP), supervised from here.

The flow's process exports the data and checks the run as usual, writes a launch spec, starts
`accelerate launch … -m swirl_core.training.launch SPEC` and waits: it passes the processes' output
through to its own terminal (the trainer's progress bar included), turns the main process's progress
file into progress events, and reports how the processes ended. Each process trains its share of every
batch (one gloo or NCCL process group); the trainer's main process alone writes checkpoints and the final
model, and every process leaves a small result file so the supervisor can tell that each one finished.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from swirl_core.training.progress import ProgressFile, ProgressSink
from swirl_core.training.run import LAUNCH_DIR, LaunchSpec, train_exported
from swirl_core.training.trainers import TrainResult

CONFIG_DIR = Path(__file__).with_name("accelerate_configs")  # ZeRO-2/3 and FSDP, for models that do not fit one GPU
ENGINE_PACKAGES = {"zero2": "deepspeed", "zero3": "deepspeed"}
SPEC_FILE, PROGRESS_FILE = "spec.json", "progress.jsonl"
OUTPUT_TAIL = 50_000  # characters of the processes' output kept for an error message
_RANK_EXIT = re.compile(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)")  # torchrun's failure summary
_ERROR_LINE = re.compile(r"^(\w+(?:Error|Exception)): (.+)$", re.MULTILINE)


class TrainingProcessError(RuntimeError):
    """A launched training process failed: the launcher's exit code and which ranks finished."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(spec_path: Path, num_processes: int, distributed: str) -> list[str]:
    """`accelerate launch` of this module's worker: DDP on the local GPUs (on CPU: one gloo process group),
    or the shipped DeepSpeed / FSDP config."""
    engine = ["--multi_gpu", "--mixed_precision", "no"] if distributed == "ddp" else \
        ["--config_file", str(CONFIG_DIR / f"{distributed}.yaml")]
    return [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_port", str(_free_port()), "--dynamo_backend", "no",
            "-m", "swirl_core.training.launch", str(spec_path)]


def launch(spec: LaunchSpec, *, on_progress: ProgressSink | None = None) -> tuple[TrainResult, dict[str, Any] | None]:
    settings = spec.request.settings
    package = ENGINE_PACKAGES.get(settings.distributed)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"distributed '{settings.distributed}' needs the {package} package: pip install {package}")
    folder = Path(settings.output_dir) / LAUNCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rank-*.json"):
        old.unlink()
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    spec_path = folder / SPEC_FILE
    spec_path.write_text(spec.model_dump_json(indent=2), encoding="utf-8")
    progress = ProgressFile(folder / PROGRESS_FILE)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the processes import this very checkout
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(accelerate_command(spec_path, settings.num_processes, settings.distributed), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL)
    pump = threading.Thread(target=_pass_through, args=(proc.stdout, tail), daemon=True)
    pump.start()
    code: int | None = None
    try:
        while code is None:
            try:
                code = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            for event in progress.read_new():  # after the exit too: the last steps' events
                if on_progress is not None:
                    on_progress(event)
    except BaseException:
        # The supervisor is going away: its processes must not train on unwatched. SIGTERM first, which
        # torchrun's agent passes on to the ranks (a SIGKILL would leave them running).
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    pump.join(timeout=10)
    ranks = {int(p.stem.split("-")[1]): json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("rank-*.json")}
    finished = sorted(ranks)
    if code != 0 or len(ranks) != settings.num_processes:
        raise TrainingProcessError(_failure(settings.num_processes, code, finished, "".join(tail)))
    main = ranks[0]
    return TrainResult(**main["result"]), _sum_rewards([r["reward"] for r in ranks.values()])


def _failure(processes: int, code: int, finished: list[int], output: str) -> str:
    """How the processes ended, from torchrun's summary, and the first error any of them raised."""
    exits = ", ".join(f"rank {r}: {c}" for r, c in sorted(set(_RANK_EXIT.findall(output))))
    errors = [f"{kind}: {text}" for kind, text in _ERROR_LINE.findall(output) if kind != "ChildFailedError"]
    return (f"accelerate launch of {processes} training processes exited with code {code}"
            + (f" ({exits})" if exits else "") + f"; ranks that finished: {finished or 'none'}"
            + (f"; first error: {errors[0]}" if errors else "") + f"; last output:\n{output[-1500:]}")


def _pass_through(stream, tail: collections.deque) -> None:
    """Copy the processes' output to this terminal as it comes (progress bars redraw in place), keeping a tail."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    for chunk in iter(lambda: stream.read1(4096), b""):
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode("utf-8", "replace"))
        tail.extend(chunk.decode("utf-8", "replace"))


def _sum_rewards(summaries: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Every process judged its share of each batch: the run's reward counts are their sums."""
    if not summaries or summaries[0] is None:
        return None
    return {k: round(sum(s[k] for s in summaries), 4) if isinstance(summaries[0][k], float) else sum(s[k] for s in summaries)
            for k in summaries[0]}


def worker(spec_path: str) -> None:
    """One launched process: train its share and leave its result (rank, world size, steps, reward counts)."""
    import torch.distributed as dist

    folder = Path(spec_path).parent
    spec = LaunchSpec.model_validate_json(Path(spec_path).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    result, reward = train_exported(spec, on_progress=ProgressFile(folder / PROGRESS_FILE) if rank == 0 else None)
    backend = dist.get_backend() if dist.is_initialized() else None
    record = {"rank": rank, "world_size": result.world_size, "backend": backend, "pid": os.getpid(),
              "result": result.__dict__, "reward": reward}
    tmp = folder / f"rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(record, default=str), encoding="utf-8")
    tmp.replace(folder / f"rank-{rank}.json")


if __name__ == "__main__":
    worker(sys.argv[1])
