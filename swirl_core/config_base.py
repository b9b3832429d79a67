"""The base of every config, and the workspace: the lowest layer, imported by llm/, training/ and config.py alike."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from swirl_core.records import StepProtocol

DEFAULT_DB = "swirl.duckdb"


class StrictConfig(BaseModel):
    """Unknown keys are errors: a YAML `generate: {sample: 10}` or a deployment form with a misspelt field fails
    naming the key, instead of running silently with the default."""

    model_config = ConfigDict(extra="forbid")


class ActionProtocol(StrictConfig):
    """A config whose steps follow one protocol: generation and evaluation (which the policy speaks), training
    (which steps it learns from)."""

    protocol: StepProtocol = Field(StepProtocol.TAGS, description="how the policy calls tools: tags (the paper's "
                                   "<search_query>/<math_exp>/<answer>) or tools (native function calling)")


class Workspace(StrictConfig):
    """A config that names a database (`db`) and its work folder (`work_dir`: journals, shards, reports)."""

    db: str = Field(DEFAULT_DB, description="DuckDB file")
    work_dir: str | None = Field(None, description="journals, shards, checkpoints and reports; default: <db>.work beside the database")

    @property
    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.db).with_suffix(".work")

    @property
    def journal_dir(self) -> Path:
        """The call journals: every LLM response, so a rerun pays for nothing twice."""
        return self.resolved_work_dir / "journal"

