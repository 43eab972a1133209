"""Prior sampling: our cached-prefix sampler against diffusers' own prior pipelines."""

from __future__ import annotations

import pytest
import torch
from diffusers import KandinskyPriorPipeline, KandinskyV22PriorPipeline

from creative_generation.nodes.engine.bank import PAPER_TEMPLATE, EmbeddingBank, sample_bank
from creative_generation.nodes.engine.prior import load_prior
from creative_generation.nodes.engine.sampling import build_prefix, denoise, initial_latents, sample_embeddings

PROMPT = PAPER_TEMPLATE.format(subject="vehicle")


def _pipeline(cls, p):
    return cls(prior=p.transformer, text_encoder=p.text_encoder, tokenizer=p.tokenizer, scheduler=p.scheduler,
               image_encoder=p.image_encoder, image_processor=None)


def _pipeline_bank(pipe, prompt, batches, steps, guidance, seed):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return torch.cat([pipe(prompt, num_images_per_prompt=b, num_inference_steps=steps, guidance_scale=guidance,
                           generator=g, output_type="pt").image_embeds for b in batches])


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_matches_kandinsky22_pipeline(prior, guidance):
    ours = sample_embeddings(prior, PROMPT, 20, batch_size=8, steps=5, guidance=guidance, seed=3)
    ref = _pipeline_bank(_pipeline(KandinskyV22PriorPipeline, prior), PROMPT, [8, 8, 4], 5, guidance, 3)
    assert ours.shape == (20, prior.embedding_dim)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_matches_kandinsky21_pipeline(tiny_prior21_dir):
    p = load_prior(str(tiny_prior21_dir))
    assert p.family == "kandinsky-2.1"
    ours = sample_embeddings(p, "a photo of a red bus", 12, batch_size=6, steps=7, guidance=3.0, seed=11)
    ref = _pipeline_bank(_pipeline(KandinskyPriorPipeline, p), "a photo of a red bus", [6, 6], 7, 3.0, 11)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_negative_prompt_matches_uncached_prior(prior):
    """With a negative prompt the uncond prefix is longer than the cond one; compare to the full forward."""
    ours = sample_embeddings(prior, "a car", 6, batch_size=6, steps=4, guidance=5.0, seed=2,
                             negative_prompt="blurry, low quality, oversaturated colours and strange shapes")
    emb = prior.encode_prompt(["blurry, low quality, oversaturated colours and strange shapes", "a car"],
                              full_length=True)
    g = torch.Generator().manual_seed(2)
    lat = initial_latents(prior, 6, g)
    sched = prior.scheduler
    sched.set_timesteps(4)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            rows = torch.tensor([0] * 6 + [1] * 6)
            pred = prior.transformer(torch.cat([lat, lat]), timestep=t, proj_embedding=emb.text_embeds[rows],
                                     encoder_hidden_states=emb.hidden_states[rows],
                                     attention_mask=emb.mask[rows]).predicted_image_embedding
            u, c = pred.chunk(2)
            prev = None if i + 1 == len(sched.timesteps) else sched.timesteps[i + 1]
            lat = sched.step(u + 5.0 * (c - u), t, lat, generator=g, prev_timestep=prev).prev_sample
        ref = prior.transformer.post_process_latents(lat)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_seeded_and_prompt_encoded_once(prior):
    calls = []
    handle = prior.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        a = sample_embeddings(prior, PROMPT, 30, batch_size=7, seed=5)
    finally:
        handle.remove()
    assert len(calls) == 1, "the prompt must be encoded once per bank, not once per batch"
    assert torch.equal(a, sample_embeddings(prior, PROMPT, 30, batch_size=7, seed=5))
    assert not torch.allclose(a, sample_embeddings(prior, PROMPT, 30, batch_size=7, seed=6))


def test_one_step_is_refused_clearly(prior):
    with pytest.raises(ValueError, match="at least 2"):
        sample_embeddings(prior, PROMPT, 4, steps=1)


def test_progress_and_cancel(prior):
    seen = []
    sample_embeddings(prior, PROMPT, 10, batch_size=4, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(4, 10), (8, 10), (10, 10)]

    def cancel(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_embeddings(prior, PROMPT, 10, batch_size=4, progress=cancel)


def test_longest_padding_equals_full_length(prior):
    """The causal text encoder gives the same states for real tokens without the 77-position padding."""
    prompts = ["", PROMPT, "a car"]
    short, full = prior.encode_prompt(prompts), prior.encode_prompt(prompts, full_length=True)
    n = short.hidden_states.shape[1]
    assert n < 77 and torch.equal(full.mask[:, n:].any(), torch.tensor(False))
    assert torch.allclose(short.text_embeds, full.text_embeds, atol=1e-6)
    assert torch.allclose(short.hidden_states, full.hidden_states[:, :n], atol=1e-6)


def test_differentiable_generate(prior):
    """Gradients reach the prompt's text embedding through the cached prefix and the denoising loop."""
    emb = prior.encode_prompt(["", PROMPT])
    emb.text_embeds.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    e = denoise(prior, build_prefix(prior.transformer, emb), initial_latents(prior, 1, g), 5, 4.0, g)
    e.sum().backward()
    assert emb.text_embeds.grad is not None and emb.text_embeds.grad.abs().sum() > 0


def test_bank_provenance_and_roundtrip(prior, tmp_path):
    bank = sample_bank(prior, PROMPT, 16, batch_size=8, steps=5, guidance=4.0, seed=9)
    assert bank.provenance["prior"] == prior.identity
    assert {bank.provenance[k] for k in ("prompt", "seed", "steps", "guidance", "count")} == {PROMPT, 9, 5, 4.0, 16}
    bank.save(tmp_path / "bank.safetensors")
    again = EmbeddingBank.load(tmp_path / "bank.safetensors")
    assert torch.equal(again.embeds, bank.embeds) and again.provenance == bank.provenance
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"], "no temporary file left behind"
