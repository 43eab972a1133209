"""Automatic trials on the mini world: a rejected trial's state becomes a cluster the next trial avoids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from creative_generation.nodes.engine.bank import sample_bank
from creative_generation.nodes.engine.gate import ValidityGate
from creative_generation.nodes.engine.losses import CreativeTerm
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import OptimConfig, StopOptimisation
from creative_generation.nodes.engine.prior import load_prior
from creative_generation.nodes.engine.trials import plot_trials, run_trials

MINIWORLD = Path(__file__).resolve().parents[2] / "models" / "miniworld"


class Rejects:
    """A judge that says no to everything (the gate rejects every trial at its first check)."""

    def __init__(self):
        self.calls = 0

    def p_yes(self, images, question):
        self.calls += 1
        return torch.zeros(images.shape[0])


def render(e: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(e[:, :48].reshape(-1, 4, 4, 3))


@pytest.fixture(scope="module")
def world(one_thread):
    prior = load_prior(str(MINIWORLD / "prior"))
    norm = GaussianNorm.fit(sample_bank(prior, "a photo of a vehicle", 256, batch_size=256, seed=0), 16)
    return prior, norm


CFG = OptimConfig(steps=20, lr=1e-2, rank=4, alpha=4.0, seed=0)


def test_second_trial_ends_farther_from_the_first_rejected_region(world):
    prior, norm = world
    gate = ValidityGate(Rejects(), every=10)
    result = run_trials(prior, norm, "car", [CreativeTerm(norm)], CFG, gate, render, trials=2, alpha=1.0)
    first, second = result.trials
    assert first.rejected and second.rejected and result.stop_reason == "trials"
    assert first.result.steps_run == 10 and first.cluster_added == "rejected 1"
    assert second.clusters_before == ["rejected 1"] and [label for label, _ in result.clusters] == ["rejected 1",
                                                                                                   "rejected 2"]
    region = result.clusters[0][1]
    d_first = float(region.mahalanobis(first.end_embeds.double()).median())
    d_second = float(region.mahalanobis(second.end_embeds.double()).median())
    # control: the second trial's seed and settings without the cluster
    control = run_trials(prior, norm, "car", [CreativeTerm(norm)], CFG.__class__(**{**CFG.__dict__, "seed": 1}),
                         gate, render, trials=1)
    d_control = float(region.mahalanobis(control.trials[0].end_embeds.double()).median())
    print(f"distance to trial 1's rejected region: trial 1 {d_first:.2f}, trial 2 {d_second:.2f}, "
          f"trial 2 without the cluster {d_control:.2f}")
    assert d_second > d_first and d_second > d_control
    assert len(result.concepts) == 2 and all(c.meta["accepted_step"] == 0 for c in result.concepts)
    plot = plot_trials(norm, result, size=128)
    assert plot.shape == (1, 128 + 14, 256, 3)


def test_accepted_trials_add_no_cluster_and_the_budget_and_cancel_stop(world):
    prior, norm = world
    yes = ValidityGate(type("Yes", (), {"p_yes": staticmethod(lambda images, q: torch.ones(images.shape[0]))})(),
                       every=2)
    cfg = OptimConfig(steps=2, lr=1e-3, rank=2, alpha=2.0, seed=3)
    result = run_trials(prior, norm, "car", [CreativeTerm(norm)], cfg, yes, render, trials=2, cluster_samples=4)
    assert [t.result.stop_reason for t in result.trials] == ["max_steps"] * 2 and not result.clusters
    assert [t.seed for t in result.trials] == [3, 4]
    budget = run_trials(prior, norm, "car", [CreativeTerm(norm)], cfg, yes, render, trials=5, time_budget=1e-6,
                        cluster_samples=4)
    assert len(budget.trials) == 1 and budget.stop_reason == "time_budget"

    def cancel(trial, record):
        raise StopOptimisation

    cancelled = run_trials(prior, norm, "car", [CreativeTerm(norm)], cfg, yes, render, trials=3, callback=cancel,
                           cluster_samples=4)
    assert len(cancelled.trials) == 1 and cancelled.stop_reason == "cancelled"


def test_refuses_without_gate_or_with_bad_counts(world):
    prior, norm = world
    with pytest.raises(ValueError, match="gate"):
        run_trials(prior, norm, "car", [], CFG, None, render)
    with pytest.raises(ValueError, match="trials must be at least 1"):
        run_trials(prior, norm, "car", [], CFG, ValidityGate(Rejects()), render, trials=0)
