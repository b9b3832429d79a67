"""Deterministic content hashes used as primary keys and cache keys."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical_json(value: Any) -> bytes:
    """Compact JSON with sorted keys: the same value always gives the same bytes."""
    return orjson.dumps(value, option=_OPTIONS, default=str)


def content_hash(*parts: Any, length: int = 32) -> str:
    """A stable hex digest of JSON-serialisable parts (order matters, dict key order does not)."""
    return hashlib.blake2b(canonical_json(parts), digest_size=length // 2).hexdigest()
