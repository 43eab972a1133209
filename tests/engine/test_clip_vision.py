"""Differentiable CLIP image embeddings over a model's own tensors (the SD path's embedding)."""

from __future__ import annotations

import pytest
import torch

from creative_generation.nodes.engine.clip_vision import DifferentiableClipVision, preprocess

CONFIG = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_channels": 3, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu",
          "projection_dim": 16}


@pytest.fixture(scope="module")
def reference():
    from transformers import CLIPVisionModelWithProjection

    from creative_generation.nodes.engine.clip_vision import hf_config

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(hf_config(CONFIG)).eval()


def test_matches_transformers_and_has_gradients(reference):
    vision = DifferentiableClipVision(CONFIG, dict(reference.named_parameters()))
    images = torch.rand(2, 48, 40, 3, requires_grad=True)
    embeds = vision(images)
    with torch.no_grad():
        expected = reference(pixel_values=preprocess(images, 32)).image_embeds
    assert embeds.shape == (2, 16) and torch.allclose(embeds, expected, atol=1e-5)
    embeds.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_identity_names_the_space(reference):
    vision = DifferentiableClipVision(CONFIG, dict(reference.named_parameters()))
    other = {n: p.detach() + 0.01 for n, p in reference.named_parameters()}
    assert vision.identity.startswith("clip-vision:16d:")
    assert vision.identity == DifferentiableClipVision(CONFIG, dict(reference.named_parameters())).identity
    assert vision.identity != DifferentiableClipVision(CONFIG, other).identity


def test_refuses_a_model_without_clip_projection(reference):
    with pytest.raises(ValueError, match="without a CLIP image projection"):
        DifferentiableClipVision({**CONFIG, "model_type": "siglip_vision_model"}, dict(reference.named_parameters()))
    with pytest.raises(ValueError, match="lacks"):
        DifferentiableClipVision(CONFIG, {})


def test_a_half_precision_model_runs_in_fp32_on_a_cpu(reference):
    """ComfyUI keeps CLIP vision in fp16 even on a CPU, where fp16 matmuls have no fast backward kernel."""
    half = {n: p.detach().half() for n, p in reference.named_parameters()}
    vision = DifferentiableClipVision(CONFIG, half)
    upcast = DifferentiableClipVision(CONFIG, {n: p.float() for n, p in half.items()})
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    assert vision.dtype == torch.float32
    assert vision.cast_bytes == sum(p.numel() * 4 for p in half.values())
    assert upcast.cast_bytes == 0
    assert torch.equal(vision(images), upcast(images))
