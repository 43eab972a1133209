"""Does training earn its time? Variants of the method against rare select, at equal compute (issue 20).

The ``variants`` study of the evaluation script runs, for one subject and seed, under a protocol fixed
before any tuning (docs/evaluation.md, section 6):

- three novelty bars, each with its own creativity: today's (rarer than the norm bank's 5th percentile,
  or a rare combination), **beyond the bank** (rarer than every sample of a 5,000-sample typical
  reference bank, drawn once per subject with its own seed) and the judge's **rare combinations**;
- every row's cost: wall-clock seconds, this process's CPU seconds (one thread: the measure that load
  moves least) and prior rows (every sample-row of every prior denoising prediction, CFG's two halves
  counted, training and gate checks included; a backward pass is not counted);
- **rare select (bank 1,000)**: the rarest gated samples of a fresh bank of 1,000 (as section 5);
- **rare select (equal compute)**: the rarest gated samples of a fresh bank whose sampling takes as many
  CPU seconds as a chosen trained method up to a chosen step (``--equal-to LABEL@STEP``); its size is
  the reference bank's CPU seconds per sample into that budget;
- the trained methods: the paper's, LoRA only (today's best trained method) and its variants (several
  noise samples per step, gate-guided rollback, a creative term with a ceiling at the norm bank's rarest
  sample, a larger learning rate), all with the anchor and the MLLM gate;
- **then rare select**: each trained method's concept at its last measured step, sampled 1,000 times and
  the rarest gated samples kept (the trained concept as rare select's bank; a user wires it with the
  Prior Sampler and Rare Select nodes), its row's cost the training's plus the selection's;
- **rare start** (round 3): rare select as the starting point of training: the rarest gated sample of a
  fresh bank of 1,000 is inverted into a token + LoRA (the image-variations inversion) and the creative
  run continues from there; its rows' step 0 is the inverted concept, their cost includes bank, selection
  and inversion;
- **along words** (rounds 4-5): the creative term measured only along the directions of the words a user
  would name for "unusual in what" (the subject's kinds, colours and settings, as prior text embeddings;
  ``GaussianNorm.along``), with or without the ceiling, and with each word's axis held inside the bank's
  typical range (:class:`TypicalParts`), so that the only way to low density left is an unusual pairing.

The independent judge is the only measure of validity; the gate's MLLM never is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from ...engine.bank import EmbeddingBank, sample_bank
from ...engine.evaluation import measure_snapshots
from ...engine.gate import GateCheck, ValidityGate
from ...engine.concept import Concept
from ...engine.losses import AnchorTerm, CreativeTerm
from ...engine.norm import GaussianNorm
from ...engine.optimizer import CreativeRun, OptimConfig
from ...engine.prior import Prior
from ...engine.rare import select_rare
from ...engine.rare_start import invert, rarest_accepted
from ...engine.sampling import sample_embeddings
from . import world
from .baselines import Method

REFERENCE_COUNT = 5000
REFERENCE_SEED = 77  # the reference bank's seed: not the norm bank's (0) nor any rare-select bank's
BANK_SEED = 10_000  # rare select's bank of 1,000 for seed s is drawn with BANK_SEED + s
EQUAL_SEED = 20_000  # the equal-compute bank of seed s is drawn with EQUAL_SEED + s
TRAINED_BANK_SEED = 30_000  # the trained concept's bank of 1,000 for seed s is drawn with TRAINED_BANK_SEED + s
RARE_START_SEED = 50_000  # the rare start's bank of 1,000 for seed s is drawn with RARE_START_SEED + s
THEN_SELECT = " + rare select"  # the label suffix of a trained method's then-rare-select row
EQUAL_TO = "paper (token+LoRA, anchor, gate)@50"


@dataclass
class Meter:
    """Costs since a start: wall-clock, this process's CPU time, prior rows (a hook on the transformer)."""

    rows: list[int]

    @classmethod
    def on(cls, prior: Prior) -> "Meter":
        meter = cls([0])

        def count(_module, args):
            meter.rows[0] += int(args[0].shape[0])

        # every denoising prediction (ours and diffusers') ends in this projection, one row per sample
        prior.transformer.proj_to_clip_embeddings.register_forward_pre_hook(count)
        return meter

    def now(self) -> tuple[float, float, int]:
        return time.perf_counter(), time.process_time(), self.rows[0]

    def since(self, start: tuple[float, float, int]) -> dict[str, float]:
        wall, cpu, rows = self.now()
        return {"seconds": round(wall - start[0], 2), "cpu_seconds": round(cpu - start[1], 2),
                "prior_rows": rows - start[2]}


@dataclass(frozen=True)
class RareStart:
    """Rare select as the starting point: the rarest sample of a fresh bank of 1,000 that the gate accepts,
    inverted into a token + LoRA as image variations invert an image (the image anchor to its embedding as
    the only term, ``lr``, no gate, one noise draw per step), for ``steps`` steps."""

    steps: int = 100
    lr: float = 1e-2

    def __call__(self, prior: Prior, subj, gate: ValidityGate, cfg: OptimConfig) -> Concept:
        run = CreativeRun(prior, subj.evaluator.norm, subj.name, (), replace(cfg, train="both", samples=1),
                          GateCheck.of(gate, subj.evaluator.renderer))
        rarest = rarest_accepted(run, 1000, RARE_START_SEED + cfg.seed)
        return invert(run, AnchorTerm.from_embeds(rarest.embeds, prior.identity), self.steps, self.lr).concept


def word_axes(prior: Prior, subj) -> list[torch.Tensor]:
    """The words a user would name for "unusual in what", as prior text embeddings, one tensor per axis: the
    subject's kinds, colours and settings (the world's vocabulary, none of its probabilities); an axis of one
    word (the animal's one kind) has no direction and is left out."""
    kinds = world.kinds_of(subj.name) or [subj.name]
    axes = [[f"a photo of a {k}" for k in kinds], [f"a photo of a {c} {subj.name}" for c in world.COLOURS],
            [f"a photo of a {subj.name} {world.BACKGROUND_PHRASE[b]}" for b in world.BACKGROUNDS]]
    with torch.no_grad():
        return [prior.with_concept(None).encode_prompt(a).text_embeds.double().cpu() for a in axes if len(a) > 1]


@dataclass(frozen=True)
class TypicalParts:
    """A pullback that holds each axis on its own inside the bank's typical range: per axis, how far each
    sample's log-likelihood under that axis' norm falls below the bank's ``quantile`` (0 above it). Beside a
    creative term along all the axes together, the only way left to low density is an unusual *pairing* of
    typical parts (a boat, on a road)."""

    parts: tuple[GaussianNorm, ...]
    floors: tuple[float, ...]
    weight: float = 1.0
    name: str = "typical parts"

    @classmethod
    def of(cls, bank: torch.Tensor, axes: list[torch.Tensor], quantile: float = 0.05) -> "TypicalParts":
        parts = tuple(GaussianNorm.along(bank, [a]) for a in axes)
        floors = tuple(float(torch.quantile(n.log_prob(bank.double()), quantile)) for n in parts)
        return cls(parts, floors)

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        return sum((f - n.log_prob(e)).clamp(min=0).mean() for n, f in zip(self.parts, self.floors))


def methods(subj, gate: ValidityGate, prior: Prior) -> dict[str, Method]:
    """The paper's method, LoRA only, and LoRA only's variants; all with anchor and gate."""
    paper = lambda: [CreativeTerm(subj.evaluator.norm), subj.anchor]
    hinge = lambda: [CreativeTerm.beyond(subj.evaluator.norm), subj.anchor]
    hinge_anchor = lambda: [CreativeTerm.beyond(subj.evaluator.norm),
                            replace(subj.anchor, weight=10.0)]
    hinge_margin = lambda: [CreativeTerm.beyond(subj.evaluator.norm, margin=10.0), subj.anchor]
    gated = lambda _terms: gate
    axes, bank = word_axes(prior, subj), subj.evaluator.bank
    words = GaussianNorm.along(bank, axes)
    parts = TypicalParts.of(bank.embeds, axes)
    along = lambda: [CreativeTerm.beyond(words), subj.anchor]
    along_unbounded = lambda: [CreativeTerm(words), subj.anchor]
    pairing = lambda: [CreativeTerm(words), parts, subj.anchor]
    pairing_hinge = lambda: [CreativeTerm.beyond(words), parts, subj.anchor]
    return {
        "paper (token+LoRA, anchor, gate)": Method(paper, gated, {}),
        "LoRA only (anchor, gate)": Method(paper, gated, {"train": "lora"}),
        "LoRA, 4 samples/step": Method(paper, gated, {"train": "lora", "samples": 4}),
        "LoRA, rollback": Method(paper, gated, {"train": "lora", "on_reject": "rollback"}),
        "LoRA, 4 samples/step, rollback": Method(paper, gated, {"train": "lora", "samples": 4,
                                                                "on_reject": "rollback"}),
        # the creative term stops pushing a sample once it is rarer than every sample of the norm's own bank
        "LoRA, 4 samples/step, beyond-bank ceiling": Method(hinge, gated, {"train": "lora", "samples": 4}),
        "token+LoRA, 4 samples/step, beyond-bank ceiling": Method(hinge, gated, {"samples": 4}),
        "LoRA, 4 samples/step, beyond-bank ceiling, lr 3e-4": Method(hinge, gated, {"train": "lora", "samples": 4,
                                                                                     "lr": 3e-4}),
        "LoRA, 4 samples/step, beyond-bank ceiling, lr 3e-4, rollback": Method(
            hinge, gated, {"train": "lora", "samples": 4, "lr": 3e-4, "on_reject": "rollback"}),
        # round 2 (tuning set): the pullback's weight on the scale of the ceiling's term, a ceiling 10
        # log-likelihood units past the bank's rarest sample, more noise draws per step
        "LoRA, 4 samples/step, beyond-bank ceiling, anchor 10": Method(hinge_anchor, gated, {"train": "lora",
                                                                                              "samples": 4}),
        "LoRA, 4 samples/step, beyond-bank ceiling - 10": Method(hinge_margin, gated, {"train": "lora",
                                                                                       "samples": 4}),
        "LoRA, 8 samples/step, beyond-bank ceiling": Method(hinge, gated, {"train": "lora", "samples": 8}),
        # round 3 (tuning set): rare select as the starting point (token + LoRA: the inversion trains both)
        "token+LoRA, rare start, 4 samples/step, beyond-bank ceiling": Method(hinge, gated, {"samples": 4},
                                                                              RareStart()),
        "token+LoRA, rare start (50 inversion steps), 4 samples/step, beyond-bank ceiling": Method(
            hinge, gated, {"samples": 4}, RareStart(steps=50)),
        # round 4 (tuning set): the creative term along the words of kinds, colours and settings only
        # (GaussianNorm.along), so it cannot push toward unusual sizes, positions or blends
        "LoRA, 4 samples/step, beyond-bank ceiling, along words": Method(along, gated, {"train": "lora",
                                                                                        "samples": 4}),
        "LoRA, 4 samples/step, along words": Method(along_unbounded, gated, {"train": "lora", "samples": 4}),
        # round 5 (tuning set): along the words together, each word's axis held typical (TypicalParts): an
        # unusual pairing of typical parts, the world's rare combinations by construction
        "LoRA, 4 samples/step, along words, typical parts": Method(pairing, gated, {"train": "lora", "samples": 4}),
        "LoRA, 4 samples/step, beyond-bank ceiling, along words, typical parts": Method(
            pairing_hinge, gated, {"train": "lora", "samples": 4}),
    }


def reference_bank(prior: Prior, subj, meter: Meter, count: int) -> tuple[EmbeddingBank, float]:
    """The beyond-the-bank reference, and the CPU seconds one bank sample costs (from drawing it)."""
    start = meter.now()
    bank = sample_bank(prior, subj.prompt, count, batch_size=500, seed=REFERENCE_SEED)
    return bank, meter.since(start)["cpu_seconds"] / count


def trained(prior: Prior, subj, gate: ValidityGate, meter: Meter, label: str, method: Method, cfg: OptimConfig,
            steps: list[int], samples: int) -> list[dict]:
    """One run, one row per measured step with the costs of training up to that step, and the row of its
    last measured concept then rare-selected."""
    terms = method.terms()
    config = replace(cfg, steps=max(steps), **method.changes)
    start = meter.now()
    concept = None if method.start is None else method.start(prior, subj, gate, config)
    run = CreativeRun(prior, subj.evaluator.norm, subj.name, tuple(terms), config,
                      GateCheck.of(method.gate(terms), subj.evaluator.renderer), start=concept)
    marks = [meter.since(start)]
    result = run.run(lambda _event: marks.append(meter.since(start)), snapshot_at=frozenset(steps))
    trained_cost = meter.since(start)
    rows = measure_snapshots(run, subj.evaluator, result, label)
    for r in rows:
        r.update(marks[min(r["step"], len(marks) - 1)])
        r["accepted_step"] = result.accepted_step
    step = max(result.snapshots)
    concept = result.snapshots[step]
    selected = rare_select(prior.with_concept(concept), subj, gate, meter, label + THEN_SELECT, 1000,
                           TRAINED_BANK_SEED + cfg.seed, cfg.seed, samples,
                           prompt=run.config.prompt(concept.token, subj.name),
                           sampling={"steps": run.config.prior_steps, "guidance": run.config.guidance})
    for key in ("seconds", "cpu_seconds", "prior_rows"):  # the training's cost (marks cover its last step)
        selected[key] = round(selected[key] + trained_cost[key], 2)
    selected["step"] = step
    return rows + [selected]


def rare_select(prior: Prior, subj, gate: ValidityGate, meter: Meter, label: str, bank_size: int, bank_seed: int,
                seed: int, samples: int, prompt: str | None = None, sampling: dict | None = None) -> dict:
    """The ``samples`` rarest gated embeddings of a fresh bank of ``bank_size`` drawn with ``bank_seed``
    (its sampling in the row's cost; never the norm's own bank, whose cost no other row carries).
    ``prompt`` and ``sampling`` (steps, guidance): a trained concept's, when ``prior`` carries one."""
    start = meter.now()
    bank = sample_bank(prior, prompt or subj.prompt, bank_size, batch_size=500, seed=bank_seed, **(sampling or {}))
    sel = select_rare(subj.evaluator.norm, bank, samples, candidates=len(bank), gate=gate,
                      renderer=subj.evaluator.renderer, subject=subj.name, batch_size=32)
    cost = meter.since(start)
    m = subj.evaluator.measure_embeddings(sel.embeds, subj.name)
    return {"config": label, "subject": subj.name, "seed": seed, "step": None, **m.as_dict(), **cost,
            "bank": len(bank), "selected": len(sel.samples), "checked": len(sel.checked)}


def equal_bank_size(rows: list[dict], equal_to: str, cpu_per_sample: float) -> tuple[int, dict]:
    """The bank size whose sampling costs the CPU seconds of ``LABEL@STEP``'s training, and that row."""
    label, _, step = equal_to.rpartition("@")
    match = [r for r in rows if r["config"] == label and r["step"] == int(step)]
    if not match:
        raise ValueError(f"--equal-to {equal_to!r}: no such method and measured step in this run.")
    return max(1, math.ceil(match[0]["cpu_seconds"] / cpu_per_sample)), match[0]


def variants(prior: Prior, gate: ValidityGate, subj, cfg: OptimConfig, steps: list[int], seeds: list[int],
             samples: int, wanted: list[str] | None, equal_to: str,
             reference_count: int = REFERENCE_COUNT) -> list[dict]:
    """Every row of the study for one subject and each seed."""
    meter = Meter.on(prior)
    reference, cpu_per_sample = reference_bank(prior, subj, meter, reference_count)
    subj = replace(subj, evaluator=replace(subj.evaluator, reference=reference))
    catalogue = methods(subj, gate, prior)
    chosen = wanted or list(catalogue)
    if unknown := set(chosen) - set(catalogue) - {"typical", "rare select"}:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {sorted(catalogue)}")
    rows = []
    for seed in seeds:
        start = meter.now()
        embeds = sample_embeddings(prior, subj.prompt, samples, batch_size=samples, seed=1000 + seed)
        cost = meter.since(start)
        rows.append({"config": "typical", "subject": subj.name, "seed": seed, "step": None,
                     **subj.evaluator.measure_embeddings(embeds, subj.name).as_dict(), **cost})
        rows.append(rare_select(prior, subj, gate, meter, "rare select (bank 1,000)", 1000, BANK_SEED + seed, seed,
                                samples))
        for label in chosen:
            if label in catalogue:
                rows += trained(prior, subj, gate, meter, label, catalogue[label], replace(cfg, seed=seed), steps,
                                samples)
        size, matched = equal_bank_size([r for r in rows if r["seed"] == seed], equal_to, cpu_per_sample)
        row = rare_select(prior, subj, gate, meter, "rare select (equal compute)", size, EQUAL_SEED + seed, seed,
                          samples)
        row["equal_to"] = f"{equal_to}: {matched['cpu_seconds']} CPU s"
        rows.append(row)
    return rows
