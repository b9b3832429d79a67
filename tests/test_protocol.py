"""The tag protocol: prompts carry the paper's elements; the parser survives real model output."""

import pytest

from swirl_core.protocol import (
    TWO_ACTIONS,
    instructions,
    observation_message,
    parse_action,
    policy_messages,
    prompt_version,
)


def test_qa_prompt_carries_the_papers_elements():
    text = instructions("qa", 5)
    for needle in ("few words", "<search_query> QUERY </search_query>", "several searches", "at most 5",
                   "never repeat", "QUERY → RESULT", "<answer>ANSWER</answer>", "EITHER search OR answer"):
        assert needle in text


def test_math_prompt_carries_the_papers_elements():
    text = instructions("math", 10)
    for needle in ("<math_exp> MATH EXP </math_exp>", "EXP → RESULT", "at most 10", "<answer>ANSWER</answer>"):
        assert needle in text


def test_zero_shot_is_one_user_turn_and_few_shot_adds_demo_turns():
    plain = policy_messages("math", "What is 2+2?", 10)
    assert [m["role"] for m in plain] == ["user"] and plain[0]["content"].endswith("Question: What is 2+2?")
    demo = policy_messages("math", "What is 2+2?", 10, few_shot=True)
    assert demo[0]["role"] == "system" and demo[-1] == {"role": "user", "content": "Question: What is 2+2?"}
    assert any(m["role"] == "assistant" and "<math_exp>" in m["content"] for m in demo)
    assert prompt_version("math", True) != prompt_version("math", False)


@pytest.mark.parametrize(
    "text, kind, content, truncated",
    [
        ("I should search. <search_query>capital of France</search_query>", "search", "capital of France", False),
        ("<answer> Paris </answer>\n", "answer", "Paris", False),
        ("<search_query>Eiffel tower height", "search", "Eiffel tower height", False),  # missing close
        ("<SEARCH_QUERY>x</SEARCH_QUERY>", "search", "x", False),
        ("reasoning\n\nmore reasoning <answer>42</answer> trailing words", "answer", "42", True),
    ],
)
def test_parser_on_messy_qa_output(text, kind, content, truncated):
    action = parse_action(text, "qa").action
    assert (action.kind, action.content, action.truncated) == (kind, content, truncated)


@pytest.mark.parametrize("text", [
    "<search_query>a</search_query> and <answer>b</answer>",
    "<search_query>a <answer>b</answer>",  # unclosed, then another tag
    "<math_exp>2+2</math_exp> <math_exp>3+3</math_exp>",
])
def test_a_message_with_two_actions_is_invalid_and_kept_whole(text):
    parsed = parse_action(text, "qa" if "search" in text else "math")
    assert parsed.action.kind == "invalid" and parsed.action.error == TWO_ACTIONS
    assert parsed.message == text  # the judge sees both actions and rates the step BAD


@pytest.mark.parametrize(
    "text, error",
    [
        ("The answer is clearly 42.", "no action tag"),
        ("<answer></answer>", "empty <answer> tag"),
        ("<answer>   </answer>", "empty <answer> tag"),
        ("<math_exp>2+2</math_exp>", "<math_exp> is not available for this task"),
        ("", "no action tag"),
    ],
)
def test_parse_failures_are_recorded_not_raised(text, error):
    action = parse_action(text, "qa").action
    assert action.kind == "invalid" and action.error == error


def test_message_is_cut_after_its_action_and_closed():
    parsed = parse_action("think <math_exp>3*4</math_exp> and that is all", "math")
    assert parsed.message == "think <math_exp>3*4</math_exp>" and parsed.action.truncated
    assert parse_action("<math_exp>3*4", "math").message == "<math_exp>3*4</math_exp>"


def test_observation_format_and_guided_regex():
    assert observation_message("2+2", "4") == "2+2 → 4"
    import re

    from swirl_core.constraints import ActionGrammar

    pattern = re.compile(ActionGrammar.for_task("math").regex())
    assert pattern.fullmatch("Add them. <math_exp>2+2</math_exp>")
    assert not pattern.fullmatch("<search_query>x</search_query>")
