"""Rare samples without training: the rarest embeddings of a bank that the gate still accepts.

The honest training-free counterpart of the creative optimiser (and the baseline it has to
beat): every embedding of a bank is scored under the norm (``log Ĝ(ẽ)``, Eq. 4-5), the rarest
``candidates`` are rendered and shown to the validity gate in rarity order, batch by batch, and
the first ``k`` that pass are returned with their log-likelihoods and P(yes). The rarest samples
of a prior are often broken ones, which is what the gate is there to catch; without a gate the
``k`` rarest are returned as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import budget
from .bank import EmbeddingBank
from .gate import GateCheck, ValidityGate, draw
from .norm import GaussianNorm
from .render import ProgressCallback, Renderer


@dataclass(frozen=True)
class RareSample:
    """One candidate: its row in the bank, its log-likelihood under the norm and the gate's verdict."""

    index: int
    log_likelihood: float
    p_yes: float | None  # None when no gate was asked
    passed: bool


@dataclass
class RareSelection:
    """The ``k`` (or fewer) rarest accepted samples, rarest first, and every candidate that was checked."""

    samples: list[RareSample]
    checked: list[RareSample]
    embeds: torch.Tensor  # [len(samples), D], rows of the bank
    images: torch.Tensor | None  # [len(samples), H, W, 3] renders, None without a renderer
    bank_size: int
    question: str = ""

    @property
    def log_likelihoods(self) -> list[float]:
        return [s.log_likelihood for s in self.samples]


def rarity_order(norm: GaussianNorm, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices sorted rarest first (lowest log-likelihood under the norm), and every row's log-likelihood."""
    with torch.no_grad():
        ll = norm.log_prob(embeds.double())
    return torch.argsort(ll, stable=True), ll


def _check(norm: GaussianNorm, bank: EmbeddingBank, k: int, candidates: int, gate: ValidityGate | None,
           subject: str) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if candidates < k:
        raise ValueError(f"candidates ({candidates}) must be at least k ({k}): check more of the rarest embeddings "
                         "or ask for fewer.")
    if len(bank) == 0:
        raise ValueError("The bank is empty: sample some embeddings first (Prior Sampler).")
    if bank.dim != norm.embed_dim:
        raise ValueError(f"The bank holds {bank.dim}-d embeddings but the norm is {norm.embed_dim}-d: use a bank of "
                         "the prior the norm was fitted on.")
    if norm.prior_identity and bank.prior_identity and norm.prior_identity != bank.prior_identity:
        raise ValueError(f"The bank comes from prior '{bank.prior_identity}' but the norm was fitted on "
                         f"'{norm.prior_identity}': sample the bank from the norm's prior.")
    if gate is not None and not (gate.subject or subject.strip()):
        raise ValueError("The gate needs a subject to ask about: set the subject, e.g. 'vehicle'.")


def select_rare(norm: GaussianNorm, bank: EmbeddingBank | torch.Tensor, k: int, *, candidates: int | None = None,
                gate: ValidityGate | None = None, renderer: Renderer | None = None,
                subject: str = "", batch_size: int = 8, progress: ProgressCallback | None = None,
                on_phase: budget.PhaseCallback | None = None) -> RareSelection:
    """The ``k`` rarest embeddings of ``bank`` that pass ``gate``, checking at most ``candidates`` of the rarest.

    Candidates are rendered and judged ``batch_size`` at a time, rarest first, and the search
    stops as soon as ``k`` passed. ``progress(checked, candidates)`` runs after every batch;
    raising from it cancels. With a renderer but no gate, the ``k`` rarest are rendered.
    ``on_phase`` hears each render and each question (as in an optimiser's gate check).
    """
    bank = bank if isinstance(bank, EmbeddingBank) else EmbeddingBank(bank.detach().float().cpu())
    candidates = min(len(bank), k if candidates is None else candidates)
    check = GateCheck.of(gate, renderer)  # a gate without a renderer is refused here
    _check(norm, bank, k, candidates, gate, subject)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    order, ll = rarity_order(norm, bank.embeds)
    pool = order[:candidates].tolist() if gate is not None else order[:k].tolist()
    question = gate.question_for(subject) if gate is not None else ""
    checked: list[RareSample] = []
    images: list[torch.Tensor] = []
    for start in range(0, len(pool), batch_size):
        rows = pool[start:start + batch_size]
        drawn = None
        if renderer is not None:
            drawn = draw(renderer, bank.embeds[rows], on_phase).detach().float().cpu()
        p_yes = [None] * len(rows)
        if check is not None:
            if on_phase is not None:
                on_phase(budget.JUDGE)
            with torch.no_grad():
                p_yes = gate.judge.p_yes(drawn, question).float().cpu().tolist()
        for i, (row, p) in enumerate(zip(rows, p_yes)):
            passed = p is None or gate.passes(p)
            checked.append(RareSample(row, float(ll[row]), p, passed))
            if passed and drawn is not None and len(images) < k:
                images.append(drawn[i])
        if progress is not None:
            progress(len(checked), len(pool))
        if sum(s.passed for s in checked) >= k:
            break
    chosen = [s for s in checked if s.passed][:k]
    embeds = bank.embeds[[s.index for s in chosen]] if chosen else bank.embeds[:0]
    return RareSelection(chosen, checked, embeds, torch.stack(images) if images else None, len(bank), question)


def selection_bank(selection: RareSelection, bank: EmbeddingBank) -> EmbeddingBank:
    """The selected embeddings as a bank, with where they came from (for saving, rendering, negative clusters)."""
    provenance = dict(bank.provenance, kind="rare_selection", source_count=selection.bank_size,
                      selected=[s.index for s in selection.samples], log_likelihoods=selection.log_likelihoods,
                      p_yes=[s.p_yes for s in selection.samples])
    return EmbeddingBank(selection.embeds.clone(), provenance)
