"""Stage 2 of the mini world: a ``PriorTransformer`` diffusion prior, text -> CLIP image embedding
(x0 prediction, ``clip_mean``/``clip_std`` from the data, empty prompts for guidance), saved with the
CLIP towers, tokenizer and ``UnCLIPScheduler`` as a Kandinsky 2.2 prior folder."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ...engine.prior import PromptEmbeds
from ...engine.sampling import build_prefix, predict
from ..tiny.prior import clip_processor_config
from ..tiny.tokenizer import save_clip_tokenizer
from . import world as W
from .train_setup import Captioner, Config, Split, log, seed_all, to_fp16, update

if TYPE_CHECKING:
    from diffusers import PriorTransformer, UnCLIPScheduler


def prior_forward(tf: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, text_embeds: torch.Tensor,
                  latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``PriorTransformer.forward`` for P prompts with R noisy latents each, sharing the prompt's work.

    ``hidden [P, L, W]``, ``mask [P, L]``, ``text_embeds [P, W]``, ``latents [P, R, D]``, ``t [P, R]``
    -> x0 predictions ``[P, R, D]``: the sampler's own prefix forward (``engine/sampling.py``, whose
    docstring states the identity), with a noise level per latent; :func:`check_prior_forward`
    compares it with diffusers' own forward.
    """
    p, r = t.shape
    cache = build_prefix(tf, PromptEmbeds(text_embeds, hidden, mask))
    x0 = predict(tf, cache, [(i, r) for i in range(p)], latents.reshape(p * r, -1), t.reshape(-1))
    return x0.view(p, r, -1)


class MatchIndex:
    """Indices of the training images a caption is true of (the empirical p(image | caption))."""

    def __init__(self, scenes: list[W.Scene]) -> None:
        self.labels = [s.labels() for s in scenes]
        self.index: dict[tuple, np.ndarray] = {}

    def __call__(self, stated: dict[str, str]) -> np.ndarray:
        key = tuple(sorted(stated.items()))
        if key not in self.index:
            self.index[key] = np.array([i for i, lab in enumerate(self.labels) if W.matches(lab, stated)])
        return self.index[key]


class TextCache:
    """Text-encoder outputs (hidden states, projected embedding) per caption, computed once."""

    def __init__(self, text_encoder, captioner: Captioner) -> None:
        self.text_encoder, self.captioner = text_encoder, captioner
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def get(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        new = sorted({t for t in texts if t not in self.states})
        for i in range(0, len(new), 512):
            chunk = new[i:i + 512]
            ids = self.captioner.ids(chunk)
            out = self.text_encoder(ids)
            for j, text in enumerate(chunk):
                n = len(self.captioner.cache[text])
                self.states[text] = (out.last_hidden_state[j, :n].clone(), out.text_embeds[j].clone())
        length = max(self.states[t][0].shape[0] for t in texts)
        hidden = torch.zeros(len(texts), length, self.states[texts[0]][0].shape[1])
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, t in enumerate(texts):
            h = self.states[t][0]
            hidden[i, :len(h)], mask[i, :len(h)] = h, True
        return hidden, mask, torch.stack([self.states[t][1] for t in texts])


def prior_scheduler() -> UnCLIPScheduler:
    from diffusers import UnCLIPScheduler

    # Kandinsky 2.2's prior scheduler config (squaredcos_cap_v2, x0 prediction, clip to +-10).
    return UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                           clip_sample=True, clip_sample_range=10.0, beta_schedule="squaredcos_cap_v2")


def train_prior(cfg: Config, train: Split, embeds: torch.Tensor, texts: TextCache) -> PriorTransformer:
    from diffusers import PriorTransformer

    rng = seed_all(cfg.seed + 2)
    tf = PriorTransformer(num_attention_heads=cfg.prior_heads, attention_head_dim=cfg.prior_head_dim,
                          num_layers=cfg.prior_layers, embedding_dim=cfg.width, num_embeddings=77,
                          additional_embeddings=4)
    mean, std = embeds.mean(0), embeds.std(0)
    with torch.no_grad():
        tf.clip_mean.copy_(mean[None])
        tf.clip_std.copy_(std[None])
    target = (embeds - mean) / std
    alphas = prior_scheduler().alphas_cumprod
    params = [p for n, p in tf.named_parameters() if n not in ("clip_mean", "clip_std")]
    tf.clip_mean.requires_grad_(False)
    tf.clip_std.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.prior_lr, weight_decay=0.01)
    t0 = time.time()
    match = MatchIndex(train.scenes)
    groups, per = cfg.prior_batch // cfg.prior_repeats, cfg.prior_repeats
    for step in range(cfg.prior_steps):
        # P captions of random images; each with R images it is true of, at R noise levels.
        anchors = rng.choice(len(train.scenes), groups, replace=False)
        caps, rows = [], []
        for i in anchors:
            text, stated = W.caption(train.scenes[i], rng)
            if rng.random() < cfg.prior_uncond:
                text, stated = "", {}
            pool = match(stated) if stated else np.arange(len(train.scenes))
            caps.append(text)
            rows.append(pool[rng.integers(len(pool), size=per)])
        hidden, mask, proj = texts.get(caps)
        x0 = target[torch.from_numpy(np.stack(rows))]  # [P, R, D]
        t = torch.from_numpy(rng.integers(0, 1000, (groups, per)))
        a = alphas[t][..., None]
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = prior_forward(tf, hidden, mask, proj, xt, t)
        loss = F.mse_loss(pred, x0)
        update(opt, loss, cfg.prior_lr, step, cfg.prior_steps, clip=params)
        if step % 250 == 0 or step == cfg.prior_steps - 1:
            log(f"prior step {step}: x0 mse {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return tf.eval().requires_grad_(False)


def check_prior_forward(tf, texts: TextCache) -> float:
    """Our grouped, cut forward against diffusers' own 77-token forward; returns the max abs difference."""
    hidden, mask, proj = texts.get(["a photo of a red car", "", "a photo of a vehicle"])
    full_h = torch.zeros(3, 77, hidden.shape[2])
    full_h[:, :hidden.shape[1]] = hidden
    full_m = torch.zeros(3, 77, dtype=torch.bool)
    full_m[:, :mask.shape[1]] = mask
    gen = torch.Generator().manual_seed(0)
    lat, t = torch.randn(3, 2, tf.config.embedding_dim, generator=gen), torch.tensor([[999, 10], [500, 0], [3, 700]])
    with torch.no_grad():
        ours = prior_forward(tf, hidden, mask, proj, lat, t)
        ref = torch.stack([tf(lat[:, j], timestep=t[:, j], proj_embedding=proj, encoder_hidden_states=full_h,
                              attention_mask=full_m).predicted_image_embedding for j in range(2)], dim=1)
    return float((ours - ref).abs().max())


def save_prior(folder: Path, tf, text, vision, cfg: Config) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    to_fp16(tf).save_pretrained(folder / "prior", safe_serialization=True)
    to_fp16(text).save_pretrained(folder / "text_encoder", safe_serialization=True)
    to_fp16(vision).save_pretrained(folder / "image_encoder", safe_serialization=True)
    tf.float(), text.float(), vision.float()
    save_clip_tokenizer(folder / "tokenizer")
    # vocab.json + merges.txt define the tokenizer; the 3.5 MB tokenizer.json is a cache of them.
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    prior_scheduler().save_pretrained(folder / "scheduler")
    (folder / "image_processor").mkdir(parents=True)
    (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(clip_processor_config(cfg.res),
                                                                                     indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "KandinskyV22PriorPipeline", "prior": ["diffusers", "PriorTransformer"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "UnCLIPScheduler"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "image_processor": ["transformers", "CLIPImageProcessor"]}, indent=2))
