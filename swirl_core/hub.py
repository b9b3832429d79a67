"""Export curated data from DuckDB to a `datasets`-loadable Hub folder, write its card, upload it.

Parquet is written by DuckDB's `COPY … TO` straight from the views, in files of bounded size,
so nothing is loaded into Python memory. Output is deterministic (ordered rows, no publish-time
stamps), so republishing unchanged data uploads identical bytes and makes no new commit.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from swirl_core.contamination import NGRAM, overlaps
from swirl_core.records import CuratedFilter, StepProtocol
from swirl_core.seeds import DATASETS
from swirl_core.store import query_dicts

LICENCES = {  # of the seed datasets; the generated text inherits them
    "gsm8k": "mit", "hotpotqa": "cc-by-sa-4.0", "musique": "cc-by-4.0", "beerqa": "cc-by-sa-4.0",
    "demo-math": "apache-2.0", "demo-qa": "cc-by-sa-4.0",
}
CITATION = """@article{goldie2025swirl,
  title   = {Synthetic Data Generation \\& Multi-Step RL for Reasoning \\& Tool Use},
  author  = {Goldie, Anna and Mirhoseini, Azalia and Zhou, Hao and Cai, Irene and Manning, Christopher D.},
  journal = {arXiv preprint arXiv:2504.04736},
  year    = {2025}
}"""

# The conversation is the one `sub_trajectories` slices (the `conversations` view), less the observations a step
# never got (content NULL: the answer's).
_TRAJECTORY_SQL = """
SELECT t.trajectory_id, t.question_id, q.dataset, q.split, q.question, q.answer, q.answer_aliases,
       t.final_answer, t.status, t.num_steps, l.process_pass, l.outcome_pass,
       list_filter(c.conversation, lambda m: m.content IS NOT NULL) AS messages,
       t.model, t.prompt_version, t.run_id
FROM trajectories t JOIN trajectory_labels l USING (trajectory_id) JOIN questions q ON q.question_id = t.question_id
JOIN conversations c ON c.trajectory_id = t.trajectory_id
WHERE {where} AND q.split = ?
ORDER BY t.question_id, t.sample_index, t.trajectory_id
"""

_STEPS_SQL = """
SELECT s.trajectory_id, s.step_index, l.question_id, l.dataset, q.split, s.state AS prompt,
       [{'role': 'assistant', 'content': s.action}] AS completion, s.action_kind, s.is_last_step,
       v.verdict AS process_verdict, l.process_pass, l.outcome_pass, s.model, s.prompt_version
FROM sub_trajectories s JOIN trajectory_labels l USING (trajectory_id)
JOIN questions q ON q.question_id = l.question_id
LEFT JOIN step_verdicts v USING (trajectory_id, step_index)
WHERE q.split = ?
ORDER BY l.question_id, s.trajectory_id, s.step_index
"""

# The tools-protocol trajectories in TRL's tool-calling format (`tool_conversations`): `messages` and `tools`.
_TOOLS_TRAJECTORY_SQL = """
SELECT c.trajectory_id, c.question_id, q.dataset, q.split, q.question, q.answer, q.answer_aliases,
       t.final_answer, c.status, c.num_steps, l.process_pass, l.outcome_pass, c.messages, c.tools,
       c.model, c.prompt_version, t.run_id
FROM tool_conversations c JOIN trajectory_labels l USING (trajectory_id) JOIN trajectories t USING (trajectory_id)
JOIN questions q ON q.question_id = c.question_id
WHERE {where} AND q.split = ?
ORDER BY c.question_id, t.sample_index, c.trajectory_id
"""

# One curated set's tools-protocol steps (`curated_<name>_tools`): `prompt` / `completion` and `tools`.
_TOOLS_STEPS_SQL = """
SELECT s.trajectory_id, s.step_index, s.question_id, s.dataset, q.split, s.prompt, s.completion, s.tools,
       s.action_kind, s.is_last_step, v.verdict AS process_verdict, l.process_pass, l.outcome_pass, s.model,
       s.prompt_version
FROM {view} s JOIN trajectory_labels l USING (trajectory_id) JOIN questions q ON q.question_id = s.question_id
LEFT JOIN step_verdicts v USING (trajectory_id, step_index)
WHERE q.split = ?
ORDER BY s.question_id, s.trajectory_id, s.step_index
"""

# The judge probe's figures of every judge the published sets read (NULL figures: the judge was not measured).
_PROBE_SQL = """
SELECT coalesce(j.judge_model, '?') AS judge, s.judge_fingerprint AS judge_id, p.dataset AS probe_dataset,
       p.steps AS labelled_steps, round(p.balanced_accuracy, 3) AS balanced_accuracy,
       '[' || round(p.balanced_accuracy_ci_low, 3) || ', ' || round(p.balanced_accuracy_ci_high, 3) || ']' AS ci_95,
       round(p.f1_bad, 3) AS f1_bad, round(p.auroc, 3) AS auroc, round(p.threshold, 4) AS p_good_threshold,
       p.better_than_chance
FROM (SELECT DISTINCT judge_fingerprint FROM selected_judges) s
LEFT JOIN judges j USING (judge_fingerprint)
LEFT JOIN judge_probe_summary p ON p.judge_fingerprint = j.probe_fingerprint
ORDER BY ALL
"""

# How each of those judges turned P(GOOD) into a verdict: its calibration method and per-task thresholds.
_CALIBRATION_SQL = """
SELECT j.judge_model AS judge, s.judge_fingerprint AS judge_id, coalesce(j.spec->>'calibration', 'none') AS calibration,
       CAST(j.spec->'thresholds' AS VARCHAR) AS p_good_thresholds
FROM (SELECT DISTINCT judge_fingerprint FROM selected_judges) s JOIN judges j USING (judge_fingerprint)
ORDER BY ALL
"""


TOOLS_SUFFIX = "-tools"  # a tools-protocol trajectory config: `<set>-tools`; its steps: `<set>-tools-steps`
_TOOLS_NOTE = """
The `-tools` configs hold the trajectories made with native function calling (`--protocol tools`) in TRL's
tool-calling format: assistant messages carry `tool_calls` (`arguments` a JSON object, or the string the model wrote
when it was not one: such a step is invalid), each result comes back as a `tool` message naming its `tool_call_id`,
and `tools` lists the JSON-schema functions the model was offered. Messages and tools are `datasets` `Json` values,
so every message loads with exactly its own keys; `SFTTrainer` passes `tools` to the chat template (use a template
that renders tools, e.g. `swirl train --protocol tools`'s).
"""


@dataclass
class ExportSummary:
    folder: Path
    files: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # config → split → files
    rows: dict[str, dict[str, int]] = field(default_factory=dict)  # config → split → rows
    about: dict[str, str] = field(default_factory=dict)  # config → what its rows are, for the card


def _configs(con) -> dict[str, tuple[str, str]]:
    """Each config's query and what its rows are: the four sets and `steps` in the tag protocol's rendering (every
    trajectory), then, when the database holds tools-protocol trajectories, each set's `<set>-tools` (trajectories)
    and `<set>-tools-steps` (steps) in TRL's tool-calling format."""
    configs = {str(f): (_TRAJECTORY_SQL.format(where=f.keeps),
                        f"one row per trajectory passing the **{f}** filter, with the full `messages`") for f in CuratedFilter}
    configs["steps"] = (_STEPS_SQL, "one row per (state, action) step: `prompt` (chat messages) / `completion`, for SFT and RL")
    if con.execute("SELECT count(*) FROM trajectories WHERE protocol = ?", [str(StepProtocol.TOOLS)]).fetchall()[0][0]:
        for f in CuratedFilter:
            configs[f"{f}{TOOLS_SUFFIX}"] = (_TOOLS_TRAJECTORY_SQL.format(where=f.keeps),
                                     f"tools-protocol trajectories passing the **{f}** filter: `messages` with `tool_calls` "
                                     "and `tool` results, and `tools`")
            configs[f"{f}{TOOLS_SUFFIX}-steps"] = (_TOOLS_STEPS_SQL.format(view=f.tools_view),
                                                    f"the steps of `{f}{TOOLS_SUFFIX}`: `prompt` / `completion` with `tool_calls`, and `tools`")
    return configs


def _split_name(split: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", split) or "train"


def export_folder(con, folder: str | Path, *, max_file_bytes: str = "256MB") -> ExportSummary:
    """Write `data/<config>/<split>-*.parquet` for the four filters and `steps`; returns counts."""
    folder = Path(folder)
    data = folder / "data"
    if data.exists():
        shutil.rmtree(data)  # a republish writes the whole layout again, deterministically
    summary = ExportSummary(folder)
    splits = [r[0] for r in con.execute(
        "SELECT DISTINCT q.split FROM trajectory_labels l JOIN questions q USING (question_id) ORDER BY 1").fetchall()]
    for config, (sql, about) in _configs(con).items():
        summary.about[config] = about
        for split in splits:
            target = data / config
            target.mkdir(parents=True, exist_ok=True)
            name = _split_name(split)
            # An empty set still gets its (empty) file: every config stays loadable by name.
            # COPY answers with the number of rows it wrote, so the query runs once.
            n = con.execute(
                f"COPY ({sql}) TO '{target}' (FORMAT parquet, FILE_SIZE_BYTES '{max_file_bytes}', "
                f"FILENAME_PATTERN '{name}-{{i}}', OVERWRITE_OR_IGNORE true)",
                [split],
            ).fetchall()[0][0]
            summary.files.setdefault(config, {})[name] = sorted(
                str(p.relative_to(folder)) for p in target.glob(f"{name}-*.parquet"))
            summary.rows.setdefault(config, {})[name] = n
    return summary


RUN_CONFIG_FILE = "swirl_runs.json"


def write_run_config(con, folder: str | Path) -> Path:
    """`swirl_runs.json` beside the data: every run's stored configuration (secrets are never stored), to rerun it."""
    runs = [{"run_id": run_id, "kind": kind, "config": json.loads(config)} for run_id, kind, config in con.execute(
        "SELECT run_id, kind, config FROM runs ORDER BY kind, run_id").fetchall()]
    path = Path(folder) / RUN_CONFIG_FILE
    path.write_text(json.dumps(runs, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


class CardRejected(ValueError):
    """The Hub's card validation (`/api/validate-yaml`) refused the dataset card: nothing was uploaded."""


def validate_card(card: DatasetCard) -> None:
    """The Hub's own check of the card's metadata, before anything is uploaded; a refusal is one line."""
    try:
        card.validate(repo_type="dataset")
    except ValueError as exc:  # huggingface_hub raises the Hub's 400 answer, `{"error": …}`, as a ValueError
        try:
            reason = json.loads(str(exc))["error"]
        except (ValueError, TypeError, KeyError):
            reason = str(exc)
        raise CardRejected(f"the Hub rejected the dataset card: {' '.join(str(reason).split())}") from exc


def upload_folder(folder: str | Path, repo_id: str, *, token: str | None, private: bool,
                  message: str = "Publish SWiRL curated data", repo_type: str = "dataset",
                  ignore_patterns: list[str] | None = None) -> dict[str, Any]:
    """Create the repo (a dataset, or a model) if needed and commit the folder; unchanged files make no commit.

    The endpoint comes from `HF_ENDPOINT` as usual; the token is passed through, never logged."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    head = api.repo_info(repo_id, repo_type=repo_type).sha
    # When every file is unchanged the client makes no commit and returns a CommitInfo naming the current head.
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, commit_message=message,
                             ignore_patterns=ignore_patterns)
    return {"repo_id": repo_id, "commit": info.oid, "new_commit": info.oid != head, "private": private}


def contamination(con, eval_splits: tuple[str, ...] = ("test", "validation", "dev"), ngram: int = NGRAM) -> dict[str, Any]:
    """Overlap between published training questions and evaluation questions in the database.

    Exact overlap is on normalized question text; near overlap counts training questions sharing
    any 13-token window with an evaluation question (the GPT-3 paper's test)."""
    train = [r[0] for r in con.execute(
        "SELECT DISTINCT q.question FROM trajectory_labels l JOIN questions q USING (question_id) "
        "WHERE q.split NOT IN (SELECT unnest(?::VARCHAR[]))", [list(eval_splits)]).fetchall()]
    evals = [r[0] for r in con.execute(
        "SELECT DISTINCT question FROM questions WHERE split IN (SELECT unnest(?::VARCHAR[]))",
        [list(eval_splits)]).fetchall()]
    found = overlaps(train, evals, ngram)
    return {"train_questions": len(train), "eval_questions": len(evals), "eval_splits": list(eval_splits),
            "exact_overlap": sum(o.exact for o in found), f"{ngram}gram_overlap": sum(o.near for o in found)}


# The Hub's size buckets (its validate-yaml rejects any other value).
SIZE_CATEGORIES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                   "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T")


def size_category(n: int) -> str:
    """The bucket of `n` rows: one per power of ten from 1K, then `n>1T`."""
    return SIZE_CATEGORIES[min(max(len(str(max(n, 1))) - 3, 0), len(SIZE_CATEGORIES) - 1)]


def _table(rows: list[dict]) -> str:
    if not rows:
        return "_none_"
    head = list(rows[0])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join("" if r[h] is None else str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(out)


def dataset_card(con, summary: ExportSummary, repo_id: str, contamination_report: dict[str, Any]) -> DatasetCard:
    """README.md: YAML metadata with the configs, then how the data was made and what is in it."""
    datasets = [r[0] for r in con.execute(
        "SELECT DISTINCT dataset FROM trajectory_labels ORDER BY 1").fetchall()]
    licences = sorted({LICENCES.get(d, "other") for d in datasets})
    runs = query_dicts(con, "SELECT run_id, kind, dataset, model, prompt_version, status, "
                      "strftime(started_at, '%Y-%m-%d') AS started FROM runs ORDER BY kind, run_id")
    gen_configs = [json.loads(r[0]) for r in con.execute(
        "SELECT config FROM runs WHERE kind = 'generate' ORDER BY run_id").fetchall()]
    judges = query_dicts(con, "SELECT judge_model, prompt_version, count(*) AS judgments FROM judgments GROUP BY ALL ORDER BY ALL")
    policies = query_dicts(con, "SELECT model, prompt_version, count(*) AS trajectories FROM trajectories GROUP BY ALL ORDER BY ALL")
    example = query_dicts(con, "SELECT trajectory_id, step_index, action_kind, action FROM sub_trajectories "
                         "ORDER BY trajectory_id, step_index LIMIT 3")
    configs = [{"config_name": config, **({"default": True} if config == CuratedFilter.PROCESS else {}),
                "data_files": [{"split": split, "path": f"data/{config}/{split}-*.parquet"}
                               for split in sorted(files)]}
               for config, files in summary.files.items()]
    licence = licences[0] if len(licences) == 1 else "other"
    sources = sorted({DATASETS[d].hub_name for d in datasets if d in DATASETS and DATASETS[d].hub_name})
    card_data = DatasetCardData(
        license=licence, pretty_name=f"SWiRL multi-step tool-use trajectories ({', '.join(datasets)})",
        language=["en"], task_categories=["question-answering", "text-generation"],
        tags=["swirl", "tool-use", "multi-step-reasoning", "synthetic", "process-supervision"],
        size_categories=[size_category(sum(summary.rows.get("none", {}).values()))],
        source_datasets=sources or None, configs=configs,
        # The Hub asks an `other` licence to be named and linked: the seeds' own terms, in the card's Licence section.
        **({"license_name": "seed-datasets-licences", "license_link": "README.md#licence"} if licence == "other" else {}),
    )
    snippets = "\n".join(f'load_dataset("{repo_id}", "{c}")' for c in summary.files)
    settings = [
        {"dataset": c.get("dataset"), "split": c.get("split"), "samples_per_question": c.get("samples"),
         "step_cap": (c.get("resolved_policy") or {}).get("max_steps", c.get("max_steps")),
         "few_shot": (c.get("resolved_policy") or {}).get("few_shot"),
         "constraint": (c.get("resolved_policy") or {}).get("constraint"),
         "temperature": (c.get("policy") or {}).get("temperature"),
         "corpus": Path(corpus).name if (corpus := (c.get("resolved_policy") or {}).get("corpus")) else None,
         "search_k": c.get("search_k")}
        for c in gen_configs
    ]
    body = """
# SWiRL multi-step tool-use data

Synthetic multi-step reasoning and tool-use trajectories made with the SWiRL recipe (Goldie et al., 2025,
arXiv:2504.04736): a policy model answers each seed question step by step, each step being brief reasoning and
exactly one action — `<search_query>` (search over a paragraph corpus), `<math_exp>` (a calculator) or
`<answer>` — with tool results fed back as `INPUT → RESULT`. Every step was rated by a process judge (GOOD/BAD,
without the gold answer) and every trajectory was graded against the gold answer.

## Configs

| config | rows | what |
|---|---|---|
""" + "\n".join(f"| `{c}` | {sum(summary.rows[c].values())} | {summary.about[c]} |" for c in summary.files) + f"""

```python
from datasets import load_dataset
{snippets}
```

`prompt`/`completion` are conversational (TRL's `SFTTrainer` trains on the completion only; `GRPOTrainer` uses
`prompt` as the RL state). The paper found the `process` set best for RL and `process_outcome` best for SFT.
{_TOOLS_NOTE if any(c.endswith(TOOLS_SUFFIX) for c in summary.files) else ""}
## How it was made

Policy models and prompt versions:

{_table(policies)}

Process judge:

{_table(judges)}

Generation settings:

{_table(settings)}

Tools: a BM25 search engine returning the top paragraph(s) of the corpus for each query (QA); a calculator
that parses arithmetic and never evaluates code (math). Tools ran live during generation; each step's
observation is stored as `INPUT → RESULT`.

The configuration of every run behind this data is in `{RUN_CONFIG_FILE}` beside it.

## Retention per filter

{_table(query_dicts(con, "SELECT * FROM curation_retention"))}

## Judge quality

The judge probe (`swirl judge-eval`): the judge rated steps of known verdict built from the seed dataset's gold
solutions (gold steps GOOD; wrong operands, operators, answers, premature answers and repeats BAD). Balanced
accuracy with its 95% bootstrap CI, F1 for detecting BAD steps; a judge whose CI reaches 0.5 is no better than
chance, and its process filter then means little:

{_table(query_dicts(con, _PROBE_SQL))}

Judge calibration (a calibrated judge's verdict is GOOD when P(GOOD) reaches its task's threshold):

{_table(query_dicts(con, _CALIBRATION_SQL))}

Process verdict vs outcome (trajectories judged and graded):

{_table(query_dicts(con, "SELECT * FROM judge_agreement"))}

GOOD rate by step index:

{_table(query_dicts(con, "SELECT * FROM good_rate_by_step"))}

GOOD rate by action:

{_table(query_dicts(con, "SELECT * FROM good_rate_by_action"))}

## Contamination check

Training questions here vs evaluation questions ({", ".join(contamination_report["eval_splits"])} splits) known to
the factory's database: {_table([contamination_report])}

## Lineage

{_table(runs)}

## Example steps

{_table(example)}

## Licence

Seed datasets: {", ".join(f"{d} ({LICENCES.get(d, 'see the source dataset')})" for d in datasets)}. The generated
text is released under the same terms as the seed data it was made from.

## Citation

```bibtex
{CITATION}
```
"""
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
