"""Tools the policy can call. A tool maps the text inside an action tag to an observation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ToolResult:
    """What a tool returns: the observation text shown to the model, and whether it is an error.

    Errors are observations too (the model sees them and may correct itself); they never raise.
    """

    output: str
    error: bool = False


class Tool(Protocol):
    name: str  # the action kind it serves: "search" or "math"

    def __call__(self, tool_input: str) -> ToolResult: ...
