"""A tiny random diffusion prior in the Kandinsky prior folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...engine.prior import CLIP_MEAN, CLIP_STD
from .tokenizer import save_clip_tokenizer

PIPELINES = {"kandinsky-2.1": "KandinskyPriorPipeline", "kandinsky-2.2": "KandinskyV22PriorPipeline"}


def clip_processor_config(size: int) -> dict[str, object]:
    """A prior folder's ``image_processor/preprocessor_config.json``: OpenAI CLIP's normalisation at ``size`` px."""
    return {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": size, "width": size},
            "size": {"shortest_edge": size}, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
            "do_resize": True, "do_center_crop": True, "do_normalize": True, "resample": 3}


def build_tiny_prior(folder: str | Path, *, family: str = "kandinsky-2.2", width: int = 32, layers: int = 2,
                     heads: int = 2, embed_dim: int = 32, text_layers: int = 2,
                     seed: int = 0, with_image_encoder: bool = True) -> Path:
    """Save a seeded random prior (transformer, CLIP text/vision encoders, tokenizer, scheduler).

    The text encoder's width equals ``embed_dim``: PriorTransformer projects token states of
    that width (as in the real priors, where CLIP text width = image-embedding width).
    ``clip_std`` is set to ones: diffusers initialises it to zeros, which would make every
    sample identical (a singular Gaussian).
    """
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    folder = Path(folder)
    torch.manual_seed(seed)
    prior = PriorTransformer(num_attention_heads=heads, attention_head_dim=width // heads, num_layers=layers,
                             embedding_dim=embed_dim, num_embeddings=77, additional_embeddings=4)
    with torch.no_grad():
        for p in prior.parameters():  # zeros-initialised tensors would hide bugs in tests
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.02)
        prior.clip_std.fill_(1.0)
        prior.clip_mean.normal_(0.0, 0.1)
    prior.save_pretrained(folder / "prior", safe_serialization=True)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=embed_dim, intermediate_size=2 * embed_dim, num_hidden_layers=text_layers,
        num_attention_heads=2, projection_dim=embed_dim, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=2, pad_token_id=1))
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    save_clip_tokenizer(folder / "tokenizer")
    UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                    clip_sample_range=10.0).save_pretrained(folder / "scheduler")
    index = {"_class_name": PIPELINES[family], "prior": ["diffusers", "PriorTransformer"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "UnCLIPScheduler"]}
    if with_image_encoder:
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=embed_dim))
        vision.save_pretrained(folder / "image_encoder", safe_serialization=True)
        (folder / "image_processor").mkdir(parents=True, exist_ok=True)
        (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(clip_processor_config(32)))
        index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
