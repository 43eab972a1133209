"""Measuring creativity: novelty, validity and diversity of a concept, and the Wundt sweep.

- novelty: log-likelihood of the concept's samples under the norm, and its percentile within
  the typical bank (0 % = rarer than every typical sample);
- validity: the rate at which an *independent* judge (never used by the optimiser) says the
  rendered samples are the subject; the paper's "deceptive adherence" fools the gate, not it;
- diversity: mean pairwise distance of the samples in the norm's whitened PCA space, relative
  to the typical bank's (1.0 = as varied as typical samples);
- cluster distance (when a region was marked, e.g. a negative cluster): median Mahalanobis
  distance of the samples to that cluster, in the cluster's own whitened space;
- rare: the share of renders a rarity judge (if the judge is one) calls a rare combination;
- creativity: the share of renders that are valid AND novel: the judge calls them the subject
  and their log-likelihood is below the bank's 5th percentile, or the judge calls them rare. One
  number that needs both in the same image, so neither typical valid samples nor far-away broken
  ones score (the typical bank scores about 5 %, its own 5th percentile);
- beyond the bank (with a ``reference`` bank, e.g. 5,000 typical samples): the share of samples
  rarer than every reference sample, and ``creativity_beyond``, the share of renders valid and
  beyond it: a bar a selection from a bank of the same distribution seldom clears, however large;
  ``creativity_rare``: the share valid and called a rare combination. Each bar has its own
  creativity; none replaces another.
The sweep runs the optimiser once per (configuration, subject, seed) and measures snapshots at
given steps, which is the paper's creativity-vs-steps (Wundt) curve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from . import budget
from .bank import EmbeddingBank
from .concept import Concept
from .gate import draw
from .norm import GaussianNorm
from .optimizer import CreativeRun, OptimResult, StepCallback
from .prior import Prior
from .render import Renderer
from .sampling import sample_embeddings

EVAL_JUDGE = "evaluation: judge"  # the phase, and the memory kind, of the independent judge


class SubjectJudge(Protocol):
    def is_subject(self, images: torch.Tensor, subject: str) -> torch.Tensor:
        """``[B]`` bool: does each image ``[B,H,W,3]`` show the subject?"""


@runtime_checkable
class RarityJudge(SubjectJudge, Protocol):
    def is_rare(self, images: torch.Tensor, subject: str) -> torch.Tensor:
        """``[B]`` bool: does each image show a combination its world seldom shows (a purple car)?"""


@dataclass(frozen=True)
class Measurement:
    novelty_ll: float  # median log-likelihood of the samples under the norm
    novelty_percentile: float  # % of the typical bank with a lower log-likelihood than that median
    validity: float | None  # judge's "is the subject" rate, None without judge/renderer
    diversity: float  # mean pairwise whitened distance relative to the bank's
    cluster_distance: float | None = None  # median Mahalanobis distance to the marked cluster, if any
    rare: float | None = None  # share of renders a rarity judge calls a rare combination
    creativity: float | None = None  # share of renders both valid and novel (rarer than the bank's 5 %, or rare)
    beyond: float | None = None  # share of samples rarer than every sample of the reference bank
    creativity_beyond: float | None = None  # share of renders valid and beyond the reference bank
    creativity_rare: float | None = None  # share of renders valid and called a rare combination

    def as_dict(self) -> dict[str, float | None]:
        return {"novelty_ll": self.novelty_ll, "novelty_percentile": self.novelty_percentile,
                "validity": self.validity, "diversity": self.diversity, "cluster_distance": self.cluster_distance,
                "rare": self.rare, "creativity": self.creativity, "beyond": self.beyond,
                "creativity_beyond": self.creativity_beyond, "creativity_rare": self.creativity_rare}


def _pairwise_spread(norm: GaussianNorm, embeds: torch.Tensor) -> float:
    white = norm.whiten(embeds.double())
    return float(torch.pdist(white).mean()) if len(white) > 1 else 0.0


@dataclass
class Evaluator:
    """Everything fixed across measurements: the norm, its bank, and how samples are judged."""

    norm: GaussianNorm
    bank: EmbeddingBank
    renderer: Renderer | None = None
    judge: SubjectJudge | None = None
    samples: int = 32
    rendered: int = 16
    marked: GaussianNorm | None = None  # a region the samples should avoid (GaussianNorm.fit_cluster)
    novel_quantile: float = 0.05  # creativity counts a render novel below this quantile of the bank's likelihoods
    reference: EmbeddingBank | None = None  # a (larger) typical bank for the beyond-the-bank bar

    def __post_init__(self) -> None:
        self._bank_ll = self.norm.log_prob(self.bank.embeds.double())
        self._bank_spread = _pairwise_spread(self.norm, self.bank.embeds[:512])
        self._novel_ll = float(torch.quantile(self._bank_ll, self.novel_quantile))
        self._beyond_ll = None if self.reference is None else float(
            self.norm.log_prob(self.reference.embeds.double()).min())

    def measure_embeddings(self, embeds: torch.Tensor, subject: str,
                           on_phase: budget.PhaseCallback | None = None,
                           images: torch.Tensor | None = None) -> Measurement:
        """``images``: the renders the embeddings were taken of (row i is embedded as ``embeds[i]``), judged
        instead of drawing the embeddings with the renderer; on the SD path the image comes first and its
        CLIP embedding is what the norm scores, so there is nothing to draw."""
        lls = self.norm.log_prob(embeds.double())
        ll = float(lls.median())
        pct = float((self._bank_ll < ll).double().mean() * 100)
        validity = rare = creativity = creativity_beyond = creativity_rare = None
        beyond_all = None if self._beyond_ll is None else lls < self._beyond_ll
        if images is not None and len(images) != len(embeds):
            raise ValueError(f"{len(images)} images for {len(embeds)} embeddings: give the render of every row.")
        if self.judge is not None and (images is not None or self.renderer is not None):
            images = images[:self.rendered] if images is not None else draw(self.renderer, embeds[:self.rendered],
                                                                            on_phase)
            if on_phase is not None:
                on_phase(EVAL_JUDGE)
            valid = self.judge.is_subject(images, subject).bool().cpu()
            novel = lls[:len(valid)].cpu() < self._novel_ll
            if isinstance(self.judge, RarityJudge):
                seen_rare = self.judge.is_rare(images, subject).bool().cpu()
                rare, novel = float(seen_rare.float().mean()), novel | seen_rare
                creativity_rare = float((valid & seen_rare).float().mean())
            validity, creativity = float(valid.float().mean()), float((valid & novel).float().mean())
            if beyond_all is not None:
                creativity_beyond = float((valid & beyond_all[:len(valid)].cpu()).float().mean())
        diversity = _pairwise_spread(self.norm, embeds) / self._bank_spread if self._bank_spread else 0.0
        distance = None if self.marked is None else float(self.marked.mahalanobis(embeds.double()).median())
        beyond = None if beyond_all is None else float(beyond_all.double().mean())
        return Measurement(ll, pct, validity, diversity, distance, rare, creativity, beyond, creativity_beyond,
                           creativity_rare)

    def measure_concept(self, prior: Prior, concept: Concept | None, prompt: str, subject: str, seed: int = 0, *,
                        steps: int = 5, guidance: float = 4.0,
                        on_phase: budget.PhaseCallback | None = None) -> Measurement:
        """Sample the concept's prompt from the prior carrying it (``steps``, ``guidance``: the run's prior
        settings) and measure the samples."""
        if on_phase is not None:
            on_phase(budget.SAMPLING)
        embeds = sample_embeddings(prior.with_concept(concept), prompt, self.samples, batch_size=self.samples,
                                   steps=steps, guidance=guidance, seed=seed)
        return self.measure_embeddings(embeds, subject, on_phase)

    def memory_estimate(self, run: CreativeRun, *, on_gpu: bool) -> budget.Estimate:
        """Memory of one measurement of ``run``'s concepts: sampling all samples at once, rendering the
        rendered ones at once, one question of an MLLM judge (phases :data:`budget.SAMPLING`,
        :data:`budget.RENDER`, :data:`EVAL_JUDGE`)."""
        config = run.config
        parts, phases, hints = [], [], []
        sampling = run.generator.sampling_estimate(config.prompt("", run.subject), config.negative_prompt,
                                                   batch=self.samples, steps=config.prior_steps,
                                                   guidance=config.guidance, on_gpu=on_gpu)
        estimates = [sampling]
        if self.renderer is not None and self.judge is not None:
            drawing = self.renderer.memory_estimate(min(self.rendered, self.samples), on_gpu=on_gpu)
            height, width = self.renderer.image_size
            own = getattr(self.judge, "memory_estimate", None)
            asking = own(run.subject, height, width, on_gpu=on_gpu) if callable(own) else None
            checking = budget.gate_check_estimate(drawing, asking)
            if checking is not None:
                estimates.append(checking)
        for estimate in estimates:
            # the prior's and the decoder's weights are the run's own (same names, counted once by a host that
            # joins the two estimates); working memory and the judge's weights are the measurement's own
            names = {p.name: p.name if p.model in (budget.PRIOR, budget.DECODER) else f"measurement: {p.name}"
                     for p in estimate.parts}
            parts += [replace(p, name=names[p.name], model=EVAL_JUDGE if p.model == budget.MLLM else p.model)
                      for p in estimate.parts]
            phases += [budget.Phase(ph.name.replace(budget.JUDGE, EVAL_JUDGE), tuple(names[n] for n in ph.parts))
                       for ph in estimate.phases]
            hints += estimate.hints
        return budget.Estimate("measurement", parts, phases, [f"lower samples (now {self.samples})", *hints])


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table (the evaluation script prints it; the sweep node shows it)."""
    def cell(v) -> str:
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c)).rjust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class AskingJudge:
    """Any yes/no judge (e.g. a second MLLM) used as a validity judge: P(yes) ≥ threshold."""

    judge: object  # has p_yes(images, question)
    question: str = "Is this a {subject}? Yes or No."
    threshold: float = 0.5

    def is_subject(self, images: torch.Tensor, subject: str) -> torch.Tensor:
        return self.judge.p_yes(images, self.question.format(subject=subject)) >= self.threshold

    def managed_modules(self) -> dict[str, torch.nn.Module]:
        """The asked model's modules (none for a scripted judge), so a host can load it."""
        modules = getattr(self.judge, "managed_modules", None)
        return modules() if callable(modules) else {}

    def memory_estimate(self, subject: str, height: int, width: int, *, on_gpu: bool) -> budget.Estimate | None:
        own = getattr(self.judge, "memory_estimate", None)
        question = self.question.format(subject=subject)
        return own(question, height, width, on_gpu=on_gpu) if callable(own) else None


def wundt_sweep(runs: dict[str, CreativeRun], evaluator: Evaluator, steps: list[int], seeds: list[int], *,
                on_step: StepCallback | None = None, on_phase: budget.PhaseCallback | None = None) -> list[dict]:
    """Novelty/validity/diversity at ``steps`` for each configuration ``name -> run`` and seed (each run
    with ``max(steps)`` steps and that seed). ``on_step`` hears every step, counted over the whole sweep."""
    rows, per_run = [], max(max(steps), 1)
    total, done = len(runs) * len(seeds) * per_run, 0
    for name, run in runs.items():
        for seed in seeds:
            seeded = run.with_(config=replace(run.config, steps=per_run, seed=seed))
            result = seeded.run(on_step, on_phase=on_phase, snapshot_at=frozenset(steps),
                                stage=f"{name}, seed {seed}", offset=done, total=total)
            rows += measure_snapshots(seeded, evaluator, result, name, on_phase)
            done += per_run
    return rows


def measure_snapshots(run: CreativeRun, evaluator: Evaluator, result: OptimResult, name: str,
                      on_phase: budget.PhaseCallback | None = None) -> list[dict]:
    """One row per snapshot of ``run`` (run with ``snapshot_at=...``), sampled with its seed and prior settings."""
    config, subject, rows = run.config, run.subject, []
    for step, concept in sorted(result.snapshots.items()):
        m = evaluator.measure_concept(run.generator, concept, config.prompt(concept.token, subject), subject,
                                      seed=config.seed, steps=config.prior_steps, guidance=config.guidance,
                                      on_phase=on_phase)
        rows.append({"config": name, "subject": subject, "seed": config.seed, "step": step, **m.as_dict(),
                     "stop_reason": result.stop_reason, "steps_run": result.steps_run})
    return rows


SWEEP_KEYS = ("config", "step")
SWEEP_METRICS = ("novelty_ll", "novelty_percentile", "validity", "diversity", "cluster_distance", "rare", "creativity")


def sweep_columns(*, rarity: bool = False, cluster: bool = False) -> list[str]:
    """The sweep table's columns: novelty, validity, diversity; the rarity judge's shares and the distance
    to a marked cluster when measured; ``n`` (runs averaged)."""
    return ["config", "step", "novelty_ll", "novelty_percentile", "validity", "diversity",
            *(["rare", "creativity"] if rarity else []), *(["cluster_distance"] if cluster else []), "n"]


def sweep_summary(rows: list[dict], extra: tuple[str, ...] = ()) -> list[dict]:
    """Sweep rows averaged per configuration and step (over subjects and seeds), with ``extra`` values."""
    return mean_by(rows, SWEEP_KEYS, SWEEP_METRICS + extra)


def mean_by(rows: list[dict], keys: tuple[str, ...], values: tuple[str, ...]) -> list[dict]:
    """Average ``values`` over rows sharing ``keys`` (e.g. over seeds and subjects)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip(keys, key))
        for v in values:
            present = [m[v] for m in members if m.get(v) is not None]
            row[v] = sum(present) / len(present) if present else None
        row["n"] = len(members)
        out.append(row)
    return out
