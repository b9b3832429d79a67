"""Prefect tasks: thin wrappers around `swirl_core` calls (retries, names, logging)."""
