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
