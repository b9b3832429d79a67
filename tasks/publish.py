"""Tasks of the publish flow."""

from __future__ import annotations

from prefect import task

from swirl_core.hub import upload_folder
from tasks.secrets import read_secret


def hub_token(secret_name: str | None) -> str | None:
    """The token of a Prefect Secret block, or None: huggingface_hub then reads HF_TOKEN (or the saved login)."""
    return read_secret(secret_name) if secret_name else None


@task(name="upload-to-hub", retries=2, retry_delay_seconds=10)
def upload(folder: str, repo_id: str, private: bool, token: str | None) -> dict:
    return upload_folder(folder, repo_id, token=token, private=private)
