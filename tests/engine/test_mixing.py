"""Concept mixing on the mini world: 1:0 is the first concept, 1:1 lands between, save/load, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from creative_generation.nodes.engine.bank import sample_bank
from creative_generation.nodes.engine.concept import Concept, ConceptMismatchError
from creative_generation.nodes.engine.losses import AnchorTerm, CreativeTerm
from creative_generation.nodes.engine.mixing import mix_concepts, normalised_weights
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig
from creative_generation.nodes.engine.prior import load_prior
from creative_generation.nodes.engine.sampling import sample_embeddings

MINIWORLD = Path(__file__).resolve().parents[2] / "models" / "miniworld"
SAMPLES = 64


@pytest.fixture(scope="module")
def world(one_thread):
    """The mini prior, a vehicle norm, and two concepts trained apart (car, boat; 20 steps, lr 1e-2)."""
    prior = load_prior(str(MINIWORLD / "prior"))
    norm = GaussianNorm.from_bank(sample_bank(prior, "a photo of a vehicle", 256, batch_size=256, seed=0), 16)
    concepts = []
    for subject, seed in (("car", 0), ("boat", 1)):
        cfg = OptimConfig(steps=20, lr=1e-2, rank=4, lora_alpha=4.0, seed=seed)
        terms = [CreativeTerm(norm), AnchorTerm.from_prior(prior, f"a photo of a {subject}")]
        concepts.append(CreativeRun(prior, norm, subject, terms, cfg).run().concept)
    return prior, norm, concepts


def samples(prior, concept) -> torch.Tensor:
    return sample_embeddings(prior.with_concept(concept), f"a photo of a {concept.token}", SAMPLES,
                             batch_size=SAMPLES, seed=7)


def test_a_one_to_zero_mix_equals_the_first_concept(world):
    prior, _, (car, boat) = world
    mix = mix_concepts(prior, [car, boat], [1.0, 0.0])
    assert torch.equal(mix.token_embedding, car.token_embedding.float())
    assert mix.lora_rank == car.lora_rank + boat.lora_rank  # peft's "cat": the parents stacked
    assert torch.allclose(samples(prior, mix), samples(prior, car), atol=1e-5)
    assert not torch.allclose(samples(prior, mix), samples(prior, boat), atol=1e-2)


def test_a_half_half_mix_lands_between_under_the_norm(world):
    prior, norm, (car, boat) = world
    centre = {name: norm.whiten(samples(prior, c).double()).mean(0)
              for name, c in (("car", car), ("boat", boat), ("mix", mix_concepts(prior, [car, boat], [1, 1])))}
    apart = float((centre["car"] - centre["boat"]).norm())
    to_car, to_boat = float((centre["mix"] - centre["car"]).norm()), float((centre["mix"] - centre["boat"]).norm())
    print(f"whitened centroids: car-boat {apart:.2f}, mix-car {to_car:.2f}, mix-boat {to_boat:.2f}")
    assert to_car < apart and to_boat < apart


def test_the_mix_saves_loads_and_leaves_no_scratch_adapter(world, tmp_path):
    prior, _, (car, boat) = world
    mix = mix_concepts(prior, [car, boat], [3, 1])
    assert [p["weight"] for p in mix.meta["mixed_from"]] == [0.75, 0.25] and mix.token == "<creative-mix-car-boat>"
    mix.save(tmp_path / "mix.safetensors")
    loaded = Concept.load(tmp_path / "mix.safetensors")
    assert torch.allclose(samples(prior, loaded), samples(prior, mix))
    assert not [n for n in prior.transformer.peft_config if "mixscratch" in n or "creative_mixed_" in n]


def test_refuses_other_priors_and_bad_weights(world):
    prior, _, (car, boat) = world
    alien = Concept(car.token, car.token_embedding, car.lora_state, car.lora_rank, car.lora_alpha, car.lora_targets,
                    dict(car.meta, base_prior="another-prior"))
    with pytest.raises(ConceptMismatchError, match="different priors"):
        mix_concepts(prior, [alien, boat], [1, 1])
    with pytest.raises(ValueError, match="at least two"):
        mix_concepts(prior, [car], [1])
    with pytest.raises(ValueError, match="positive weight"):
        normalised_weights([0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        normalised_weights([1, -1])
