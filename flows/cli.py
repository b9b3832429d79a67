"""`swirl`: run the factory's flows from the command line (no Prefect server needed)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flows.runtime import apply_quiet_env
from swirl_core.records import CuratedFilter

EXAMPLES = """\
examples:
  swirl run                                        # the whole pipeline, offline, on the demo (about 10 min)
  swirl run --config pipeline.yaml                 # any PipelineConfig as YAML or JSON
  swirl generate                                   # offline demo: SmolLM2 on the demo math seeds
  swirl generate --dataset gsm8k --data-files ../shared/data/gsm8k/test_dev.jsonl --split test \\
      --limit 50 --samples 5 --policy openai/gpt-4o-mini        # key from OPENAI_API_KEY
  swirl generate --dataset hotpotqa --data-files dev.json --corpus wiki.jsonl \\
      --policy hosted_vllm/Qwen2.5-7B-Instruct --policy-api-base http://127.0.0.1:8000/v1
  swirl judge-eval --dataset gsm8k --data-files ../shared/data/gsm8k/train.jsonl --judge openai/gpt-4o-mini
  swirl curate --db swirl.duckdb --judge openai/gpt-4o-mini --grader llm --min-judge-f1 0.6
  swirl evaluate --dataset gsm8k --data-files ../shared/data/gsm8k/test_dev.jsonl --limit 300 \
      --model base=smollm2 --model sft=./out/sft --model swirl=./out/swirl --judge openai/gpt-4o-mini --grader llm
  swirl evaluate --dataset hotpotqa --data-files dev.json --dataset gsm8k --data-files test.jsonl \
      --model base=smollm2 --model swirl=./out/swirl --judge openai/gpt-4o-mini   # a model × dataset grid
  swirl train --method swirl --output ./out/swirl --num-processes 2 --save-steps 50 --push-to-hub me/swirl
  swirl sql --db swirl.duckdb "SELECT status, count(*) FROM trajectories GROUP BY 1"
"""


EVAL_DEFAULT_DATASET = "demo-math"


def _add_model_args(p: argparse.ArgumentParser, prefix: str, default: str, *, temperature: float = 0.7,
                    policy: bool = True, spec: bool = False) -> None:
    p.add_argument(f"--{prefix}", default=default, metavar="MODEL[@API_BASE]" if spec else "MODEL",
                   help=f"litellm model name{' with an optional @API_BASE' if spec else ''}, 'smollm2' (offline default) "
                        f"or a local checkpoint folder (default: {default})")
    p.add_argument(f"--{prefix}-api-base", metavar="URL", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument(f"--{prefix}-api-key-env", metavar="VAR", help="environment variable holding the API key (default: the provider's usual one)")
    p.add_argument(f"--{prefix}-api-key-secret", metavar="BLOCK", help="Prefect Secret block holding the API key (instead of an environment variable)")
    p.add_argument(f"--{prefix}-identity", metavar="NAME",
                   help="name its calls and results are stored under (default: MODEL@API_BASE; give one model on several hosts one name)")
    p.add_argument("--concurrency", type=int, default=32, help="max requests in flight per worker (default: 32)")
    p.add_argument("--rpm", type=float, help="requests-per-minute limit")
    p.add_argument("--tpm", type=float, help="tokens-per-minute limit")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt (default: 120)")
    p.add_argument("--max-retries", type=int, default=6, help="retries on 429/5xx/timeouts (default: 6)")
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--max-tokens", type=int, help="tokens per reply (default: 256 API, 64 in-process)")
    if policy:
        from swirl_core.constraints import SERVER_KINDS

        p.add_argument("--few-shot", action=argparse.BooleanOptionalAction, default=None,
                       help="demonstrations as chat turns (default: on for in-process models)")
        p.add_argument("--constraint", choices=["auto", "none", "grammar", "regex"], default="auto",
                       help="decoding constraint: grammar in-process, regex on a server, verified by one probe request "
                            "before the run (default: auto)")
        p.add_argument("--server-kind", choices=["auto", *SERVER_KINDS], default="auto",
                       help="how --constraint regex is sent: vLLM structured_outputs, SGLang regex, llama.cpp GBNF, "
                            "TGI regex; auto = what the server says it is (default: auto)")
        p.add_argument("--allow-unconstrained", action="store_true",
                       help="if the server ignores the constraint, continue without it (constraint NULL) instead of stopping")


class _NewDataset(argparse.Action):
    """`--dataset NAME` starts a dataset of the evaluation grid; the options after it are its own."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), {"dataset": values}])


class _OfDataset(argparse.Action):
    """`--data-files` / `--corpus`: of the last `--dataset` (before any: of the default one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        datasets = getattr(namespace, self.dest) or [{"dataset": EVAL_DEFAULT_DATASET}]
        key = option_string.lstrip("-").replace("-", "_")
        if key in datasets[-1]:
            parser.error(f"{option_string} given twice for --dataset {datasets[-1]['dataset']}")
        datasets[-1][key] = values
        setattr(namespace, self.dest, datasets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swirl", description="SWiRL data factory: multi-step tool-use trajectories, judging, training.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="the whole pipeline: generate, curate, train SFT and SWiRL, evaluate, publish",
                         description="Runs the whole pipeline; without options, the offline demo (about 10 minutes on "
                                     "2 CPU cores). Rerunning resumes: nothing is paid for or trained twice.")
    run.add_argument("--db", help="DuckDB file (default: the config's, else swirl.duckdb)")
    run.add_argument("--config", metavar="FILE",
                     help="a PipelineConfig as YAML or JSON (sections generate, curate, sft, swirl, evaluate, publish); "
                          "the options below override it")
    run.add_argument("--work-dir", help="journals, checkpoints and reports (default: <db>.work)")
    run.add_argument("--dataset", help="seed dataset (default: demo-math)")
    run.add_argument("--data-files", nargs="+", metavar="PATH", help="local seed files")
    run.add_argument("--limit", type=int, help="first N seed questions")
    run.add_argument("--samples", type=int, help="trajectories per question")
    run.add_argument("--policy", metavar="MODEL[@API_BASE]", help="policy model (default: smollm2, in-process)")
    run.add_argument("--judge", metavar="MODEL[@API_BASE]", help="process judge and SWiRL reward model (default: smollm2)")
    run.add_argument("--eval-limit", type=int, help="held-out questions to evaluate on")
    run.add_argument("--no-train", action="store_true", help="stop after curation")
    run.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    run.add_argument("--publish-repo-id", metavar="USER/NAME", help="also publish the curated sets to this Hub repo")
    run.add_argument("--scheduler-address", help="Dask scheduler tls://HOST:PORT or tcp://HOST:PORT (default: a local cluster)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    gen = sub.add_parser("generate", help="generate multi-step trajectories into DuckDB",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--dataset", default="demo-math",
                     help="gsm8k, hotpotqa, musique, beerqa, cofca, generic, demo-math, demo-qa")
    gen.add_argument("--data-files", nargs="+", metavar="PATH", help="local JSONL/JSON/Parquet (default: the Hub dataset)")
    gen.add_argument("--split", default="train")
    gen.add_argument("--hub-name", help="Hub dataset name (default: the dataset's usual one)")
    gen.add_argument("--hub-config", help="Hub dataset config")
    gen.add_argument("--limit", type=int, help="first N valid questions")
    gen.add_argument("--skip-invalid", action="store_true", help="record and skip malformed seed rows instead of failing")
    gen.add_argument("--samples", type=int, default=5, help="trajectories per question")
    gen.add_argument("--max-steps", type=int, help="step cap (default: 10 math, 5 QA)")
    gen.add_argument("--corpus", help="search corpus JSONL/Parquet (title,text), or 'seeds' for the questions' own paragraphs")
    gen.add_argument("--search-k", type=int, default=1, help="paragraphs returned per search")
    _add_model_args(gen, "policy", "smollm2")
    gen.add_argument("--db", default="swirl.duckdb", help="DuckDB file")
    gen.add_argument("--work-dir", help="call journals and shards (default: <db>.work)")
    gen.add_argument("--scheduler-address", help="Dask scheduler tls://HOST:PORT or tcp://HOST:PORT (default: a local cluster)")
    gen.add_argument("--workers", type=int, help="local Dask workers (default: 2; 1 for in-process models)")
    gen.add_argument("--shard-size", type=int, default=8, help="questions per shard")
    gen.add_argument("--fsync", action="store_true", help="fsync the call journal after every response")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")

    cur = sub.add_parser("curate", help="judge every step, grade outcomes, build the four curated sets",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cur.add_argument("--db", default="swirl.duckdb", help="DuckDB file written by `swirl generate`")
    _add_model_args(cur, "judge", "smollm2", temperature=0.0, policy=False)
    cur.add_argument("--judge-samples", type=int, default=1, help="judge samples per step, majority vote")
    cur.add_argument("--max-reasks", type=int, default=2, help="re-asks when a verdict is unparseable")
    cur.add_argument("--grader", choices=["rule", "llm"], default="rule",
                     help="outcome grader: rule-based (exact match/F1, numeric), or also the judge model's YES/NO")
    cur.add_argument("--skip-judge", action="store_true", help="grade outcomes only")
    cur.add_argument("--judge-id", metavar="FINGERPRINT",
                     help="judge nothing: the curated sets read the verdicts this judge already gave (e.g. an earlier one)")
    cur.add_argument("--probe-limit", type=int, default=20,
                     help="seed questions the judge probe builds labelled steps from (0: no probe)")
    cur.add_argument("--min-judge-f1", type=float, metavar="X",
                     help="refuse to curate when the judge's probe F1 for detecting BAD steps is below X")
    cur.add_argument("--run-id", action="append", dest="run_ids", metavar="RUN", help="only this generation run (repeatable)")
    cur.add_argument("--dataset", help="only questions of this dataset")
    cur.add_argument("--work-dir", help="call journals (default: <db>.work)")
    cur.add_argument("--scheduler-address", help="Dask scheduler tls://HOST:PORT or tcp://HOST:PORT (default: a local cluster)")
    cur.add_argument("--workers", type=int, help="local Dask workers (default: 2; 1 for in-process models)")
    cur.add_argument("--shard-size", type=int, default=64, help="steps per shard")
    cur.add_argument("--fsync", action="store_true", help="fsync the call journal after every response")
    cur.add_argument("--no-progress", action="store_true", help="no progress bar")

    je = sub.add_parser("judge-eval", help="measure a judge on labelled GOOD/BAD steps built from gold solutions",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    je.add_argument("--db", default="swirl.duckdb", help="DuckDB file (results land in judge_probe_results)")
    je.add_argument("--dataset", default="demo-math", help="a dataset with gold steps: gsm8k, hotpotqa, musique, demo-math")
    je.add_argument("--data-files", nargs="+", metavar="PATH", help="local JSONL/JSON/Parquet (default: the Hub dataset)")
    je.add_argument("--split", default="train")
    je.add_argument("--hub-name", help="Hub dataset name (default: the dataset's usual one)")
    je.add_argument("--hub-config", help="Hub dataset config")
    je.add_argument("--limit", type=int, default=20, help="seed questions to build labelled steps from")
    je.add_argument("--seed", type=int, default=0, help="seed of the corruptions")
    _add_model_args(je, "judge", "smollm2", temperature=0.0, policy=False, spec=True)
    je.add_argument("--judge-samples", type=int, default=1, help="judge samples per step (self-consistency)")
    je.add_argument("--max-reasks", type=int, default=2, help="re-asks when a verdict is unparseable")
    je.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the CIs")
    je.add_argument("--work-dir", help="call journals (default: <db>.work)")

    tr = sub.add_parser("train", help="fine-tune on a curated set: SFT baseline or SWiRL step-wise RL",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("--db", default="swirl.duckdb", help="DuckDB file with curated data (read-only)")
    tr.add_argument("--method", choices=["sft", "swirl"], required=True)
    tr.add_argument("--base-model", default="smollm2", help="'smollm2', a checkpoint folder, or a Hub name")
    tr.add_argument("--filter", choices=[str(f) for f in CuratedFilter],
                    help="curated set (default: process_outcome for sft, process for swirl)")
    tr.add_argument("--output", required=True, help="checkpoint folder")
    tr.add_argument("--max-steps", type=int, default=100)
    tr.add_argument("--batch-size", type=int, default=4, help="per device: examples (sft) or completions (swirl)")
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--learning-rate", type=float, help="default 2e-5 sft, 1e-6 swirl")
    tr.add_argument("--num-generations", type=int, default=4, help="swirl: fresh actions per state")
    tr.add_argument("--max-completion-length", type=int, default=64, help="swirl: tokens of one step")
    tr.add_argument("--beta", type=float, default=0.04, help="swirl: KL coefficient to the initial policy (> 0)")
    tr.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the saved model)")
    tr.add_argument("--dataset", help="only steps of this seed dataset")
    tr.add_argument("--run-id", action="append", dest="run_ids", metavar="RUN",
                    help="only trajectories of this generation run (repeatable; default: every run in the database)")
    tr.add_argument("--limit", type=int, help="at most this many training rows")
    tr.add_argument("--judge", default="smollm2", help="swirl: the reward judge (litellm name or local model)")
    tr.add_argument("--judge-api-base", help="swirl: OpenAI-compatible endpoint of the judge")
    tr.add_argument("--judge-api-key-env", help="swirl: environment variable holding the judge's API key")
    tr.add_argument("--judge-api-key-secret", help="swirl: Prefect Secret block holding the judge's API key")
    tr.add_argument("--rpm", type=float, help="swirl: the judge's requests-per-minute limit (one limiter for the whole run)")
    tr.add_argument("--save-steps", type=int, default=50, help="a checkpoint every N steps; rerun the same command to resume")
    tr.add_argument("--num-processes", type=int, default=1, help="training processes under `accelerate launch` (one per GPU)")
    tr.add_argument("--distributed", choices=["ddp", "zero2", "zero3", "fsdp"], default="ddp",
                    help="engine of several processes (DeepSpeed ZeRO / FSDP for models that do not fit one GPU)")
    tr.add_argument("--vllm", choices=["colocate", "server"], help="swirl: sample with vLLM on the GPU (default: transformers)")
    tr.add_argument("--vllm-server-base-url", help="swirl: the `trl vllm-serve` server of --vllm server")
    tr.add_argument("--report-to", action="append", choices=["tensorboard", "wandb"], default=[],
                    help="also log to this tracker (repeatable)")
    tr.add_argument("--push-to-hub", metavar="USER/NAME", help="push the final model and its card to this Hub model repo")
    tr.add_argument("--public", action="store_true", help="a new Hub repo is public (default: private)")
    tr.add_argument("--token-secret", help="Prefect Secret block holding the Hub token (default: HF_TOKEN)")
    tr.add_argument("--dataset-repo-id", metavar="USER/NAME", help="the Hub dataset of the curated set, named in the card")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")

    pub = sub.add_parser("publish", help="export the curated sets with a dataset card and upload them to the Hub",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pub.add_argument("--db", default="swirl.duckdb", help="DuckDB file with curated data")
    pub.add_argument("--repo-id", required=True, help="USER/NAME of the dataset repo (endpoint: HF_ENDPOINT)")
    visibility = pub.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True, help="private repo")
    visibility.add_argument("--public", dest="private", action="store_false", help="public repo")
    pub.add_argument("--out-dir", help="where the Hub folder is written (default: <db>.work/hub/USER__NAME)")
    pub.add_argument("--token-secret", help="Prefect Secret block holding the token (default: HF_TOKEN)")
    pub.add_argument("--dry-run", action="store_true", help="export and write the card only")

    ev = sub.add_parser("evaluate", help="compare models (base, SFT, SWiRL) on held-out questions with CIs",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--db", default="swirl.duckdb", help="DuckDB file (results land in eval_results)")
    ev.add_argument("--dataset", action=_NewDataset, dest="datasets", metavar="NAME",
                    help="gsm8k, hotpotqa, musique, beerqa, cofca, generic, demo-math, demo-qa; repeatable, each followed "
                         "by its own --data-files/--corpus: a table of model × dataset (default: demo-math)")
    ev.add_argument("--data-files", nargs="+", metavar="PATH", action=_OfDataset, dest="datasets",
                    help="local JSONL/JSON/Parquet of the --dataset before it (default: the Hub dataset)")
    ev.add_argument("--split", default="test", help="a split the models were not trained on")
    ev.add_argument("--hub-name", help="Hub dataset name (default: the dataset's usual one)")
    ev.add_argument("--hub-config", help="Hub dataset config")
    ev.add_argument("--limit", type=int, help="first N valid questions")
    ev.add_argument("--model", action="append", dest="models", metavar="LABEL=SPEC",
                    help="repeatable; SPEC is a litellm name with an optional @API_BASE "
                         "(sft=openai/sft@http://127.0.0.1:8000/v1), 'smollm2', or a checkpoint folder "
                         "(swirl=./out/swirl) (default: base=smollm2)")
    ev.add_argument("--grader", choices=["auto", "rule", "llm"], default="auto",
                    help="correctness: exact match/F1 (rule), plus the judge's YES/NO (llm); auto: llm for QA when a "
                         "--judge is given")
    ev.add_argument("--judge", metavar="MODEL[@API_BASE]",
                    help="LLM grader and process judge (mean step score); none: rule metrics only")
    ev.add_argument("--no-step-scores", action="store_true", help="skip the process judge's step scores")
    ev.add_argument("--no-tools", action="store_true", help="no-tool mode: answer in one message (paper's Figure 6)")
    ev.add_argument("--max-steps", type=int, help="step cap (default: 10 math, 5 QA, 1 without tools)")
    ev.add_argument("--corpus", action=_OfDataset, dest="datasets", metavar="PATH",
                    help="search corpus JSONL/Parquet (title,text) of the --dataset before it, or 'seeds'")
    ev.add_argument("--search-k", type=int, default=1, help="paragraphs returned per search")
    ev.add_argument("--temperature", type=float, default=0.0, help="policy temperature (greedy by default)")
    ev.add_argument("--max-tokens", type=int, help="tokens per step (default: 256 API, 64 in-process)")
    ev.add_argument("--concurrency", type=int, default=32, help="max requests in flight per worker")
    ev.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the CIs")
    ev.add_argument("--report", help="markdown report path (default: <db>.work/eval/report-<run>.md)")
    ev.add_argument("--work-dir", help="call journals (default: <db>.work)")
    ev.add_argument("--scheduler-address", help="Dask scheduler tls://HOST:PORT or tcp://HOST:PORT (default: a local cluster)")
    ev.add_argument("--workers", type=int, help="local Dask workers")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    sql = sub.add_parser("sql", help="run a SQL query on the database and print the result")
    sql.add_argument("query", help="SQL, e.g. \"SELECT * FROM run_report\"")
    sql.add_argument("--db", default="swirl.duckdb", help="DuckDB file (opened read-only)")
    sql.add_argument("--max-rows", type=int, default=50)
    sql.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    return parser


def _model_config(args: argparse.Namespace, prefix: str):
    from swirl_core.config import ModelConfig

    return ModelConfig(
        model=getattr(args, prefix), api_base=getattr(args, f"{prefix}_api_base"),
        api_key_env=getattr(args, f"{prefix}_api_key_env"), api_key_secret=getattr(args, f"{prefix}_api_key_secret"),
        identity=getattr(args, f"{prefix}_identity"),
        concurrency=args.concurrency,
        requests_per_minute=args.rpm, tokens_per_minute=args.tpm, timeout_s=args.timeout,
        max_retries=args.max_retries, temperature=args.temperature, max_tokens=args.max_tokens,
        few_shot=getattr(args, "few_shot", None), constraint=getattr(args, "constraint", "auto"),
        server_kind=getattr(args, "server_kind", "auto"), allow_unconstrained=getattr(args, "allow_unconstrained", False),
    )


def pipeline_config(args: argparse.Namespace):
    """The config file (if any) with the command line's options on top."""
    from swirl_core.config import PipelineConfig, parse_model_spec

    data: dict = {}
    if args.config:
        import yaml

        text = Path(args.config).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping of pipeline settings")
    for key in ("db", "work_dir"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.scheduler_address:
        data["cluster"] = {"address": args.scheduler_address}
    if args.no_progress:
        data["progress"] = False
    def section(name: str, default: dict | None = None) -> dict:  # a section the file left out or set to null
        if not isinstance(data.get(name), dict):
            data[name] = dict(default or {})
        return data[name]

    gen = section("generate", {"samples": 4})
    for key in ("dataset", "data_files", "limit", "samples"):
        if getattr(args, key) is not None:
            gen[key] = getattr(args, key)
    if args.policy:
        gen["policy"] = parse_model_spec(args.policy).model_dump(exclude_unset=True)
    if args.judge:
        section("curate")["judge"] = parse_model_spec(args.judge, temperature=0.0).model_dump(exclude_unset=True)
    if args.no_train:
        data["sft"] = data["swirl"] = None
    if args.no_eval or args.no_train:
        data["evaluate"] = None
    elif args.eval_limit is not None:
        section("evaluate")["limit"] = args.eval_limit
    if args.publish_repo_id:
        data["publish"] = {"repo_id": args.publish_repo_id}
    return PipelineConfig.model_validate(data)


def cmd_run(args: argparse.Namespace) -> int:
    config = pipeline_config(args)
    # Not held for the whole command like generate's: training opens the database read-only in this process.
    _check_db_free(argparse.Namespace(db=config.db, command="run"))
    from flows.pipeline import check_inputs, pipeline
    from flows.runtime import prefect_api

    check_inputs(config)  # bad seeds or options: a one-line error before any flow or call
    with prefect_api():
        result = pipeline(config)
    _print_rows(f"pipeline: {result['status']}", result["stages"])
    _print_probes(result["probes"])
    _print_rows("steps parsed as one action", result["step_parse"])
    _print_rows("curated sets", result["retention"])
    if result["metrics"]:
        _print_rows("evaluation on held-out questions", [
            {"dataset": m["dataset"], "model": m["label"], "metric": m["metric"], "n": m["n"], "mean": f"{m['mean']:.3f}",
             "95% CI": f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]"} for m in result["metrics"]])
    db = result["db"]
    print(f"\nresults: {db} (DuckDB); checkpoints: {', '.join(result['checkpoints'].values()) or 'none'}"
          + (f"; evaluation report: {result['report']}" if result["report"] else ""))
    print("try:\n"
          f"  swirl sql --db {db} \"SELECT * FROM curation_retention\"\n"
          f"  swirl sql --db {db} \"SELECT state, action FROM curated_process_outcome LIMIT 5\"\n"
          f"  swirl sql --db {db} \"SELECT label, questions, answered, exact_match, f1 FROM eval_summary\"")
    return 0 if result["status"] == "completed" else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from swirl_core.config import ClusterConfig, GenerateConfig

    config = GenerateConfig(
        dataset=args.dataset, data_files=args.data_files, split=args.split, hub_name=args.hub_name,
        hub_config=args.hub_config, limit=args.limit, skip_invalid=args.skip_invalid, samples=args.samples,
        max_steps=args.max_steps, policy=_model_config(args, "policy"), corpus=args.corpus, search_k=args.search_k,
        db=args.db, work_dir=args.work_dir, shard_size=args.shard_size, fsync=args.fsync,
        cluster=ClusterConfig(address=args.scheduler_address, n_workers=args.workers), progress=not args.no_progress,
    )
    from flows.generate import run_generate
    from flows.runtime import prefect_api
    from swirl_core.generation import plan_generation, verify_constraint

    plan_generation(config)  # bad seeds or options: a one-line error here, before any flow or call
    verify_constraint(config.policy)  # a server that ignores the constraint: a one-line error, before the flow
    with _hold_db(config.db), prefect_api():
        result = run_generate(config)
    _print_generation(result)
    return 0 if result["status"] == "completed" else 1


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
    console.print(f"results in [bold]{result['db']}[/bold]; try:\n"
                  f"  swirl sql --db {result['db']} \"SELECT * FROM run_report\"\n"
                  f"  swirl sql --db {result['db']} \"SELECT action_kind, action_input, observation FROM steps LIMIT 10\"")
    for failure in result["shard_failures"]:
        console.print(f"[red]shard failed[/red]: {failure} — rerun the same command to resume")


def cmd_curate(args: argparse.Namespace) -> int:
    from swirl_core.config import ClusterConfig, CurateConfig

    if not Path(args.db).exists():
        raise FileNotFoundError(f"{args.db} does not exist: run `swirl generate --db {args.db}` first")
    config = CurateConfig(
        db=args.db, work_dir=args.work_dir, judge=_model_config(args, "judge"), judge_samples=args.judge_samples,
        max_reasks=args.max_reasks, grader=args.grader, skip_judge=args.skip_judge, run_ids=args.run_ids,
        judge_id=args.judge_id, probe_limit=args.probe_limit, min_judge_f1=args.min_judge_f1,
        dataset=args.dataset, shard_size=args.shard_size, fsync=args.fsync, progress=not args.no_progress,
        cluster=ClusterConfig(address=args.scheduler_address, n_workers=args.workers),
    )
    from flows.curate import run_curate
    from flows.runtime import prefect_api

    with _hold_db(config.db), prefect_api():
        result = run_curate(config)
    _print_probes(result["probes"])
    print(f"judge {result['fingerprint']} (select an earlier judge's verdicts with --judge-id FINGERPRINT)")
    _print_rows(f"curation run {result['run_id']}: {result['status']}", result["report"]["retention"])
    _print_rows("process judge vs outcome", result["report"]["agreement"])
    db = result["db"]
    print(f"curated sets are views in {db}: {', '.join(f.view for f in CuratedFilter)}\n"
          f"  swirl sql --db {db} \"SELECT * FROM curation_retention\"\n"
          f"  swirl sql --db {db} \"SELECT * FROM good_rate_by_step\"")
    for failure in result["shard_failures"]:
        print(f"shard failed: {failure} — rerun the same command to resume", file=sys.stderr)
    return 0 if result["status"] == "completed" else 1


def _print_probes(probes: list[dict]) -> None:
    """The judge probe's figures, and a plain warning when the judge is no better than chance."""
    for probe in probes:
        print(probe["headline"], file=sys.stdout if probe["better_than_chance"] else sys.stderr)


def cmd_judge_eval(args: argparse.Namespace) -> int:
    from swirl_core.config import JudgeEvalConfig, parse_model_spec

    judge = _model_config(args, "judge")
    if judge.api_base is None:  # --judge MODEL@API_BASE
        spec = parse_model_spec(args.judge)
        judge = judge.model_copy(update={"model": spec.model, "api_base": spec.api_base})
    config = JudgeEvalConfig(
        db=args.db, work_dir=args.work_dir, dataset=args.dataset, data_files=args.data_files, split=args.split,
        hub_name=args.hub_name, hub_config=args.hub_config, limit=args.limit, seed=args.seed,
        judge=judge, judge_samples=args.judge_samples, max_reasks=args.max_reasks, n_resamples=args.resamples,
    )
    from flows.judge_eval import build_steps, judge_eval
    from flows.runtime import prefect_api

    build_steps(config)  # bad seeds, or a dataset without gold steps: a one-line error before any call
    with _hold_db(config.db), prefect_api():
        result = judge_eval(config)
    _print_rows(f"judge probe {result['run_id']}: {result['steps']} labelled steps ({result['judged_now']} judged now)",
                [{"group": m["grp"], "metric": m["metric"], "n": m["n"],
                  "value": "NULL" if m["value"] is None else f"{m['value']:.3f}",
                  "95% CI": "" if m["ci_low"] is None else f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]"}
                 for m in result["metrics"] if m["grp"] == "all" or m["metric"] == "accuracy"])  # the rest: in the DB
    _print_probes([result])
    print(f"  swirl sql --db {config.db} \"SELECT * FROM judge_probe_summary\"\n"
          f"  swirl sql --db {config.db} \"SELECT label, verdict, p_good, corruption, message FROM judge_probe_results "
          f"WHERE judge_fingerprint = '{result['fingerprint']}' LIMIT 10\"")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from swirl_core.config import ClusterConfig, EvalConfig, EvalDataset, EvalModel, parse_model_spec

    tuning = {"temperature": args.temperature, "max_tokens": args.max_tokens, "concurrency": args.concurrency}
    models = [EvalModel.parse(m, **tuning) for m in (args.models or ["base=smollm2"])]
    first, *rest = args.datasets or [{"dataset": EVAL_DEFAULT_DATASET}]
    config = EvalConfig(
        db=args.db, **first, split=args.split, hub_name=args.hub_name, hub_config=args.hub_config,
        also=[EvalDataset(**d) for d in rest], limit=args.limit, models=models, tools=not args.no_tools,
        max_steps=args.max_steps, search_k=args.search_k, grader=args.grader,
        judge=parse_model_spec(args.judge, temperature=0.0) if args.judge else None,
        step_scores=not args.no_step_scores, n_resamples=args.resamples, report=args.report, work_dir=args.work_dir,
        cluster=ClusterConfig(address=args.scheduler_address, n_workers=args.workers), progress=not args.no_progress,
    )
    from flows.evaluate import evaluate
    from flows.runtime import prefect_api
    from swirl_core.generation import plan_generation

    for c in config.per_dataset():  # bad seeds, options or checkpoints: a one-line error before any call
        for m in c.models:
            plan_generation(c.generate_config(m))
    with _hold_db(config.db), prefect_api():
        result = evaluate(config)
    print(Path(result["report"]).read_text().rsplit("\n![", 1)[0])  # the report's tables, without the plot link
    runs = ", ".join(f"'{r['run_id']}'" for r in result.get("datasets", [result]))
    print(f"report: {result['report']} (plot: {result['plot']})\n"
          f"  swirl sql --db {result['db']} \"SELECT * FROM eval_summary WHERE eval_run_id IN ({runs})\"")
    for failure in result["failures"]:
        print(f"failed: {failure} — rerun the same command to resume", file=sys.stderr)
    return 0 if result["status"] == "completed" else 1


def cmd_train(args: argparse.Namespace) -> int:
    from swirl_core.config import ModelConfig
    from swirl_core.training.run import TrainConfig
    from swirl_core.training.trainers import TrainSettings

    if not Path(args.db).exists():
        raise FileNotFoundError(f"{args.db} does not exist")
    settings = TrainSettings(
        method=args.method, base_model=args.base_model, output_dir=args.output, max_steps=args.max_steps,
        per_device_batch_size=args.batch_size, gradient_accumulation=args.grad_accum, learning_rate=args.learning_rate,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length, beta=args.beta,
        use_lora=args.lora, save_steps=args.save_steps, num_processes=args.num_processes, distributed=args.distributed,
        use_vllm=args.vllm is not None, vllm_mode=args.vllm or "colocate", vllm_server_base_url=args.vllm_server_base_url,
        report_to=args.report_to,
    )
    judge = ModelConfig(model=args.judge, api_base=args.judge_api_base, api_key_env=args.judge_api_key_env,
                        api_key_secret=args.judge_api_key_secret, requests_per_minute=args.rpm,
                        temperature=0.0) if args.method == "swirl" else None
    config = TrainConfig(db=args.db, filter=args.filter, settings=settings, judge=judge, dataset=args.dataset,
                         run_ids=args.run_ids, limit=args.limit, progress=not args.no_progress, push_to_hub=args.push_to_hub,
                         private=not args.public, token_secret=args.token_secret, dataset_repo_id=args.dataset_repo_id)
    from flows.runtime import prefect_api
    from flows.train import train_flow

    with prefect_api():
        result = train_flow(config)
    if result["skipped"]:
        print(f"{result['output_dir']} already holds this training run (same settings, same data): nothing to do; "
              "delete the folder or change --output to train again")
    else:
        _print_training(result)
    if result.get("hub"):
        print(f"pushed to the Hub: {result['hub']['repo_id']} ({result['hub']['commit']})")
    return 0


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


def cmd_publish(args: argparse.Namespace) -> int:
    from swirl_core.config import PublishConfig

    if not Path(args.db).exists():
        raise FileNotFoundError(f"{args.db} does not exist")
    config = PublishConfig(db=args.db, repo_id=args.repo_id, private=args.private, out_dir=args.out_dir,
                           token_secret=args.token_secret, dry_run=args.dry_run)
    from flows.publish import publish
    from flows.runtime import prefect_api

    with prefect_api():
        result = publish(config)
    _print_rows("exported rows", [{"config": c, **v} for c, v in result["rows"].items()])
    print(f"Hub folder: {result['folder']}")
    if result["uploaded"]:
        state = "new commit" if result["new_commit"] else "unchanged, no new commit"
        print(f"published {result['repo_id']} ({'private' if result['private'] else 'public'}): {state} {result['commit']}")
        print(f'  from datasets import load_dataset; load_dataset("{result["repo_id"]}", "process")')
    return 0


def _print_rows(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(*rows[0].keys(), title=title)
    for r in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in r.values()))
    Console().print(table)


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from swirl_core.store import Store

    try:
        store = Store(args.db, read_only=True)
    except (RuntimeError, duckdb.Error) as exc:
        print(f"swirl sql: {exc}", file=sys.stderr)
        return 2
    with store:
        try:
            cur = store.con.execute(args.query)
        except duckdb.Error as exc:
            print(f"swirl sql: {exc}", file=sys.stderr)
            return 2
        if cur.description is None:
            return 0
        cols = [d[0] for d in cur.description]
        rows = cur.fetchmany(args.max_rows)
    if args.csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(cols)
        writer.writerows(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(*cols)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    Console().print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    apply_quiet_env()
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "generate": cmd_generate, "curate": cmd_curate, "judge-eval": cmd_judge_eval,
                "train": cmd_train, "publish": cmd_publish, "evaluate": cmd_evaluate, "sql": cmd_sql}
    try:
        _check_db_free(args)
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: a clear message, not a traceback
        print(f"swirl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from swirl_core.store import DatabaseInUseError, DatabaseOpenError

        if not isinstance(exc, DatabaseOpenError):
            raise
        print(f"swirl {args.command}: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, DatabaseInUseError) else 2


def _hold_db(db: str):
    """Hold the database read-write for the whole command. `_check_db_free` cannot stop two commands started
    together (a new file, or both checking before either opens it): the second then fails here, in one line,
    before a flow or a Dask cluster starts. The flow's own connection in this process shares the instance."""
    import contextlib

    from swirl_core.store import connect

    Path(db).parent.mkdir(parents=True, exist_ok=True)
    return contextlib.closing(connect(db))


def _check_db_free(args: argparse.Namespace) -> None:
    """A database another process holds fails here in one line, not as a traceback from inside a flow."""
    if getattr(args, "db", None) and Path(args.db).is_file():
        from swirl_core.store import connect

        connect(args.db, read_only=args.command in ("train", "publish", "sql")).close()


if __name__ == "__main__":
    sys.exit(main())
