"""Prefect flows composed from tasks; `swirl` (flows/cli.py) drives them."""
