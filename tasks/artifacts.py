"""Prefect artifacts that summarise a run in the UI."""

from __future__ import annotations

import base64

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact

from swirl_core.training.progress import WATCHED_METRICS


def _key(text: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def publish_tables(prefix: str, run_id: str, tables: dict[str, list[dict]]) -> None:
    for name, rows in tables.items():
        if rows:
            create_table_artifact(
                key=_key(f"{prefix}-{name}"), table=[{k: _plain(v) for k, v in r.items()} for r in rows],
                description=f"{prefix} run {run_id}: {name.replace('_', ' ')}",
            )


def publish_markdown(prefix: str, markdown: str, description: str, name: str = "summary") -> None:
    create_markdown_artifact(key=_key(f"{prefix}-{name}"), markdown=markdown, description=description)


def progress_tracker(key: str, description: str):
    """A progress artifact (percent of max_steps) and the sink that moves it with each training event; its
    description shows the step and the latest loss, reward, KL and share of zero-variance groups."""
    artifact = create_progress_artifact(0.0, key=_key(key), description=description)

    def update(event: dict) -> None:
        shown = {k: event[k] for k in WATCHED_METRICS if k in event}
        line = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
        update_progress_artifact(artifact, 100.0 * event["step"] / max(event["max_steps"], 1),
                                 description=f"{description}: step {event['step']}/{event['max_steps']}" + (f"; {line}" if line else ""))

    return update


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown that shows a PNG inline (a data URI: artifacts hold no files)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _plain(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
