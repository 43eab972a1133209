"""The validity gate of §5.3: ask a judge "Is this still a {subject}?" every few steps.

The judge is anything with ``p_yes(images [B,H,W,3], question) -> [B]`` (the MLLM judge in
``mllm.py``, or a fake in tests). A "no" ends the trial; the optimiser then keeps the last
state that passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import budget
from .render import Renderer

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

    def provenance(self) -> dict[str, object]:
        """How the gate judged, as a concept's metadata records it."""
        return {"question": self.question, "every": self.every, "threshold": self.threshold}

    def memory_estimate(self, subject: str, height: int, width: int, *, on_gpu: bool) -> budget.Estimate | None:
        """What one question about a ``width`` x ``height`` image takes: the judge's own estimate, or
        ``None`` for a judge the pack cannot size (a scripted judge holds no model)."""
        own = getattr(self.judge, "memory_estimate", None)
        return own(self.question_for(subject), height, width, on_gpu=on_gpu) if callable(own) else None

    def ask(self, images: torch.Tensor, subject: str, step: int) -> Verdict:
        question = self.question_for(subject)
        p = float(self.judge.p_yes(images, question).float().mean())
        return Verdict(step, question, p, self.passes(p), images[0].detach().cpu())


def draw(renderer: Renderer, embeds: torch.Tensor, on_phase: budget.PhaseCallback | None = None) -> torch.Tensor:
    """Render without gradients, telling the host first (:data:`budget.RENDER`) so it can load the decoder."""
    if on_phase is not None:
        on_phase(budget.RENDER)
    with torch.no_grad():
        return renderer(embeds)


NEEDS_RENDERER = ("gate is connected but renderer is not: the gate judges rendered images, so connect a renderer "
                  "(Decoder Renderer).")


@dataclass(frozen=True)
class GateCheck:
    """The gate with the renderer that draws what it judges: the one place that pairs them.

    A gate without a renderer is refused here (:data:`NEEDS_RENDERER`), for every caller. The run's
    training session draws the images (:func:`draw`, or the generator itself) and the gate asks; the
    host hears :data:`budget.RENDER` and :data:`budget.JUDGE` before each, to load the decoder, then
    the MLLM.
    """

    gate: ValidityGate
    renderer: Renderer | None  # None: the generator draws the images itself (the SD path)

    @classmethod
    def of(cls, gate: ValidityGate | None, renderer: Renderer | None, *,
           generator_draws: bool = False) -> GateCheck | None:
        """The check of an optional gate: ``None`` without a gate, refused without a renderer unless the
        generator draws its own images (a few-step SD model renders what the gate judges; a prior cannot)."""
        if gate is None:
            return None
        if renderer is None and not generator_draws:
            raise ValueError(NEEDS_RENDERER)
        return cls(gate, None if generator_draws else renderer)

    def models(self) -> dict[str, object]:
        """The check's models by memory kind (no decoder when the generator draws)."""
        return {budget.DECODER: self.renderer, budget.MLLM: self.gate}

    def memory_estimate(self, count: int, subject: str, *, on_gpu: bool,
                        image_size: tuple[int, int] | None = None) -> budget.Estimate | None:
        """Rendering ``count`` embeddings at once, then one question about one image. Without a renderer the
        generator's own estimate holds the drawing; ``image_size`` (height, width) is then what it draws."""
        height, width = self.renderer.image_size if self.renderer is not None else image_size
        drawing = None if self.renderer is None else self.renderer.memory_estimate(count, on_gpu=on_gpu)
        asking = self.gate.memory_estimate(subject, height, width, on_gpu=on_gpu)
        return budget.gate_check_estimate(drawing, asking)
