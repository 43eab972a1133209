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
