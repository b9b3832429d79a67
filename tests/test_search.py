"""BM25 search tool: corpus loading, HotpotQA retrieval quality, on-disk index cache, output."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from swirl_core.records import Paragraph
from swirl_core.tools import ToolResult
from swirl_core.tools.search import CorpusError, SearchTool, default_cache_dir, load_corpus

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURE_CORPUS = DATA / "fixtures" / "corpus_fixture.jsonl"
WIKI_CORPUS = DATA / "corpus" / "wiki_paragraphs.jsonl"


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bm25")


@pytest.fixture(scope="session")
def fixture_paragraphs() -> list[Paragraph]:
    return load_corpus(FIXTURE_CORPUS)


@pytest.fixture(scope="session")
def fixture_tool(fixture_paragraphs: list[Paragraph], cache_root: Path) -> SearchTool:
    return SearchTool(fixture_paragraphs, cache_dir=cache_root)


@pytest.fixture(scope="session")
def wiki_tool(cache_root: Path) -> SearchTool:
    # The one 24k-paragraph index build of the session (~2 s).
    return SearchTool.from_file(WIKI_CORPUS, cache_dir=cache_root)


@pytest.fixture(scope="session")
def hotpot() -> list[dict[str, Any]]:
    return json.loads((DATA / "fixtures" / "hotpotqa_dev20.json").read_text(encoding="utf-8"))


def _support_hit_rate(tool: SearchTool, questions: list[dict[str, Any]], k: int) -> float:
    hits = 0
    for q in questions:
        gold = {title for title, _ in q["supporting_facts"]}
        hits += any(p.title in gold for p, _ in tool.search(q["question"], k=k))
    return hits / len(questions)


def test_jsonl_and_parquet_load_equally(
    fixture_paragraphs: list[Paragraph], tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in FIXTURE_CORPUS.read_text(encoding="utf-8").splitlines()]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)  # several row groups
    assert len(fixture_paragraphs) == 618
    assert load_corpus(path) == fixture_paragraphs
    a = SearchTool.from_file(path, cache_dir=tmp_path)
    assert a.corpus_hash == SearchTool(fixture_paragraphs, cache_dir=tmp_path).corpus_hash


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"title": "T", "text": ', "invalid JSON"),
        ('{"title": "T"}', "'text'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_jsonl_row_names_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"title": "A", "text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=needle) as exc:
        load_corpus(path)
    assert f"{path}:2" in str(exc.value)


def test_malformed_parquet_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"title": ["A"], "body": ["x"]}), path)
    with pytest.raises(CorpusError, match="missing column"):
        load_corpus(path)
    pq.write_table(pa.table({"title": ["A", None], "text": ["x", "y"]}), path)
    with pytest.raises(CorpusError, match=r"row 1: .*'title'"):
        load_corpus(path)
    with pytest.raises(CorpusError, match="unsupported"):
        load_corpus(FIXTURE_CORPUS.parent / "hotpotqa_dev20.json")


def test_hotpotqa_supporting_title_in_top2(
    fixture_tool: SearchTool, wiki_tool: SearchTool, hotpot: list[dict[str, Any]]
) -> None:
    fixture_rate = _support_hit_rate(fixture_tool, hotpot, k=2)
    wiki_rate = _support_hit_rate(wiki_tool, hotpot, k=2)
    print(f"\nsupporting title in top-2: fixture {fixture_rate:.2f}, wiki {wiki_rate:.2f}")
    assert fixture_rate >= 0.75
    assert wiki_rate >= 0.75


def test_known_query_top1(wiki_tool: SearchTool) -> None:
    [(para, score)] = wiki_tool.search("Jonny Craig Canadian-American singer Dance Gavin Dance")
    assert para.title == "Jonny Craig" and score > 0
    out = wiki_tool('"Pete Doherty co-frontman of the Libertines"')  # quotes are stripped
    assert not out.error and out.output.startswith("Pete Doherty: ")


def test_retrieval_is_fast_and_thread_safe(
    wiki_tool: SearchTool, hotpot: list[dict[str, Any]]
) -> None:
    queries = [q["question"] for q in hotpot] * 5
    start = time.perf_counter()
    sequential = [wiki_tool.search(q, k=3) for q in queries]
    ms = (time.perf_counter() - start) / len(queries) * 1000
    print(f"\n{ms:.2f} ms/query over {len(wiki_tool.paragraphs)} paragraphs")
    assert ms < 50
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda q: wiki_tool.search(q, k=3), queries)) == sequential


def test_disk_cache_reused_and_keyed_by_content(
    fixture_paragraphs: list[Paragraph], tmp_path: Path
) -> None:
    first = SearchTool(fixture_paragraphs, cache_dir=tmp_path)
    second = SearchTool(fixture_paragraphs, cache_dir=tmp_path)
    assert not first.loaded_from_cache and second.loaded_from_cache
    assert [p.name for p in tmp_path.iterdir()] == [first.index_dir.name]  # no temp dirs left over
    q = "Relativity debut album Emarosa"
    assert second.search(q) == first.search(q)
    assert second.fingerprint == first.fingerprint

    changed = [*fixture_paragraphs[:-1], Paragraph(title="Zorblax", text="A made-up paragraph.")]
    third = SearchTool(changed, cache_dir=tmp_path)
    assert not third.loaded_from_cache and third.index_dir != first.index_dir
    assert third.fingerprint != first.fingerprint
    assert third.search("Zorblax")[0][0].title == "Zorblax"
    assert not first.search("Zorblax")
    # The fingerprint also covers the tool config (it names the observation format).
    assert SearchTool(fixture_paragraphs, cache_dir=tmp_path, k=2).fingerprint != first.fingerprint


def test_losing_the_cache_race_is_harmless(fixture_tool: SearchTool) -> None:
    # A concurrent writer already renamed its index in place: saving again must be a no-op.
    fixture_tool._save_atomically(fixture_tool._retriever)
    assert [p.name for p in fixture_tool.cache_dir.iterdir() if p.name.startswith(".")] == []


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWIRL_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "bm25"
    monkeypatch.delenv("SWIRL_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "swirl" / "bm25"


def test_empty_and_no_hit_queries(fixture_tool: SearchTool) -> None:
    for q in ("", "   ", ' "" '):
        assert fixture_tool(q) == ToolResult("Search error: empty query", error=True)
    assert fixture_tool(" qwxzzy ") == ToolResult("No results found for: qwxzzy", error=False)
    assert fixture_tool("the of and") == ToolResult("No results found for: the of and")  # stopwords


def test_k_and_max_chars(fixture_paragraphs: list[Paragraph], cache_root: Path) -> None:
    tool = SearchTool(fixture_paragraphs, cache_dir=cache_root, k=3)
    assert len(tool.search("American singer songwriter band")) == 3
    out = tool("American singer songwriter band").output
    assert len(out.split("\n\n")) >= 3 and ": " in out
    assert len(tool.search("American singer songwriter band", k=5)) == 5
    short = SearchTool(fixture_paragraphs, cache_dir=cache_root, max_chars=50)
    assert len(short("American singer").output) == 50


def test_call_never_raises(fixture_tool: SearchTool, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(query: str, k: int | None = None) -> list[tuple[Paragraph, float]]:
        raise RuntimeError("index gone")

    monkeypatch.setattr(fixture_tool, "search", boom)
    result = fixture_tool("anything")
    assert result.error and "index gone" in result.output
