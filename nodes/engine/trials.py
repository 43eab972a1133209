"""Automatic trials: a rejection by the validity gate becomes a direction for the next trial.

In the paper a "no" from the gate ends the trial and a user starts over by hand, free to walk
into the same invalid region again. Here each rejected trial's *rejected state* (the token and
LoRA at the step the gate said no) is sampled from the prior, those embeddings are fitted as a
negative cluster in the norm's PCA space (the same fit as the Negative Cluster node,
:func:`losses.negative_cluster`), and a fresh trial starts: next seed, same settings, plus every
cluster so far. It stops after ``trials`` trials or when the time budget is spent. Every trial
returns the state its gate last accepted (as a single run does), with a log of why it stopped,
where it ended and which cluster it added.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from .concept import Concept
from .losses import negative_cluster
from .norm import GaussianNorm
from .optimizer import CreativeRun, OptimResult, PhaseCallback, StepCallback, StopReason
from .plots import annotate, plot_embedding_map
from .sampling import sample_embeddings

SEED_STRIDE = 1  # trial i runs with seed cfg.seed + i * SEED_STRIDE


@dataclass
class Trial:
    """One trial: how it ended, what it kept, where its last state lies, the cluster it added."""

    index: int
    seed: int
    result: OptimResult
    end_embeds: torch.Tensor  # samples of the state the trial ended in (the rejected one, or the kept one)
    end_log_likelihood: float  # their median log-likelihood under the norm
    clusters_before: list[str]
    cluster_added: str | None = None
    seconds: float = 0.0

    @property
    def rejected(self) -> bool:
        return self.result.stop_reason is StopReason.GATE_REJECTED

    def summary(self) -> dict:
        r = self.result
        return {"trial": self.index, "seed": self.seed, "stop_reason": r.stop_reason, "steps_run": r.steps_run,
                "accepted_step": r.accepted_step, "end_log_likelihood": self.end_log_likelihood,
                "clusters_in_effect": list(self.clusters_before), "cluster_added": self.cluster_added,
                "seconds": self.seconds}


@dataclass
class TrialsResult:
    trials: list[Trial]
    clusters: list[tuple[str, GaussianNorm]]
    stop_reason: str  # "trials" (all ran) or "time_budget"
    log: list[dict] = field(default_factory=list)

    @property
    def concepts(self) -> list[Concept]:
        """Each trial's kept concept: the state its gate last accepted."""
        return [t.result.concept for t in self.trials]


def _end_state(run: CreativeRun, concept: Concept, count: int) -> torch.Tensor:
    config = run.config
    return sample_embeddings(run.generator.with_concept(concept), config.prompt(concept.token, run.subject), count,
                             batch_size=count, steps=config.prior_steps, guidance=config.guidance, seed=config.seed,
                             negative_prompt=config.negative_prompt)


def run_trials(run: CreativeRun, *, trials: int = 3, time_budget: float = 0.0, alpha: float = 1.0,
               cluster_samples: int = 16, on_step: StepCallback | None = None,
               on_phase: PhaseCallback | None = None) -> TrialsResult:
    """Up to ``trials`` runs of ``run`` (trial i with seed + i); each rejection adds a negative cluster
    (repulsion weight ``alpha``) to the next runs.

    ``time_budget`` seconds (0 = none) is checked before each new trial. ``on_step`` hears every step of
    every trial (stage "trial N", counted over all trials); a cancel raises from the engine's cancel point.
    """
    if run.check is None:
        raise ValueError("Automatic trials need the validity gate and a renderer: a trial ends when the gate says no.")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}.")
    if cluster_samples < 2:
        raise ValueError(f"cluster_samples must be at least 2 to fit a cluster, got {cluster_samples}.")
    if time_budget < 0 or alpha < 0:
        raise ValueError("time_budget and alpha must be >= 0.")
    t_start, done, repelled, stop = time.monotonic(), [], [], "trials"  # repelled: a term per rejection
    steps = run.config.steps
    for i in range(trials):
        if time_budget and done and time.monotonic() - t_start > time_budget:
            stop = "time_budget"
            break
        t0 = time.monotonic()
        trial_run = run.with_(config=replace(run.config, seed=run.config.seed + i * SEED_STRIDE),
                              terms=(*run.terms, *repelled))
        result = trial_run.run(on_step, on_phase=on_phase, stage=f"trial {i + 1}", offset=i * steps,
                               total=trials * steps)
        end = result.rejected if result.stop_reason is StopReason.GATE_REJECTED else result.concept
        with torch.no_grad():
            end_embeds = _end_state(trial_run, end, cluster_samples)
            end_ll = float(run.norm.log_prob(end_embeds.double()).median())
        trial = Trial(i, trial_run.config.seed, result, end_embeds, end_ll, [t.name for t in repelled])
        if trial.rejected:
            repelled.append(negative_cluster(run.norm, end_embeds, alpha, f"rejected {i + 1}"))
            trial.cluster_added = repelled[-1].name
        trial.seconds = time.monotonic() - t0
        done.append(trial)
    return TrialsResult(done, [(t.name, t.cluster) for t in repelled], stop, [t.summary() for t in done])


def plot_trials(norm: GaussianNorm, result: TrialsResult, size: int = 384) -> torch.Tensor:
    """One embedding map per trial, side by side: its path and the clusters it avoided (and the one it added)."""
    panels = []
    for t in result.trials:
        shown = [(label, g) for label, g in result.clusters if label in t.clusters_before or label == t.cluster_added]
        panel = plot_embedding_map(norm, None, t.result.path, shown, size=size)
        caption = f"trial {t.index + 1}: {t.result.stop_reason} at step {t.result.steps_run}"
        panels.append(annotate(panel, [caption])[0])
    return torch.cat(panels, dim=1)[None]
