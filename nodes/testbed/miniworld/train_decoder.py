"""Stage 3 of the mini world: a ``VQModel`` (movq) autoencoder and a ``UNet2DConditionModel`` with
Kandinsky 2.2's image-embedding conditioning (x0 prediction, DDIM), saved as a Kandinsky 2.2 decoder folder."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .train_setup import Config, Split, log, seed_all, to_fp16, update

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

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


def train_movq(cfg: Config, train: Split) -> tuple[VQModel, torch.Tensor]:
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
        update(opt, loss, cfg.movq_lr, step, cfg.movq_steps)
        if step % 200 == 0 or step == cfg.movq_steps - 1:
            log(f"movq step {step}: loss {loss.item():.4f} latent rms {h.pow(2).mean().sqrt().item():.2f} "
                f"({time.time() - t0:.0f} s)")
    movq.eval().requires_grad_(False)
    latents = encode_latents(movq, target_all)
    with torch.no_grad():
        # Codebook = k-means of the latent vectors, so the quantised path decodes sensibly too
        # (Kandinsky 2.2 rendering itself decodes without quantising).
        from sklearn.cluster import KMeans

        vecs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        sub = vecs[torch.from_numpy(rng.choice(len(vecs), min(len(vecs), 20000), replace=False))].numpy()
        km = KMeans(n_clusters=MOVQ["num_vq_embeddings"], n_init=1, max_iter=20, random_state=cfg.seed).fit(sub)
        movq.quantize.embedding.weight.copy_(torch.from_numpy(km.cluster_centers_).float())
    return movq, latents


def render_embeds(prior, decoder, embeds: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The decoder's renders of image embeddings at the settings it was trained for (``cfg``'s render steps,
    guidance and size, the prior's zero image embedding as the negative)."""
    return decoder.render(embeds, negative_embeds=prior.zero_image_embed(), seed=cfg.seed, steps=cfg.render_steps,
                          guidance=cfg.render_guidance, height=cfg.res, width=cfg.res)


def encode_latents(movq, x: torch.Tensor) -> torch.Tensor:
    """The movq's latents of images ``x`` in -1..1, 500 at a time."""
    with torch.no_grad():
        return torch.cat([movq.encode(x[i:i + 500]).latents for i in range(0, len(x), 500)])


def decoder_scheduler() -> DDIMScheduler:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**DECODER_SCHEDULE)


def train_unet(cfg: Config, latents: torch.Tensor, embeds: torch.Tensor,
               zero_embed: torch.Tensor) -> UNet2DConditionModel:
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
        zero_like = torch.where(torch.from_numpy(rng.random(len(idx)) < 0.5)[:, None], zero_embed,
                                torch.zeros_like(zero_embed))
        emb[drop] = zero_like[drop]
        t = torch.from_numpy(rng.integers(0, 1000, len(idx)))
        a = alphas[t][:, None, None, None]
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = unet(xt, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample
        pred, extra = out.split(x0.shape[1], dim=1)
        loss = F.mse_loss(pred, x0) + 0.01 * extra.pow(2).mean()  # the variance channels: unused, kept at zero
        update(opt, loss, cfg.unet_lr, step, cfg.unet_steps, clip=unet.parameters())
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


def train_balanced_decoder(cfg: Config, out: Path) -> None:
    """The world's decoder UNet trained again (same movq, same recipe) on scenes whose colour and background are
    independent of the kind, saved as ``out/decoder_balanced``: a decoder that draws what an embedding holds, as a
    decoder trained on the web draws a purple bus, while the prior keeps the world's frequencies (so a purple bus
    stays rare under the norm). The world's decoder saw a boat on grass about 17 times (10,000 scenes / 9 kinds x 1.5 %)."""
    from diffusers import VQModel

    from ...engine.prior import load_prior
    from .train_clip import image_embeds
    from .train_setup import make_split

    prior = load_prior(str(out / "prior"))
    movq = VQModel.from_pretrained(out / "decoder" / "movq", local_files_only=True).float().eval().requires_grad_(False)
    split = make_split(cfg.n_train, cfg.seed + 700, cfg.res, uniform=True)
    latents = encode_latents(movq, pixels_pm1(split, slice(None), cfg.res))
    with torch.no_grad():
        embeds = image_embeds(prior.image_encoder, split.x)
    unet = train_unet(cfg, latents, embeds, prior.zero_image_embed())
    save_decoder(out / "decoder_balanced", unet, movq)
