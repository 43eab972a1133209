"""What the creative optimiser has to beat on the mini world: cheaper ways of getting rare images.

The ``baselines`` study of the evaluation script runs, for each subject and seed:

- **typical**: fresh samples of the bank's prompt (what the prior gives without any effort);
- **rare select**: the ``k`` rarest embeddings of a bank of the same size that the MLLM gate
  accepts (:func:`engine.rare.select_rare`; no training). Seed 0 selects from the reference bank
  itself, other seeds from a bank drawn with that seed;
- **ConceptLab-style**: a token only (5 prior steps, AdamW 1e-4), trained with ConceptLab's loss
  (:class:`ConceptLabLoss`) and its live negatives: every ``every`` steps the concept is rendered
  and the mini MLLM names the kind of the category it shows; a kind not yet named becomes a new
  negative (:class:`KindNamer`). Only a category with several kinds gives it more than one;
- **the paper's method** (token + LoRA, anchor, gate) and its ablations, at the same steps.

The ConceptLab loss lives here, not in the engine: it is a baseline, not part of the paper's method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ...engine.bank import PAPER_TEMPLATE, sample_bank
from ...engine.evaluation import measure_snapshots
from ...engine.gate import GateCheck, ValidityGate, Verdict
from ...engine.losses import AnchorTerm, CreativeTerm
from ...engine.optimizer import CreativeRun, OptimConfig
from ...engine.prior import Prior
from ...engine.rare import select_rare
from ...engine.sampling import sample_embeddings
from . import world

CONCEPTLAB_EVERY = 25  # ConceptLab asks its VLM every 250 of 2,500 steps; here every gate interval


@dataclass(frozen=True)
class ConceptLabLoss:
    """ConceptLab's prior constraint (Richardson et al. 2023, their code's ``new_pet`` setting).

    ``L_pos = 1 − min(cos(e, pos), 0.28)``: pulled toward the category text only until the cosine
    reaches 0.28; ``L_neg = ½ (mean_j + max_j) max(cos(e, neg_j), 0.2)``: pushed away from every
    named kind down to 0.2. The negatives list grows during a run (:class:`KindNamer` appends).
    """

    positive: torch.Tensor  # [D] the prior's projected text embedding of the category prompt
    negatives: list[torch.Tensor] = field(default_factory=list)  # [D] each, one per named kind
    pos_clamp: float = 0.28
    neg_floor: float = 0.2
    weight: float = 1.0
    name: str = "conceptlab"

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        e = e.float()
        pos = F.cosine_similarity(e, self.positive.to(e.device)[None], dim=-1).clamp(max=self.pos_clamp)
        loss = (1.0 - pos).mean()
        if self.negatives:
            neg = torch.stack([F.cosine_similarity(e, n.to(e.device)[None], dim=-1) for n in self.negatives])
            neg = neg.clamp(min=self.neg_floor)  # [N, B]
            loss = loss + 0.5 * (neg.mean(0) + neg.max(0).values).mean()
        return loss


def kinds_of(subject: str) -> tuple[str, ...]:
    """The world's kinds of a category (ConceptLab needs a category: its negatives are the kinds)."""
    kinds = tuple(k for k in world.kinds_of(subject) if k != subject)
    if not kinds:
        raise ValueError(f"ConceptLab-style runs need a category subject ({', '.join(world.CATEGORIES)}), "
                         f"got {subject!r}: its negatives are the category's kinds.")
    return kinds


def text_target(prior: Prior, word: str) -> torch.Tensor:
    """The prior's projected text embedding of the paper's prompt for ``word`` (as the anchor uses)."""
    return AnchorTerm.from_prior(prior, PAPER_TEMPLATE.format(subject=word)).target


@dataclass
class KindNamer:
    """ConceptLab's live negatives in the optimiser's gate slot: it never stops the run.

    ConceptLab asks BLIP-2 "What kind of {category} is in this photo?"; the mini MLLM answers
    yes/no only, so its answer is the kind it gives the highest P(yes) for "Is this a {kind}?".
    """

    judge: object  # has p_yes(images, question), e.g. the mini MLLM
    loss: ConceptLabLoss
    prior: Prior
    kinds: tuple[str, ...]
    every: int = CONCEPTLAB_EVERY
    named: list[str] = field(default_factory=list)
    question: str = "What kind of {subject} is in this photo?"
    threshold: float = 0.0
    subject: str = ""

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def answer(self, images: torch.Tensor) -> str:
        with torch.no_grad():
            p = [float(self.judge.p_yes(images, f"Is this {world.article(k)} {k}? Yes or No.").mean())
                 for k in self.kinds]
        return self.kinds[max(range(len(p)), key=p.__getitem__)]

    def name(self, images: torch.Tensor) -> str:
        """Ask, and make the answer a negative if it is new."""
        kind = self.answer(images)
        if kind not in self.named:
            self.named.append(kind)
            self.loss.negatives.append(text_target(self.prior, kind))
        return kind

    def provenance(self) -> dict[str, object]:
        """What a concept's metadata records of its gate: how the kinds were asked for, and how often."""
        return {"question": self.question, "every": self.every, "threshold": self.threshold}

    def ask(self, images: torch.Tensor, subject: str, step: int) -> Verdict:
        kind = self.name(images)
        return Verdict(step, f"{self.question.format(subject=subject)} -> {kind}", 1.0, True)


@dataclass(frozen=True)
class Method:
    """A trained method: its loss terms, its gate (or ConceptLab's namer) and what it trains."""

    terms: Callable[[], list]  # fresh terms per run (ConceptLab's negatives grow during a run)
    gate: Callable[[list], object | None]  # the terms -> gate for this run
    changes: dict  # OptimConfig fields, e.g. train="token"
    start: Callable[..., object] | None = None  # (prior, subj, gate, config) -> the Concept the run starts from


def trained_methods(prior: Prior, subj, gate: ValidityGate) -> dict[str, Method]:
    """The paper's method, its ablations, and the ConceptLab-style baseline, for one subject."""
    norm = subj.evaluator.norm
    paper = lambda: [CreativeTerm(norm), subj.anchor]
    methods = {
        "paper (token+LoRA, anchor, gate)": Method(paper, lambda t: gate, {}),
        "no pullback": Method(lambda: [CreativeTerm(norm)], lambda t: None, {}),
        "anchor only": Method(paper, lambda t: None, {}),
        "gate only": Method(lambda: [CreativeTerm(norm)], lambda t: gate, {}),
        "token only (anchor, gate)": Method(paper, lambda t: gate, {"train": "token"}),
        "LoRA only (anchor, gate)": Method(paper, lambda t: gate, {"train": "lora"}),
        "broken: lr 0": Method(paper, lambda t: gate, {"lr": 0.0}),
    }
    if subj.name in world.CATEGORIES:
        kinds = kinds_of(subj.name)
        methods["ConceptLab-style (token)"] = Method(
            lambda: [ConceptLabLoss(text_target(prior, subj.name))],
            lambda t: KindNamer(gate.judge, t[0], prior, kinds), {"train": "token"})
    return methods


def run_method(prior: Prior, subj, label: str, method: Method, cfg: OptimConfig, steps: list[int]) -> list[dict]:
    """One run; one row per measured step, with the wall-clock seconds of training up to that step."""
    terms = method.terms()
    gate = method.gate(terms)
    run_cfg = replace(cfg, steps=max(max(steps), 1), **method.changes)
    t0 = time.perf_counter()
    if isinstance(gate, KindNamer):  # ConceptLab asks once before training too (the step-0 concept)
        gate.name(subj.evaluator.renderer(sample_embeddings(prior, subj.prompt, 1, batch_size=1, seed=cfg.seed)))
    marks = [time.perf_counter() - t0]  # marks[s]: seconds after step s
    run = CreativeRun(prior, subj.evaluator.norm, subj.name, tuple(terms), run_cfg,
                      GateCheck.of(gate, subj.evaluator.renderer))
    result = run.run(lambda _event: marks.append(time.perf_counter() - t0), snapshot_at=frozenset(steps))
    rows = measure_snapshots(run, subj.evaluator, result, label)
    for r in rows:
        r["seconds"] = marks[min(r["step"], len(marks) - 1)]
        if isinstance(gate, KindNamer):
            r["negatives"] = ", ".join(gate.named)
    return rows


def typical(prior: Prior, subj, seed: int, samples: int) -> dict:
    t0 = time.perf_counter()
    embeds = sample_embeddings(prior, subj.prompt, samples, batch_size=samples, seed=1000 + seed)
    seconds = time.perf_counter() - t0
    m = subj.evaluator.measure_embeddings(embeds, subj.name)
    return {"config": "typical", "subject": subj.name, "seed": seed, "step": None, **m.as_dict(), "seconds": seconds}


def rare_select(prior: Prior, subj, gate: ValidityGate, seed: int, samples: int) -> dict:
    """The ``samples`` rarest of a bank (seed 0: the reference bank) that the gate accepts."""
    evaluator = subj.evaluator
    t0 = time.perf_counter()
    bank = evaluator.bank if seed == 0 else sample_bank(prior, subj.prompt, len(evaluator.bank), batch_size=500,
                                                         seed=seed)
    sel = select_rare(evaluator.norm, bank, samples, candidates=len(bank), gate=gate, renderer=evaluator.renderer,
                      subject=subj.name, batch_size=32)
    seconds = time.perf_counter() - t0 + (subj.bank_seconds if seed == 0 else 0.0)
    m = evaluator.measure_embeddings(sel.embeds, subj.name)
    return {"config": "rare select", "subject": subj.name, "seed": seed, "step": None, **m.as_dict(),
            "seconds": seconds, "selected": len(sel.samples), "checked": len(sel.checked)}


def baselines(prior: Prior, gate: ValidityGate, subj, cfg: OptimConfig, steps: list[int], seeds: list[int],
              samples: int, methods: list[str] | None = None) -> list[dict]:
    """Every method for one subject and each seed (``methods``: labels to run, default all but the broken ones)."""
    trained = trained_methods(prior, subj, gate)
    wanted = methods or ["typical", "rare select", *(m for m in trained if not m.startswith("broken"))]
    rows = []
    for seed in seeds:
        if "typical" in wanted:
            rows.append(typical(prior, subj, seed, samples))
        if "rare select" in wanted:
            rows.append(rare_select(prior, subj, gate, seed, samples))
        for label, method in trained.items():
            if label in wanted:
                rows += run_method(prior, subj, label, method, replace(cfg, seed=seed), steps)
    return rows
