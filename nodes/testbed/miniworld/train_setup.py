"""What every training stage of the mini world shares: the configuration, logging, seeding, the
learning-rate schedule, the data splits and their captions (see ``train.py`` for the stages)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ...engine.prior import CLIP_MEAN, CLIP_STD, preprocess_images
from . import world as W


@dataclass(frozen=True)
class Config:
    seed: int = 0
    n_train: int = 10000
    n_test: int = 900
    n_judge: int = 6000
    res: int = 32  # model resolution (world images are 64 px, downsampled with antialiasing)
    width: int = 64  # CLIP embedding width = text width = prior width
    # One thread: on a CPU shared with other jobs, two OpenMP threads wait on each other at every
    # barrier and ran 3-20x slower than one in our measurements (small convs and matmuls).
    threads: int = 1
    # The world's general-purpose models (CLIP, decoder, MLLM) trained on scenes whose colour and background are
    # independent of the kind, as real CLIPs, decoders and MLLMs know a purple bus is a bus; the prior alone keeps
    # the world's frequencies, so a purple bus stays rare under the norm (issue 20: the world as shipped cannot
    # represent its rare combinations, models/miniworld/readings.json).
    balanced: bool = False
    # CLIP
    clip_layers: int = 2
    clip_patch: int = 8
    clip_steps: int = 700
    clip_batch: int = 256
    clip_lr: float = 2e-3
    # prior
    prior_layers: int = 4
    prior_heads: int = 4
    prior_head_dim: int = 32
    prior_steps: int = 600
    prior_batch: int = 256
    prior_lr: float = 1e-3
    prior_uncond: float = 0.1
    prior_repeats: int = 4  # images (and noise levels) per caption in a batch
    # decoder
    movq_steps: int = 800
    movq_batch: int = 16
    movq_lr: float = 3e-3
    unet_steps: int = 900
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_uncond: float = 0.1
    render_steps: int = 10
    render_guidance: float = 2.0
    # MLLM
    mllm_images: int = 4000
    mllm_steps: int = 1000
    mllm_batch: int = 64
    mllm_lr: float = 3e-3
    mllm_vision_lr_scale: float = 0.3
    mllm_layers: int = 2
    mllm_hidden: int = 64
    # judge
    judge_width: int = 16
    judge_steps: int = 700
    judge_batch: int = 128
    # SD form (stage sd, train_sd.py)
    sd_images: int = 4000
    sd_captions: int = 3  # captions drawn per image (cached encodings)
    sd_vae_steps: int = 700
    sd_vae_batch: int = 16
    sd_vae_lr: float = 3e-3
    sd_unet_steps: int = 1500
    sd_unet_batch: int = 64
    sd_unet_lr: float = 1e-3
    sd_uncond: float = 0.1
    sd_ema: float = 0.995
    sd_eval_per_kind: int = 10
    sd_eval_test: int = 180  # held-out images for the VAE / CLIP vision checks
    # eval
    eval_prior_samples: int = 60
    eval_render: int = 90
    eval_mllm: int = 270


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 50) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    for group in opt.param_groups:
        group["lr"] = lr * group.get("scale", 1.0)


def update(opt: torch.optim.Optimizer, loss: torch.Tensor, base_lr: float, step: int, total: int, *,
           clip: Iterable[torch.nn.Parameter] | None = None) -> None:
    """One optimiser step of a training stage: the cosine learning rate, gradients (clipped to norm 1 when
    ``clip`` names the parameters), the update."""
    cosine_lr(opt, base_lr, step, total)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()


def to_fp16(module: torch.nn.Module) -> torch.nn.Module:
    return module.to(torch.float16)


@dataclass
class Split:
    scenes: list[W.Scene]
    pixels: np.ndarray  # uint8 [N, 64, 64, 3]
    x: torch.Tensor  # CLIP-normalised [N, 3, res, res]
    labels: dict[str, np.ndarray]  # key -> class index [N]

    def images(self, idx=None) -> torch.Tensor:
        """ComfyUI IMAGE float tensor of (a subset of) the split."""
        px = self.pixels if idx is None else self.pixels[idx]
        return W.to_image_tensor(px)


def make_split(n: int, seed: int, res: int, *, uniform: bool = False) -> Split:
    scenes = W.sample_scenes(n, seed, uniform=uniform)
    pixels = W.draw_many(scenes)
    x = torch.cat([preprocess_images(W.to_image_tensor(pixels[i:i + 2000]), res, CLIP_MEAN, CLIP_STD)
                   for i in range(0, n, 2000)])
    return Split(scenes, pixels, x, W.label_indices(scenes))


class Captioner:
    """Random captions for images and their ground-truth match matrix; token ids cached per text."""

    KEYS = ("kind", "colour", "background", "size", "category")

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def ids(self, texts: list[str]) -> torch.Tensor:
        """Token ids padded to the longest text with <|endoftext|> (the pad the prior's tokenizer uses)."""
        rows = []
        for text in texts:
            if text not in self.cache:
                self.cache[text] = self.tokenizer(text, truncation=True, max_length=77).input_ids
            rows.append(self.cache[text])
        out = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row)
        return out

    def sample(self, scenes: list[W.Scene], rng: np.random.Generator) -> tuple[list[str], torch.Tensor]:
        """One caption per scene and M[i, j] = caption j is true of image i."""
        caps = [W.caption(s, rng) for s in scenes]
        n = len(scenes)
        match = torch.ones(n, n, dtype=torch.bool)
        for key in self.KEYS:
            have = torch.tensor([W.VOCAB[key].index(s.labels()[key]) for s in scenes])
            need = torch.tensor([W.VOCAB[key].index(st[key]) if key in st else -1 for _, st in caps])
            match &= (need[None, :] == -1) | (have[:, None] == need[None, :])
        return [c for c, _ in caps], match
