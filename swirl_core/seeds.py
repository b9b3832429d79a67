"""Seed question loaders: local files or the Hugging Face Hub -> validated `Question` records.

Every row is adapted and validated here, before anything downstream (and before any LLM call)
sees it. Row positions in messages and `Question.source`:

* ``FILE:line N`` -- JSON lines, N is the 1-based line number (what an editor shows);
* ``FILE:row N``  -- JSON lists and parquet, N is the 0-based index into the list/table;
* ``hub:NAME/CONFIG/SPLIT:row N`` -- Hub datasets, N is the 0-based index into the split.

A question must be a string of at most `MAX_QUESTION_CHARS` characters: a longer one is a broken row
(it could never fit a model's context), rejected like any other invalid row, naming file and row.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from swirl_core.records import InvalidRow, Paragraph, Question, TaskKind

log = logging.getLogger(__name__)

Row = dict[str, Any]
Adapter = Callable[[Row], dict[str, Any]]

_PARQUET_BATCH_ROWS = 1024
MAX_QUESTION_CHARS = 100_000
_HUB_BATCH_ROWS = 1024


class SeedError(ValueError):
    """A seed file or row is unusable; the message names the file (or hub dataset) and the row."""


@dataclass
class SeedLoadResult:
    questions: list[Question]
    invalid: list[InvalidRow] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: TaskKind
    max_steps: int  # default step cap for rollouts on this dataset
    hub_name: str | None
    hub_config: str | None
    adapter: Adapter
    # Files the project ships per split (the offline demo): used when neither data_files nor a Hub name is given.
    default_files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_corpus: str | None = None


# --------------------------------------------------------------------------- field helpers


def _require(row: Row, *keys: str) -> Any:
    """The first present, non-None field among `keys` (aliases), else a clear error."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    names = " or ".join(repr(k) for k in keys)
    raise ValueError(f"missing field {names}")


def _optional(row: Row, *keys: str) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _text(value: Any, what: str) -> str:
    """A non-empty string; numbers are coerced because some datasets store numeric answers."""
    if isinstance(value, bool) or value is None:  # bool is an int subclass: "True" is no answer
        raise ValueError(f"{what} must be a string, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 3.0 -> "3", matching how gold answers are written
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise ValueError(f"{what} is empty")
    return value


def _question(row: Row) -> str:
    """The row's question: a string (never a coerced number), at most MAX_QUESTION_CHARS characters."""
    value = _require(row, "question")
    if not isinstance(value, str):
        raise ValueError(f"question must be a string, got {type(value).__name__}")
    if len(value) > MAX_QUESTION_CHARS:
        raise ValueError(f"question is {len(value):,} characters, over the limit of {MAX_QUESTION_CHARS:,}")
    return _text(value, "question")


def _aliases(values: Any, answer: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str | int | float):
        values = [values]
    if not isinstance(values, list | tuple):
        raise ValueError(f"answer aliases must be a list, got {type(values).__name__}")
    out: list[str] = []
    for v in values:
        s = _text(v, "answer alias")
        if s != answer and s not in out:
            out.append(s)
    return tuple(out)


def _join_sentences(sentences: Any) -> str:
    # HotpotQA sentences keep their own leading whitespace (" He is ...") and some splits fall
    # mid-token ('com is ...'), so plain concatenation restores the Wikipedia paragraph exactly
    # (it matches the shared search corpus text byte for byte).
    if isinstance(sentences, str):
        return sentences
    return "".join(str(s) for s in sentences)


def _context(value: Any) -> tuple[Paragraph, ...]:
    """Context paragraphs from any of the shapes the supported datasets use:

    * ``[[title, [sentence, ...]], ...]`` (HotpotQA original) or ``[[title, text], ...]`` (BeerQA);
    * ``{"title": [...], "sentences": [[...], ...]}`` (HotpotQA on the Hub, columnar);
    * ``[{"title", "text" | "paragraph_text" | "sentences"}, ...]`` (MuSiQue, generic);
    * ``["text", ...]`` (untitled paragraphs).
    """
    if value is None:
        return ()
    if isinstance(value, dict):
        titles = value.get("title")
        bodies = value.get("sentences", value.get("text"))
        if not isinstance(titles, list) or not isinstance(bodies, list) or len(titles) != len(bodies):
            raise ValueError("context dict needs equal-length 'title' and 'sentences' lists")
        value = [[t, b] for t, b in zip(titles, bodies)]
    if not isinstance(value, list | tuple):
        raise ValueError(f"context must be a list, got {type(value).__name__}")
    out: list[Paragraph] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            title, body = "", item
        elif isinstance(item, dict):
            title = item.get("title") or ""
            body = _optional(item, "text", "paragraph_text", "sentences")
        elif isinstance(item, list | tuple) and len(item) == 2:
            title, body = item
        else:
            raise ValueError(f"context[{i}] is not a paragraph: {str(item)[:80]!r}")
        if body is None:
            raise ValueError(f"context[{i}] has no text")
        out.append(Paragraph(title=str(title), text=_join_sentences(body)))
    return tuple(out)


def _supporting_facts(value: Any) -> list[list[Any]]:
    # Normalise the Hub's columnar {"title": [...], "sent_id": [...]} to the original pairs.
    if isinstance(value, dict):
        return [[t, s] for t, s in zip(value.get("title") or [], value.get("sent_id") or [])]
    return [list(x) for x in value or []]


# --------------------------------------------------------------------------- row adapters


def adapt_gsm8k(row: Row) -> dict[str, Any]:
    question = _question(row)
    solution = _text(_require(row, "answer"), "answer")
    if "####" not in solution:
        raise ValueError("answer has no '#### N' final line")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").strip()
    if not gold:
        raise ValueError("answer has nothing after '####'")
    # GSM8K rows carry no id: the loader then uses the row index as source_id.
    return {"question": question, "answer": gold, "metadata": {"solution": solution}}


def adapt_hotpotqa(row: Row) -> dict[str, Any]:
    answer = _text(_require(row, "answer"), "answer")
    return {
        "source_id": str(_require(row, "_id", "id")),
        "question": _question(row),
        "answer": answer,
        "metadata": {
            "type": row.get("type"),
            "level": row.get("level"),
            "supporting_facts": _supporting_facts(row.get("supporting_facts")),
        },
        "context": _context(_require(row, "context")),
    }


def adapt_musique(row: Row) -> dict[str, Any]:
    answer = _text(_require(row, "answer"), "answer")
    paragraphs = _require(row, "paragraphs")
    return {
        "source_id": str(_require(row, "id")),
        "question": _question(row),
        "answer": answer,
        "answer_aliases": _aliases(row.get("answer_aliases"), answer),
        "metadata": {
            "question_decomposition": row.get("question_decomposition") or [],
            "answerable": row.get("answerable"),
            "supporting_titles": [
                p.get("title") for p in paragraphs if isinstance(p, dict) and p.get("is_supporting")
            ],
        },
        "context": _context(paragraphs),
    }


def adapt_beerqa(row: Row) -> dict[str, Any]:
    answers = _require(row, "answers")
    if not isinstance(answers, list) or not answers:
        raise ValueError("'answers' must be a non-empty list")
    answer = _text(answers[0], "answer")
    return {
        "source_id": str(_require(row, "id")),
        "question": _question(row),
        "answer": answer,
        "answer_aliases": _aliases(answers[1:], answer),
        "metadata": {"src": row.get("src")},
        "context": _context(row.get("context")),
    }


def adapt_generic(row: Row) -> dict[str, Any]:
    answer = _text(_require(row, "answer"), "answer")
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("'metadata' must be an object")
    out: dict[str, Any] = {
        "question": _question(row),
        "answer": answer,
        "answer_aliases": _aliases(_optional(row, "answer_aliases", "aliases"), answer),
        "metadata": metadata,
        "context": _context(row.get("context")),
    }
    if row.get("id") is not None:
        out["source_id"] = str(row["id"])
    return out


# CofCA is not published in a public repository, so its real schema is unknown offline. We assume
# a generic-like shape -- `question`, `answer`, optional `id`, `answer_aliases`/`aliases` and
# `context` as [{title, text}] or [[title, text]] -- which covers the released JSON as described
# in the paper; a differing schema should fail loudly here rather than load garbage.
adapt_cofca = adapt_generic


DEMO_DIR = Path(__file__).resolve().parent / "demo_data"

DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec("gsm8k", "math", 10, "openai/gsm8k", "main", adapt_gsm8k),
        DatasetSpec("hotpotqa", "qa", 5, "hotpotqa/hotpot_qa", "distractor", adapt_hotpotqa),
        DatasetSpec("musique", "qa", 5, "dgslibisey/MuSiQue", None, adapt_musique),
        DatasetSpec("beerqa", "qa", 5, None, None, adapt_beerqa),
        DatasetSpec("cofca", "qa", 5, None, None, adapt_cofca),
        DatasetSpec("generic", "qa", 5, None, None, adapt_generic),
        DatasetSpec("demo-math", "math", 10, None, None, adapt_gsm8k, {
            "train": (str(DEMO_DIR / "demo_math.jsonl"),), "test": (str(DEMO_DIR / "demo_math_test.jsonl"),)}),
        DatasetSpec(
            "demo-qa", "qa", 5, None, None, adapt_generic,
            {"train": (str(DEMO_DIR / "demo_qa.jsonl"),)}, str(DEMO_DIR / "demo_corpus.jsonl"),
        ),
    )
}


# --------------------------------------------------------------------------- readers
# Each reader yields (position label, row index, row-or-error). The label is "line N" or
# "row N"; the index counts every row in file order and is the fallback source_id. A row that
# cannot even be parsed is yielded as an Exception so the loader can skip or raise uniformly.

_Item = tuple[str, int, "Row | Exception"]


def _read_jsonl(lines: Iterable[str], first_index: int) -> Iterator[_Item]:
    index = first_index
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            line.encode("utf-8")  # bytes that were not UTF-8 arrive as lone surrogates (surrogateescape)
            row: Row | Exception = json.loads(line)
        except UnicodeEncodeError as e:
            row = ValueError(f"not valid UTF-8 (at character {e.start + 1} of the line)")
        except json.JSONDecodeError as e:
            row = ValueError(f"not valid JSON ({e.msg} at column {e.colno})")
        yield f"line {lineno}", index, row
        index += 1


def _read_jsonl_file(path: Path, first_index: int) -> Iterator[_Item]:
    # Streamed line by line, so `limit` never reads past the rows it needs; a line that is not UTF-8 is
    # reported by its number like any other bad line.
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        yield from _read_jsonl(f, first_index)


def _read_json(path: Path, first_index: int) -> Iterator[_Item]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SeedError(f"{path}: not valid UTF-8 (byte {e.start} of the file)") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        # JSON lines saved as .json: fall back, so bad lines are still reported by number.
        if text.lstrip().startswith("{") and e.msg == "Extra data":
            yield from _read_jsonl(text.splitlines(), first_index)
            return
        raise SeedError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]  # BeerQA-style wrapper {version, split, data: [...]}
    if not isinstance(doc, list):
        raise SeedError(f"{path}: expected a JSON list or an object with a 'data' list")
    for i, row in enumerate(doc):
        yield f"row {i}", first_index + i, row


def _read_parquet(path: Path, first_index: int) -> Iterator[_Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Record batches keep memory bounded and let `limit` stop reading early.
    i = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        for batch in batches:
            for row in batch.to_pylist():
                yield f"row {i}", first_index + i, row
                i += 1
    except (pa.ArrowException, OSError) as e:  # not Parquet, truncated, corrupt: name the file (pyarrow doesn't)
        where = f" after row {i - 1}" if i else ""
        raise SeedError(f"{path}: not a readable Parquet file{where} ({e})") from e


def _expand(data_files: str | Path | list[str | Path]) -> list[Path]:
    items = [data_files] if isinstance(data_files, str | Path) else list(data_files)
    paths: list[Path] = []
    for item in items:
        s = str(item)
        if any(c in s for c in "*?["):
            matched = sorted(glob.glob(s))
            if not matched:
                raise SeedError(f"{s}: no files match")
            paths.extend(Path(m) for m in matched)
        else:
            paths.append(Path(item))
    if not paths:
        raise SeedError("data_files is empty")
    return paths


def _read_files(paths: list[Path]) -> Iterator[tuple[str, str, int, Row | Exception]]:
    """(file label, position, global row index, row) over all files in order."""
    index = 0
    for path in paths:
        if not path.is_file():
            raise SeedError(f"{path}: file not found")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            items: Iterator[_Item] = _read_jsonl_file(path, index)
        elif suffix == ".json":
            items = _read_json(path, index)
        elif suffix == ".parquet":
            items = _read_parquet(path, index)
        else:
            raise SeedError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
        for pos, idx, row in items:
            yield str(path), pos, idx, row
            index = idx + 1


def _read_hub(name: str, config: str | None, split: str) -> Iterator[tuple[str, str, int, Row | Exception]]:
    import datasets

    label = f"hub:{name}/{config or 'default'}/{split}"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing dataset or split: say which dataset failed
        raise SeedError(f"{label}: could not load dataset ({type(e).__name__}: {e})") from e
    i = 0
    # Arrow batches instead of per-row __getitem__: much faster on large splits.
    for batch in ds.with_format("arrow").iter(batch_size=_HUB_BATCH_ROWS):
        for row in batch.to_pylist():
            yield label, f"row {i}", i, row
            i += 1


# --------------------------------------------------------------------------- public API


def _error_text(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'row'}: {err['msg']}" for err in e.errors())
    if isinstance(e, KeyError):
        return f"missing field {e.args[0]!r}" if e.args else "missing field"
    return str(e) or type(e).__name__


def load_seeds(
    dataset: str,
    *,
    data_files: str | Path | list[str | Path] | None = None,
    split: str = "train",
    hub_name: str | None = None,
    hub_config: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> SeedLoadResult:
    """Load and validate seed questions from local files (by extension) or the Hub.

    Without `skip_invalid` the first bad row raises `SeedError` naming its file and position;
    with it, bad rows are returned as `InvalidRow`s. `limit` keeps the first N valid questions.
    Duplicate question ids keep the first occurrence.
    """
    spec = DATASETS.get(dataset)
    if spec is None:
        raise SeedError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if limit is not None and limit < 0:
        raise SeedError(f"limit must be >= 0, got {limit}")

    if data_files is None and hub_name is None and spec.default_files:
        if split not in spec.default_files:
            raise SeedError(f"dataset {dataset!r} ships the splits {', '.join(spec.default_files)}; got split {split!r}")
        data_files = list(spec.default_files[split])
    if data_files is not None:
        rows = _read_files(_expand(data_files))
    else:
        name = hub_name or spec.hub_name
        if name is None:
            raise SeedError(
                f"dataset {dataset!r} has no known Hub name: pass data_files=... or hub_name=..."
            )
        # Our default config only applies to our default dataset: a local folder or another Hub
        # repo passed as hub_name has its own configs ("main" would not exist there).
        config = hub_config or (spec.hub_config if name == spec.hub_name else None)
        rows = _read_hub(name, config, split)

    questions: list[Question] = []
    invalid: list[InvalidRow] = []
    seen: set[str] = set()
    if limit == 0:
        return SeedLoadResult(questions, invalid)
    for file_label, pos, index, row in rows:
        source = f"{file_label}:{pos}"
        try:
            if isinstance(row, Exception):
                raise row
            fields = spec.adapter(row)
            source_id = str(fields.pop("source_id", index))
            question = Question(
                question_id=Question.make_id(dataset, split, source_id, fields["question"]),
                dataset=dataset,
                split=split,
                source_id=source_id,
                task=spec.task,
                source=source,
                **fields,
            )
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            msg = _error_text(e)
            if not skip_invalid:
                raise SeedError(f"{file_label} {pos}: {msg}") from e
            invalid.append(InvalidRow(source=source, error=msg))
            continue
        if question.question_id in seen:
            log.debug("dropping duplicate question %s at %s", question.question_id, source)
            continue
        seen.add(question.question_id)
        questions.append(question)
        if limit is not None and len(questions) >= limit:
            break  # stop reading: the rest of the file is never parsed
    return SeedLoadResult(questions, invalid)


def corpus_from_questions(questions: Iterable[Question]) -> list[Paragraph]:
    """The context paragraphs of `questions`, deduplicated by (title, text), in first-seen order."""
    seen: set[tuple[str, str]] = set()
    out: list[Paragraph] = []
    for q in questions:
        for p in q.context:
            key = (p.title, p.text)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out
