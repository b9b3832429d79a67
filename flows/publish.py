"""The `publish` flow: curated sets → a `datasets`-loadable Hub folder with a card → the Hub."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.runtime import database_slot
from swirl_core.config import PublishConfig
from swirl_core.hub import contamination, dataset_card, export_folder, validate_card, write_run_config
from swirl_core.store import Store
from tasks.artifacts import publish_markdown
from tasks.publish import hub_token, upload


@flow(name="publish", log_prints=True)
def publish(config: PublishConfig) -> dict[str, Any]:
    logger = get_run_logger()
    folder = config.resolved_out_dir
    with database_slot(config.db), Store(config.db, read_only=True) as store:
        summary = export_folder(store.con, folder)
        report = contamination(store.con, tuple(config.eval_splits))
        write_run_config(store.con, folder)
        card = dataset_card(store.con, summary, config.repo_id, report)
    card.save(folder / "README.md")
    logger.info("exported %s to %s", {c: sum(v.values()) for c, v in summary.rows.items()}, folder)
    result: dict[str, Any] = {"folder": str(folder), "rows": summary.rows, "contamination": report,
                              "repo_id": config.repo_id, "uploaded": False}
    if not config.dry_run:
        validate_card(card)  # a card the Hub refuses stops here, with the folder exported and nothing uploaded
        result |= upload(str(folder), config.repo_id, config.private, hub_token(config.token_secret)) | {"uploaded": True}
    publish_markdown("publish", card.text, f"dataset card for {config.repo_id}", name="card")
    return result
