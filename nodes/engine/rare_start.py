"""Rare select as the optimiser's starting point (docs/evaluation.md §6, tuning round 3).

Training from the subject word spends its first steps leaving the typical region that rare select
already reaches for the cost of a bank. So the run starts where rare select ends:

1. a fresh bank of the subject's prompt is drawn and its rarest sample that the gate accepts is kept
   (:func:`rarest_accepted`);
2. that embedding is inverted into a token + LoRA as image variations invert an image: the creative
   optimiser with the image anchor to it as its only term, no gate (:func:`invert`);
3. the creative run continues from the inverted concept, with its own terms and gate.

On the evaluation's second held-out seeds this beat rare select at equal compute on both novelty bars,
but its concept's renders are close to one image (diversity about a tenth of the typical spread).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .bank import sample_bank
from .losses import AnchorTerm
from .optimizer import CreativeRun, OptimResult, PhaseCallback, StepCallback
from .rare import RareSelection, select_rare

INVERSION_STEPS = 100  # what the evaluation measured (50 scored within its noise)
INVERSION_LR = 1e-2  # image variations' inversion rate
BANK_BATCH = 500  # the starting bank is drawn in batches of this many (the evaluation's)
SELECT_BATCH = 32  # candidates rendered and judged at a time (the evaluation's)


@dataclass
class RareStartResult:
    rarest: RareSelection  # the accepted sample the run started from (one row)
    inversion: OptimResult
    creative: OptimResult

    @property
    def concept(self):
        return self.creative.concept


def _needs_token(run: CreativeRun) -> None:
    if not run.config.train.token:
        raise ValueError("A rare start inverts the sample into a token: train 'token + LoRA' (as evaluated) or "
                         "'token', not the LoRA alone.")


def rarest_accepted(run: CreativeRun, bank_size: int, seed: int, *, batch_size: int = BANK_BATCH,
                    select_batch: int = SELECT_BATCH, on_phase: PhaseCallback | None = None) -> RareSelection:
    """The rarest sample, under the run's norm, of a fresh bank of ``bank_size`` drawn for the subject's prompt
    with the run's prior settings, that the run's gate accepts (every sample is a candidate, judged
    ``select_batch`` at a time; without a gate, the rarest). ``on_phase`` hears each render and question."""
    _needs_token(run)  # before the bank is drawn: the whole start would be wasted
    if bank_size < 1:
        raise ValueError(f"The starting bank needs at least 1 sample, got {bank_size}.")
    config, check = run.config, run.check
    bank = sample_bank(run.generator, config.prompt("", run.subject), bank_size, batch_size=min(batch_size, bank_size),
                       steps=config.prior_steps, guidance=config.guidance, seed=seed)
    gate = check.gate if check is not None else None
    chosen = select_rare(run.norm, bank, 1, candidates=bank_size, gate=gate,
                         renderer=check.renderer if gate is not None else None, subject=run.subject,
                         batch_size=select_batch, on_phase=on_phase)
    if not chosen.samples:
        raise ValueError(f"None of the starting bank's {bank_size} samples passed the gate ('{chosen.question}'): "
                         "draw a larger starting bank, lower the gate's threshold, or start from the subject word.")
    return chosen


def invert(run: CreativeRun, target: AnchorTerm, steps: int, lr: float, *, on_step: StepCallback | None = None,
           on_phase: PhaseCallback | None = None, total: int = 0) -> OptimResult:
    """A token (and LoRA, as ``run`` trains) whose output matches ``target``'s embedding: the run with
    ``target`` as its only term, ``steps`` at ``lr``, no gate, from the subject word (the stage "inversion")."""
    if steps < 1:
        raise ValueError(f"inversion steps must be at least 1, got {steps}.")
    return run.with_(terms=(replace(target, weight=1.0),), check=None, start=None,
                     config=replace(run.config, steps=steps, lr=lr)).run(
        on_step, on_phase=on_phase, stage="inversion", total=total)


def rare_start(run: CreativeRun, rarest: RareSelection, *, inversion_steps: int = INVERSION_STEPS,
               inversion_lr: float = INVERSION_LR, on_step: StepCallback | None = None,
               on_phase: PhaseCallback | None = None) -> RareStartResult:
    """``run`` started from ``rarest`` (:func:`rarest_accepted`) instead of the subject word. The inversion
    trains what ``run`` trains, one noise draw per step; the creative stage continues it. ``run`` must train the
    token (the evaluated setting trains token + LoRA): the inverted sample lives in the token, and a run that
    does not train a part drops it. ``on_step`` hears both stages as one job."""
    _needs_token(run)
    target = AnchorTerm.from_embeds(rarest.embeds[:1], run.generator.identity)
    single = run.with_(config=replace(run.config, samples=1))
    total = inversion_steps + run.config.steps
    inversion = invert(single, target, inversion_steps, inversion_lr, on_step=on_step, on_phase=on_phase, total=total)
    creative = run.with_(start=inversion.concept).run(on_step, on_phase=on_phase, stage="creative",
                                                      offset=inversion_steps, total=total)
    return RareStartResult(rarest, inversion, creative)
