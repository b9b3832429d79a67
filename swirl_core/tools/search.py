"""BM25 search tool: `<search_query> QUERY </search_query>` -> the retrieved article(s).

SWiRL (arXiv 2504.04736) feeds the top retrieved paragraph back to the model as the observation.
The index is built once per corpus content and cached on disk, because many Dask workers build
tools over the same corpus and re-tokenising tens of thousands of paragraphs each time is waste.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import bm25s
import numpy as np

from swirl_core.hashing import content_hash
from swirl_core.records import Paragraph
from swirl_core.tools import ToolResult

logger = logging.getLogger(__name__)

try:  # Stemming helps recall, but PyStemmer is optional: never a hard dependency.
    import Stemmer  # type: ignore[import-not-found]

    _STEMMER = Stemmer.Stemmer("english")
except ImportError:  # pragma: no cover - depends on the environment
    _STEMMER = None

# Part of the cache key: an index tokenised with a stemmer is useless to a process without one.
_TOKENIZER_VARIANT = f"bm25s{bm25s.__version__}-en-{'stem' if _STEMMER else 'nostem'}"
_QUOTES = "\"'`“”‘’«»"


class CorpusError(ValueError):
    """A corpus file that cannot be read as `{title, text}` paragraphs."""


def _check_row(row: object, where: str) -> Paragraph:
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("title", "text"):
        if not isinstance(row.get(key), str):
            raise CorpusError(f"{where}: missing or non-string field {key!r}")
    return Paragraph(title=row["title"], text=row["text"])


def _iter_jsonl(path: Path) -> Iterator[Paragraph]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            yield _check_row(row, f"{path}:{lineno}")


def _iter_parquet(path: Path) -> Iterator[Paragraph]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    missing = {"title", "text"} - set(pf.schema_arrow.names)
    if missing:
        raise CorpusError(f"{path}: missing column(s) {sorted(missing)}")
    row_index = 0
    for batch in pf.iter_batches(columns=["title", "text"], batch_size=8192):
        for row in batch.to_pylist():
            yield _check_row(row, f"{path}: row {row_index}")
            row_index += 1


def load_corpus(path: str | Path) -> list[Paragraph]:
    """Read `{title, text}` paragraphs from .jsonl or .parquet (other columns ignored)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found")
    if path.suffix == ".jsonl":
        paragraphs = list(_iter_jsonl(path))
    elif path.suffix == ".parquet":
        paragraphs = list(_iter_parquet(path))
    else:
        raise CorpusError(f"{path}: unsupported corpus format (expected .jsonl or .parquet)")
    if not paragraphs:
        raise CorpusError(f"{path}: corpus is empty")
    return paragraphs


def corpus_hash(paragraphs: Sequence[Paragraph]) -> str:
    """Content hash of all titles+texts, streamed (no giant JSON string for a large corpus)."""
    h = hashlib.blake2b(digest_size=16)
    for p in paragraphs:
        for field in (p.title, p.text):
            data = field.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))  # length prefix: no ambiguous concatenation
            h.update(data)
    return h.hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("SWIRL_CACHE_DIR")
    return Path(env) / "bm25" if env else Path.home() / ".cache" / "swirl" / "bm25"


def _tokenize(texts: list[str], return_ids: bool) -> object:
    return bm25s.tokenize(
        texts, stopwords="en", stemmer=_STEMMER, return_ids=return_ids, show_progress=False
    )


class SearchTool:
    """BM25 over "title + text" paragraphs; the observation is the top-k paragraphs as text."""

    name = "search"

    def __init__(
        self,
        paragraphs: Sequence[Paragraph],
        *,
        k: int = 1,
        cache_dir: str | Path | None = None,
        max_chars: int = 4000,
    ) -> None:
        if not paragraphs:
            raise ValueError("SearchTool needs a non-empty corpus")
        if k < 1 or max_chars < 1:
            raise ValueError(f"k and max_chars must be >= 1 (got k={k}, max_chars={max_chars})")
        self.paragraphs: list[Paragraph] = list(paragraphs)
        self.k = k
        self.max_chars = max_chars
        self.corpus_hash = corpus_hash(self.paragraphs)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.index_dir = self.cache_dir / f"{self.corpus_hash}-{_TOKENIZER_VARIANT}"
        self.loaded_from_cache = False
        self._retriever = self._load_or_build()

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        k: int = 1,
        cache_dir: str | Path | None = None,
        max_chars: int = 4000,
    ) -> SearchTool:
        return cls(load_corpus(path), k=k, cache_dir=cache_dir, max_chars=max_chars)

    @property
    def fingerprint(self) -> str:
        return content_hash("search", self.corpus_hash, _TOKENIZER_VARIANT, self.k, self.max_chars)

    def _load_or_build(self) -> bm25s.BM25:
        if self.index_dir.is_dir():
            try:
                retriever = bm25s.BM25.load(self.index_dir)
                if retriever.scores["num_docs"] == len(self.paragraphs):
                    self.loaded_from_cache = True
                    return retriever
                logger.warning("BM25 cache %s has the wrong size; rebuilding", self.index_dir)
            except Exception as e:  # a damaged cache must not break search: rebuild in memory
                logger.warning("BM25 cache %s unreadable (%s); rebuilding", self.index_dir, e)
            return self._build()
        retriever = self._build()
        self._save_atomically(retriever)
        return retriever

    def _build(self) -> bm25s.BM25:
        docs = [f"{p.title}\n{p.text}" for p in self.paragraphs]
        retriever = bm25s.BM25()
        retriever.index(_tokenize(docs, return_ids=True), show_progress=False)
        return retriever

    def _save_atomically(self, retriever: bm25s.BM25) -> None:
        # Several worker processes may build the same index at once: each writes a private temp
        # dir next to the target and renames it in; the final dir only ever appears complete.
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.index_dir.name}.", dir=self.cache_dir))
        except OSError as e:
            logger.warning("cannot write BM25 cache in %s: %s", self.cache_dir, e)
            return
        try:
            retriever.save(tmp, show_progress=False)
            os.rename(tmp, self.index_dir)
        except OSError:
            if not self.index_dir.is_dir():  # not a lost race: a real failure, but search works
                logger.warning("could not save BM25 cache to %s", self.index_dir, exc_info=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def search(self, query: str, k: int | None = None) -> list[tuple[Paragraph, float]]:
        """Top-k (paragraph, score) pairs with score > 0, best first."""
        k = min(k or self.k, len(self.paragraphs))
        tokens = _tokenize([query], return_ids=False)[0]  # type: ignore[index]
        vocab = self._retriever.vocab_dict
        ids = [vocab[t] for t in tokens if t in vocab]
        if not ids:
            return []
        # The index is read-only after construction and n_threads=0 runs in the calling thread
        # (no pool per call), so concurrent searches from threads need no lock.
        docs, scores = self._retriever.retrieve(
            [ids], k=k, n_threads=0, show_progress=False, backend_selection="numpy"
        )
        return [
            (self.paragraphs[int(i)], float(s))
            for i, s in zip(docs[0], scores[0], strict=True)
            if s > 0 and np.isfinite(s)
        ]

    def __call__(self, tool_input: str) -> ToolResult:
        try:
            query = str(tool_input).strip().strip(_QUOTES).strip()
            if not query:
                return ToolResult("Search error: empty query", error=True)
            hits = self.search(query)
            if not hits:
                return ToolResult(f"No results found for: {query}")
            text = "\n\n".join(f"{p.title}: {p.text}" for p, _ in hits)
            return ToolResult(text[: self.max_chars])
        except Exception as e:  # the observation goes back to the model; a tool never raises
            logger.exception("search failed for %r", tool_input)
            return ToolResult(f"Search error: {type(e).__name__}: {e}", error=True)
