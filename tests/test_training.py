"""Training: curated-set export, the judge reward over real HTTP, SFT and SWiRL RL on a tiny model (CPU)."""

from __future__ import annotations

import json
import math
import re
import time

import duckdb
import pytest
from helpers import build_labeled_db
from scripted_server import ScriptedServer

from swirl_core.config import ModelConfig
from swirl_core.llm.chat_templates import renders_tools, shipped_template
from swirl_core.training.data import rl_dataset, sft_dataset
from swirl_core.training.rewards import JudgeReward, format_reward
from swirl_core.training.trainers import (
    TrainSettings,
    choose_chat_template,
    fit_max_length,
    sft_trainer,
    train_sft,
    train_swirl,
)

MAGIC = "Vistula-7"


@pytest.fixture(scope="module")
def labeled_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("training") / "labeled.duckdb"
    build_labeled_db(path)
    return path


@pytest.fixture()
def con(labeled_db):
    con = duckdb.connect(str(labeled_db), read_only=True)
    yield con
    con.close()


def _evaluated(body: dict) -> str:
    """The message the process judge is asked to rate (the end of its single user turn)."""
    return body["messages"][-1]["content"].rsplit("Last message to evaluate:", 1)[-1]


# ------------------------------------------------------------------------------------------- export


def test_sft_export_matches_duckdb(con, tmp_path):
    exported = sft_dataset(con, "process", out_dir=tmp_path)
    assert (exported.rows, exported.trajectories, exported.run_ids, exported.datasets) == (4, 2, ["r"], ["hotpotqa"])
    ds = exported.dataset
    assert len(ds) == 4 and {"prompt", "completion", "trajectory_id", "step_index"} <= set(ds.column_names)
    expected = con.execute("SELECT trajectory_id, step_index, state, action FROM curated_process ORDER BY 1, 2").fetchall()
    for row, (tid, step, state, action) in zip(ds, expected, strict=True):
        assert (row["trajectory_id"], row["step_index"]) == (tid, step)
        assert row["prompt"] == [dict(m) for m in state]
        assert row["completion"] == [{"role": "assistant", "content": action}]
    assert [len(r["prompt"]) for r in ds] == [1, 3, 1, 3]  # s_1 = prompt + action 0 + its observation
    assert sft_dataset(con, "none", out_dir=tmp_path / "none").rows == 8
    assert sft_dataset(con, "process", out_dir=tmp_path / "empty", dataset="gsm8k").rows == 0
    with pytest.raises(ValueError, match="curation filter"):
        sft_dataset(con, "bogus")  # type: ignore[arg-type]


def test_rl_export_carries_what_the_judge_needs(con, tmp_path):
    exported = rl_dataset(con, "process", out_dir=tmp_path, run_ids=["r"])
    ds = exported.dataset
    assert exported.rows == len(ds) == 4 and exported.trajectories == 2
    assert {"prompt", "task", "question", "history", "trajectory_id", "step_index"} <= set(ds.column_names)
    assert "completion" not in ds.column_names  # RL samples the action; the stored one is not an input
    histories = dict(((t, s), json.loads(h)) for t, s, h in con.execute(
        "SELECT trajectory_id, step_index, to_json(history)::VARCHAR FROM curated_process").fetchall())
    for row in ds:
        assert row["task"] == "qa" and "Marie Curie" in row["question"]
        assert json.loads(row["history"]) == histories[(row["trajectory_id"], row["step_index"])]
        assert row["prompt"][len(row["prompt"]) - len(json.loads(row["history"])):] == json.loads(row["history"])
    assert rl_dataset(con, "process", out_dir=tmp_path / "x", run_ids=["other"]).rows == 0


# ------------------------------------------------------------------------------------------- rewards


async def test_judge_reward_follows_the_sampled_text_not_the_stored_label(con, tmp_path):
    """The state of t0 step 1, whose stored action was judged GOOD: only the sampled text decides."""
    row = rl_dataset(con, "process", out_dir=tmp_path / "rl").dataset.filter(
        lambda r: (r["trajectory_id"], r["step_index"]) == ("t0", 1))[0]

    def judge(body: dict) -> str:
        action = _evaluated(body)
        if "ramble" in action:
            return "I cannot tell."  # no verdict: re-asked, then scored 0.0
        return "It follows from the results.\nGOOD" if MAGIC in action else "Not supported.\nBAD"

    sampled = [f"<answer>{MAGIC}</answer>", "<answer>Vistula</answer>", "ramble ramble"]
    n = len(sampled)
    with ScriptedServer(responder=judge) as srv:
        reward = JudgeReward(ModelConfig(model="openai/judge", api_base=srv.base_url, temperature=0.0),
                             tmp_path / "journal", run_id="train-test", max_reasks=1)
        kwargs = {key: [row[key]] * n for key in ("task", "question", "history", "trajectory_id", "step_index")}
        rewards = await reward([row["prompt"]] * n, [[{"role": "assistant", "content": t}] for t in sampled], **kwargs)
        assert rewards == [1.0, 0.0, 0.0]
        evaluated = [_evaluated(b) for b in srv.requests]
        for text in sampled:
            assert any(text in e for e in evaluated)  # the judge saw each sampled completion itself
        assert all("Marie Curie birthplace → Warsaw" in b["messages"][-1]["content"] for b in srv.requests)
        assert reward.calls == 4 and reward.sent == 4 and reward.unknown == 1 and reward.good == 1
        assert reward.wait_s > 0 and reward.__name__ == "judge_reward"
        # The same (state, action) again is answered from the call journal: paid once, on the same client.
        assert await reward([row["prompt"]] * n, [[{"role": "assistant", "content": t}] for t in sampled], **kwargs) == rewards
        assert len(srv.requests) == 4 and reward.cache_hits == 4 and reward.clients_built == 1
        await reward.aclose()
        port = srv.port
    # A judge that cannot be reached scores 0.0 (and is counted), it does not stop training.
    down = JudgeReward(ModelConfig(model="openai/judge", api_base=f"http://127.0.0.1:{port}/v1", max_retries=0,
                                   timeout_s=5), None)
    assert await down([row["prompt"]], [[{"role": "assistant", "content": "<answer>x</answer>"}]], task=["qa"],
                      question=[row["question"]], history=[row["history"]]) == [0.0]
    assert down.failures == 1
    await down.aclose()


async def test_judge_reward_keeps_one_rate_limiter_across_batches(con, tmp_path):
    """--rpm holds for the whole run: the second batch waits for the bucket the first one emptied (a client
    rebuilt per batch would start it full again)."""
    row = rl_dataset(con, "process", out_dir=tmp_path / "rl").dataset[0]
    def batch(texts: list[str]) -> dict:
        cols = {key: [row[key]] * len(texts) for key in ("task", "question", "history", "trajectory_id", "step_index")}
        return {"prompts": [row["prompt"]] * len(texts), "completions": texts, **cols}

    with ScriptedServer(default="GOOD") as srv:
        # 60/min: a burst of one second's worth (one request), then one request a second.
        reward = JudgeReward(ModelConfig(model="openai/judge", api_base=srv.base_url, temperature=0.0,
                                         requests_per_minute=60), None)
        started = time.perf_counter()
        await reward(**batch(["<answer>first</answer>"]))
        first = time.perf_counter() - started
        await reward(**batch(["<answer>one more</answer>"]))
        second = time.perf_counter() - started - first
        await reward.aclose()
    assert reward.clients_built == 1 and reward.sent == 2
    assert second >= 0.8 > first  # the bucket the first batch emptied refills at 1/s


def test_format_reward():
    completions = [
        "The river is known. <answer>Vistula</answer>",
        "<search_query>Warsaw river</search_query>",
        "I think it is the Vistula.",  # no action
        "<search_query>a</search_query> <answer>b</answer>",  # two actions
        "<search_query>cut off at the length lim",  # never closed
        "<math_exp>2+2</math_exp>",  # not a QA tool
        "<answer></answer>",  # empty
    ]
    assert format_reward([[{"role": "assistant", "content": c}] for c in completions], ["qa"] * len(completions)) == [
        0.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0]
    assert format_reward(["<math_exp>2+2</math_exp>"], ["math"]) == [0.0]


def test_train_settings_validation(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        TrainSettings(method="swirl", output_dir=str(tmp_path), beta=0.0)
    with pytest.raises(ValueError, match="divisible"):
        TrainSettings(method="swirl", output_dir=str(tmp_path), per_device_batch_size=3, num_generations=2)
    assert TrainSettings(method="sft", output_dir=str(tmp_path), beta=0.0).resolved_learning_rate == 2e-5
    s = TrainSettings(method="swirl", output_dir=str(tmp_path))
    assert (s.beta, s.num_generations, s.max_completion_length, s.resolved_bf16) == (0.04, 4, 64, False)


# ------------------------------------------------------------------------------------------- training


def test_sft_masks_the_state(con, tmp_path, tiny_model_dir):
    """Completion-only loss: the labels are the action and the end of turn, never the state."""
    data = sft_dataset(con, "process", out_dir=tmp_path / "d")
    trainer = sft_trainer(TrainSettings(method="sft", base_model=str(tiny_model_dir), output_dir=str(tmp_path / "o"),
                                        max_steps=1), data.dataset)
    tok = trainer.processing_class
    for example, source in zip(trainer.train_dataset, data.dataset, strict=True):
        learned = tok.decode([t for t in example["labels"] if t != -100])
        assert learned.startswith(source["completion"][0]["content"]) and "Question:" not in learned


def test_sft_pairs_over_max_length_are_left_out(con, tmp_path, tiny_model_dir):
    """TRL cuts a long pair from the end, i.e. its action; such a pair would train on nothing, so it is dropped."""
    data = sft_dataset(con, "process", out_dir=tmp_path / "d")
    settings = TrainSettings(method="sft", base_model=str(tiny_model_dir), output_dir=str(tmp_path / "o"), max_steps=1)
    tok = sft_trainer(settings, data.dataset).processing_class
    full = [len(tok(tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False), add_special_tokens=False)
                ["input_ids"]) for r in data.dataset]
    cut = max(full) - 3  # the longest pairs miss their last 3 tokens
    truncated = sft_trainer(settings.model_copy(update={"max_length": cut}), data.dataset)
    for example, n in zip(truncated.train_dataset, full, strict=True):
        learned = tok.decode([t for t in example["labels"] if t != -100])
        assert learned.startswith(example["completion"][0]["content"]) == (n <= cut)  # TRL would train on a cut action
    kept, dropped = fit_max_length(data.dataset, tok, cut)
    assert dropped == sum(n > cut for n in full) > 0 and len(kept) == len(full) - dropped
    assert {r["step_index"] for r in kept} == {r["step_index"] for r, n in zip(data.dataset, full) if n <= cut}
    with pytest.raises(ValueError, match="longer than max_length"):
        train_sft(settings.model_copy(update={"max_length": 16}), data.dataset)


@pytest.mark.slow
def test_sft_trains_saves_and_the_checkpoint_generates(con, tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = sft_dataset(con, "process_outcome", out_dir=tmp_path / "d")
    assert data.rows == 2
    out = tmp_path / "sft"
    result = train_sft(TrainSettings(method="sft", base_model=str(tiny_model_dir), output_dir=str(out), max_steps=2,
                                     per_device_batch_size=1, learning_rate=1e-3), data.dataset, lineage=data.lineage())
    assert result.steps == 2 and len(result.log_history) == 2
    assert all(math.isfinite(h["loss"]) for h in result.log_history)
    summary = json.loads((out / "swirl_training.json").read_text())
    assert summary["lineage"]["run_ids"] == ["r"] and summary["settings"]["method"] == "sft"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[name]) for name, p in before.named_parameters())  # the steps changed it
    ids = tok.apply_chat_template(data.dataset[0]["prompt"], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5


def _alternating(completions, **kwargs) -> list[float]:
    """A tiny tie-breaker: groups always have non-zero advantages, so step 1 surely moves the policy."""
    return [float(i % 2) for i in range(len(completions))]


@pytest.mark.slow
def test_swirl_rl_scores_fresh_samples_over_http(con, tmp_path, tiny_model_dir):
    """2 GRPO steps; every reward is a judge verdict fetched over HTTP for a freshly sampled step."""
    data = rl_dataset(con, "process", out_dir=tmp_path / "d")
    settings = TrainSettings(method="swirl", base_model=str(tiny_model_dir), output_dir=str(tmp_path / "rl"), max_steps=2,
                             per_device_batch_size=4, num_generations=2, max_completion_length=8, learning_rate=1e-3)

    def judge(body: dict) -> str:  # varied verdicts, so groups have non-zero advantages
        return "GOOD" if len(_evaluated(body).strip()) % 2 else "BAD"

    with ScriptedServer(responder=judge) as srv:
        reward = JudgeReward(ModelConfig(model="openai/judge", api_base=srv.base_url, temperature=0.0),
                             tmp_path / "journal", run_id="rl-test")
        result = train_swirl(settings, data.dataset, [reward, format_reward, _alternating], reward_weights=[1.0, 0.1, 0.01],
                             lineage=data.lineage())
        requests = list(srv.requests)
    assert result.steps == 2 and len(result.log_history) == 2
    for h in result.log_history:
        assert 0.0 <= h["rewards/judge_reward/mean"] <= 1.0
        assert math.isfinite(h["reward"]) and "kl" in h  # beta > 0: the KL term is computed and logged
        assert h["judge/wait_s"] > 0
    # Step 1 starts at the reference policy; after one update the policy has moved away from it.
    assert abs(result.log_history[0]["kl"]) < 1e-6 and result.log_history[1]["kl"] > 0.0
    # 2 steps × 2 states × 2 samples: every completion judged (identical samples would be cache hits).
    assert reward.completions == 8 and reward.batches == 2 and 1 <= len(requests) <= 8
    stored = {a for (a,) in con.execute("SELECT action FROM curated_process").fetchall()}
    assert all("Marie Curie" in b["messages"][-1]["content"] for b in requests)
    assert not any(_evaluated(b).strip().removeprefix("[Assistant]").strip() in stored for b in requests)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(result.output_dir).config.num_hidden_layers == 2
    assert result.seconds_per_step > 0


def test_train_cli_exports_only_the_given_runs():
    from flows.cli import resolve

    assert resolve(["train", "--method", "sft", "--output", "o", "--run-id", "a", "--run-id", "b"]).run_ids == ["a", "b"]


@pytest.mark.slow
def test_swirl_rl_samples_under_the_action_grammar_like_generation(con, tmp_path, tiny_model_dir):
    """A random tiny policy writes no tags on its own; sampled under the in-process grammar (the default for a
    QA run without vLLM) every completion is exactly one well-formed QA action, so the judge rates real steps."""
    data = rl_dataset(con, "process", out_dir=tmp_path / "d")
    settings = TrainSettings(method="swirl", base_model=str(tiny_model_dir), output_dir=str(tmp_path / "rl"), max_steps=1,
                             per_device_batch_size=4, num_generations=2, max_completion_length=24)
    with ScriptedServer(default="GOOD") as srv:
        reward = JudgeReward(ModelConfig(model="openai/judge", api_base=srv.base_url, temperature=0.0), None)
        result = train_swirl(settings, data.dataset, [reward, format_reward], sampling_task="qa")
        sampled = [_evaluated(b).strip().removeprefix("[Assistant]").strip() for b in srv.requests]
    assert result.log_history[0]["rewards/format_reward/mean"] == 0.0  # all four: one closed action each
    assert len(sampled) == 4 and all(re.fullmatch(r"<(search_query|answer)>[^<]+</\1>", s) for s in sampled), sampled


# ------------------------------------------------------------------------------------------- the tools protocol


def test_train_takes_the_tools_protocol_and_a_chat_template(tmp_path):
    from flows.cli import resolve
    from swirl_core.records import StepProtocol

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    config = resolve(["train", "--method", "sft", "--output", "o", "--protocol", "tools", "--chat-template", str(template)])
    assert (config.protocol, config.settings.chat_template) == (StepProtocol.TOOLS, str(template))
    with pytest.raises(ValueError, match="not a file"):
        TrainSettings(method="sft", output_dir="o", chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="tag-protocol steps"):
        resolve(["train", "--method", "swirl", "--output", "o", "--protocol", "tools"])


def test_the_chat_template_is_the_given_one_else_a_tool_calling_one_for_tools_data(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tags, tools = Dataset.from_dict({"prompt": [[]]}), Dataset.from_dict({"prompt": [[]], "tools": [[]]})
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    own = tok.chat_template
    assert not renders_tools(tok)  # SmolLM2's template drops tools and calls
    choose_chat_template(tok, TrainSettings(method="sft", output_dir="o"), tags)
    assert tok.chat_template == own
    choose_chat_template(tok, TrainSettings(method="sft", output_dir="o"), tools)
    assert tok.chat_template == shipped_template() and renders_tools(tok)
    choose_chat_template(tok, TrainSettings(method="sft", output_dir="o"), tools)  # one that renders tools is kept
    assert tok.chat_template == shipped_template()
    given = tmp_path / "given.jinja"
    given.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    choose_chat_template(tok, TrainSettings(method="sft", output_dir="o", chat_template=str(given)), tools)
    assert tok.chat_template == given.read_text()


@pytest.mark.slow
def test_sft_trains_on_the_tools_config_with_a_tool_calling_template(tools_db, tmp_path, tiny_model_dir):
    """The tools-protocol steps (generated and curated over HTTP) in TRL's tool-calling format: SFTTrainer renders
    them with the shipped template (SmolLM2's own has no tools), learns the call only, and takes a step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swirl_core.records import StepProtocol
    from swirl_core.training.run import TrainConfig, run_training

    db, _ = tools_db
    with duckdb.connect(str(db), read_only=True) as con:
        data = sft_dataset(con, "none", out_dir=tmp_path / "d", protocol=StepProtocol.TOOLS)
        assert (data.rows, data.trajectories) == (15, 6) == (len(data.dataset), 6)
    assert {"prompt", "completion", "tools"} <= set(data.dataset.column_names)
    settings = TrainSettings(method="sft", base_model=str(tiny_model_dir), output_dir=str(tmp_path / "o"), max_steps=1,
                             per_device_batch_size=2, learning_rate=1e-3)
    trainer = sft_trainer(settings, data.dataset)
    tok = trainer.processing_class
    for example, source in zip(trainer.train_dataset, data.dataset, strict=True):
        text, learned = tok.decode(example["input_ids"]), tok.decode([t for t in example["labels"] if t != -100])
        assert "<tools>" in text and '"name": "answer"' in text and "Question:" not in learned
        for call in source["completion"][0].get("tool_calls", []):
            arguments = call["function"]["arguments"]  # an object, written once: never a JSON string encoded again
            shown = arguments if isinstance(arguments, str) else json.dumps(arguments)
            assert f'{{"name": "{call["function"]["name"]}", "arguments": {shown}}}' in learned
        assert '"arguments": "{' not in text
    # What `swirl train --method sft --protocol tools --filter none` runs: export, template, one step, the card.
    request = TrainConfig(db=str(db), protocol=StepProtocol.TOOLS, filter="none", progress=False, settings=settings)
    result = run_training(request, "tools-sft")
    assert result["steps"] == 1 and all(math.isfinite(h["loss"]) for h in result["log_history"])
    assert result["lineage"]["rows"] == 15 and result["lineage"]["protocol"] == "tools"
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = dict(AutoModelForCausalLM.from_pretrained(result["output_dir"]).named_parameters())
    assert any(not torch.equal(p, trained[name]) for name, p in before.named_parameters())  # the step changed it
    assert renders_tools(AutoTokenizer.from_pretrained(result["output_dir"]))  # the checkpoint keeps the template
    assert "exactly one tool call" in (tmp_path / "o" / "README.md").read_text()
