"""Stage 5 of the mini world: the independent CNN classifier (:mod:`.judge`), from ground-truth labels
only; it measures validity in evaluations and is never used by the optimiser."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import world as W
from .train_setup import Config, Split, log, seed_all, update

if TYPE_CHECKING:
    from .judge import LabelNet


def train_judge(cfg: Config, split: Split) -> LabelNet:
    from .judge import LabelNet, prepare

    rng = seed_all(cfg.seed + 6)
    keys = W.LABEL_KEYS
    net = LabelNet({k: len(W.VOCAB[k]) for k in keys}, width=cfg.judge_width)
    x_all = prepare(split.images(), cfg.res)
    y_all = {k: torch.from_numpy(split.labels[k]) for k in keys}
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    t0 = time.time()
    for step in range(cfg.judge_steps):
        idx = torch.from_numpy(rng.choice(len(split.scenes), cfg.judge_batch, replace=False))
        x = x_all[idx]
        # Robustness to decoded images: random blur and noise (colours untouched: colour is a label).
        sigma = torch.from_numpy(rng.uniform(0, 1.2, len(idx)).astype(np.float32))
        blurred = _gaussian_blur(x, sigma)
        x = blurred + torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)) * 0.1 * float(rng.random())
        out = net(x)
        loss = sum(F.cross_entropy(out[k], y_all[k][idx]) for k in keys)
        update(opt, loss, 2e-3, step, cfg.judge_steps)
        if step % 150 == 0 or step == cfg.judge_steps - 1:
            log(f"judge step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return net.eval().requires_grad_(False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (sigma 0 = identity), 5-tap."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, 5]
    b, c, h, w = x.shape
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    out = sum(k[:, i, None, None, None] * xp[:, :, :, i:i + w] for i in range(5))[:, :, 2:2 + h]
    out = F.pad(out, (0, 0, 2, 2), mode="replicate")
    return sum(k[:, i, None, None, None] * out[:, :, i:i + h] for i in range(5))
