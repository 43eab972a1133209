"""CLIP image embeddings with gradients, over the weights of a user's CLIP vision model.

The creative loss on the SD path scores the CLIP vision embedding of a render, so the embedding
must be differentiable in the render. ComfyUI's own ``encode_image`` is not: its preprocessing
rounds to 8-bit levels (zero gradient) and its transformer layers add in place. Here the same
preprocessing is written without the rounding, and the forward is transformers'
``CLIPVisionModelWithProjection`` (no in-place adds) run with ``torch.func.functional_call`` over
the model's own tensors: its parameter names are transformers' names (ComfyUI loads the HF
layout), so no weight is copied. Everything here is ComfyUI-free; the node side hands in the
config and the tensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               crop: bool = True) -> torch.Tensor:
    """IMAGE ``[B, H, W, 3]`` in 0..1 -> normalised pixels ``[B, 3, size, size]``, differentiable.

    The steps of ComfyUI's ``clip_preprocess`` (bicubic antialiased resize of the shorter side,
    centre crop, normalise) without its 8-bit rounding, which has no gradient."""
    x = images[..., :3].movedim(-1, 1)
    if x.shape[2] != size or x.shape[3] != size:
        if crop:
            scale = size / min(x.shape[2], x.shape[3])
            target = (round(scale * x.shape[2]), round(scale * x.shape[3]))
        else:
            target = (size, size)
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - m) / s


def hf_config(config: Mapping[str, Any]):
    """The transformers ``CLIPVisionConfig`` of a ComfyUI CLIP vision JSON config (the same keys)."""
    from transformers import CLIPVisionConfig

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps", "projection_dim")
    return CLIPVisionConfig(**{k: config[k] for k in keys if k in config})


class DifferentiableClipVision:
    """``embeds = vision(images)``: projected CLIP image embeddings ``[B, D]`` with gradients to the images.

    ``config``: the model's ComfyUI / transformers JSON config; ``tensors``: its named parameters
    (transformers' names: ``vision_model.embeddings.patch_embedding.weight``, ...). Only CLIP vision
    models with a projection are supported (SigLIP and DINOv2 have no CLIP image embedding)."""

    def __init__(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        from transformers import CLIPVisionModelWithProjection

        if config.get("model_type", "clip_vision_model") != "clip_vision_model" or "projection_dim" not in config:
            raise ValueError(f"The CLIP vision model is a {config.get('model_type')!r} without a CLIP image "
                             "projection: use a CLIP ViT vision model (e.g. CLIP-ViT-L-14 or CLIP-ViT-H-14), the kind "
                             "IP-Adapter and unCLIP use.")
        self.config = dict(config)
        self.size = int(config.get("image_size", 224))
        self.mean = tuple(config.get("image_mean", CLIP_MEAN))
        self.std = tuple(config.get("image_std", CLIP_STD))
        with torch.device("meta"):
            self.skeleton = CLIPVisionModelWithProjection(hf_config(config)).eval()
        wanted = {n for n, _ in self.skeleton.named_parameters()}
        missing = sorted(wanted - set(tensors))
        if missing:
            raise ValueError(f"The CLIP vision model lacks {len(missing)} weights a CLIP ViT has, e.g. {missing[0]!r}.")
        self.tensors = {n: tensors[n] for n in wanted}
        positions = (self.size // int(config["patch_size"])) ** 2 + 1
        self.buffers = {"vision_model.embeddings.position_ids": torch.arange(positions)[None]}

    @property
    def width(self) -> int:
        return int(self.config["projection_dim"])

    @property
    def identity(self) -> str:
        """The embedding space: a fingerprint of the config and of the patch embedding and projection weights
        (a bank, a norm and a run must agree on it)."""
        digest = hashlib.sha256(json.dumps({k: self.config.get(k) for k in sorted(self.config)}, sort_keys=True,
                                           default=str).encode())
        for name in ("vision_model.embeddings.patch_embedding.weight", "visual_projection.weight"):
            digest.update(self.tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
        return f"clip-vision:{self.width}d:{digest.hexdigest()[:16]}"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype every tensor runs in: the patch embedding's on an accelerator, fp32 on a CPU.

        ComfyUI keeps a CLIP vision model in mixed dtypes (its projection stays fp32 beside fp16 layers, fp16
        even on a CPU) and casts per layer. A CPU has no fast half-precision matmul for the backward pass: a
        ViT-L/14 pass ran its backward ~20x slower in fp16 than in fp32, so there the weights are cast up."""
        weights = self.tensors["vision_model.embeddings.patch_embedding.weight"]
        return torch.float32 if weights.device.type == "cpu" else weights.dtype

    @property
    def cast_bytes(self) -> int:
        """Bytes of the weight copies a call makes (those stored in another dtype than :attr:`dtype`)."""
        return sum(v.numel() * self.dtype.itemsize for v in self.tensors.values() if v.dtype != self.dtype)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = self.tensors["vision_model.embeddings.patch_embedding.weight"].device, self.dtype
        pixels = preprocess(images.to(device, torch.float32), self.size, self.mean, self.std)
        params = {**{k: v.to(dtype) for k, v in self.tensors.items()},
                  **{k: v.to(device) for k, v in self.buffers.items()}}
        out = torch.func.functional_call(self.skeleton, params, (pixels.to(dtype),))
        return out.image_embeds.float()
