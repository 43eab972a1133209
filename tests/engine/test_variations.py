"""Creative variations of a given image, on the mini world, judged by the independent judge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cancelling import Cancelled, assert_same_prior, prior_state, training_adapters

from creative_generation.nodes.engine.bank import sample_bank
from creative_generation.nodes.engine.gate import GateCheck, ValidityGate
from creative_generation.nodes.engine.losses import AnchorTerm
from creative_generation.nodes.engine.mllm import load_mllm
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig
from creative_generation.nodes.engine.prior import PriorFolderError, load_prior
from creative_generation.nodes.engine.render import DecoderRenderer, RenderSettings, load_decoder
from creative_generation.nodes.engine.sampling import sample_embeddings
from creative_generation.nodes.engine.bank import encode_image
from creative_generation.nodes.engine.variations import image_variations
from creative_generation.nodes.testbed.miniworld import world as W
from creative_generation.nodes.testbed.miniworld.judge import load_judge

MINIWORLD = Path(__file__).resolve().parents[2] / "models" / "miniworld"
SAMPLES = 16


@pytest.fixture(scope="module")
def world(one_thread):
    prior = load_prior(str(MINIWORLD / "prior"))
    renderer = DecoderRenderer(load_decoder(str(MINIWORLD / "decoder")), RenderSettings(10, 2.0, 32, 32, 0),
                               prior.zero_image_embed())
    norm = GaussianNorm.from_bank(sample_bank(prior, "a photo of a car", 256, batch_size=256, seed=0), 16)
    image = W.to_image_tensor(W.draw_many([W.make_scene("car", "red", "road")]))
    return prior, renderer, norm, image, load_judge(MINIWORLD / "judge")


def _samples(prior, concept) -> torch.Tensor:
    return sample_embeddings(prior.with_concept(concept), f"a photo of a {concept.token}", SAMPLES, batch_size=SAMPLES,
                             seed=1)


@pytest.mark.transformers5
def test_variations_are_rarer_than_the_image_and_keep_its_kind(world):
    """Inversion (token + LoRA, 100 steps at lr 1e-2) reproduces the car; 30 creative steps at lr 1e-4, anchored
    to the image and gated by the mini LLaVA every 5 steps, go rarer than the image while the judge sees a car."""
    prior, renderer, norm, image, judge = world
    cfg = OptimConfig(steps=30, lr=1e-4, train="both", rank=4, lora_alpha=4.0, seed=0)
    events = []
    run = CreativeRun(prior, norm, "car", (), cfg, GateCheck(ValidityGate(load_mllm(str(MINIWORLD / "mllm")), every=5),
                                                             renderer))
    result = image_variations(run, image, inversion_steps=100, inversion_lr=1e-2, on_step=events.append)
    stages = [e.stage for e in events]
    assert stages == ["inversion"] * 100 + ["creative"] * result.creative.steps_run
    assert [e.done for e in events] == list(range(1, 101 + result.creative.steps_run))
    assert {e.total for e in events} == {130}
    assert set(result.inversion.records[0].terms) == {"image_anchor"}
    assert set(result.creative.records[0].terms) == {"creative", "image_anchor"}
    assert judge.predict(image)[0]["kind"] == "car"

    inverted = _samples(prior, result.inversion.concept)
    cos = float(torch.nn.functional.cosine_similarity(inverted, result.image_embeds).mean())
    inverted_kinds = [p["kind"] for p in judge.predict(renderer(inverted))]
    variations = _samples(prior, result.concept)
    ll = float(norm.log_prob(variations.double()).median())
    kinds = [p["kind"] for p in judge.predict(renderer(variations))]
    print(f"image ll {result.image_log_likelihood:.1f}; inversion cos {cos:.4f}, judge kinds {inverted_kinds}; "
          f"variations: {result.creative.stop_reason} (kept step {result.concept.meta['accepted_step']}), median ll "
          f"{ll:.1f}, judge kinds {kinds}")
    assert cos > 0.95 and inverted_kinds.count("car") > SAMPLES // 2
    assert result.concept.meta["accepted_step"] > 0 and ll < result.image_log_likelihood
    assert kinds.count("car") > SAMPLES // 2


def test_image_anchor_term_is_cosine_to_the_image(world):
    prior, _, _, image, _ = world
    term = AnchorTerm.from_images(prior, image, weight=2.0)
    target = encode_image(prior, image)
    assert term.name == "image_anchor" and term.weight == 2.0
    assert float(term(target)) == pytest.approx(0.0, abs=1e-6)


def test_image_anchor_refuses_what_the_image_encoding_refuses(world):
    """The image anchor encodes its image as the variations do (one encode_image), with the same refusals."""
    prior, _, _, image, _ = world
    blind = prior.with_concept(None)
    blind.image_encoder = None
    with pytest.raises(PriorFolderError, match="no image encoder"):
        AnchorTerm.from_images(blind, image)
    with pytest.raises(ValueError, match=r"IMAGE batch \[B, H, W, 3\]"):
        AnchorTerm.from_images(prior, image[0])


def test_refuses_a_prior_without_image_encoder(world):
    prior, _, norm, image, _ = world
    blind = prior.with_concept(None)
    blind.image_encoder = None
    with pytest.raises(PriorFolderError, match="image encoder"):
        image_variations(CreativeRun(blind, norm, "car", (), OptimConfig(steps=1)), image)
    with pytest.raises(ValueError, match="inversion_steps must be at least 1"):
        image_variations(CreativeRun(prior, norm, "car", (), OptimConfig(steps=1)), image, inversion_steps=0)


@pytest.mark.parametrize("stage", ["inversion", "creative"])
def test_a_cancel_raises_and_leaves_the_prior_clean(world, user_cancel, stage):
    """A user's cancel during the inversion raises before the creative stage starts (the old 'cancelled' result
    is gone); during the creative stage it raises as well; either way no training adapter is left on the prior."""
    prior, _, norm, image, _ = world
    before = prior_state(prior)
    check = user_cancel(lambda event: event.stage == stage and event.record.step == 2)
    run = CreativeRun(prior, norm, "car", (), OptimConfig(steps=5, rank=2, lora_alpha=2.0))
    with pytest.raises(Cancelled):
        image_variations(run, image, inversion_steps=3, on_step=check.on_step)
    expected = [("inversion", 1), ("inversion", 2)] if stage == "inversion" else [
        ("inversion", 1), ("inversion", 2), ("inversion", 3), ("creative", 1), ("creative", 2)]
    assert [(e.stage, e.record.step) for e in check.events] == expected
    assert check.raised == 1 and training_adapters(prior) == []
    assert_same_prior(before, prior_state(prior))
