"""Overlap between training and evaluation questions: exact (normalized text) and 13-gram.

The 13-token-window test is the GPT-3 paper's; both publishing (how much of the released training
data overlaps evaluation sets) and evaluation (which evaluated questions were seen in training)
use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swirl_core.grading import normalize_answer

NGRAM = 13


@dataclass(frozen=True)
class Overlap:
    exact: bool  # the same question after normalization
    near: bool  # shares a 13-token window with a reference question (implied by exact for long questions)


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    tokens = normalize_answer(text).split()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def overlaps(candidates: Sequence[str], reference: Sequence[str], n: int = NGRAM) -> list[Overlap]:
    """For each candidate question: does it occur in, or share an n-gram with, the reference set?"""
    exact_set = {normalize_answer(q) for q in reference}
    grams = {g for q in reference for g in ngrams(q, n)}
    return [Overlap(normalize_answer(q) in exact_set, bool(ngrams(q, n) & grams)) for q in candidates]
