"""`swirl`: run the factory's flows from the command line (no Prefect server needed).

The commands are generated from the flow configs with cyclopts: each option is a config field with its type,
range, description and default as the config declares them. cyclopts rather than pydantic-settings' CLI: it
reads the pydantic configs as they are and brings shell completion, `--version`, environment variables and
per-option names and aliases without touching the configs (pydantic-settings has no completion, and renames an
option only through a field alias, which would rename the YAML and deployment keys too).

Every command takes `--config FILE` (YAML or JSON of that command's config) and `SWIRL_<COMMAND>_<OPTION>`
environment variables; the command line overrides the environment, which overrides the file. Exit codes:
0 done, 1 finished with failed shards (rerun to resume), 2 bad input, 3 the database is in use.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from copy import copy
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any, Literal

from cyclopts import App, Parameter
from cyclopts.config import Env
from cyclopts.exceptions import CycloptsError
from pydantic import BaseModel, Field, ValidationError, create_model

from flows.runtime import apply_quiet_env, prefect_api
from swirl_core.config import (
    ClusterConfig,
    CurateConfig,
    EvalConfig,
    GenerateConfig,
    GreedyModelConfig,
    JudgeEvalConfig,
    ModelConfig,
    PipelineConfig,
    PublishConfig,
)
from swirl_core.config_base import DEFAULT_DB, Workspace
from swirl_core.records import CuratedFilter, StepProtocol
from swirl_core.training.run import TrainConfig
from swirl_core.training.trainers import TrainSettings

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DB_IN_USE = 0, 1, 2, 3

EXAMPLES = """\
examples:
  swirl run                                        # the whole pipeline, offline, on the demo (about 10 min)
  swirl run --config pipeline.yaml                 # any PipelineConfig as YAML or JSON
  swirl generate                                   # offline demo: SmolLM2 on the demo math seeds
  swirl generate --dataset gsm8k --data-files ../shared/data/gsm8k/test_dev.jsonl --split test \\
      --limit 50 --samples 5 --policy openai/gpt-4o-mini        # key from OPENAI_API_KEY
  swirl generate --dataset hotpotqa --data-files dev.json --corpus wiki.jsonl \\
      --policy hosted_vllm/Qwen2.5-7B-Instruct@http://127.0.0.1:8000/v1
  swirl generate --config generate.yaml --samples 2    # a GenerateConfig file, one option on top
  swirl judge-eval --dataset gsm8k --data-files ../shared/data/gsm8k/train.jsonl --judge openai/gpt-4o-mini
  swirl curate --db swirl.duckdb --judge openai/gpt-4o-mini --grader llm --min-judge-f1 0.6
  swirl evaluate --dataset gsm8k --data-files ../shared/data/gsm8k/test_dev.jsonl --limit 300 \\
      --model base=smollm2 --model sft=./out/sft --model swirl=./out/swirl --judge openai/gpt-4o-mini --grader llm
  swirl evaluate --dataset hotpotqa --data-files dev.json --dataset gsm8k --data-files test.jsonl \\
      --model base=smollm2 --model swirl=./out/swirl --judge openai/gpt-4o-mini   # a model × dataset grid
  swirl train --method swirl --output-dir ./out/swirl --num-processes 2 --save-steps 50 --push-to-hub me/swirl
  swirl sql --db swirl.duckdb "SELECT status, count(*) FROM trajectories GROUP BY 1"
  swirl compact --db swirl.duckdb                  # fold finished call journals into one segment
  swirl completion bash > ~/.local/share/bash-completion/completions/swirl
"""

SPEC = r"MODEL\[@API_BASE]"  # escaped: option names and metavars are rich text


# -- options generated from the configs -------------------------------------------------------------------
def options(config: type[BaseModel], names: dict[str, Any] | None = None) -> type[BaseModel]:
    """The command line's reading of a config: its fields with their types, ranges, descriptions and defaults,
    under the names `names` gives (a `Parameter`, or `(type, Parameter)` for a field spelt otherwise here, e.g.
    a nested config flattened into its own options). Nothing is required here, so a `--config` file or an
    environment variable may give a required field: the config validates what the three give together."""
    names = names or {}
    fields: dict[str, Any] = {}
    for name, info in config.model_fields.items():
        how = names.get(name, Parameter())
        annotation, parameter = how if isinstance(how, tuple) else (info.annotation, how)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not info.annotation:
            info = Field(default_factory=annotation)  # a nested config's options: their defaults are its own
        elif info.is_required() or annotation is not info.annotation:
            info = copy(info)
            info.default, info.default_factory = None, None
        fields[name] = (Annotated[annotation, parameter], info)
    return create_model(f"{config.__name__}Options", **fields)


def given(opts: BaseModel) -> dict[str, Any]:
    """Only what the command line or the environment set: the rest is the config file's, else the default."""
    return opts.model_dump(exclude_unset=True)


HIDDEN = Parameter(parse=False)
FILES = Parameter(consume_multiple=True, metavar="PATH")  # `--data-files a.jsonl b.jsonl`


def model_options(role: str, model: type[ModelConfig] = ModelConfig) -> type[BaseModel]:
    """A model's options: `--ROLE MODEL[@API_BASE]` and `--ROLE-api-base`/`-api-key-env`/`-api-key-secret`/
    `-identity` name it; its sampling and limits are plain options (`--temperature`, `--rpm`, ...)."""
    return options(model, {
        "model": Parameter(name=f"--{role}", metavar=SPEC),
        **{f: Parameter(name=f"--{role}-{f.replace('_', '-')}") for f in ("api_base", "api_key_env", "api_key_secret", "identity")},
        "backend": Parameter(name=f"--{role}-backend"),
        "requests_per_minute": Parameter(name="--requests-per-minute", alias="--rpm"),
        "tokens_per_minute": Parameter(name="--tokens-per-minute", alias="--tpm"),
        "timeout_s": Parameter(name="--timeout-s", alias="--timeout"),
    })


CLUSTER = (options(ClusterConfig, {
    "address": Parameter(name="--scheduler-address"), "n_workers": Parameter(name="--workers"),
    "cluster_class": HIDDEN, "cluster_kwargs": HIDDEN,
}), Parameter(name="*"))
DATASET_FILES = {"data_files": FILES}
RUN_IDS = Parameter(name="--run-id", alias="--run-ids", metavar="RUN")  # repeatable

GenerateOptions = options(GenerateConfig, {**DATASET_FILES, "policy": (model_options("policy"), Parameter(name="*")),
                                           "cluster": CLUSTER})
CurateOptions = options(CurateConfig, {"judge": (model_options("judge", GreedyModelConfig), Parameter(name="*")), "cluster": CLUSTER,
                                       "run_ids": RUN_IDS})
JudgeEvalOptions = options(JudgeEvalConfig, {**DATASET_FILES, "judge": (model_options("judge", GreedyModelConfig), Parameter(name="*")),
                                              "n_resamples": Parameter(name="--n-resamples", alias="--resamples")})
EvalOptions = options(EvalConfig, {
    **DATASET_FILES, "cluster": CLUSTER,
    "models": (list[str] | None, Parameter(name="--model", alias="--models", metavar="LABEL=SPEC",
                                           help="repeatable; SPEC is MODEL[@API_BASE], 'smollm2' or a checkpoint folder "
                                                "(default: base=smollm2)")),
    "judge": (str | None, Parameter(metavar=SPEC, help="LLM grader and process judge (mean step score); none: rule metrics only")),
    "also": (list[dict[str, Any]] | None, Parameter(show=False)),  # the grid: written by `evaluate_grid`
    "n_resamples": Parameter(name="--n-resamples", alias="--resamples"),
})
TrainOptions = options(TrainConfig, {
    "settings": (options(TrainSettings, {
        "output_dir": Parameter(name="--output-dir", alias="--output"),
        "per_device_batch_size": Parameter(name="--per-device-batch-size", alias="--batch-size"),
        "gradient_accumulation": Parameter(name="--gradient-accumulation", alias="--grad-accum"),
        "use_lora": Parameter(name="--use-lora", alias="--lora"),
    }), Parameter(name="*")),
    # SWiRL's reward judge: named here, its other fields in a --config file (its sampling options would take the
    # policy's own names, --temperature and --constraint)
    "judge": (options(GreedyModelConfig, {
        "model": Parameter(name="--judge", metavar=SPEC),
        **{f: Parameter(name=f"--judge-{f.replace('_', '-')}") for f in ("api_base", "api_key_env", "api_key_secret")},
        "requests_per_minute": Parameter(name="--requests-per-minute", alias="--rpm"),
        **{f: HIDDEN for f in ModelConfig.model_fields if f not in ("model", "api_base", "api_key_env", "api_key_secret",
                                                                    "requests_per_minute")},
    }), Parameter(name="*")),
    "run_ids": RUN_IDS,
    "private": Parameter(negative=("--no-private", "--public")),
})
PublishOptions = options(PublishConfig, {"private": Parameter(negative="--public")})
CompactOptions = options(Workspace)

ConfigFile = Annotated[Path | None, Parameter(name="--config", metavar="FILE",
                                              help="this command's config as YAML or JSON; the options given here override it")]


def load_config(config: type[BaseModel], file: Path | None, *overrides: dict[str, Any]) -> Any:
    """The config file (if any) with the environment's and the command line's options on top, validated."""
    data: dict[str, Any] = {}
    if file is not None:
        import yaml

        data = yaml.safe_load(Path(file).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a mapping of {config.__name__.removesuffix('Config').lower()} settings")
    for layer in overrides:
        data = _merge(data, layer)
    return config.model_validate(data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, str):
            below = {"model": below}  # a model given as its MODEL[@API_BASE] spec, options on top
        merged[key] = _merge(below, value) if isinstance(value, dict) and isinstance(below, dict) else value
    return merged


app = App(
    name="swirl", help="SWiRL data factory: multi-step tool-use trajectories, judging, training.\n\n"
                       "Every command takes --config FILE (its config as YAML or JSON) and reads SWIRL_<COMMAND>_<OPTION> "
                       "environment variables; the command line overrides them, and they override the file. Exit codes: "
                       "0 done, 1 finished with failed shards (rerun to resume), 2 bad input, 3 database in use.\n\n"
                       + EXAMPLES, version=lambda: package_version("swirl-factory"), config=[Env("SWIRL_")],
    default_parameter=Parameter(negative_iterable=(), show_env_var=False), result_action="return_value",
    exit_on_error=False, print_error=False, help_on_error=False, help_format="plaintext",
)


# -- commands ---------------------------------------------------------------------------------------------
def pipeline_config(*, config: ConfigFile = None, db: str | None = None, work_dir: str | None = None, dataset: str | None = None,
        data_files: Annotated[list[str] | None, FILES] = None, limit: int | None = None, samples: int | None = None,
        policy: Annotated[str | None, Parameter(metavar=SPEC)] = None, judge: Annotated[str | None, Parameter(metavar=SPEC)] = None,
        eval_limit: int | None = None, train: bool = True, run_eval: Annotated[bool, Parameter(name="--eval")] = True,
        publish_repo_id: Annotated[str | None, Parameter(metavar="USER/NAME")] = None,
        protocol: StepProtocol | None = None, scheduler_address: str | None = None, progress: bool = True) -> PipelineConfig:
    """The whole pipeline: generate, curate, train SFT and SWiRL, evaluate, publish.

    Without options, the offline demo (about 10 minutes on 2 CPU cores). Rerunning resumes: nothing is paid for or trained twice.
    The options are shortcuts into the --config file's sections (a PipelineConfig: generate, curate, sft, swirl, evaluate, publish).

    Args:
        db: DuckDB file
        work_dir: journals, checkpoints and reports (default: <db>.work)
        dataset: seed dataset of generate (and evaluate)
        data_files: local seed files
        limit: first N seed questions
        samples: trajectories per question
        policy: policy model
        judge: process judge and SWiRL reward model
        eval_limit: held-out questions to evaluate on
        train: --no-train stops after curation
        run_eval: --no-eval skips the evaluation
        publish_repo_id: also publish the curated sets to this Hub repo
        protocol: tags or tools, for generation, training and evaluation alike
        scheduler_address: Dask scheduler tls://HOST:PORT or tcp://HOST:PORT (default: a local cluster)
        progress: progress bars
    """
    top = {k: v for k, v in {"db": db, "work_dir": work_dir, "protocol": protocol}.items() if v is not None}
    if scheduler_address:
        top["cluster"] = {"address": scheduler_address}
    if not progress:
        top["progress"] = False
    gen = {k: v for k, v in {"dataset": dataset, "data_files": data_files, "limit": limit, "samples": samples,
                              "policy": policy}.items() if v is not None}
    sections: dict[str, Any] = {"generate": gen} if gen else {}
    if judge:
        sections["curate"] = {"judge": judge}
    if not train:
        sections |= {"sft": None, "swirl": None}
    if not (train and run_eval):
        sections["evaluate"] = None
    elif eval_limit is not None:
        sections["evaluate"] = {"limit": eval_limit}
    if publish_repo_id:
        sections["publish"] = {"repo_id": publish_repo_id}
    return load_config(PipelineConfig, config, top, sections)


@app.command(name="run")
@functools.wraps(pipeline_config, assigned=("__module__", "__doc__", "__annotations__"))
def run(**options: Any) -> int:
    config = pipeline_config(**options)
    # Not held for the whole command like generate's: training opens the database read-only in this process.
    _check_db_free(config.db)
    with prefect_api() as api_ready:
        from flows.pipeline import check_inputs, pipeline

        check_inputs(config)  # bad seeds or options: a one-line error before any flow or call
        api_ready()
        result = pipeline(config)
    _print_rows(f"pipeline: {result['status']}", result["stages"])
    _print_probes(result["probes"])
    _print_rows("steps parsed as one action", result["step_parse"])
    _print_rows("curated sets", result["retention"])
    if result["metrics"]:
        _print_rows("evaluation on held-out questions", [
            {"dataset": m["dataset"], "model": m["label"], "metric": m["metric"], "n": m["n"], "mean": f"{m['mean']:.3f}",
             "95% CI": f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]"} for m in result["metrics"]])
    out = result["db"]
    print(f"\nresults: {out} (DuckDB); checkpoints: {', '.join(result['checkpoints'].values()) or 'none'}"
          + (f"; evaluation report: {result['report']}" if result["report"] else ""))
    print("try:\n"
          f"  swirl sql --db {out} \"SELECT * FROM curation_retention\"\n"
          f"  swirl sql --db {out} \"SELECT state, action FROM curated_process_outcome LIMIT 5\"\n"
          f"  swirl sql --db {out} \"SELECT label, questions, answered, exact_match, f1 FROM eval_summary\"")
    return EXIT_OK if result["status"] == "completed" else EXIT_FAILED


@app.command
def generate(*, config: ConfigFile = None, opts: Annotated[GenerateOptions, Parameter(name="*")] = GenerateOptions()) -> int:
    """Generate multi-step trajectories into DuckDB."""
    gen_config = load_config(GenerateConfig, config, given(opts))
    _check_db_free(gen_config.db)
    with prefect_api() as api_ready:
        from flows.generate import run_generate
        from swirl_core.generation import plan_generation, verify_constraint

        plan_generation(gen_config)  # bad seeds or options: a one-line error here, before any flow or call
        verify_constraint(gen_config.policy)  # a server that ignores the constraint: a one-line error, before the flow
        with _hold_db(gen_config.db):
            api_ready()
            result = run_generate(gen_config)
    _print_generation(result)
    return EXIT_OK if result["status"] == "completed" else EXIT_FAILED


@app.command
def curate(*, config: ConfigFile = None, opts: Annotated[CurateOptions, Parameter(name="*")] = CurateOptions()) -> int:
    """Judge every step, grade outcomes, build the four curated sets."""
    cur_config = load_config(CurateConfig, config, given(opts))
    if not Path(cur_config.db).exists():
        raise FileNotFoundError(f"{cur_config.db} does not exist: run `swirl generate --db {cur_config.db}` first")
    _check_db_free(cur_config.db)
    with prefect_api() as api_ready:
        from flows.curate import run_curate

        with _hold_db(cur_config.db):
            api_ready()
            result = run_curate(cur_config)
    _print_probes(result["probes"])
    print(f"judge {result['fingerprint']} (select an earlier judge's verdicts with --judge-id FINGERPRINT)")
    print(f"calls: {result['calls'].describe()}")
    _print_rows(f"curation run {result['run_id']}: {result['status']}", result["report"]["retention"])
    _print_rows("process judge vs outcome", result["report"]["agreement"])
    out = result["db"]
    print(f"curated sets are views in {out}: {', '.join(f.view for f in CuratedFilter)}\n"
          f"  swirl sql --db {out} \"SELECT * FROM curation_retention\"\n"
          f"  swirl sql --db {out} \"SELECT * FROM good_rate_by_step\"")
    for failure in result["shard_failures"]:
        print(f"shard failed: {failure} — rerun the same command to resume", file=sys.stderr)
    return EXIT_OK if result["status"] == "completed" else EXIT_FAILED


@app.command(name="judge-eval")
def judge_eval(*, config: ConfigFile = None, opts: Annotated[JudgeEvalOptions, Parameter(name="*")] = JudgeEvalOptions()) -> int:
    """Measure a judge on labelled GOOD/BAD steps built from gold solutions."""
    je_config = load_config(JudgeEvalConfig, config, given(opts))
    _check_db_free(je_config.db)
    with prefect_api() as api_ready:
        from flows.judge_eval import build_steps
        from flows.judge_eval import judge_eval as judge_eval_flow

        build_steps(je_config)  # bad seeds, or a dataset without gold steps: a one-line error before any call
        with _hold_db(je_config.db):
            api_ready()
            result = judge_eval_flow(je_config)
    _print_rows(f"judge probe {result['run_id']}: {result['steps']} labelled steps ({result['judged_now']} judged now)",
                [{"group": m["grp"], "metric": m["metric"], "n": m["n"],
                  "value": "NULL" if m["value"] is None else f"{m['value']:.3f}",
                  "95% CI": "" if m["ci_low"] is None else f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]"}
                 for m in result["metrics"] if m["grp"] == "all" or m["metric"] == "accuracy"])  # the rest: in the DB
    _print_probes([result])
    print(f"  swirl sql --db {je_config.db} \"SELECT * FROM judge_probe_summary\"\n"
          f"  swirl sql --db {je_config.db} \"SELECT label, verdict, p_good, corruption, message FROM judge_probe_results "
          f"WHERE judge_fingerprint = '{result['fingerprint']}' LIMIT 10\"")
    return EXIT_OK


def evaluate_config(config: Path | None, opts: BaseModel, temperature: float | None = None, max_tokens: int | None = None,
                    concurrency: int | None = None) -> EvalConfig:
    """The evaluation config, with `--temperature`/`--max-tokens`/`--concurrency` applied to every `--model`."""
    data = given(opts)
    tuning = {k: v for k, v in {"temperature": temperature, "max_tokens": max_tokens, "concurrency": concurrency}.items()
              if v is not None}
    if tuning:
        data["models"] = [{"label": m.label, "model": m.model.model_dump(exclude_unset=True) | tuning}
                          for m in load_config(EvalConfig, config, data).models]
    return load_config(EvalConfig, config, data)


@app.command
def evaluate(*, config: ConfigFile = None, opts: Annotated[EvalOptions, Parameter(name="*")] = EvalOptions(),
             temperature: float | None = None, max_tokens: int | None = None, concurrency: int | None = None) -> int:
    """Compare models (base, SFT, SWiRL) on held-out questions with CIs.

    `--dataset NAME` may be repeated, each followed by its own --data-files/--corpus: a table of model × dataset.

    Args:
        temperature: of every --model (default: the model config's, greedy)
        max_tokens: tokens per step of every --model (default: 256 API, 64 in-process)
        concurrency: max requests in flight for the whole run (split across its workers), of every --model
    """
    ev_config = evaluate_config(config, opts, temperature, max_tokens, concurrency)
    _check_db_free(ev_config.db)
    with prefect_api() as api_ready:
        from flows.evaluate import evaluate as evaluate_flow
        from swirl_core.generation import plan_generation

        for c in ev_config.per_dataset():  # bad seeds, options or checkpoints: a one-line error before any call
            for m in c.models:
                plan_generation(c.generate_config(m))
        with _hold_db(ev_config.db):
            api_ready()
            result = evaluate_flow(ev_config)
    print(Path(result["report"]).read_text().rsplit("\n![", 1)[0])  # the report's tables, without the plot link
    runs = ", ".join(f"'{r['run_id']}'" for r in result.get("datasets", [result]))
    print(f"report: {result['report']} (plot: {result['plot']})\n"
          f"  swirl sql --db {result['db']} \"SELECT * FROM eval_summary WHERE eval_run_id IN ({runs})\"")
    for failure in result["failures"]:
        print(f"failed: {failure} — rerun the same command to resume", file=sys.stderr)
    return EXIT_OK if result["status"] == "completed" else EXIT_FAILED


def training_config(config: Path | None, opts: BaseModel) -> TrainConfig:
    data = given(opts)
    method = data.get("settings", {}).get("method")
    if method == "swirl" and "judge" not in data:
        data["judge"] = {}  # SWiRL's reward judge: the offline default unless named
    elif method == "sft":
        data.pop("judge", None)  # SFT has no reward model
    return load_config(TrainConfig, config, data)


@app.command
def train(*, config: ConfigFile = None, opts: Annotated[TrainOptions, Parameter(name="*")] = TrainOptions()) -> int:
    """Fine-tune on a curated set: SFT baseline or SWiRL step-wise RL.

    `--vllm MODE` is short for `--use-vllm --vllm-mode MODE`."""
    train_config = training_config(config, opts)
    if not Path(train_config.db).exists():
        raise FileNotFoundError(f"{train_config.db} does not exist")
    _check_db_free(train_config.db, read_only=True)
    with prefect_api() as api_ready:
        from flows.train import train_flow

        api_ready()
        result = train_flow(train_config)
    if result["skipped"]:
        print(f"{result['output_dir']} already holds this training run (same settings, same data): nothing to do; "
              "delete the folder or change --output-dir to train again")
    else:
        _print_training(result)
    if result.get("hub"):
        print(f"pushed to the Hub: {result['hub']['repo_id']} ({result['hub']['commit']})")
    return EXIT_OK


@app.command
def publish(*, config: ConfigFile = None, opts: Annotated[PublishOptions, Parameter(name="*")] = PublishOptions()) -> int:
    """Export the curated sets with a dataset card and upload them to the Hub (endpoint: HF_ENDPOINT)."""
    pub_config = load_config(PublishConfig, config, given(opts))
    if not Path(pub_config.db).exists():
        raise FileNotFoundError(f"{pub_config.db} does not exist")
    _check_db_free(pub_config.db, read_only=True)
    with prefect_api() as api_ready:
        from flows.publish import publish as publish_flow

        api_ready()
        result = publish_flow(pub_config)
    _print_rows("exported rows", [{"config": c, **v} for c, v in result["rows"].items()])
    print(f"Hub folder: {result['folder']}")
    if result["uploaded"]:
        state = "new commit" if result["new_commit"] else "unchanged, no new commit"
        print(f"published {result['repo_id']} ({'private' if result['private'] else 'public'}): {state} {result['commit']}")
        print(f'  from datasets import load_dataset; load_dataset("{result["repo_id"]}", "process")')
    return EXIT_OK


@app.command
def sql(query: str, /, *, db: str = DEFAULT_DB, max_rows: int = 50, csv: bool = False) -> int:
    """Run a SQL query on the database (opened read-only) and print the result.

    Args:
        query: SQL, e.g. "SELECT * FROM run_report"
        db: DuckDB file
        max_rows: rows printed at most
        csv: print CSV instead of a table
    """
    import duckdb

    from swirl_core.store import Store

    _check_db_free(db, read_only=True)
    try:
        store = Store(db, read_only=True)
    except (RuntimeError, duckdb.Error) as exc:
        print(f"swirl sql: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with store:
        try:
            cur = store.con.execute(query)
        except duckdb.Error as exc:
            print(f"swirl sql: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if cur.description is None:
            return EXIT_OK
        cols = [d[0] for d in cur.description]
        rows = cur.fetchmany(max_rows)
    if csv:
        import csv as csv_module

        writer = csv_module.writer(sys.stdout)
        writer.writerow(cols)
        writer.writerows(rows)
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(*cols)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    Console().print(table)
    return EXIT_OK


@app.command
def compact(*, config: ConfigFile = None, opts: Annotated[CompactOptions, Parameter(name="*")] = CompactOptions()) -> int:
    """Fold the call journals of finished writers, once in the database, into one segment and delete them.

    Every stage does it when it ends. A kill at any moment loses no paid call (the next compaction finishes the work).
    Journals still being written, or whose writer died, are kept."""
    workspace = load_config(Workspace, config, given(opts))
    if not Path(workspace.db).is_file():
        raise FileNotFoundError(f"{workspace.db} does not exist")
    if not workspace.journal_dir.is_dir():
        raise FileNotFoundError(f"{workspace.journal_dir} does not exist: --work-dir names the work folder of {workspace.db}")
    from swirl_core.store import Store

    with Store(workspace.db) as store:
        done = store.compact_journals(workspace.journal_dir)
    if done.folded:
        print(f"folded {done.folded} journals into {done.segment} ({done.segment_bytes / 2**20:.1f} MiB); "
              f"{workspace.journal_dir} holds {done.journals_left} journal files")
    else:
        print(f"nothing to fold: {workspace.journal_dir} holds {done.journals_left} journal files")
    return EXIT_OK


@app.command
def completion(shell: Literal["bash", "zsh", "fish", "powershell"], /) -> int:
    """Print the shell completion script, e.g. `swirl completion bash > ~/.local/share/bash-completion/completions/swirl`.

    Args:
        shell: the shell the script is for
    """
    print(app.generate_completion(prog_name="swirl", shell=shell))
    return EXIT_OK


# -- output -----------------------------------------------------------------------------------------------
def _print_generation(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"run {result['run_id']}: {result['status']}")
    for col in ("status", "trajectories", "mean_steps"):
        table.add_column(col)
    for r in result["summary"]["status"]:
        table.add_row(str(r["status"]), str(r["trajectories"]), str(r["mean_steps"]))
    console.print(table)
    actions = result["summary"]["actions"]
    total = sum(a["steps"] for a in actions) or 1
    parsed = sum(a["steps"] for a in actions if a["action"] != "invalid")
    console.print(f"steps: {total}, parsed as one action: {parsed / total:.1%}")
    console.print(f"calls: {result['calls'].describe()}")
    console.print(f"results in [bold]{result['db']}[/bold]; try:\n"
                  f"  swirl sql --db {result['db']} \"SELECT * FROM run_report\"\n"
                  f"  swirl sql --db {result['db']} \"SELECT action_kind, action_input, observation FROM steps LIMIT 10\"")
    for failure in result["shard_failures"]:
        console.print(f"[red]shard failed[/red]: {failure} — rerun the same command to resume")


def _print_probes(probes: list[dict]) -> None:
    """The judge probe's figures, and a plain warning when the judge is no better than chance."""
    for probe in probes:
        print(probe["headline"], file=sys.stdout if probe["better_than_chance"] else sys.stderr)


def _print_training(result: dict) -> None:
    from flows.train import rl_signals

    resumed = f", resumed from step {result['resumed_from']}" if result["resumed_from"] else ""
    print(f"trained {result['steps']} steps ({result['seconds_per_step']:.2f} s/step, {result['world_size']} process(es)"
          f"{resumed}) on {result['lineage']['rows']} rows of the '{result['lineage']['filter']}' set; "
          f"checkpoint: {result['output_dir']}")
    if result["dropped_too_long"]:
        print(f"{result['dropped_too_long']} rows left out: state and action longer than max_length")
    for line in rl_signals(result["log_history"]):
        print(line)


def _print_rows(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(*rows[0].keys(), title=title)
    for r in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in r.values()))
    Console().print(table)


# -- entry point ------------------------------------------------------------------------------------------
GRID_OPTIONS = ("--data-files", "--corpus")


def evaluate_grid(tokens: list[str]) -> list[str]:
    """`evaluate --dataset A --data-files a.jsonl --dataset B --data-files b.jsonl`: each `--dataset` after the
    first starts another dataset of the grid, and the `--data-files`/`--corpus` after it are its own (before
    any `--dataset`: the default dataset's). The first stays as options; the others become `also` entries."""
    rest: list[str] = []
    datasets: list[dict[str, Any]] = []
    i = 0
    while i < len(tokens):
        option, eq, value = tokens[i].partition("=")
        if option != "--dataset" and option not in GRID_OPTIONS:
            rest.append(tokens[i])
            i += 1
            continue
        values = [value] if eq else []
        i += 1
        while i < len(tokens) and not tokens[i].startswith("-") and (option == "--data-files" or not values):
            values.append(tokens[i])
            i += 1
        if option == "--dataset" or not datasets:
            datasets.append({})
        key = option.lstrip("-").replace("-", "_")
        if key in datasets[-1]:
            raise ValueError(f"{option} given twice for --dataset {datasets[-1].get('dataset', 'of the default')}")
        datasets[-1][key] = values if option == "--data-files" else " ".join(values)
    first, *more = datasets or [{}]
    for key, value in first.items():
        rest += [f"--{key.replace('_', '-')}", *(value if isinstance(value, list) else [value])]
    for d in more:
        rest += ["--also", json.dumps(d)]
    return rest


def rewrite(tokens: list[str]) -> list[str]:
    """The spellings options had before they were the configs' fields, where one old option is two fields."""
    if tokens[:1] == ["evaluate"]:
        return ["evaluate", *evaluate_grid(tokens[1:])]
    if tokens[:1] == ["train"]:
        out: list[str] = []
        for i, token in enumerate(tokens):  # --vllm MODE: sample with vLLM, in this mode
            if token == "--vllm" and i + 1 < len(tokens):
                out += ["--use-vllm", "--vllm-mode"]
            elif token.startswith("--vllm="):
                out += ["--use-vllm", f"--vllm-mode={token.split('=', 1)[1]}"]
            else:
                out.append(token)
        return out
    return tokens


def resolve(argv: Sequence[str]) -> BaseModel:
    """The validated config a command line stands for, without running anything."""
    command, bound, _ = app.parse_args(rewrite(list(argv)))
    bound.apply_defaults()
    builders = {run: pipeline_config, evaluate: evaluate_config, train: training_config,
                generate: GenerateConfig, curate: CurateConfig, judge_eval: JudgeEvalConfig, publish: PublishConfig}
    build = builders[command]
    if isinstance(build, type):
        return load_config(build, bound.arguments["config"], given(bound.arguments["opts"]))
    return build(*bound.args, **bound.kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    apply_quiet_env()
    tokens = list(sys.argv[1:] if argv is None else argv)
    if not tokens:
        app.help_print(tokens)
        return EXIT_BAD_INPUT  # a command is required
    command = tokens[0] if tokens and tokens[0] in app else None
    try:
        result = app(rewrite(tokens))
    except (CycloptsError, ValidationError, ValueError, FileNotFoundError) as exc:  # bad input: one line
        _error(command, exc)
        return EXIT_BAD_INPUT
    except RuntimeError as exc:
        from swirl_core.store import DatabaseInUseError, DatabaseOpenError

        if not isinstance(exc, DatabaseOpenError):
            raise
        _error(command, exc)
        return EXIT_DB_IN_USE if isinstance(exc, DatabaseInUseError) else EXIT_BAD_INPUT
    return EXIT_OK if result is None else result  # --help, --version


def _error(command: str | None, exc: Exception) -> None:
    if isinstance(exc, CycloptsError) and isinstance(exc.__cause__, ValidationError):
        exc = exc.__cause__
    if isinstance(exc, ValidationError):  # each error as `field: message`, the field as the config spells it
        text = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors())
        text = text.replace("Value error, ", "")
    else:
        text = str(exc)
    print(f"swirl{' ' + command if command else ''}: error: {' '.join(text.split())}", file=sys.stderr)


def _hold_db(db: str):
    """Hold the database read-write for the whole command. `_check_db_free` cannot stop two commands started
    together (a new file, or both checking before either opens it): the second then fails here, in one line,
    before a flow or a Dask cluster starts. The flow's own connection in this process shares the instance."""
    import contextlib

    from swirl_core.store import connect

    Path(db).parent.mkdir(parents=True, exist_ok=True)
    return contextlib.closing(connect(db))


def _check_db_free(db: str, read_only: bool = False) -> None:
    """A database another process holds fails here in one line, not as a traceback from inside a flow."""
    if Path(db).is_file():
        from swirl_core.store import connect

        connect(db, read_only=read_only).close()


if __name__ == "__main__":
    sys.exit(main())
