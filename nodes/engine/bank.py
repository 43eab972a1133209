"""An embedding bank: N CLIP image embeddings and where they came from."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .prior import Prior, PriorFolderError
from .safetensors_io import load_tensors, save_tensors
from .sampling import sample_embeddings

PAPER_TEMPLATE = "Professional high-quality photo of a {subject}. photorealistic, 4k, HQ."
FORMAT = "creative-bank/1"


@dataclass
class EmbeddingBank:
    """``embeds`` ``[N, D]`` float32 on CPU plus provenance (prior identity, prompt, seed, ...)."""

    embeds: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeds.shape[1])

    @property
    def prior_identity(self) -> str:
        return str(self.provenance.get("prior", ""))

    def save(self, path: str | os.PathLike, *, numbered: bool = False) -> Path:
        """Write the bank; ``numbered``: as the first free ``<stem>_NNNNN`` name (see save_tensors)."""
        return save_tensors(path, {"embeds": self.embeds}, dict(self.provenance, format=FORMAT), numbered=numbered)

    @classmethod
    def load(cls, path) -> "EmbeddingBank":
        tensors, meta = load_tensors(path)
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a Creative Generation embedding bank.")
        embeds = tensors.get("embeds")
        if embeds is None or embeds.ndim != 2 or not len(embeds) or not embeds.is_floating_point():
            shape = "no 'embeds' tensor" if embeds is None else f"{embeds.dtype} of shape {tuple(embeds.shape)}"
            raise ValueError(f"{path}: a bank holds float embeddings [count, width], this file has {shape}. "
                             "It is damaged or not a bank: delete it or save the bank again.")
        if not bool(torch.isfinite(embeds).all()):
            raise ValueError(f"{path}: the bank has NaN or infinite values. Sample it again (e.g. in fp32).")
        return cls(embeds.float(), meta)

    @classmethod
    def concat(cls, banks: list["EmbeddingBank"]) -> "EmbeddingBank":
        """Join banks of one prior (e.g. several negative selections) into one."""
        priors = {b.prior_identity for b in banks}
        if len(priors) > 1:
            raise ValueError(f"Cannot join banks from different priors: {sorted(priors)}.")
        return cls(torch.cat([b.embeds for b in banks]), {"prior": priors.pop() if priors else "",
                                                          "parts": [b.provenance for b in banks]})


def sample_bank(prior: Prior, prompt: str, count: int = 5000, *, batch_size: int = 500, steps: int = 5,
                guidance: float = 4.0, seed: int = 0, negative_prompt: str = "",
                progress: Callable[[int, int], None] | None = None) -> EmbeddingBank:
    """The paper's step 1: N image embeddings of one prompt from the (frozen) prior."""
    embeds = sample_embeddings(prior, prompt, count, batch_size=batch_size, steps=steps, guidance=guidance,
                               seed=seed, negative_prompt=negative_prompt, progress=progress)
    provenance = {"kind": "prior", "prior": prior.identity, "prompt": prompt, "negative_prompt": negative_prompt,
                  "seed": int(seed), "steps": int(steps), "guidance": float(guidance), "count": int(count),
                  "batch_size": int(batch_size),
                  "concept": prior.concept.adapter_name if prior.concept is not None else None}
    return EmbeddingBank(embeds, provenance)


def encode_image(prior: Prior, images: torch.Tensor) -> torch.Tensor:
    """The image's CLIP embedding ``[1, D]`` (several images: their mean), by the prior's own image encoder.

    What image variations start from and the image anchor pulls toward; refuses a prior without
    an image encoder and anything that is not an IMAGE batch, before any model runs.
    """
    if prior.image_encoder is None:
        raise PriorFolderError(f"The prior at '{prior.source}' has no image encoder, so it cannot read an image: "
                               "load a prior folder with image_encoder/ (Kandinsky 2.1 / 2.2 priors ship one).")
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[-1] != 3:
        raise ValueError(f"Expected an IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}.")
    return prior.encode_images(images).mean(0, keepdim=True).float().cpu()


def encode_image_bank(prior: Prior, images: torch.Tensor, batch_size: int = 16) -> EmbeddingBank:
    """Embeddings of user images (e.g. ones marked as unwanted) with the prior's image encoder."""
    parts = [prior.encode_images(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return EmbeddingBank(torch.cat(parts).cpu(), {"kind": "images", "prior": prior.identity,
                                                  "count": int(images.shape[0])})
