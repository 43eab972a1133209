"""Automatic trials on the mini world: a rejected trial's state becomes a cluster the next trial avoids."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from cancelling import Cancelled, assert_same_prior, prior_state, training_adapters

from creative_generation.nodes.engine.bank import sample_bank
from creative_generation.nodes.engine.gate import GateCheck, ValidityGate
from creative_generation.nodes.engine.losses import CreativeTerm
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig, StopReason
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


YES = ValidityGate(type("Yes", (), {"p_yes": staticmethod(lambda images, q: torch.ones(images.shape[0]))})(), every=2)


@pytest.fixture(scope="module")
def world(one_thread):
    prior = load_prior(str(MINIWORLD / "prior"))
    norm = GaussianNorm.from_bank(sample_bank(prior, "a photo of a vehicle", 256, batch_size=256, seed=0), 16)
    return prior, norm


CFG = OptimConfig(steps=20, lr=1e-2, rank=4, lora_alpha=4.0, seed=0)


def _run(prior, norm, config, gate=None, terms=None) -> CreativeRun:
    """A run about "car" with the creative term, gated by ``gate`` on the stand-in ``render``."""
    return CreativeRun(prior, norm, "car", (CreativeTerm(norm),) if terms is None else terms, config,
                       GateCheck.of(gate, render))


def test_second_trial_ends_farther_from_the_first_rejected_region(world):
    prior, norm = world
    gate = ValidityGate(Rejects(), every=10)
    result = run_trials(_run(prior, norm, CFG, gate), trials=2, alpha=1.0)
    first, second = result.trials
    assert first.rejected and second.rejected and result.stop_reason == "trials"
    assert first.result.steps_run == 10 and first.cluster_added == "rejected 1"
    assert second.clusters_before == ["rejected 1"] and [label for label, _ in result.clusters] == ["rejected 1",
                                                                                                   "rejected 2"]
    region = result.clusters[0][1]
    d_first = float(region.mahalanobis(first.end_embeds.double()).median())
    d_second = float(region.mahalanobis(second.end_embeds.double()).median())
    # control: the second trial's seed and settings without the cluster
    control = run_trials(_run(prior, norm, dataclasses.replace(CFG, seed=1), gate), trials=1)
    d_control = float(region.mahalanobis(control.trials[0].end_embeds.double()).median())
    print(f"distance to trial 1's rejected region: trial 1 {d_first:.2f}, trial 2 {d_second:.2f}, "
          f"trial 2 without the cluster {d_control:.2f}")
    assert d_second > d_first and d_second > d_control
    assert len(result.concepts) == 2 and all(c.meta["accepted_step"] == 0 for c in result.concepts)
    plot = plot_trials(norm, result, size=128)
    assert plot.shape == (1, 128 + 14, 256, 3)


def test_accepted_trials_add_no_cluster_and_the_budget_stops(world):
    prior, norm = world
    cfg = OptimConfig(steps=2, lr=1e-3, rank=2, lora_alpha=2.0, seed=3)
    events = []
    result = run_trials(_run(prior, norm, cfg, YES), trials=2, cluster_samples=4, on_step=events.append)
    assert [t.result.stop_reason for t in result.trials] == [StopReason.MAX_STEPS] * 2 and not result.clusters
    assert [t.seed for t in result.trials] == [3, 4]
    assert [(e.stage, e.record.step, e.done, e.total) for e in events] == [
        ("trial 1", 1, 1, 4), ("trial 1", 2, 2, 4), ("trial 2", 1, 3, 4), ("trial 2", 2, 4, 4)]
    budget = run_trials(_run(prior, norm, cfg, YES), trials=5, time_budget=1e-6, cluster_samples=4)
    assert len(budget.trials) == 1 and budget.stop_reason == "time_budget"


def test_a_cancel_during_trial_2_raises_and_leaves_the_prior_clean(world, user_cancel):
    """A user's cancel in the second trial raises from the engine's cancel point (no trial result is made up) and
    the shared prior keeps no training adapter, no gradients and gives the samples it gave before."""
    prior, norm = world
    cfg = OptimConfig(steps=3, lr=1e-3, rank=2, lora_alpha=2.0, seed=3)
    before = prior_state(prior)
    check = user_cancel(lambda event: event.stage == "trial 2" and event.record.step == 2)
    with pytest.raises(Cancelled):
        run_trials(_run(prior, norm, cfg, YES), trials=3, cluster_samples=4, on_step=check.on_step)
    assert [(e.stage, e.record.step) for e in check.events] == [("trial 1", 1), ("trial 1", 2), ("trial 1", 3),
                                                                 ("trial 2", 1), ("trial 2", 2)]
    assert check.raised == 1 and training_adapters(prior) == []
    assert_same_prior(before, prior_state(prior))


def test_refuses_without_gate_or_with_bad_counts(world):
    prior, norm = world
    with pytest.raises(ValueError, match="gate"):
        run_trials(_run(prior, norm, CFG))
    gated = _run(prior, norm, CFG, ValidityGate(Rejects()), terms=())
    with pytest.raises(ValueError, match="trials must be at least 1"):
        run_trials(gated, trials=0)
    with pytest.raises(ValueError, match="cluster_samples must be at least 2"):
        run_trials(gated, cluster_samples=1)
    with pytest.raises(ValueError, match="must be >= 0"):
        run_trials(gated, alpha=-1.0)
