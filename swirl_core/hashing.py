"""Deterministic content hashes used as primary keys and cache keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(*parts: Any, length: int = 32) -> str:
    """A stable hex digest of JSON-serialisable parts (order matters, dict key order does not)."""
    return hashlib.blake2b(canonical_json(parts).encode("utf-8"), digest_size=length // 2).hexdigest()
