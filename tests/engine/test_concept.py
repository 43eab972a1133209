"""Concept plumbing: placeholder token, LoRA adapters on a shared prior, save/load, base checks."""

from __future__ import annotations

import re

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from creative_generation.nodes.engine.bank import sample_bank
from creative_generation.nodes.engine.concept import LORA_TARGETS, Concept, ConceptMismatchError, add_lora, lora_state
from creative_generation.nodes.engine.losses import CreativeTerm
from creative_generation.nodes.engine.mixing import mix_concepts
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig
from creative_generation.nodes.engine.prior import load_prior
from creative_generation.nodes.engine.prior_training import subject_embedding
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


# -- a failed concept load leaves the shared prior exactly as it was (issue 18) --------------------------------


@pytest.fixture
def fresh_prior(tiny_prior_dir):
    """A prior no adapter was ever added to (the session's ``prior`` carries other tests' adapters)."""
    return load_prior(str(tiny_prior_dir))


@pytest.fixture(scope="module")
def small_norm(prior):
    return GaussianNorm.from_bank(sample_bank(prior, "a photo of a vehicle", 64, batch_size=64, seed=0), 8)


def _adapter_state(tf) -> dict:
    """Everything adding an adapter can change on a transformer, weights aside."""
    return {"modules": [(n, type(m).__name__) for n, m in tf.named_modules()],
            "marks": {k: sorted(v) if k == "peft_config" else v for k, v in vars(tf).items()
                      if k in ("_hf_peft_config_loaded", "peft_config")},
            "layers": {n: (list(m.active_adapters), m.disable_adapters) for n, m in tf.named_modules()
                       if isinstance(m, BaseTunerLayer)},
            "grads": {n: p.requires_grad for n, p in tf.named_parameters()}}


def _broken(prior, kind: str) -> Concept:
    """A concept that cannot load on ``prior``, broken in one of the ways a real file can be."""
    state = _trained_lora(prior, 5)
    base = {"base_prior": prior.identity}
    if kind == "no layer":  # targets that match no module: diffusers had already marked the model
        return Concept("", None, state, 4, 4.0, ("no_such_layer",), base)
    if kind == "half injected":  # to_q layers are wrapped before peft meets a LayerNorm it cannot adapt
        return Concept("", None, state, 4, 4.0, ("to_q", "norm1"), base)
    if kind == "wrong rank":  # the adapter is added, then its weights do not fit it
        return Concept("", None, state, 8, 4.0, LORA_TARGETS, base)
    if kind == "missing weights":  # its to_q layers would stay untrained
        return Concept("", None, {k: v for k, v in state.items() if "to_q" not in k}, 4, 4.0, LORA_TARGETS, base)
    assert kind == "unknown weights"
    return Concept("", None, {k.replace("to_q", "to_qq"): v for k, v in state.items()}, 4, 4.0, LORA_TARGETS, base)


def _valid(prior, seed: int) -> Concept:
    return Concept("", None, _trained_lora(prior, seed), 4, 4.0, meta={"base_prior": prior.identity})


KINDS = ["no layer", "half injected", "wrong rank", "unknown weights", "missing weights"]


@pytest.mark.parametrize("before", ["fresh", "concept active", "adapters disabled"])
@pytest.mark.parametrize("kind", KINDS)
def test_failed_load_leaves_the_prior_as_it_was(fresh_prior, small_norm, before, kind):
    """Then an optimiser run and a valid concept both work, also when the failure was the first thing done."""
    prior = fresh_prior
    broken = _broken(prior, kind)  # built first: it adds and removes a scratch adapter
    if before != "fresh":
        prior.with_concept(_valid(prior, 1)).activate()
        if before == "adapters disabled":
            prior.activate()
    was = _adapter_state(prior.transformer)
    weights = {k: v.clone() for k, v in prior.transformer.state_dict().items()}
    with pytest.raises(ConceptMismatchError, match="does not fit this prior's layers"):
        prior.with_concept(broken).activate()
    assert _adapter_state(prior.transformer) == was
    now = prior.transformer.state_dict()
    assert now.keys() == weights.keys() and all(torch.equal(now[k], v) for k, v in weights.items())
    result = CreativeRun(prior, small_norm, "vehicle", [CreativeTerm(small_norm)],
                         OptimConfig(steps=2, train="both", rank=4, lora_alpha=4.0)).run()
    assert result.steps_run == 2 and result.concept.lora_state
    base = sample_embeddings(prior, "a photo of a car", 2, seed=1)
    assert not torch.allclose(sample_embeddings(prior.with_concept(_valid(prior, 2)), "a photo of a car", 2, seed=1),
                              base, atol=1e-4)
    assert torch.equal(sample_embeddings(prior, "a photo of a car", 2, seed=1), base)


def test_failed_training_adapter_leaves_the_prior_as_it_was(fresh_prior, small_norm):
    """The optimiser adds its adapter through add_lora: targets that match nothing are refused just as cleanly."""
    was = _adapter_state(fresh_prior.transformer)
    with pytest.raises(ValueError, match="no_such_layer"):
        CreativeRun(fresh_prior, small_norm, "vehicle", [CreativeTerm(small_norm)],
                    OptimConfig(steps=2, rank=4, lora_alpha=4.0, targets=("no_such_layer",))).run()
    assert _adapter_state(fresh_prior.transformer) == was
    result = CreativeRun(fresh_prior, small_norm, "vehicle", [CreativeTerm(small_norm)],
                         OptimConfig(steps=2, rank=4, lora_alpha=4.0)).run()
    assert result.steps_run == 2


def test_a_starting_lora_that_does_not_fit_leaves_no_training_adapter(fresh_prior, small_norm):
    """A run continuing from a concept whose LoRA weights have the wrong shapes (its rank and targets claim to
    match) fails while its session opens: the half-opened session is closed, the prior is as it was."""
    state = {k: v[:, :-1] if v.ndim == 2 and v.shape[1] > 4 else v for k, v in _trained_lora(fresh_prior, 3).items()}
    start = Concept("", None, state, 4, 4.0, meta={"base_prior": fresh_prior.identity})
    was = _adapter_state(fresh_prior.transformer)
    with pytest.raises(RuntimeError, match="size mismatch"):
        CreativeRun(fresh_prior, small_norm, "vehicle", [CreativeTerm(small_norm)],
                    OptimConfig(steps=2, train="lora", rank=4, lora_alpha=4.0), start=start).run()
    assert _adapter_state(fresh_prior.transformer) == was


def test_adapter_key_covers_rank_alpha_and_targets(prior):
    """Same weights, other settings: never the same loaded adapter, so the outcome does not depend on history."""
    good = _valid(prior, 7)
    twice = Concept("", None, good.lora_state, 4, 8.0, meta=good.meta)  # alpha 8: the LoRA acts twice as strongly
    fewer = Concept("", None, good.lora_state, 4, 4.0, ("to_q", "to_k", "to_v"), good.meta)
    damaged = Concept("", None, good.lora_state, 8, 4.0, meta=good.meta)  # says rank 8, holds rank 4
    assert len({c.adapter_name for c in (good, twice, fewer, damaged)}) == 4
    a = sample_embeddings(prior.with_concept(good), "a photo of a car", 2, seed=1)
    b = sample_embeddings(prior.with_concept(twice), "a photo of a car", 2, seed=1)
    assert not torch.allclose(a, b, atol=1e-4), "alpha 8 ran with the alpha-4 adapter loaded before it"
    with pytest.raises(ConceptMismatchError, match="does not fit"):  # refused even right after `good` loaded
        prior.with_concept(damaged).activate()


def test_a_token_of_another_width_is_refused_when_applied(prior, small_norm, tmp_path):
    """Without a base-prior tag it used to pass and fail at sampling with a tensor-size error naming no file."""
    path = tmp_path / "narrow.safetensors"
    Concept("<narrow>", torch.randn(7)).save(path)
    narrow = Concept.load(path)
    message = re.escape(str(path)) + r": the token embedding of '<narrow>' is 7 wide, but this prior's text " \
                                     r"encoder takes 32-wide"
    with pytest.raises(ConceptMismatchError, match=message):
        prior.with_concept(narrow)
    with pytest.raises(ConceptMismatchError, match=message):
        mix_concepts(prior, [narrow, Concept("<wide>", torch.randn(32))], [1.0, 1.0])
    with pytest.raises(ConceptMismatchError, match=message):  # a run continuing from it
        CreativeRun(prior, small_norm, "vehicle", [CreativeTerm(small_norm)], OptimConfig(steps=1), start=narrow)
    prior.with_concept(Concept("<wide>", torch.randn(32)))  # the right width passes
