"""The capability nodes (Rare Select, Mix Concepts, Auto Trials, Image Variations) in-process, on the mini world.

Each node runs as ComfyUI's executor calls it (a class clone with the hidden id, under
inference mode), on the bundled mini-world models; checked: outputs, progress reports, that
``validate_inputs`` accepts linked (None) and missing inputs, and the refusals' messages.
"""

from __future__ import annotations

import comfy_harness
import pytest

# every node here runs on the bundled mini world, whose judge folder is saved in transformers 5's layout
pytestmark = [pytest.mark.transformers5, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def world(pack_nodes, comfy_inprocess):
    """The mini world's prior, renderer and gate, a 128-sample vehicle bank and its norm."""

    def call(node_id, **inputs):
        return comfy_harness.execute_node(pack_nodes[node_id], "world", **inputs)

    prior, = call("CreativeLoadPrior", prior="miniworld/prior", dtype="auto")
    decoder, = call("CreativeLoadDecoder", decoder="miniworld/decoder", dtype="auto")
    mllm, = call("CreativeLoadMLLM", model="miniworld/mllm", dtype="auto", trust_remote_code=False, vision_check=False)
    renderer, = call("CreativeDecoderRenderer", decoder=decoder, steps=10, guidance=2.0, width=32, height=32, seed=0,
                     prior=prior)
    gate, = call("CreativeMLLMValidityGate", mllm=mllm, subject="", question="Is this still a {subject}? Yes or No.",
                 check_every=2, threshold=0.5)
    bank, = call("CreativePriorSampler", prior=prior, prompt="a photo of a vehicle", count=128, batch_size=128,
                 steps=5, guidance=4.0, seed=0, negative_prompt="")
    norm, _ = call("CreativeNormGaussianFit", embeds=bank, pca_dims=16)
    return dict(prior=prior, renderer=renderer, gate=gate, mllm=mllm, bank=bank, norm=norm)


# --------------------------------------------------------------------------- Rare Select


def test_rare_select_returns_gated_rare_samples(world, run, progress_log):
    embeds, images, report = run("CreativeRareSelect", norm=world["norm"], embeds=world["bank"], k=3, candidates=16,
                                 gate=world["gate"], renderer=world["renderer"], subject="vehicle", batch_size=4)
    ll = world["norm"].log_prob(world["bank"].embeds.double())
    assert len(embeds) == 3 and images.shape == (3, 32, 32, 3)
    assert max(embeds.provenance["log_likelihoods"]) < float(ll.median())
    assert all(p >= 0.5 for p in embeds.provenance["p_yes"])
    assert "Is this still a vehicle?" in report and "P(yes)" in report
    assert [v for n, v, _ in progress_log if n == "test-CreativeRareSelect"][:1] == [4]


def test_rare_select_validates_and_refuses(world, run, pack_nodes):
    node = pack_nodes["CreativeRareSelect"]
    assert node.validate_inputs() is True and node.validate_inputs(k=None, candidates=None) is True
    assert "candidates" in node.validate_inputs(k=8, candidates=2)
    with pytest.raises(ValueError, match="connect a renderer"):
        run("CreativeRareSelect", norm=world["norm"], embeds=world["bank"], gate=world["gate"])
    with pytest.raises(ValueError, match="k is 0, below its minimum 1"):  # the schema's range, checked on every input
        run("CreativeRareSelect", norm=world["norm"], embeds=world["bank"], k=0)


# --------------------------------------------------------------------------- Mix Concepts


def _train(run, world, subject, seed, steps=3):
    return run("CreativeLoRAOptimizer", prior=world["prior"], norm=world["norm"], subject=subject, steps=steps,
               learning_rate=1e-2, lora_rank=2, train="token + LoRA", seed=seed, prompt_template="a photo of a {token}",
               creative_weight=1.0, guidance=4.0, prior_steps=5)[1]


def test_mix_concepts_node(world, run, pack_nodes, tmp_path):
    from creative_generation.nodes.engine.concept import Concept

    car, boat = _train(run, world, "car", 0), _train(run, world, "boat", 1)
    prior, mixed, token = run("CreativeMixConcepts", prior=world["prior"], concept_a=car, concept_b=boat,
                              weight_a=3.0, weight_b=1.0)
    assert token == "<creative-mix-car-boat>" and prior.concept is mixed
    assert [p["weight"] for p in mixed.meta["mixed_from"]] == [0.75, 0.25]
    mixed.save(tmp_path / "mix.safetensors")
    assert Concept.load(tmp_path / "mix.safetensors").lora_rank == 4
    node = pack_nodes["CreativeMixConcepts"]
    assert node.validate_inputs() is True and node.validate_inputs(weight_a=None, weight_b=None) is True
    assert "positive weight" in node.validate_inputs(weight_a=0.0, weight_b=0.0)
    with pytest.raises(ValueError, match="angle brackets"):
        run("CreativeMixConcepts", prior=world["prior"], concept_a=car, concept_b=boat, token="two words")


# --------------------------------------------------------------------------- Auto Trials


def test_auto_trials_node(world, run, pack_nodes, progress_log):
    concepts, log, trial_map = run("CreativeAutoTrials", prior=world["prior"], norm=world["norm"], gate=world["gate"],
                                   renderer=world["renderer"], subject="vehicle", trials=2, steps=2,
                                   learning_rate=1e-3, lora_rank=2, cluster_samples=4)
    assert len(concepts) == 2 and all(c.meta["base_prior"] == world["prior"].identity for c in concepts)
    assert "2 trial(s)" in log and "stop_reason" in log and trial_map.shape[0] == 1 and trial_map.shape[-1] == 3
    assert max(v for n, v, _ in progress_log if n == "test-CreativeAutoTrials") == 4
    node = pack_nodes["CreativeAutoTrials"]
    assert node.validate_inputs() is True and node.validate_inputs(subject=None, prompt_template=None) is True
    assert "{token}" in node.validate_inputs(prompt_template="a photo")
    with pytest.raises(ValueError, match="subject is empty"):
        run("CreativeAutoTrials", prior=world["prior"], norm=world["norm"], gate=world["gate"],
            renderer=world["renderer"], subject=" ")


# --------------------------------------------------------------------------- Image Variations


def test_image_variations_and_image_anchor_nodes(world, run, pack_nodes, progress_log):
    image = world["renderer"](world["bank"].embeds[:1])
    terms, = run("CreativeImageAnchorLoss", prior=world["prior"], image=image, weight=2.0)
    assert [t.name for t in terms] == ["image_anchor"] and terms[0].weight == 2.0
    prior, concept, inversion, token, image_embeds, embedding_map, report = run(
        "CreativeImageVariations", prior=world["prior"], norm=world["norm"], image=image, subject="vehicle",
        inversion_steps=3, steps=2, lora_rank=2, gate=world["gate"], renderer=world["renderer"], loss_terms=terms)
    assert token == "<creative-vehicle>" and prior.concept is concept and inversion.meta["steps_run"] == 3
    assert len(image_embeds) == 1 and embedding_map.shape[-1] == 3 and "image log-likelihood" in report
    assert max(v for n, v, _ in progress_log if n == "test-CreativeImageVariations") == 5
    node = pack_nodes["CreativeImageVariations"]
    assert node.validate_inputs() is True and node.validate_inputs(subject=None, prompt_template=None) is True
    blind = world["prior"].with_concept(None)
    blind.image_encoder = None
    with pytest.raises(ValueError, match="no image encoder"):
        run("CreativeImageVariations", prior=blind, norm=world["norm"], image=image)
    with pytest.raises(ValueError, match="connect a renderer"):
        run("CreativeImageVariations", prior=world["prior"], norm=world["norm"], image=image, gate=world["gate"])
