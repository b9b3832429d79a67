"""Prefect Secret blocks: the one place a named secret is read (API keys, the Hub token)."""

from __future__ import annotations


def read_secret(name: str) -> str:
    from prefect.blocks.system import Secret

    try:
        # _sync: the LLM client is built inside an event loop, where `load` would return a coroutine.
        return Secret.load(name, _sync=True).get()
    except ValueError as exc:  # Prefect: "Unable to find block document named …"
        raise ValueError(f"no Prefect Secret block named {name!r}: create it in the UI (Blocks → Secret) "
                         "or with prefect.blocks.system.Secret(value=...).save(name)") from exc
