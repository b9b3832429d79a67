"""Shared helpers for tests and benchmarks."""

from __future__ import annotations

import re
from pathlib import Path


def build_tiny_model(target: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from swirl_core.llm.local_models import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def math_policy(body: dict) -> str:
    """A scripted math policy: two calculator steps, then the answer; keyed on the question's numbers."""
    messages = body["messages"]
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user" and "Question:" in m["content"])
    anchor = max(i for i, m in enumerate(messages) if m["content"] == question)
    step = sum(1 for m in messages[anchor:] if m["role"] == "assistant")
    numbers = re.findall(r"\d+", question.rsplit("Question:", 1)[1])[:2] or ["1", "1"]
    if step == 0:
        return f"First add. <math_exp>{numbers[0]} + {numbers[-1]}</math_exp>"
    if step == 1:
        return f"Then double it. <math_exp>({numbers[0]} + {numbers[-1]}) * 2</math_exp>"
    return "<answer>42</answer>"


def build_labeled_db(path: Path) -> None:
    """Four 2-step QA trajectories with hand-set labels:
    t0 process ✓ outcome ✓; t1 process ✓ outcome ✗; t2 process ✗ outcome ✓; t3 process ✗ (UNKNOWN) outcome ✗."""
    import pyarrow as pa

    from swirl_core.records import Action, Question, Step, Trajectory
    from swirl_core.store import Store

    with Store(path) as store:
        q = Question(question_id="q", dataset="hotpotqa", split="train", source_id="1", task="qa",
                     question="Which river flows through the birthplace of Marie Curie?", answer="Vistula")
        store.upsert_questions([q], "r")
        trajs = []
        for n in range(4):
            steps = [Step(step_index=0, message="<search_query>Marie Curie birthplace</search_query>",
                          action=Action(kind="search", content="Marie Curie birthplace"),
                          observation="Marie Curie birthplace → Warsaw: on the Vistula.", model="m", prompt_version="v"),
                     Step(step_index=1, message="<answer>Vistula</answer>", action=Action(kind="answer", content="Vistula"),
                          model="m", prompt_version="v")]
            trajs.append(Trajectory(trajectory_id=f"t{n}", question_id="q", sample_index=n, model="m", prompt_version="v",
                                    prompt_messages=[{"role": "user", "content": "Question: " + q.question}],
                                    steps=steps, status="answered", final_answer="Vistula"))
        store.write_trajectories(trajs, "r", "fp")
        verdicts = {"t0": ["GOOD", "GOOD"], "t1": ["GOOD", "GOOD"], "t2": ["GOOD", "BAD"], "t3": ["UNKNOWN", "GOOD"]}
        store.upsert("judgments", pa.Table.from_pylist([
            {"judgment_id": f"{t}{i}", "trajectory_id": t, "step_index": i, "sample_index": 0, "judge_model": "j",
             "judge_fingerprint": "f", "prompt_version": "v", "verdict": v}
            for t, vs in verdicts.items() for i, v in enumerate(vs)]))
        store.upsert("grades", pa.Table.from_pylist([
            {"trajectory_id": t, "method": "exact_match", "correct": c}
            for t, c in [("t0", True), ("t1", False), ("t2", True), ("t3", False)]]))
