"""Process judge and outcome grader: prompts, verdict parsing, and judging over real HTTP."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
from scripted_server import Faults, ScriptedServer

from swirl_core.config import ModelConfig
from swirl_core.judging import (
    GRADER_PROMPT_VERSION,
    JUDGE_PROMPT_VERSION,
    JudgeSpec,
    OutcomeGrader,
    StepJudge,
    StepToJudge,
    TrajectoryToGrade,
    grader_messages,
    judge_messages,
    parse_verdict,
    parse_yes_no,
)
from swirl_core.llm.factory import build_client
from swirl_core.protocol import observation_message, policy_messages
from swirl_core.store import Store, step_votes

QUESTION = "In which village was the composer of the opera Rusalka born?"
GOLD = "Nelahozeves"
Q1 = "<search_query>Rusalka opera composer</search_query>"
OBS1 = observation_message("Rusalka opera composer", "Rusalka is an opera by Antonín Dvořák, first performed in 1901.")
GOOD_QUERY = "Antonín Dvořák birthplace"


def _turns() -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"Find the composer first. {Q1}"}, {"role": "user", "content": OBS1}]


def _item(action: str, step_index: int = 1, trajectory_id: str = "t1") -> StepToJudge:
    return StepToJudge(trajectory_id=trajectory_id, step_index=step_index, task="qa", question=QUESTION,
                       turns=_turns(), action_message=action)


def _client(srv: ScriptedServer, journal_dir, **overrides):
    return build_client(ModelConfig(model="openai/judge", api_base=srv.base_url, **overrides), journal_dir)


def _last_content(body: dict) -> str:
    return body["messages"][-1]["content"]


def _evaluated(body: dict) -> str:
    """The part of a judge prompt after 'Last message to evaluate:'."""
    return _last_content(body).split("Last message to evaluate:", 1)[1]


# -- prompts -------------------------------------------------------------------------------------------


def test_search_judge_prompt_carries_the_papers_elements():
    messages = judge_messages("qa", QUESTION, _turns(), f"<search_query>{GOOD_QUERY}</search_query>")
    assert [m["role"] for m in messages] == ["user"]
    text = messages[0]["content"]
    lowered = text.lower()
    assert "search engine" in lowered and "sequence of searches" in lowered
    assert "only the last message" in lowered
    assert "do not penalise or reward" in lowered
    assert "not on your own knowledge" in lowered
    assert "not contain enough information" in lowered and "only seem" in lowered
    assert "likely to help answer the question" in lowered
    assert "GOOD or BAD" in text
    # The transcript: question, the whole conversation, then the step under review, last.
    assert f"Question: {QUESTION}" in text
    assert "Rusalka opera composer" in text and "Antonín Dvořák, first performed" in text
    assert text.index("Conversation so far:") < text.index("Last message to evaluate:")
    assert text.rstrip().endswith(f"[Assistant] <search_query>{GOOD_QUERY}</search_query>")
    assert GOLD not in text  # the judge never sees the gold answer
    assert JUDGE_PROMPT_VERSION["qa"] == "judge-search-v1"


def test_math_judge_prompt_and_first_step():
    messages = judge_messages("math", "Tom has 3 bags of 4 apples. How many apples?", [], "<math_exp>3 * 4</math_exp>")
    text = messages[0]["content"]
    assert "calculator" in text.lower() and "only the last message" in text.lower()
    assert "sensible and correct next step" in text and "computations shown" in text
    assert "(nothing yet" in text and text.rstrip().endswith("[Assistant] <math_exp>3 * 4</math_exp>")
    assert JUDGE_PROMPT_VERSION["math"] == "judge-math-v1"


def test_judge_transcript_leaves_out_the_policy_set_up():
    # Few-shot prompts carry a system message and demo turns: only turns after the prompt are passed,
    # and a stray system message is dropped all the same.
    prompt = policy_messages("qa", QUESTION, 5, few_shot=True)
    turns = [prompt[0], *_turns(), {"role": "user", "content": "Format error: no action tag. Reply with ..."}]
    text = judge_messages("qa", QUESTION, turns, "<answer>Prague</answer>")[0]["content"]
    assert prompt[0]["content"] not in text
    assert "Czech Republic" not in text  # the demonstration's answer
    assert "[Search result] Rusalka opera composer →" in text
    assert "[Format feedback] Format error" in text


def test_grader_prompt_carries_the_answer_key_and_rules():
    qa = grader_messages("qa", QUESTION, GOLD, ["Nelahozeves, Bohemia", GOLD], "Nelahozeves")[0]["content"]
    assert "Am I correct?" in qa and "YES or NO" in qa
    assert f"Answer key: {GOLD} (also accepted: Nelahozeves, Bohemia)" in qa
    assert "My answer: Nelahozeves" in qa and f"Question: {QUESTION}" in qa
    assert "not use your own knowledge" in qa
    math = grader_messages("math", "How much?", "10", [], "$10.00")[0]["content"]
    assert "10, 10.00, $10 and $10.00" in math and "also accepted" not in math
    assert GRADER_PROMPT_VERSION == "grader-v1"


# -- parsing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("The query targets the missing fact.\nGOOD", "GOOD"),
    ("**GOOD**", "GOOD"),
    ("Verdict: BAD.", "BAD"),
    ("bad", "BAD"),
    ("Reasoning: the results mention it.\n\nFinal verdict: **good**", "GOOD"),
    ("At first this looks good, but the results never name the village.\n\nBAD", "BAD"),
    ("One could call it GOOD, or BAD for repeating a query; on balance it helps.\nVerdict: GOOD", "GOOD"),
    ("Verdict: **BAD**\n\nThere is no good evidence for it in the results.", "BAD"),  # labelled beats a later 'good'
    ("The answer is not supported, so I rate it BAD. A good answer would cite the result.", "BAD"),  # uppercase wins
    ("It is a reasonable query, good.", "GOOD"),
    ("I am not sure.", None),
    ("GOODNESS me, a BADGE", None),
    ("", None),
    ("   \n ", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("The key says Paris and so did you.\nYES", True),
    ("**NO**", False),
    ("Am I correct? No.", False),
    ("There is no mention of a difference; the answers match.\n\nyes", True),
    ("Answer: YES.", True),
    ("No, the key says 12 and you said 10.", False),
    ("Yes. 10.00 and $10 are the same number.\nNothing else matters here.", True),
    ("The key lists no alias like that, so NO.", False),
    ("No doubt about the format, the numbers match", None),  # 'no' in prose is not a verdict
    ("I don't know", None),
    ("NONE of this is clear", None),
    ("", None),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_the_one_vote_rule_is_sqls_step_vote(tmp_path):
    with Store(tmp_path / "v.duckdb") as store:
        # (GOOD votes, BAD votes): majority of the known votes; a tie or no known vote is UNKNOWN
        assert step_votes(store.con, [(2, 1), (0, 1), (1, 1), (0, 0)]) == ["GOOD", "BAD", "UNKNOWN", "UNKNOWN"]
        assert step_votes(store.con, []) == []


def test_judge_spec_temperature_defaults():
    assert JudgeSpec(model="m").temperature == 0.0
    assert JudgeSpec(model="m", samples=3).temperature == 0.7  # k greedy samples would be one vote
    assert JudgeSpec(model="m", samples=3, temperature=0.0).temperature == 0.0
    assert JudgeSpec(model="m", temperature=None).temperature == 0.0


# -- over HTTP -----------------------------------------------------------------------------------------


async def test_verdicts_follow_the_action_text(tmp_path):
    rules = [(rf"Last message to evaluate:\s*\[Assistant\][^\n]*{GOOD_QUERY}", "It finds the missing fact.\nGOOD")]
    with ScriptedServer(rules=rules, default="Irrelevant to the question.\n\nVerdict: BAD") as srv:
        client = _client(srv, tmp_path)
        judge = StepJudge(client, JudgeSpec(model="openai/judge"))
        items = [
            _item(f"Now the birthplace. <search_query>{GOOD_QUERY}</search_query>", trajectory_id="good"),
            _item("<search_query>opera houses in Vienna</search_query>", trajectory_id="bad"),
            _item("<answer>Kralupy</answer>", trajectory_id="unsupported"),
        ]
        judgments = await judge.judge_many(items)
        await client.aclose()
        assert {j.trajectory_id: j.verdict for j in judgments} == {"good": "GOOD", "bad": "BAD", "unsupported": "BAD"}
        for j in judgments:
            assert j.attempts == 1 and len(j.call_keys) == 1 and j.sample_index == 0
            assert j.judge_model == "openai/judge" and j.prompt_version == "judge-search-v1"
        assert srv.stats()["total"] == 3
        for body in srv.requests:
            assert body["temperature"] == 0.0 and body["max_tokens"] == 256
            assert GOLD not in json.dumps(body["messages"], ensure_ascii=False)  # never the answer key


async def test_unparseable_reply_is_reasked_with_a_new_seed(tmp_path):
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def responder(body: dict) -> str:
        step = _evaluated(body)
        with lock:
            seen[step] = seen.get(step, 0) + 1
            n = seen[step]
        return "I am not sure." if n == 1 else "The query is relevant.\n**GOOD**"

    with ScriptedServer(responder=responder) as srv:
        client = _client(srv, tmp_path)
        [judgment] = await StepJudge(client, JudgeSpec(model="openai/judge")).judge(
            _item(f"<search_query>{GOOD_QUERY}</search_query>"))
        await client.aclose()
        assert judgment.verdict == "GOOD" and judgment.attempts == 2 and len(judgment.call_keys) == 2
        assert judgment.sample_index == 0 and judgment.reasoning.endswith("**GOOD**")
        assert [(b["seed"], b["temperature"]) for b in srv.requests] == [(0, 0.0), (1000, 0.7)]
        assert srv.completed_twice() == []


async def test_always_unparseable_is_unknown_after_the_reasks(tmp_path):
    with ScriptedServer(responder=lambda body: "I am not sure.") as srv:
        client = _client(srv, tmp_path)
        judge = StepJudge(client, JudgeSpec(model="openai/judge", max_reasks=2))
        [judgment] = await judge.judge(_item("<answer>Prague</answer>"))
        await client.aclose()
        assert judgment.verdict == "UNKNOWN" and judgment.reasoning == "I am not sure."
        assert judgment.attempts == 3 and len(set(judgment.call_keys)) == 3
        assert srv.stats()["total"] == 3
        assert sorted(b["seed"] for b in srv.requests) == [0, 1000, 2000]


async def test_failed_call_is_unknown_and_does_not_raise(tmp_path):
    with ScriptedServer(default="GOOD", faults=Faults(server_error_first=10)) as srv:
        client = _client(srv, tmp_path, max_retries=0)
        [judgment] = await StepJudge(client, JudgeSpec(model="openai/judge")).judge(_item("<answer>Prague</answer>"))
        await client.aclose()
        assert judgment.verdict == "UNKNOWN" and "gave up after 1 attempts" in judgment.error and judgment.reasoning == ""
        assert judgment.attempts == 1 and judgment.call_keys == []


async def test_k_samples_vote_by_majority(tmp_path):
    # Self-consistency: three distinct samples (distinct seeds, warm temperature), one vote each.
    votes = {0: "Helpful query.\nGOOD", 1: "It repeats nothing new.\nBAD", 2: "Likely helps.\nGOOD"}
    with ScriptedServer(responder=lambda body: votes[body["seed"]], faults=Faults(latency_s=0.3)) as srv:
        client = _client(srv, tmp_path)
        judge = StepJudge(client, JudgeSpec(model="openai/judge", samples=3))
        started = time.perf_counter()
        judgments = await judge.judge(_item(f"<search_query>{GOOD_QUERY}</search_query>"))
        elapsed = time.perf_counter() - started
        await client.aclose()
        assert [(j.sample_index, j.verdict) for j in judgments] == [(0, "GOOD"), (1, "BAD"), (2, "GOOD")]
        with Store(tmp_path / "v.duckdb") as store:
            verdicts = [j.verdict for j in judgments]
            assert step_votes(store.con, [(verdicts.count("GOOD"), verdicts.count("BAD"))]) == ["GOOD"]
        assert len({j.call_keys[0] for j in judgments}) == 3 and srv.completed_twice() == []
        assert {b["temperature"] for b in srv.requests} == {0.7}
        assert elapsed < 0.8  # the three samples were in flight together, not one after another


async def test_judge_many_runs_concurrently(tmp_path):
    with ScriptedServer(default="GOOD", faults=Faults(latency_s=0.3)) as srv:
        client = _client(srv, tmp_path)
        judge = StepJudge(client, JudgeSpec(model="openai/judge", samples=2))
        items = [_item(f"<search_query>query {i}</search_query>", trajectory_id=f"t{i}") for i in range(6)]
        started = time.perf_counter()
        judgments = await judge.judge_many(items)
        elapsed = time.perf_counter() - started
        await client.aclose()
        assert len(judgments) == 12 and {j.verdict for j in judgments} == {"GOOD"}
        assert [(j.trajectory_id, j.sample_index) for j in judgments] == [(f"t{i}", s) for i in range(6) for s in (0, 1)]
        assert elapsed < 1.5  # 12 requests x 0.3 s would take 3.6 s one at a time


async def test_rerun_over_the_same_journal_sends_nothing(tmp_path):
    calls = {"n": 0}
    lock = threading.Lock()

    def responder(body: dict) -> str:
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
        return "Hmm." if first else ("GOOD" if GOOD_QUERY in _evaluated(body) else "BAD")

    with ScriptedServer(responder=responder) as srv:
        items = [_item(f"<search_query>{GOOD_QUERY}</search_query>", trajectory_id="a"),
                 _item("<answer>Vienna</answer>", trajectory_id="b")]
        spec = JudgeSpec(model="openai/judge", samples=2)
        client = _client(srv, tmp_path)
        first = await StepJudge(client, spec).judge_many(items)
        await client.aclose()
        sent = srv.stats()["total"]
        assert sent == 5  # four samples, one of them re-asked once
        fresh = _client(srv, tmp_path)
        second = await StepJudge(fresh, spec).judge_many(items)
        await fresh.aclose()
        assert srv.stats()["total"] == sent
        assert [j.model_dump() for j in second] == [j.model_dump() for j in first]
        assert fresh.stats["cache_hits"] == 5 and fresh.stats["sent"] == 0


async def test_outcome_grader_yes_no_over_http(tmp_path):
    rules = [(r"My answer: (Nelahozeves|\$?10(\.00)?)\n", "It is the answer in the key.\nYES")]
    with ScriptedServer(rules=rules, default="The key names a different place.\n\nNO") as srv:
        client = _client(srv, tmp_path)
        grader = OutcomeGrader(client, "openai/judge")
        items = [
            TrajectoryToGrade(trajectory_id="right", task="qa", question=QUESTION, answer=GOLD,
                              aliases=["Nelahozeves, Bohemia"], prediction="Nelahozeves"),
            TrajectoryToGrade(trajectory_id="wrong", task="qa", question=QUESTION, answer=GOLD, aliases=[],
                              prediction="Prague"),
            TrajectoryToGrade(trajectory_id="math", task="math", question="How much?", answer="10", aliases=[],
                              prediction="$10.00"),
            TrajectoryToGrade(trajectory_id="none", task="qa", question=QUESTION, answer=GOLD, aliases=[],
                              prediction=None),
        ]
        grades = await grader.grade_many(items)
        await client.aclose()
        assert [(g.trajectory_id, g.correct) for g in grades] == [
            ("right", True), ("wrong", False), ("math", True), ("none", False)]
        assert grades[3].reasoning == "no answer" and grades[3].call_key is None
        assert all(g.call_key for g in grades[:3])
        assert {(g.grader_model, g.prompt_version) for g in grades} == {("openai/judge", "grader-v1")}
        assert srv.stats()["total"] == 3  # no call for a trajectory without an answer
        prompts = [_last_content(b) for b in srv.requests]
        assert any(f"Answer key: {GOLD} (also accepted: Nelahozeves, Bohemia)" in p for p in prompts)
        assert all("Am I correct?" in p for p in prompts)


async def test_outcome_grader_reasks_then_gives_none(tmp_path):
    with ScriptedServer(responder=lambda body: "Hard to say.") as srv:
        client = _client(srv, tmp_path)
        grade = await OutcomeGrader(client, "openai/judge", max_reasks=1).grade(TrajectoryToGrade(
            trajectory_id="t", task="qa", question=QUESTION, answer=GOLD, aliases=[], prediction="Prague"))
        await client.aclose()
        assert grade.correct is None and grade.reasoning == "Hard to say." and grade.call_key
        assert srv.stats()["total"] == 2


async def test_local_judge_decides_at_the_median_of_a_sample_and_rewards_with_its_probability(tiny_model_dir, tmp_path):
    """An in-process judge reports P(GOOD); calibrated on a sample, a step is GOOD when it reaches the sample's
    median. Calibrating asks the very requests judging makes, so judging the sample afterwards pays nothing."""
    import re

    from swirl_core.config import ModelConfig
    from swirl_core.judging import JudgeSpec, StepJudge, StepToJudge, calibrate_thresholds
    from swirl_core.llm.factory import build_client

    cfg = ModelConfig(model=str(tiny_model_dir), temperature=0.0)
    spec = JudgeSpec.for_model(cfg)
    assert spec.calibration == "median" and spec.constraint.label == "choice:GOOD|BAD" and spec.thresholds == {}
    assert JudgeSpec.for_model(ModelConfig(model="openai/gpt-4o-mini")).calibration == "none"
    items = [StepToJudge(trajectory_id=f"t{i}", step_index=0, task="math", question=f"What is {i} + {i * 7}?", turns=[],
                         action_message=msg)
             for i, msg in enumerate(["<math_exp>1 + 1</math_exp>", "<answer>7</answer>", "I do not know",
                                      "<math_exp>2*9</math_exp>", "<answer>5</answer>"])]
    client = build_client(cfg, tmp_path)
    thresholds = await calibrate_thresholds(client, spec, items)
    sent = client.stats["sent"]
    uncalibrated = await StepJudge(client, spec).judge_many(items)  # the RL reward's view: P(GOOD), no verdict
    judgments = await StepJudge(client, spec.model_copy(update={"thresholds": thresholds})).judge_many(items)
    await client.aclose()
    assert sent == len(items) and client.stats["sent"] == sent  # judging replayed the calibration's calls
    assert set(thresholds) == {"math"}
    assert all(j.verdict == "UNKNOWN" and j.p_good is not None for j in uncalibrated)
    p_goods = sorted(j.p_good for j in judgments)
    assert thresholds["math"] == p_goods[2]  # the median of five
    for j in judgments:
        p_good, threshold = map(float, re.findall(r"(\d\.\d+)", j.reasoning))
        assert j.attempts == 1 and abs(p_good - j.p_good) < 1e-4 and abs(threshold - thresholds["math"]) < 1e-4
        assert j.verdict == ("GOOD" if j.p_good >= thresholds["math"] else "BAD")
    assert sum(j.verdict == "GOOD" for j in judgments) == 3


# -- P(GOOD) from served logprobs ----------------------------------------------------------------------


def test_choice_probs_read_the_token_where_the_last_verdict_starts():
    from swirl_core.llm.openai_compat import choice_probs

    def tok(token, *alts):
        return {"token": token, "logprob": math.log(dict(alts).get(token, 1.0)),
                "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in alts]}

    verdicts = ("GOOD", "BAD")
    # A verdict split over tokens ("GO" "OD"): its first token's alternatives decide, renormalised.
    split = {"content": [tok("Bad"), tok(" start"), tok("."), tok("\nGO", ("\nGO", 0.6), ("\nBAD", 0.2), ("\nMaybe", 0.2)),
                         tok("OD")]}
    assert choice_probs(split, verdicts) == pytest.approx({"GOOD": 0.75, "BAD": 0.25})
    # Trailing words that only start like a verdict ("Badly", "Because") are not the verdict.
    trailing = {"content": [tok(" GOOD", (" GOOD", 0.9), (" BAD", 0.1)), tok(" Because"), tok(" badly")]}
    assert choice_probs(trailing, verdicts) == pytest.approx({"GOOD": 0.9, "BAD": 0.1})
    assert choice_probs(None, verdicts) is None
    assert choice_probs({"content": [tok(" unsure")]}, verdicts) is None


async def test_served_judge_records_p_good_from_logprobs_into_judgments_and_the_reward(tmp_path):
    from swirl_core.curation import judge_fingerprint, judgment_rows
    from swirl_core.store import Store
    from swirl_core.training.rewards import JudgeReward

    def alternatives(body: dict, token: str):
        if token.strip() not in ("GOOD", "BAD"):
            return None
        p = 0.8 if GOOD_QUERY in _last_content(body) else 0.3  # the judge's confidence differs per step
        return [(token, p if token.strip() == "GOOD" else 1 - p), (" BAD" if "GOOD" in token else " GOOD",
                                                                   1 - p if token.strip() == "GOOD" else p)]

    judge = lambda body: "Plausible.\nGOOD"  # noqa: E731 — the same verdict text; only the probabilities differ
    with ScriptedServer(responder=judge, alternatives=alternatives) as srv:
        cfg = ModelConfig(model="openai/judge", api_base=srv.base_url, temperature=0.0)
        spec = JudgeSpec.for_model(cfg)
        assert spec.served_probabilities
        client = build_client(cfg, tmp_path)
        items = [_item(f"<search_query>{GOOD_QUERY}</search_query>", trajectory_id="sure"),
                 _item("<search_query>opera houses</search_query>", trajectory_id="unsure")]
        judgments = await StepJudge(client, spec).judge_many(items)
        await client.aclose()
        body = srv.requests[0]
        assert body["logprobs"] is True and body["top_logprobs"] == 5
        assert {j.trajectory_id: (j.verdict, j.p_good) for j in judgments} == {
            "sure": ("GOOD", pytest.approx(0.8)), "unsure": ("GOOD", pytest.approx(0.3))}

        with Store(str(tmp_path / "j.duckdb")) as store:
            store.upsert("judgments", judgment_rows(judgments, "run", judge_fingerprint(spec)))
            stored = dict(store.query("SELECT trajectory_id, p_good FROM judgments"))
        assert stored == {"sure": pytest.approx(0.8), "unsure": pytest.approx(0.3)}

        # The RL reward is P(GOOD) itself, not the (identical) votes; it replays the calls just made.
        reward = JudgeReward(cfg, tmp_path, run_id="rl")
        sampled = [items[0].action_message, items[1].action_message]
        rewards = await reward([""] * 2, [[{"role": "assistant", "content": t}] for t in sampled], task=["qa"] * 2,
                               question=[QUESTION] * 2, history=[json.dumps(_turns())] * 2, trajectory_id=["sure", "unsure"],
                               step_index=[1, 1])
        await reward.aclose()
        assert rewards == [pytest.approx(0.8), pytest.approx(0.3)] and reward.cache_hits == 2
    # A judge asked for no probabilities keeps its old fingerprint; one that reads them has its own.
    plain = spec.model_copy(update={"served_probabilities": False})
    assert judge_fingerprint(plain) != judge_fingerprint(spec)
    from swirl_core.hashing import content_hash
    from swirl_core.judging import JUDGE_PROMPT_VERSION

    legacy = {k: v for k, v in plain.model_dump().items() if k not in ("served_probabilities", "server_kind")}
    assert judge_fingerprint(plain) == content_hash("judge", legacy, JUDGE_PROMPT_VERSION)[:16]
