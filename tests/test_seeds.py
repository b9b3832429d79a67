"""Seed loaders on the real benchmark fixtures in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os

# Offline before `datasets`/`huggingface_hub` are imported anywhere: these are read at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from swirl_core.records import Paragraph, Question
from swirl_core.seeds import (
    DATASETS,
    SeedError,
    adapt_hotpotqa,
    corpus_from_questions,
    load_seeds,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIX = DATA / "fixtures"
GSM8K = FIX / "gsm8k_test20.jsonl"
HOTPOT = FIX / "hotpotqa_dev20.json"
MUSIQUE = FIX / "musique_dev20.jsonl"
BEERQA = FIX / "beerqa_train20.json"



def _jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_specs() -> None:
    assert set(DATASETS) == {"gsm8k", "hotpotqa", "musique", "beerqa", "cofca", "generic", "demo-math", "demo-qa"}
    assert (DATASETS["gsm8k"].task, DATASETS["gsm8k"].max_steps) == ("math", 10)
    assert (DATASETS["hotpotqa"].hub_name, DATASETS["hotpotqa"].hub_config) == ("hotpotqa/hotpot_qa", "distractor")
    math = {"gsm8k", "demo-math"}
    assert all(s.task == "qa" and s.max_steps == 5 for n, s in DATASETS.items() if n not in math)


def test_demo_datasets_ship_with_the_package() -> None:
    math, qa = load_seeds("demo-math"), load_seeds("demo-qa")
    assert len(math.questions) == 12 and not math.invalid and all(q.task == "math" for q in math.questions)
    assert len(qa.questions) == 8 and not qa.invalid
    assert DATASETS["demo-qa"].default_corpus and Path(DATASETS["demo-qa"].default_corpus).exists()


def test_gsm8k_fixture() -> None:
    res = load_seeds("gsm8k", data_files=GSM8K, split="test")
    raw = _jsonl_rows(GSM8K)
    assert len(res.questions) == 20 and not res.invalid
    q = res.questions[0]
    assert q.answer == raw[0]["answer"].split("####")[-1].strip().replace(",", "")
    assert q.metadata["solution"] == raw[0]["answer"]
    assert (q.task, q.dataset, q.split, q.source_id) == ("math", "gsm8k", "test", "0")
    assert q.source == f"{GSM8K}:line 1"
    assert all("," not in x.answer and "$" not in x.answer for x in res.questions)


def test_gsm8k_answer_normalisation(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "g.jsonl", [{"question": "How much?", "answer": "a\nb\n#### $1,200"}])
    assert load_seeds("gsm8k", data_files=f).questions[0].answer == "1200"


def test_hotpotqa_fixture() -> None:
    res = load_seeds("hotpotqa", data_files=HOTPOT, split="validation")
    raw = json.loads(HOTPOT.read_text())
    assert len(res.questions) == 20
    q = res.questions[0]
    assert q.source_id == raw[0]["_id"] and q.source == f"{HOTPOT}:row 0"
    assert len(q.context) == len(raw[0]["context"])
    support = raw[0]["supporting_facts"][0][0]
    assert support in {p.title for p in q.context}
    assert q.metadata["supporting_facts"] == raw[0]["supporting_facts"]
    assert q.metadata["type"] == raw[0]["type"]
    # Sentences carry their own leading spaces: concatenation restores the paragraph.
    title, sents = raw[0]["context"][0]
    assert q.context[0] == Paragraph(title=title, text="".join(sents))
    assert "  " not in q.context[0].text and ". He" in q.context[0].text


def test_hotpotqa_hub_schema() -> None:
    row = {
        "id": "x1", "question": "Q?", "answer": "A", "type": "bridge", "level": "easy",
        "supporting_facts": {"title": ["T1"], "sent_id": [0]},
        "context": {"title": ["T1", "T2"], "sentences": [["One.", " Two."], ["Three."]]},
    }
    fields = adapt_hotpotqa(row)
    assert fields["source_id"] == "x1"
    assert fields["context"] == (Paragraph(title="T1", text="One. Two."), Paragraph(title="T2", text="Three."))
    assert fields["metadata"]["supporting_facts"] == [["T1", 0]]


def test_musique_fixture() -> None:
    res = load_seeds("musique", data_files=MUSIQUE, split="validation")
    assert len(res.questions) == 20
    by_id = {q.source_id: q for q in res.questions}
    q = by_id["2hop__82858_654855"]
    assert q.answer == "Socialist Party of America"
    assert q.answer_aliases == ("Democrat", "Democratic Party")
    assert len(q.context) == 20 and q.metadata["answerable"] is True
    assert len(q.metadata["question_decomposition"]) == 2
    assert set(q.metadata["supporting_titles"]) <= {p.title for p in q.context}


def test_beerqa_fixture() -> None:
    res = load_seeds("beerqa", data_files=BEERQA)
    raw = json.loads(BEERQA.read_text())["data"]
    assert len(res.questions) == 20
    q = res.questions[0]
    assert (q.source_id, q.answer, q.answer_aliases) == (raw[0]["id"], raw[0]["answers"][0], ())
    assert q.metadata["src"] == raw[0]["src"]
    assert [(p.title, p.text) for p in q.context] == [tuple(c) for c in raw[0]["context"]]


def test_ids_deterministic_and_distinct() -> None:
    for name, path in [("gsm8k", GSM8K), ("hotpotqa", HOTPOT), ("musique", MUSIQUE), ("beerqa", BEERQA)]:
        a = [q.question_id for q in load_seeds(name, data_files=path).questions]
        b = [q.question_id for q in load_seeds(name, data_files=path).questions]
        assert a == b and len(set(a)) == len(a) == 20
    q = load_seeds("gsm8k", data_files=GSM8K).questions[3]
    assert q.question_id == Question.make_id("gsm8k", "train", "3", q.question)


def test_malformed_jsonl_raises_with_file_and_line(tmp_path: Path) -> None:
    good = {"question": "Q?", "answer": "x #### 1"}
    cases = {
        "badjson.jsonl": ([good, "{not json"], "line 2", "not valid JSON"),
        "noanswer.jsonl": ([good, good | {"question": "Q2?"}, {"question": "Q3?"}], "line 3", "missing field 'answer'"),
        "emptyq.jsonl": ([{"question": "  ", "answer": "#### 2"}], "line 1", "question is empty"),
    }
    for fname, (rows, where, what) in cases.items():
        f = _write_jsonl(tmp_path / fname, rows)
        with pytest.raises(SeedError) as ei:
            load_seeds("gsm8k", data_files=f)
        msg = str(ei.value)
        assert fname in msg and where in msg and what in msg, msg


def test_malformed_json_list_names_row(tmp_path: Path) -> None:
    f = tmp_path / "h.json"
    f.write_text(json.dumps([{"question": "Q", "answer": "A"}, {"question": "Q2"}]))
    with pytest.raises(SeedError, match=r"h\.json row 1: missing field 'answer'"):
        load_seeds("generic", data_files=f)


def test_skip_invalid(tmp_path: Path) -> None:
    rows = _jsonl_rows(GSM8K)[:3]
    f = _write_jsonl(tmp_path / "mixed.jsonl", [rows[0], "{oops", {"question": "Q?"}, rows[1], {"question": "", "answer": "#### 1"}, rows[2]])
    res = load_seeds("gsm8k", data_files=f, skip_invalid=True)
    assert [q.question for q in res.questions] == [r["question"] for r in rows]
    assert [r.source for r in res.invalid] == [f"{f}:line {n}" for n in (2, 3, 5)]
    assert "not valid JSON" in res.invalid[0].error and "answer" in res.invalid[1].error


def _gsm8k_parquet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Small row groups so reading really goes through several record batches.
    pq.write_table(pa.Table.from_pylist(_jsonl_rows(GSM8K)), path, row_group_size=7)
    return path


def test_parquet_matches_jsonl(tmp_path: Path) -> None:
    p = _gsm8k_parquet(tmp_path / "g.parquet")
    from_jsonl = load_seeds("gsm8k", data_files=GSM8K, split="test").questions
    from_parquet = load_seeds("gsm8k", data_files=p, split="test").questions
    strip = lambda qs: [q.model_dump(exclude={"source"}) for q in qs]  # noqa: E731
    assert strip(from_parquet) == strip(from_jsonl)
    assert from_parquet[8].source == f"{p}:row 8"


def test_generic_schema_and_json_lines_fallback(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "question": "Capital of France?", "answer": "Paris", "aliases": ["paris", "Paris"],
         "context": [{"title": "France", "text": "Paris is the capital."}, ["Paris", "A city."]],
         "metadata": {"k": 1}},
        {"question": "2+2?", "answer": 4},
    ]
    f = _write_jsonl(tmp_path / "g.json", rows)  # JSON lines under a .json name
    qs = load_seeds("generic", data_files=f).questions
    assert qs[0].source_id == "a" and qs[0].answer_aliases == ("paris",) and qs[0].metadata == {"k": 1}
    assert qs[0].context == (Paragraph(title="France", text="Paris is the capital."), Paragraph(title="Paris", text="A city."))
    assert (qs[1].answer, qs[1].source_id, qs[1].task) == ("4", "1", "qa")
    assert load_seeds("cofca", data_files=f).questions[0].dataset == "cofca"


def test_hub_path_via_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep ~ clean
    folder = tmp_path / "mydata"
    _gsm8k_parquet(folder / "data" / "test-00000-of-00001.parquet")
    res = load_seeds("gsm8k", hub_name=str(folder), split="test", limit=5)
    local = load_seeds("gsm8k", data_files=GSM8K, split="test", limit=5)
    assert [q.question_id for q in res.questions] == [q.question_id for q in local.questions]
    assert res.questions[2].source == f"hub:{folder}/default/test:row 2"


def test_no_hub_name_errors() -> None:
    with pytest.raises(SeedError, match="no known Hub name"):
        load_seeds("beerqa")
    with pytest.raises(SeedError, match="unknown dataset"):
        load_seeds("nope", data_files=GSM8K)


def test_limit_stops_early_and_dedups(tmp_path: Path) -> None:
    rows = _jsonl_rows(GSM8K)
    # A broken line after the limit is never read, so it cannot raise.
    f = _write_jsonl(tmp_path / "l.jsonl", rows[:6] + ["{broken"])
    assert len(load_seeds("gsm8k", data_files=f, limit=5).questions) == 5
    # Same id twice (hotpotqa ids come from `_id`): the first occurrence wins.
    h = json.loads(HOTPOT.read_text())
    d = tmp_path / "dup.json"
    d.write_text(json.dumps([h[0], h[1], h[0]]))
    qs = load_seeds("hotpotqa", data_files=d).questions
    assert [q.source for q in qs] == [f"{d}:row 0", f"{d}:row 1"]


def test_corpus_from_questions_dedups() -> None:
    qs = load_seeds("hotpotqa", data_files=HOTPOT).questions
    corpus = corpus_from_questions(qs + qs)
    keys = [(p.title, p.text) for p in corpus]
    assert len(keys) == len(set(keys)) == len({(p.title, p.text) for q in qs for p in q.context})
    assert corpus[0] == qs[0].context[0]  # stable, first-seen order
