"""The one multi-step agent loop, shared by generation, RL-state export and evaluation.

Each step: ask the policy, parse exactly one action, run the tool (never during RL), feed the
result back as `INPUT → RESULT`, until `<answer>` or the step cap.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from swirl_core.constraints import ActionGrammar, ServerKind, action_fields
from swirl_core.hashing import content_hash
from swirl_core.llm.base import ChatRequest, Grammar, LLMError, Served
from swirl_core.llm.chat_templates import ToolTemplate
from swirl_core.llm.client import LLMClient
from swirl_core.progress import notify
from swirl_core.protocol import (
    invalid_action_feedback,
    observation_message,
    parse_action,
    parse_tool_calls,
    policy_messages,
    prompt_version,
    render_tool_calls,
    tool_definitions,
    tools_feedback,
    tools_policy_messages,
)
from swirl_core.records import Question, Step, StepProtocol, TaskKind, Trajectory
from swirl_core.tools import Tool, ToolResult


@dataclass(frozen=True)
class PolicySpec:
    """Everything that shapes a policy's trajectories; its fingerprint is part of trajectory ids."""

    model: str
    task: TaskKind
    max_steps: int
    few_shot: bool = False
    constraint: str | None = None  # None, "grammar" (in-process) or "regex" (served, verified by a probe)
    server_kind: ServerKind | None = None  # how a served "regex" constraint is sent
    temperature: float = 0.7
    top_p: float | None = None
    max_tokens: int = 256
    tools_fingerprint: str = ""
    tools: bool = True  # False: no-tool mode, answer only (its own prompt version, so its own fingerprint)
    protocol: StepProtocol = StepProtocol.TAGS
    tool_template: ToolTemplate | None = None  # in-process under the tools protocol: which template renders the tools

    def __post_init__(self) -> None:
        if self.protocol == StepProtocol.TOOLS:  # refused, never silently dropped
            if self.constraint:
                raise ValueError(f"the {self.constraint!r} constraint shapes tag actions and does not apply under "
                                 "--protocol tools (the server parses tool calls)")
            if not self.tools:
                raise ValueError("no-tool mode has no tools to call: use --protocol tags with it")
            if self.few_shot:
                raise ValueError("few-shot demonstrations are written in the tag protocol: use --protocol tags with them")

    @functools.cached_property  # read several times per step
    def prompt_version(self) -> str:
        return prompt_version(self.task, self.few_shot, self.tools, self.protocol, self.tool_template)

    @property
    def max_turns(self) -> int:
        """Messages a trajectory may take: the prompt allows `max_steps` tool calls, and an answer after them."""
        return self.max_steps + 1 if self.tools else self.max_steps

    @functools.cached_property
    def fingerprint(self) -> str:
        later = [self.server_kind] if self.server_kind else []  # set only under a served constraint
        if self.constraint:  # the grammar itself: a changed grammar never shares trajectory ids with the old one
            later.append(ActionGrammar.for_task(self.task, self.tools).regex())
        return content_hash(
            "policy", self.model, self.task, self.max_steps, self.few_shot, self.constraint,
            self.temperature, self.top_p, self.max_tokens, self.prompt_version, self.tools_fingerprint, *later,
        )

    def request(self, messages: list[dict[str, str]], sample_index: int) -> ChatRequest:
        constraint, extra = None, {}
        if self.constraint == "grammar":
            grammar = ActionGrammar.for_task(self.task, self.tools)
            constraint = Grammar(lark=grammar.lark(self.max_tokens), label=grammar.label)
        elif self.constraint == "regex":
            if self.server_kind is None:
                raise ValueError("a served constraint needs the server kind its probe verified")
            constraint, extra = Served(), action_fields(self.server_kind, self.task, self.tools)
        return ChatRequest(
            model=self.model, messages=messages, temperature=self.temperature, top_p=self.top_p,
            max_tokens=self.max_tokens, sample_index=sample_index, seed=sample_index,
            prompt_version=self.prompt_version, constraint=constraint, extra_body=extra,
            tools=tool_definitions(self.task) if self.protocol == StepProtocol.TOOLS else None,
        )


@dataclass
class Agent:
    client: LLMClient
    policy: PolicySpec
    tools: Mapping[str, Tool] = field(default_factory=dict)

    def initial_messages(self, question: Question) -> list[dict[str, str]]:
        p = self.policy
        if p.protocol == StepProtocol.TOOLS:
            return tools_policy_messages(p.task, question.question, p.max_steps)
        return policy_messages(p.task, question.question, p.max_steps, p.few_shot, p.tools)

    def _run_tool(self, kind: str, tool_input: str) -> ToolResult:
        tool = self.tools.get(kind)
        if tool is None:
            return ToolResult(f"Tool error: no {kind} tool is configured", error=True)
        return tool(tool_input)

    async def run(self, question: Question, sample_index: int) -> Trajectory:
        policy = self.policy
        prompt = self.initial_messages(question)
        messages = list(prompt)
        steps: list[Step] = []
        status, final, error = "step_cap", None, None
        for k in range(policy.max_turns):
            request = policy.request(messages, sample_index)
            try:
                response = await self.client.complete(request)
            except LLMError as exc:
                status, error = "error", str(exc)
                break
            native = policy.protocol == StepProtocol.TOOLS
            if native:
                action = parse_tool_calls(response.text, response.tool_calls, policy.task)
                message = render_tool_calls(response.text, response.tool_calls)
            else:
                parsed = parse_action(response.text, policy.task, policy.tools)
                action, message = parsed.action, parsed.message
            observation, tool_error = None, False
            # After the last allowed tool call only an answer is taken: anything else is recorded, not run.
            capped = k == policy.max_turns - 1
            if action.kind == "invalid" and not capped:
                error = action.error or "invalid"
                feedback = tools_feedback(policy.task, error) if native else invalid_action_feedback(policy.task, error, policy.tools)
                observation, tool_error = feedback, True
            elif action.kind not in ("answer", "invalid") and not capped:
                result = self._run_tool(action.kind, action.content)
                output = result.output if native else observation_message(action.content, result.output)
                observation, tool_error = output, result.error
            steps.append(
                Step(
                    step_index=k, message=message, action=action, tool_calls=response.tool_calls, observation=observation,
                    tool_error=tool_error, call_key=response.key, model=policy.model,
                    prompt_version=policy.prompt_version, constraint=request.constraint_label,
                    prompt_tokens=response.prompt_tokens, completion_tokens=response.completion_tokens,
                    latency_s=response.latency_s, cached=response.cached,
                )
            )
            if action.kind == "answer":
                status, final = "answered", action.content
                break
            messages += _next_turns(response.text, response.tool_calls, observation) if native else [
                {"role": "assistant", "content": message}, {"role": "user", "content": observation}]
        return Trajectory(
            trajectory_id=Trajectory.make_id(question.question_id, sample_index, policy.fingerprint),
            question_id=question.question_id, sample_index=sample_index, model=policy.model,
            prompt_version=policy.prompt_version, prompt_messages=prompt, steps=steps, status=status,
            final_answer=final, error=error, protocol=policy.protocol,
        )

    async def run_many(
        self,
        work: Sequence[tuple[Question, int]],
        on_done: Callable[[Trajectory], None] | None = None,
    ) -> list[Trajectory]:
        """Run all (question, sample) pairs concurrently; the client's semaphore bounds the calls,
        so a finished trajectory's slot goes to the next one at once (no batch barrier)."""

        return list(await asyncio.gather(*(notify(self.run(q, i), on_done) for q, i in work)))


def _next_turns(text: str, tool_calls: list[dict] | None, observation: str | None) -> list[dict]:
    """Under the tools protocol: the assistant turn as sent, then a `tool` result for every call it made (the
    API requires one per call id; a second call of a message gets the same error), or a user turn when it
    made no call."""
    turns: list[dict] = [{"role": "assistant", "content": text or None, **({"tool_calls": tool_calls} if tool_calls else {})}]
    ids = [c.get("id") for c in tool_calls or [] if isinstance(c, dict) and c.get("id")]
    if not ids:
        return turns + [{"role": "user", "content": observation}]
    return turns + [{"role": "tool", "tool_call_id": i, "content": observation} for i in ids]
