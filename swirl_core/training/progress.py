"""Live training progress: a trainer callback that hands every logged step to a sink.

In the flow's own process the sink updates the Prefect progress artifact directly; under `accelerate
launch` the main process appends the events to a JSON-lines file that the supervising process tails.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ProgressSink = Callable[[dict[str, Any]], None]
# What the progress artifact shows and the run's curves draw.
WATCHED_METRICS = ("loss", "reward", "kl", "frac_reward_zero_std")


def progress_event(step: int, max_steps: int, logs: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "max_steps": max_steps,
            **{k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}


def progress_callback(sink: ProgressSink) -> Any:
    """A `TrainerCallback` calling `sink` with each logged step's metrics, on the main process only."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "train_runtime" not in logs:  # not the end-of-run summary
                sink(progress_event(state.global_step, state.max_steps, logs))

    return _Progress()


class ProgressFile:
    """Events as JSON lines: the launched main process appends, the supervisor reads what is new."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offset = 0

    def __call__(self, event: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]
