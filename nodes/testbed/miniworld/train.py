"""Train every mini-world model from the world alone, seeded, and save them in real model layouts.

    python nodes/testbed/run.py train --out models/miniworld

Stages (each seeded on its own, so ``--from-stage`` reproduces a full run's later stages):

1. ``clip``    a small CLIP (transformers ``CLIPModel``: ViT image tower, text tower over the real
               CLIP BPE tokenizer), contrastive with multi-positive targets (a caption is a positive
               for every image in the batch it is true of, using the ground-truth labels).
2. ``prior``   a ``PriorTransformer`` diffusion prior text -> CLIP image embedding (x0 prediction,
               ``clip_mean``/``clip_std`` from the data, 10 % empty prompts for guidance), saved with
               the CLIP towers, tokenizer and ``UnCLIPScheduler`` as a Kandinsky 2.2 prior folder.
3. ``decoder`` a ``VQModel`` (movq) autoencoder and a ``UNet2DConditionModel`` with Kandinsky 2.2's
               image-embedding conditioning (x0 prediction, DDIM), as a Kandinsky 2.2 decoder folder.
4. ``mllm``    a tiny LLaVA-NeXT (vision tower initialised from the mini CLIP's) answering "Is this
               (still) a {kind/category}? Yes or No." and "Is this image {colour}? Yes or No."; each
               image is asked with a true and a false subject, plus a captioning loss on the subject.
5. ``judge``   the independent CNN classifier (:mod:`.judge`), from ground-truth labels only.
6. ``eval``    accuracies on held-out world images, through the real loaders; a table is printed
               and written to ``metrics.json``.

Everything runs on the CPU in one thread (see ``Config.threads``). Weights are stored in float16
(the loaders upcast). The CLIP token table keeps only the rows of
tokens the world's captions use; all other rows are zero (an unseen word adds nothing), which
also lets git compress the 49,408-row table to almost nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world as W

STAGES = ("clip", "prior", "decoder", "mllm", "judge", "eval")
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as real Kandinsky folders use
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


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


def to_fp16(module: torch.nn.Module) -> torch.nn.Module:
    return module.to(torch.float16)


# ------------------------------------------------------------------------------------------ data

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


def make_split(n: int, seed: int, res: int) -> Split:
    from ...engine.prior import preprocess_images

    scenes = W.sample_scenes(n, seed)
    pixels = W.draw_many(scenes)
    x = torch.cat([preprocess_images(W.to_image_tensor(pixels[i:i + 2000]), res, IMAGE_MEAN, IMAGE_STD)
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


# ------------------------------------------------------------------------------------------ CLIP

def clip_configs(cfg: Config):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=49408, hidden_size=cfg.width, intermediate_size=2 * cfg.width,
                          num_hidden_layers=cfg.clip_layers, num_attention_heads=4, max_position_embeddings=77,
                          projection_dim=cfg.width, bos_token_id=49406, eos_token_id=2, pad_token_id=1,
                          hidden_act="gelu")
    vision = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=2 * cfg.width,
                              num_hidden_layers=cfg.clip_layers, num_attention_heads=4, image_size=cfg.res,
                              patch_size=cfg.clip_patch, projection_dim=cfg.width, hidden_act="gelu")
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.width), text, vision


def train_clip(cfg: Config, train: Split, captioner: Captioner, out: Path):
    from transformers import CLIPModel

    rng = seed_all(cfg.seed + 1)
    config, text_cfg, vision_cfg = clip_configs(cfg)
    model = CLIPModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    used: set[int] = set()
    t0 = time.time()
    for step in range(cfg.clip_steps):
        idx = rng.choice(len(train.scenes), cfg.clip_batch, replace=False)
        texts, match = captioner.sample([train.scenes[i] for i in idx], rng)
        ids = captioner.ids(texts)
        used.update(ids.unique().tolist())
        img = model.get_image_features(pixel_values=train.x[idx]).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
        logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T * model.logit_scale.exp().clamp(max=100)
        m = match.float()
        loss = 0.5 * (-(logits.log_softmax(1) * m / m.sum(1, keepdim=True)).sum(1).mean()
                      - (logits.log_softmax(0) * m / m.sum(0, keepdim=True)).sum(0).mean())
        cosine_lr(opt, cfg.clip_lr, step, cfg.clip_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.clip_steps - 1:
            log(f"clip step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    # Every caption the world can produce, so no row a world caption uses is zeroed.
    for scene in W.sample_scenes(3000, cfg.seed + 99):
        for t in range(len(W.TEMPLATES)):
            used.update(captioner.ids([W.caption(scene, rng, t)[0]])[0].tolist())
    used.update(captioner.ids([""])[0].tolist())
    with torch.no_grad():
        table = model.text_model.embeddings.token_embedding.weight
        keep = torch.zeros(table.shape[0], dtype=torch.bool)
        keep[sorted(used)] = True
        table[~keep] = 0.0
    log(f"clip: {int(keep.sum())} token rows used and kept, the other {int((~keep).sum())} zeroed")
    return model.eval().requires_grad_(False), text_cfg, vision_cfg


def split_clip(model, text_cfg, vision_cfg):
    """CLIPModel -> (CLIPTextModelWithProjection, CLIPVisionModelWithProjection) sharing its weights."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    state = model.state_dict()
    text = CLIPTextModelWithProjection(text_cfg)
    text.load_state_dict({k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection."))})
    vision = CLIPVisionModelWithProjection(vision_cfg)
    vision.load_state_dict({k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))})
    return text.eval().requires_grad_(False), vision.eval().requires_grad_(False)


@torch.no_grad()
def image_embeds(vision, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([vision(pixel_values=x[i:i + batch]).image_embeds for i in range(0, len(x), batch)]).float()


# ------------------------------------------------------------------------------------------ prior

def prior_forward(tf, hidden: torch.Tensor, mask: torch.Tensor, text_embeds: torch.Tensor, latents: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
    """``PriorTransformer.forward`` for P prompts with R noisy latents each, sharing the prompt's work.

    ``hidden [P, L, W]``, ``mask [P, L]``, ``text_embeds [P, W]``, ``latents [P, R, D]``, ``t [P, R]``
    -> x0 predictions ``[P, R, D]``. The prior is causal with the text first, so the prompt positions
    never see the latent; they are run once per prompt, and each latent's three positions (timestep,
    latent, readout) attend to them (the sampler in ``engine/sampling.py`` uses the same identity).
    Text is cut at the longest prompt: padding is masked out of every query, so this is exact;
    :func:`check_prior_forward` compares it with diffusers' own forward.
    """
    p, length = mask.shape
    r = latents.shape[1]
    n_text = tf.config.num_embeddings
    pos = tf.positional_embedding[0]
    time_emb = tf.time_embedding(tf.time_proj(t.reshape(-1)).to(latents.dtype)).view(p, r, -1)
    xp = torch.cat([tf.encoder_hidden_states_proj(hidden) + pos[:length],
                    (tf.embedding_proj(text_embeds) + pos[n_text])[:, None]], dim=1)  # [P, S, C]
    xt = torch.stack([time_emb + pos[n_text + 1], tf.proj_in(latents) + pos[n_text + 2],
                      (tf.prd_embedding[0, 0] + pos[n_text + 3]).expand(p, r, -1)], dim=2)  # [P, R, 3, C]
    s = length + 1
    key_bias = torch.cat([(~mask).float() * -10000.0, torch.zeros(p, 1)], dim=1)  # [P, S]
    causal_p = torch.full((s, s), -10000.0).triu(1)
    causal_t = torch.full((3, 3), -10000.0).triu(1)
    heads = tf.config.num_attention_heads
    for block in tf.transformer_blocks:
        attn = block.attn1
        hp, ht = block.norm1(xp), block.norm1(xt)
        qp, kp, vp = (f(hp).view(p, s, heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        qt, kt, vt = (f(ht).view(p, r, 3, heads, -1).transpose(2, 3) for f in (attn.to_q, attn.to_k, attn.to_v))
        probs = torch.softmax(qp @ kp.transpose(-1, -2) * attn.scale + key_bias[:, None, None] + causal_p, dim=-1)
        op = (probs @ vp).transpose(1, 2).reshape(p, s, -1)
        s_prefix = torch.einsum("prhqd,phsd->prhqs", qt, kp) * attn.scale + key_bias[:, None, None, None]
        s_self = qt @ kt.transpose(-1, -2) * attn.scale + causal_t
        probs = torch.softmax(torch.cat([s_prefix, s_self], dim=-1), dim=-1)
        ot = torch.einsum("prhqs,phsd->prhqd", probs[..., :s], vp) + probs[..., s:] @ vt
        ot = ot.transpose(2, 3).reshape(p, r, 3, -1)
        xp = xp + attn.to_out[1](attn.to_out[0](op))
        xt = xt + attn.to_out[1](attn.to_out[0](ot))
        xp = xp + block.ff(block.norm3(xp))
        xt = xt + block.ff(block.norm3(xt))
    return tf.proj_to_clip_embeddings(tf.norm_out(xt[:, :, -1]))


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


def prior_scheduler():
    from diffusers import UnCLIPScheduler

    # Kandinsky 2.2's prior scheduler config (squaredcos_cap_v2, x0 prediction, clip to +-10).
    return UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                           clip_sample=True, clip_sample_range=10.0, beta_schedule="squaredcos_cap_v2")


def train_prior(cfg: Config, train: Split, embeds: torch.Tensor, texts: TextCache):
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
        cosine_lr(opt, cfg.prior_lr, step, cfg.prior_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
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
    from ..tiny.tokenizer import save_clip_tokenizer

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
    (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": cfg.res, "width": cfg.res},
         "size": {"shortest_edge": cfg.res}, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
         "do_resize": True, "do_center_crop": True, "do_normalize": True, "resample": 3}, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "KandinskyV22PriorPipeline", "prior": ["diffusers", "PriorTransformer"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "UnCLIPScheduler"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "image_processor": ["transformers", "CLIPImageProcessor"]}, indent=2))


# ------------------------------------------------------------------------------------------ decoder

# movq: 32 px images <-> 8x8x4 latents (3 blocks, factor 4). Group norm rather than Kandinsky's
# spatial norm, whose hard-coded 32 groups would force 32+ channels at full resolution.
MOVQ = {"block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"], "in_channels": 3,
        "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "norm_type": "group",
        "num_vq_embeddings": 256, "vq_embed_dim": 4, "sample_size": 32}
UNET = {"in_channels": 4, "out_channels": 8, "sample_size": 8,
        "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "block_out_channels": (32, 64), "layers_per_block": 1,
        "attention_head_dim": 16, "resnet_time_scale_shift": "scale_shift", "class_embed_type": None,
        "addition_embed_type": "image", "encoder_hid_dim_type": "image_proj", "norm_num_groups": 16}
# Kandinsky 2.2's betas (linear 0.00085..0.012); x0 prediction and DDIM so that ~10 steps render.
DECODER_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085,
                    "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                    "prediction_type": "sample", "timestep_spacing": "trailing"}


def pixels_pm1(split: Split, idx, res: int) -> torch.Tensor:
    """The split's images at ``res`` in -1..1 (the movq's range), resized as the CLIP path resizes."""
    x = split.images(idx).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(res, res), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return x * 2 - 1


def train_movq(cfg: Config, train: Split):
    from diffusers import VQModel

    rng = seed_all(cfg.seed + 3)
    movq = VQModel(**MOVQ)
    opt = torch.optim.AdamW(movq.parameters(), lr=cfg.movq_lr, weight_decay=0.0)
    target_all = pixels_pm1(train, slice(None), cfg.res)
    t0 = time.time()
    for step in range(cfg.movq_steps):
        idx = rng.choice(len(train.scenes), cfg.movq_batch, replace=False)
        x = target_all[idx]
        h = movq.encode(x).latents
        rec = movq.decode(h, force_not_quantize=True).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 0.01 * (h.pow(2).mean() - 1).pow(2)
        cosine_lr(opt, cfg.movq_lr, step, cfg.movq_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == cfg.movq_steps - 1:
            log(f"movq step {step}: loss {loss.item():.4f} latent rms {h.pow(2).mean().sqrt().item():.2f} "
                f"({time.time() - t0:.0f} s)")
    movq.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([movq.encode(target_all[i:i + 500]).latents for i in range(0, len(target_all), 500)])
        # Codebook = k-means of the latent vectors, so the quantised path decodes sensibly too
        # (Kandinsky 2.2 rendering itself decodes without quantising).
        from sklearn.cluster import KMeans

        vecs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        sub = vecs[torch.from_numpy(rng.choice(len(vecs), min(len(vecs), 20000), replace=False))].numpy()
        km = KMeans(n_clusters=MOVQ["num_vq_embeddings"], n_init=1, max_iter=20, random_state=cfg.seed).fit(sub)
        movq.quantize.embedding.weight.copy_(torch.from_numpy(km.cluster_centers_).float())
    return movq, latents


def decoder_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**DECODER_SCHEDULE)


def train_unet(cfg: Config, latents: torch.Tensor, embeds: torch.Tensor, zero_embed: torch.Tensor):
    from diffusers import UNet2DConditionModel

    rng = seed_all(cfg.seed + 4)
    unet = UNet2DConditionModel(**UNET, encoder_hid_dim=cfg.width, cross_attention_dim=cfg.width)
    alphas = decoder_scheduler().alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(cfg.unet_steps):
        idx = rng.choice(len(latents), cfg.unet_batch, replace=False)
        x0, emb = latents[idx], embeds[idx].clone()
        drop = torch.from_numpy(rng.random(len(idx)) < cfg.unet_uncond)
        # The unconditional branch: Kandinsky's zero-image embedding, or zeros (the renderer's default).
        zero_like = torch.where(torch.from_numpy(rng.random(len(idx)) < 0.5)[:, None], zero_embed, torch.zeros_like(zero_embed))
        emb[drop] = zero_like[drop]
        t = torch.from_numpy(rng.integers(0, 1000, len(idx)))
        a = alphas[t][:, None, None, None]
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = unet(xt, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample
        pred, extra = out.split(x0.shape[1], dim=1)
        loss = F.mse_loss(pred, x0) + 0.01 * extra.pow(2).mean()  # the variance channels: unused, kept at zero
        cosine_lr(opt, cfg.unet_lr, step, cfg.unet_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step}: x0 mse {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return unet.eval().requires_grad_(False)


def save_decoder(folder: Path, unet, movq) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    to_fp16(unet).save_pretrained(folder / "unet", safe_serialization=True)
    to_fp16(movq).save_pretrained(folder / "movq", safe_serialization=True)
    unet.float(), movq.float()
    decoder_scheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "movq": ["diffusers", "VQModel"]}, indent=2))


# ------------------------------------------------------------------------------------------ MLLM

MLLM_WORDS = ("Is", "this", "still", "a", "an", "image", "?", "Yes", "yes", "No", "no", "or", ".", ",", ":",
              "USER", "ASSISTANT", *W.KINDS, *W.CATEGORIES, *W.COLOURS)
MLLM_QUESTIONS = ("Is this {a} {w}? Yes or No.", "Is this still {a} {w}? Yes or No.")
PROBE_QUESTION = "Is this image {c}? Yes or No."


def mllm_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ("<s>", "</s>", "<pad>", "<image>")
    vocab = {token: i for i, token in enumerate(("[UNK]", *specials, *MLLM_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def build_mllm(cfg: Config, vision_cfg, vision_state: dict):
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from ..tiny.mllm import LLAVA_NEXT_TEMPLATE

    tokenizer = mllm_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    pinpoints = [[cfg.res, cfg.res]]
    vision_dict = {k: v for k, v in vision_cfg.to_dict().items() if k not in ("dtype", "torch_dtype")}
    config = LlavaNextConfig(
        vision_config=vision_dict,
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.mllm_hidden,
                                intermediate_size=2 * cfg.mllm_hidden,
                                num_hidden_layers=cfg.mllm_layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>")).to_dict(),
        image_token_index=ids("<image>"), image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": cfg.res}, crop_size={"height": cfg.res, "width": cfg.res},
        image_grid_pinpoints=pinpoints, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.clip_patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_TEMPLATE)
    model = LlavaNextForConditionalGeneration(config).float()
    missing = model.model.vision_tower.load_state_dict(
        {k.removeprefix("vision_model."): v for k, v in vision_state.items() if k.startswith("vision_model.")},
        strict=False)
    assert not missing.unexpected_keys and not missing.missing_keys, missing
    return model, processor


def plain_colour_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    names = list(W.COLOURS)
    picks = [names[int(rng.integers(len(names)))] for _ in range(n)]
    px = np.stack([np.full((64, 64, 3), W._jitter(W.COLOURS[c], rng, 20), dtype=np.uint8) for c in picks])
    return px, picks


def mllm_prompt_ids(processor, image, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")["input_ids"][0]


def train_mllm(cfg: Config, train: Split, model, processor):
    from PIL import Image, ImageFilter

    rng = seed_all(cfg.seed + 5)
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    n_img = min(cfg.mllm_images, len(train.scenes))
    idx_img = rng.choice(len(train.scenes), n_img, replace=False)
    probe_px, probe_colour = plain_colour_images(n_img // 5, rng)
    pixels = np.concatenate([train.pixels[idx_img], probe_px])
    scenes = [train.scenes[i] for i in idx_img] + [None] * len(probe_px)
    t0 = time.time()
    # A third of the scenes blurred, as decoded images are: the gate judges renders.
    images = [Image.fromarray(p) for p in pixels]
    for i in range(n_img):
        if rng.random() < 0.33:
            images[i] = images[i].filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    pv = processor.image_processor(images, return_tensors="pt")
    pixel_values, image_sizes = pv["pixel_values"], pv["image_sizes"]
    log(f"mllm: {len(pixels)} images preprocessed ({time.time() - t0:.0f} s), "
        f"{len(mllm_prompt_ids(processor, Image.fromarray(pixels[0]), 'Is this a car? Yes or No.'))} tokens a question")
    prompt_cache: dict[str, torch.Tensor] = {}
    probe = Image.fromarray(pixels[0])

    def prompt(q: str) -> torch.Tensor:
        if q not in prompt_cache:
            prompt_cache[q] = mllm_prompt_ids(processor, probe, q)
        return prompt_cache[q]

    words = list(W.KINDS) + list(W.CATEGORIES)
    # The vision tower starts as the mini CLIP's and is fine-tuned too (at mllm_vision_lr_scale x the rate).
    vision_ids = {id(p) for p in model.model.vision_tower.parameters()}
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in vision_ids], "scale": 1.0},
                             {"params": [p for p in params if id(p) in vision_ids], "scale": cfg.mllm_vision_lr_scale}],
                            lr=cfg.mllm_lr, weight_decay=0.01)
    model.train()
    for step in range(cfg.mllm_steps):
        # Every image is asked twice, once with a true and once with a false subject, so the image
        # alone never predicts the answer: the model has to read the question (it otherwise settles
        # on "does this look like a typical picture" and ignores the word).
        still = rng.random() < 0.5
        half = rng.choice(len(pixels), cfg.mllm_batch // 2, replace=False)
        idx, questions, answers = [], [], []
        for i in half:
            scene = scenes[i]
            if scene is None:
                true_c = probe_colour[i - n_img]
                false_c = [c for c in W.COLOURS if c != true_c][int(rng.integers(len(W.COLOURS) - 1))]
                if not still:
                    pair = [PROBE_QUESTION.format(c=true_c), PROBE_QUESTION.format(c=false_c)]
                else:  # a plain colour is no kind or category at all
                    w = words[int(rng.integers(len(words)))]
                    pair = [None, MLLM_QUESTIONS[1].format(a=W.article(w), w=w)]
            else:
                true_w = scene.kind if rng.random() < 0.7 else scene.category
                false_w = [w for w in words if w not in (scene.kind, scene.category)][int(rng.integers(len(words) - 2))]
                pair = [MLLM_QUESTIONS[int(still)].format(a=W.article(w) if rng.random() < 0.7 else "a", w=w)
                        for w in (true_w, false_w)]
            for question, answer in zip(pair, (True, False)):
                if question is not None:
                    idx.append(i)
                    questions.append(question)
                    answers.append(answer)
        idx = np.array(idx)
        ids = torch.stack([prompt(q) for q in questions])
        # Questions end "... {subject} ? Yes or No . ASSISTANT :", so the subject is the 8th token from
        # the end. Besides the answer, the model learns to predict a *true* subject from the token
        # before it (a captioning loss on the same sequences): it then holds "what I see" as a word
        # right where the question states one, and the yes/no compares the two.
        assert all(int(row[-8]) == tok.convert_tokens_to_ids(q.split()[-4].rstrip("?")) for row, q in
                   zip(ids[:2], questions[:2]))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values[idx],
                    image_sizes=image_sizes[idx], logits_to_keep=9).logits
        logits = out[:, -1]
        target = torch.tensor([yes if a else no for a in answers])
        true_rows = torch.tensor(answers)
        loss = F.cross_entropy(logits, target) + F.cross_entropy(out[true_rows, 0], ids[true_rows, -8])
        cosine_lr(opt, cfg.mllm_lr, step, cfg.mllm_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.mllm_steps - 1:
            acc = ((logits[:, yes] > logits[:, no]) == torch.tensor(answers)).float().mean()
            log(f"mllm step {step}: loss {loss.item():.3f} batch acc {acc:.2f} ({time.time() - t0:.0f} s)")
    return model.eval().requires_grad_(False)


def save_mllm(folder: Path, model, processor) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    to_fp16(model).save_pretrained(folder, safe_serialization=True)
    model.float()
    processor.save_pretrained(folder)


# ------------------------------------------------------------------------------------------ judge

def train_judge(cfg: Config, split: Split):
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
        cosine_lr(opt, 2e-3, step, cfg.judge_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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


# ------------------------------------------------------------------------------------------ eval

def evaluate(cfg: Config, out: Path, test: Split) -> dict:
    from ...engine.mllm import load_mllm
    from ...engine.prior import load_prior
    from ...engine.render import load_decoder
    from ...engine.sampling import sample_embeddings
    from .judge import load_judge

    metrics: dict[str, dict] = {}
    prior = load_prior(str(out / "prior"))
    judge = load_judge(out / "judge")
    truth = [s.labels() for s in test.scenes]
    # CLIP zero-shot: nearest caption embedding.
    with torch.no_grad():
        img = F.normalize(prior.encode_images(test.images()), dim=-1)
        kind_txt = F.normalize(prior.encode_prompt([f"a photo of {W.article(k)} {k}" for k in W.KINDS]).text_embeds, dim=-1)
        kind_pred = (img @ kind_txt.T).argmax(1).numpy()
        colour_acc, bg_acc = [], []
        for i, s in enumerate(test.scenes):
            if i >= 300:
                break
            col = F.normalize(prior.encode_prompt([W.caption_for({"kind": s.kind, "colour": c}, 2)
                                                   for c in W.COLOURS]).text_embeds, dim=-1)
            colour_acc.append(list(W.COLOURS)[int((img[i] @ col.T).argmax())] == s.colour)
            bg = F.normalize(prior.encode_prompt([W.caption_for({"kind": s.kind, "background": b}, 4)
                                                  for b in W.BACKGROUNDS]).text_embeds, dim=-1)
            bg_acc.append(W.BACKGROUNDS[int((img[i] @ bg.T).argmax())] == s.background)
        cat_txt = F.normalize(prior.encode_prompt([f"a photo of {W.article(c)} {c}" for c in W.CATEGORIES]).text_embeds, dim=-1)
        cat_pred = (img @ cat_txt.T).argmax(1).numpy()
    metrics["clip_zero_shot"] = {
        "kind": float((kind_pred == test.labels["kind"]).mean()),
        "category": float((cat_pred == test.labels["category"]).mean()),
        "colour_given_kind": float(np.mean(colour_acc)), "background_given_kind": float(np.mean(bg_acc)),
        "n": len(test.scenes)}
    # Prior: sampled embeddings (5 steps, guidance 4, the paper's settings) classified by nearest text.
    correct, colour_ok, n = 0, 0, 0
    samples_by_kind = {}
    for k in W.KINDS:
        e = F.normalize(sample_embeddings(prior, f"a photo of {W.article(k)} {k}", cfg.eval_prior_samples,
                                          steps=5, guidance=4.0, seed=cfg.seed), dim=-1)
        samples_by_kind[k] = e
        correct += int(((e @ kind_txt.T).argmax(1) == W.KINDS.index(k)).sum())
        n += len(e)
    for k in ("car", "boat", "flower"):
        col = F.normalize(prior.encode_prompt([W.caption_for({"kind": k, "colour": c}, 2) for c in W.COLOURS]).text_embeds, dim=-1)
        for ci, c in enumerate(W.COLOURS):
            e = F.normalize(sample_embeddings(prior, W.caption_for({"kind": k, "colour": c}, 2), 20, steps=5,
                                              guidance=4.0, seed=cfg.seed), dim=-1)
            colour_ok += int(((e @ col.T).argmax(1) == ci).sum())
    metrics["prior"] = {"kind": correct / n, "colour_given_kind": colour_ok / (3 * len(W.COLOURS) * 20),
                        "samples_per_prompt": cfg.eval_prior_samples, "steps": 5, "guidance": 4.0}
    # Decoder: render embeddings of held-out images; the judge reads the renders.
    decoder = load_decoder(out / "decoder")
    zero = prior.zero_image_embed()
    idx = np.arange(cfg.eval_render)
    with torch.no_grad():
        emb = prior.encode_images(test.images(idx))
    renders = decoder.render(emb, negative_embeds=zero, seed=cfg.seed, steps=cfg.render_steps,
                             guidance=cfg.render_guidance, height=cfg.res, width=cfg.res)
    acc = judge.accuracy(renders, [truth[i] for i in idx])
    metrics["decoder"] = {**{f"judge_{k}": v for k, v in acc.items()}, "n": len(idx), "steps": cfg.render_steps,
                          "guidance": cfg.render_guidance, "size": cfg.res}
    # End to end: prior samples for "a photo of a {kind}" rendered and judged.
    e2e = torch.cat([sample_embeddings(prior, f"a photo of {W.article(k)} {k}", 10, steps=5, guidance=4.0,
                                       seed=cfg.seed + 1) for k in W.KINDS])
    e2e_img = decoder.render(e2e, negative_embeds=zero, seed=cfg.seed, steps=cfg.render_steps,
                             guidance=cfg.render_guidance, height=cfg.res, width=cfg.res)
    e2e_pred = judge.predict(e2e_img)
    metrics["text_to_image"] = {"judge_kind": float(np.mean([p["kind"] == W.KINDS[i // 10] for i, p in enumerate(e2e_pred)])),
                                "n": len(e2e_pred)}
    W.contact_sheet((renders.numpy() * 255).round().astype(np.uint8)[:48], columns=8, scale=2).save(out / "renders.png")
    W.contact_sheet((e2e_img.numpy() * 255).round().astype(np.uint8), columns=10, scale=2).save(out / "text_to_image.png")
    # MLLM through the real judge path.
    mllm = load_mllm(str(out / "mllm"))
    rng = np.random.default_rng(cfg.seed + 7)
    hits, hits_render, n_q = 0, 0, cfg.eval_mllm
    for q in range(n_q):
        i = q % len(test.scenes)
        s = test.scenes[i]
        w = [s.kind, s.category, W.KINDS[int(rng.integers(len(W.KINDS)))], W.CATEGORIES[int(rng.integers(4))]][q % 4]
        question = f"Is this still {W.article(w)} {w}? Yes or No." if q % 2 else f"Is this {W.article(w)} {w}? Yes or No."
        truth_yes = w in (s.kind, s.category)
        hits += int((float(mllm.p_yes(test.images([i]), question)[0]) > 0.5) == truth_yes)
        if i < len(renders):
            hits_render += int((float(mllm.p_yes(renders[i:i + 1], question)[0]) > 0.5) == truth_yes)
    vision = mllm.check_vision()
    metrics["mllm"] = {"yes_no": hits / n_q, "yes_no_on_renders": hits_render / min(n_q, len(renders)),
                       "n": n_q, "vision_check_passed": bool(vision.sees)}
    # Judge on held-out (clean) world images.
    metrics["judge"] = {**judge.accuracy(test.images(), truth), "n": len(test.scenes)}
    return metrics


def metrics_table(metrics: dict) -> str:
    """The accuracies as a Markdown table."""
    rows = [("CLIP zero-shot kind (9-way)", metrics["clip_zero_shot"]["kind"]),
            ("CLIP zero-shot category (4-way)", metrics["clip_zero_shot"]["category"]),
            ("CLIP zero-shot colour given kind (8-way)", metrics["clip_zero_shot"]["colour_given_kind"]),
            ("CLIP zero-shot background given kind (5-way)", metrics["clip_zero_shot"]["background_given_kind"]),
            ("prior samples -> nearest kind text", metrics["prior"]["kind"]),
            ("prior samples -> nearest colour text given kind", metrics["prior"]["colour_given_kind"]),
            ("decoder renders of image embeds: judge kind", metrics["decoder"]["judge_kind"]),
            ("decoder renders of image embeds: judge colour", metrics["decoder"]["judge_colour"]),
            ("text -> prior -> decoder: judge kind", metrics["text_to_image"]["judge_kind"]),
            ("MLLM yes/no (world images)", metrics["mllm"]["yes_no"]),
            ("MLLM yes/no (decoder renders)", metrics["mllm"]["yes_no_on_renders"]),
            ("judge kind (held-out images)", metrics["judge"]["kind"]),
            ("judge colour", metrics["judge"]["colour"]),
            ("judge background", metrics["judge"]["background"]),
            ("judge size", metrics["judge"]["size"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'metric'.ljust(width)} | accuracy |", f"|{'-' * (width + 2)}|---------:|"]
    lines += [f"| {name.ljust(width)} | {value:8.3f} |" for name, value in rows]
    check = "passed" if metrics["mllm"]["vision_check_passed"] else "FAILED"
    lines += ["", f"MLLM vision check (plain red/blue images, `MLLMJudge.check_vision`): {check}"]
    return "\n".join(lines)


README = """# Mini-world models

Small models trained only on the procedural mini world (`nodes/testbed/miniworld/world.py`), so the
whole creative pipeline runs offline, on a CPU, with no downloaded weights. Made by

    python nodes/testbed/run.py train --out models/miniworld

(seeded; {wall:.0f} s on a shared 2-core CPU; see `metrics.json` for the configuration and stage times).

| folder | what | loads with |
|---|---|---|
| `prior/` | Kandinsky 2.2 prior layout: `PriorTransformer` (x0 prediction, `clip_mean`/`clip_std` from the data), mini CLIP text tower (`text_encoder/`, real CLIP BPE `tokenizer/`) and vision tower (`image_encoder/`), `UnCLIPScheduler` | `nodes.engine.prior.load_prior` |
| `decoder/` | Kandinsky 2.2 decoder layout: `UNet2DConditionModel` (image-embedding conditioning, x0 prediction), `VQModel` movq (32 px <-> 8x8x4), `DDIMScheduler`; render at {size} px, {steps} steps, guidance {guidance} | `nodes.engine.render.load_decoder` |
| `mllm/` | tiny LLaVA-NeXT (vision tower initialised from the mini CLIP's) answering yes/no questions | `nodes.engine.mllm.load_mllm` |
| `judge/` | independent CNN classifier of kind / colour / background / size, for evaluation only | `nodes.testbed.miniworld.judge.load_judge` |

Embeddings are {width}-d (use PCA dims < {width}). Weights are float16; the loaders upcast. Only the
CLIP token-table rows of words the world's captions use are non-zero.

## Accuracy on held-out world images

{table}

Licences: weights are this project's own (same licence as the code); the CLIP BPE vocabulary in
`prior/tokenizer/` is OpenAI's (MIT, see `nodes/testbed/tiny/CLIP_BPE_LICENSE`).
"""


def print_table(metrics: dict) -> None:
    print(metrics_table(metrics))


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="models/miniworld", help="output folder")
    parser.add_argument("--from-stage", default="clip", choices=STAGES,
                        help="skip earlier stages, reloading their saved outputs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a Config field")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = type(getattr(Config, key))(value)
    cfg = Config(**overrides)
    torch.set_num_threads(cfg.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = STAGES.index(args.from_stage)
    t_start = time.time()
    load_start = list(os.getloadavg())  # the CPU is shared: record how busy it was
    timings: dict[str, float] = {}

    def stage_done(name: str, t: float) -> None:
        timings[name] = round(time.time() - t, 1)
        log(f"stage {name} done in {timings[name]:.0f} s")

    t = time.time()
    train = make_split(cfg.n_train, cfg.seed + 100, cfg.res)
    test = make_split(cfg.n_test, cfg.seed + 200, cfg.res)
    stage_done("data", t)

    from transformers import CLIPTokenizer

    from ...engine.prior import load_prior

    if start <= STAGES.index("clip"):
        t = time.time()
        from ..tiny.tokenizer import save_clip_tokenizer

        tok_dir = out / ".tokenizer"
        save_clip_tokenizer(tok_dir)
        captioner = Captioner(CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True))
        shutil.rmtree(tok_dir)
        model, text_cfg, vision_cfg = train_clip(cfg, train, captioner, out)
        text, vision = split_clip(model, text_cfg, vision_cfg)
        stage_done("clip", t)
    else:
        loaded = load_prior(str(out / "prior"))
        text, vision = loaded.text_encoder, loaded.image_encoder
        captioner = Captioner(loaded.tokenizer)
        text_cfg, vision_cfg = text.config, vision.config

    embeds = image_embeds(vision, train.x)
    texts = TextCache(text, captioner)
    if start <= STAGES.index("prior"):
        t = time.time()
        tf = train_prior(cfg, train, embeds, texts)
        diff = check_prior_forward(tf, texts)
        log(f"prior: training forward vs diffusers forward max |diff| = {diff:.2e}")
        assert diff < 1e-3, diff
        save_prior(out / "prior", tf, text, vision, cfg)
        stage_done("prior", t)
    prior = load_prior(str(out / "prior"))
    if start <= STAGES.index("decoder"):
        t = time.time()
        movq, latents = train_movq(cfg, train)
        stage_done("movq", t)
        t = time.time()
        unet = train_unet(cfg, latents, embeds, prior.zero_image_embed())
        save_decoder(out / "decoder", unet, movq)
        stage_done("unet", t)
    if start <= STAGES.index("mllm"):
        t = time.time()
        state = {k: v.float() for k, v in vision.state_dict().items()}
        model, processor = build_mllm(cfg, vision_cfg, state)
        model = train_mllm(cfg, train, model, processor)
        save_mllm(out / "mllm", model, processor)
        stage_done("mllm", t)
    if start <= STAGES.index("judge"):
        t = time.time()
        from .judge import save_judge

        judge_split = make_split(cfg.n_judge, cfg.seed + 300, cfg.res)
        net = train_judge(cfg, judge_split)
        save_judge(net, {k: list(W.VOCAB[k]) for k in W.LABEL_KEYS}, out / "judge", width=cfg.judge_width,
                   input_size=cfg.res, extra={"trained_on": f"world scenes seed {cfg.seed + 300}, n={cfg.n_judge}",
                                              "use": "evaluation only; never used by the optimiser"})
        stage_done("judge", t)
    t = time.time()
    metrics = evaluate(cfg, out, test)
    stage_done("eval", t)
    metrics["config"] = asdict(cfg)
    metrics["timings_s"] = timings
    metrics["wall_s"] = round(time.time() - t_start, 1)
    metrics["torch"] = torch.__version__
    metrics["from_stage"] = args.from_stage
    metrics["load_average_start_end"] = [load_start, list(os.getloadavg())]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(README.format(
        wall=metrics["wall_s"], size=cfg.res, steps=cfg.render_steps, guidance=cfg.render_guidance, width=cfg.width,
        table=metrics_table(metrics)))
    print_table(metrics)
    log(f"total {metrics['wall_s']:.0f} s; models in {out}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
