"""Tasks of the publish flow."""

from __future__ import annotations

from prefect import task

from swirl_core.hub import upload_folder


@task(name="upload-to-hub", retries=2, retry_delay_seconds=10)
def upload(folder: str, repo_id: str, private: bool, token: str | None) -> dict:
    return upload_folder(folder, repo_id, token=token, private=private)
