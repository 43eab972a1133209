"""A run refuses parts from another embedding space, and a gate without renderer only where the generator draws
(issue 17: the SD path's generator lives in a CLIP vision model's space and renders the gate's images itself)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from creative_generation.nodes.engine import budget
from creative_generation.nodes.engine.bank import EmbeddingBank
from creative_generation.nodes.engine.gate import GateCheck, ValidityGate
from creative_generation.nodes.engine.losses import AnchorTerm, CreativeTerm, negative_cluster
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig


@dataclass
class FakeGenerator:
    identity: str = "clip-vision:4d:aaaa"
    embedding_dim: int = 4
    draws_images: bool = False
    image_size: tuple[int, int] = (32, 48)

    def training_estimate(self, run, *, on_gpu):
        return budget.Estimate("run", [budget.Part("w", 10, "", budget.PRIOR)], [budget.Phase(budget.TRAINING, ("w",))])


class Judge:
    def p_yes(self, images, question):
        return torch.ones(images.shape[0])

    def memory_estimate(self, question, height, width, *, on_gpu):
        self.size = (height, width)
        return budget.Estimate("q", [budget.Part("m", 5, "", budget.MLLM)], [budget.Phase(budget.JUDGE, ("m",))])


@pytest.fixture
def norm():
    torch.manual_seed(0)
    return GaussianNorm.from_bank(EmbeddingBank(torch.randn(30, 4), {"prior": FakeGenerator.identity}), 2)


def test_a_term_from_another_space_is_refused_naming_the_image_anchor(norm):
    gen = FakeGenerator()
    text_anchor = AnchorTerm(torch.randn(4), "a car", space="kandinsky-2-1:bbbb")
    with pytest.raises(ValueError, match="image anchor .* is the pullback"):
        CreativeRun(gen, norm, "car", (CreativeTerm(norm), text_anchor), OptimConfig(steps=1))
    foreign = GaussianNorm.from_bank(EmbeddingBank(torch.randn(30, 4), {"prior": "kandinsky-2-1:bbbb"}), 2)
    with pytest.raises(ValueError, match="'negative' compares embeddings of 'kandinsky"):
        CreativeRun(gen, norm, "car", (negative_cluster(foreign, torch.randn(8, 4)),), OptimConfig(steps=1))
    image_anchor = AnchorTerm.from_embeds(torch.randn(3, 4), gen.identity, 0.5)
    unnamed = AnchorTerm(torch.randn(4))  # a term that names no space is not second-guessed
    run = CreativeRun(gen, norm, "car", (CreativeTerm(norm), image_anchor, unnamed), OptimConfig(steps=1))
    assert run.terms[1].name == "image_anchor" and run.terms[1].weight == 0.5


def test_a_gate_without_renderer_only_where_the_generator_draws(norm):
    gate = ValidityGate(Judge(), every=2)
    with pytest.raises(ValueError, match="renderer"):
        GateCheck.of(gate, None)
    check = GateCheck.of(gate, None, generator_draws=True)
    assert check.renderer is None
    with pytest.raises(ValueError, match="renderer"):
        CreativeRun(FakeGenerator(), norm, "car", (CreativeTerm(norm),), OptimConfig(steps=1), check)
    run = CreativeRun(FakeGenerator(draws_images=True), norm, "car", (CreativeTerm(norm),), OptimConfig(steps=1),
                      check)
    estimate = run.memory_estimate(on_gpu=False)
    assert gate.judge.size == (32, 48)  # the judge is sized for what the generator draws
    assert [ph.name for ph in estimate.phases] == [budget.TRAINING, budget.JUDGE]
