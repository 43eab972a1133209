"""The validity gate of §5.3: ask a judge "Is this still a {subject}?" every few steps.

The judge is anything with ``p_yes(images [B,H,W,3], question) -> [B]`` (the MLLM judge in
``mllm.py``, or a fake in tests). A "no" ends the trial; the optimiser then keeps the last
state that passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

PAPER_QUESTION = "Is this still a {subject}? Yes or No."


class YesNoJudge(Protocol):
    """Answers a yes/no question about each image: ``p_yes(images [B,H,W,3], question) -> [B]``."""

    def p_yes(self, images: torch.Tensor, question: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class Verdict:
    """What the gate answered at ``step``; ``image`` is the first image it judged (for previews)."""

    step: int
    question: str
    p_yes: float
    passed: bool
    image: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ValidityGate:
    """A yes/no judge + question template + how often to ask + the P(yes) needed to pass."""

    judge: YesNoJudge
    question: str = PAPER_QUESTION
    every: int = 25
    threshold: float = 0.5
    subject: str = ""  # overrides the optimiser's subject in the question when set

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("The gate's check interval must be at least 1 step.")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("The gate's threshold is a probability between 0 and 1.")

    def managed_modules(self) -> dict[str, torch.nn.Module]:
        """The judge's modules, when it has any (a scripted judge in tests has none)."""
        modules = getattr(self.judge, "managed_modules", None)
        return modules() if callable(modules) else {}

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def question_for(self, subject: str) -> str:
        """The question asked about ``subject`` (the gate's own subject, when set, takes its place)."""
        return self.question.format(subject=self.subject or subject)

    def passes(self, p_yes: float) -> bool:
        """Whether a P(yes) is enough: the one rule for a whole check and for single images (rare selection)."""
        return p_yes >= self.threshold

    def ask(self, images: torch.Tensor, subject: str, step: int) -> Verdict:
        question = self.question_for(subject)
        p = float(self.judge.p_yes(images, question).float().mean())
        return Verdict(step, question, p, self.passes(p), images[0].detach().cpu())
