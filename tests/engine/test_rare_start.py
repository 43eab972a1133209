"""Rare select as the optimiser's starting point, on the mini world's prior (docs/evaluation.md §6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from creative_generation.nodes.engine.bank import sample_bank
from creative_generation.nodes.engine.gate import GateCheck, ValidityGate
from creative_generation.nodes.engine.losses import CreativeTerm
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig
from creative_generation.nodes.engine.prior import load_prior
from creative_generation.nodes.engine.rare import rarity_order
from creative_generation.nodes.engine.rare_start import rare_start, rarest_accepted
from creative_generation.nodes.engine.sampling import sample_embeddings

MINIWORLD = Path(__file__).resolve().parents[2] / "models" / "miniworld"
PROMPT = "a photo of a car"


class Judge:
    """P(yes) 1 or 0 per render, as ``passes(render)`` says: the test decides which renders pass."""

    def __init__(self, passes):
        self.passes, self.seen = passes, 0

    def p_yes(self, images, question):
        self.seen += images.shape[0]
        return torch.tensor([float(self.passes(img)) for img in images])


def render(e: torch.Tensor) -> torch.Tensor:
    return e[:, :12].reshape(-1, 2, 2, 3)


@pytest.fixture(scope="module")
def world(one_thread):
    prior = load_prior(str(MINIWORLD / "prior"))
    bank = sample_bank(prior, PROMPT, 256, batch_size=256, seed=0)
    return prior, GaussianNorm.from_bank(bank, 16)


def _run(world, check=None, **changes) -> CreativeRun:
    prior, norm = world
    cfg = OptimConfig(**{**dict(steps=10, lr=1e-4, train="both", rank=4, lora_alpha=4.0, seed=0,
                                template="a photo of a {token}"), **changes})
    return CreativeRun(prior, norm, "car", (CreativeTerm(norm),), cfg, check)


def test_the_start_is_the_rarest_sample_the_gate_accepts(world):
    prior, norm = world
    bank = sample_bank(prior, PROMPT, 200, batch_size=200, seed=7)
    order, _ = rarity_order(norm, bank.embeds)
    rarest = rarest_accepted(_run(world), 200, 7)  # no gate: the rarest
    assert torch.equal(rarest.embeds, bank.embeds[order[:1]])
    # a gate that refuses the three rarest: the fourth, after judging four
    refused = {int(i) for i in order[:3]}
    rows = {tuple(render(bank.embeds[i:i + 1]).flatten().tolist()): int(i) for i in order[:40]}
    judge = Judge(lambda img: rows.get(tuple(img.flatten().tolist())) not in refused)
    gated = rarest_accepted(_run(world, GateCheck(ValidityGate(judge), render)), 200, 7, select_batch=2)
    assert torch.equal(gated.embeds, bank.embeds[order[3:4]]) and judge.seen == 4
    with pytest.raises(ValueError, match="None of the starting bank's 200 samples passed the gate"):
        rarest_accepted(_run(world, GateCheck(ValidityGate(Judge(lambda img: False)), render)), 200, 7)
    with pytest.raises(ValueError, match="at least 1 sample"):
        rarest_accepted(_run(world), 0, 7)
    with pytest.raises(ValueError, match="not the LoRA alone"):  # refused before the bank is drawn
        rarest_accepted(_run(world, train="lora"), 0, 7)


def test_a_rare_start_begins_far_rarer_than_the_subject_word(world):
    """The inversion lands on the rare sample (cosine > 0.9), so the creative stage begins where the subject
    word's run never is at step 0: its samples score far below the typical ones under the norm."""
    prior, norm = world
    run = _run(world, samples=2)
    rarest = rarest_accepted(run, 500, 3)
    events = []
    result = rare_start(run, rarest, inversion_steps=60, on_step=events.append)
    assert [e.stage for e in events] == ["inversion"] * 60 + ["creative"] * 10
    assert {e.total for e in events} == {70}
    assert set(result.inversion.records[0].terms) == {"image_anchor"}
    assert result.inversion.concept.token and result.concept.token == result.inversion.concept.token
    inverted = sample_embeddings(prior.with_concept(result.inversion.concept),
                                 f"a photo of a {result.inversion.concept.token}", 16, batch_size=16, seed=1)
    typical = sample_embeddings(prior, PROMPT, 16, batch_size=16, seed=1)
    assert float(torch.cosine_similarity(inverted, rarest.embeds).mean()) > 0.9
    assert float(norm.log_prob(inverted.double()).mean()) < float(norm.log_prob(typical.double()).quantile(0.05))
    # the creative stage continued both from the inversion
    assert result.concept.lora_state.keys() == result.inversion.concept.lora_state.keys()
    assert not torch.equal(result.concept.token_embedding, result.inversion.concept.token_embedding)
    with pytest.raises(ValueError, match="not the LoRA alone"):
        rare_start(_run(world, train="lora"), rarest)
