"""Concept plumbing: placeholder token, LoRA adapters on a shared prior, save/load, base checks."""

from __future__ import annotations

import pytest
import torch

from creative_generation.nodes.engine.concept import Concept, ConceptMismatchError, add_lora, lora_state
from creative_generation.nodes.engine.optimizer import subject_embedding
from creative_generation.nodes.engine.sampling import sample_embeddings


def test_placeholder_with_subject_embedding_equals_subject_word(prior):
    """A token initialised from a one-token subject encodes exactly like the subject word."""
    concept = Concept("<creative-vehicle>", subject_embedding(prior, "vehicle"))
    view = prior.with_concept(concept)
    with torch.no_grad():
        ours = view.encode_prompt(["a photo of a <creative-vehicle> on a road"])
        ref = prior.encode_prompt(["a photo of a vehicle on a road"])
    assert torch.allclose(ours.text_embeds, ref.text_embeds, atol=1e-6)
    assert torch.allclose(ours.hidden_states, ref.hidden_states, atol=1e-6)
    assert torch.equal(ours.mask, ref.mask)
    assert len(view.tokenizer_for_concept()) == len(prior.tokenizer) + 1
    assert prior.text_encoder.text_model.eos_token_id == 2, "the legacy config value is restored after encoding"


def test_token_changes_pooled_output(prior):
    vec = torch.randn(prior.text_encoder.config.hidden_size)
    view = prior.with_concept(Concept("<tok>", vec))
    with torch.no_grad():
        a = view.encode_prompt(["a photo of a <tok>"]).text_embeds
        b = prior.encode_prompt(["a photo of a vehicle"]).text_embeds
    assert not torch.allclose(a, b)


def _trained_lora(prior, seed=0):
    tf = prior.transformer
    add_lora(tf, "tmp_lora", 4, 4.0, ("to_q", "to_k", "to_v", "to_out.0"), seed)
    state = lora_state(tf, "tmp_lora")
    tf.delete_adapters("tmp_lora")
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v) for k, v in state.items()}


def test_lora_concept_applies_and_unapplies(prior):
    base = sample_embeddings(prior, "a photo of a car", 4, seed=1)
    concept = Concept("", None, _trained_lora(prior), lora_rank=4, lora_alpha=4.0, meta={"base_prior": prior.identity})
    with_lora = sample_embeddings(prior.with_concept(concept), "a photo of a car", 4, seed=1)
    assert not torch.allclose(base, with_lora, atol=1e-4)
    assert torch.equal(sample_embeddings(prior, "a photo of a car", 4, seed=1), base)
    zero = Concept("", None, {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in concept.lora_state.items()},
                   lora_rank=4, lora_alpha=4.0)
    assert torch.allclose(sample_embeddings(prior.with_concept(zero), "a photo of a car", 4, seed=1), base, atol=1e-6)


def test_save_load_roundtrip(prior, tmp_path):
    concept = Concept("<tok>", torch.randn(32), _trained_lora(prior, 3), 4, 4.0,
                      meta={"base_prior": prior.identity, "subject": "vehicle", "steps_run": 7})
    concept.save(tmp_path / "c.safetensors")
    again = Concept.load(tmp_path / "c.safetensors")
    assert again.token == "<tok>" and again.meta == concept.meta and again.lora_rank == 4
    assert torch.equal(again.token_embedding, concept.token_embedding)
    assert again.lora_state.keys() == concept.lora_state.keys()
    assert again.adapter_name == concept.adapter_name
    a = sample_embeddings(prior.with_concept(concept), "a <tok>", 3, seed=4)
    b = sample_embeddings(prior.with_concept(again), "a <tok>", 3, seed=4)
    assert torch.equal(a, b)


def test_concept_refuses_other_prior(prior):
    concept = Concept("<tok>", torch.randn(32), meta={"base_prior": "kandinsky-2.1:0000"})
    with pytest.raises(ConceptMismatchError, match="trained on prior 'kandinsky-2.1:0000'"):
        prior.with_concept(concept)
