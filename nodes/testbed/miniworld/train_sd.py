"""Stage ``sd`` of the mini world: the world in Stable Diffusion 1.5 form (``models/miniworld/sd/``).

    python nodes/testbed/run.py train --out models/miniworld --stages sd

Reuses the trained mini CLIP (``prior/text_encoder``, ``prior/image_encoder``) as the text encoder
and the CLIP vision encoder, and trains with ComfyUI's own classes (so ComfyUI must be importable:
``COMFYUI_DIR`` or the repository's ``.comfyui``):

1. a VAE: core ``AutoencoderKL`` with a small config (64 px <-> 8x8x4, SD's 8x factor; 64 channels
   at full resolution and next to the latent, where its output norms sit, so that no GroupNorm(32)
   there has one channel per group, i.e. is an instance norm that removes each channel's mean),
   trained on 32 px crops (it is convolutional; full images every 8th step), then rescaled so its latents
   have SD 1.5's spread (``std = 1 / 0.18215``) and the UNet sees unit-variance latents;
2. a UNet: core ``openaimodel.UNetModel`` in an SD 1.5 ``BaseModel`` (epsilon prediction, SD 1.5's
   noise schedule), conditioned on the text encoder's last hidden state exactly as core
   ``CLIPTextEncode`` makes it. Trained through ``BaseModel.apply_model`` (the function core's
   samplers call) on the denoised output with v-style weighting ``1 + 1/sigma^2``, and half the
   noise levels drawn from the few-step schedules' timesteps (999, 749, 666, 499, 333, 249), so
   1-4 step euler / lcm renders work. 10 % empty prompts (classifier-free guidance).

Everything is then loaded back through the shipped loader (:func:`nodes.miniworld_sd.load_miniworld_sd`)
and measured with core's sampler: the independent judge's kind accuracy on text -> image renders
per sampler / steps / cfg, the VAE's reconstructions, and CLIP vision through core vs transformers.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world as W
from .train_setup import Config, log, seed_all, update

REPO = Path(__file__).resolve().parents[3]
RES = 64  # render size: the world's native size; 8x8 latents
LATENT_SCALE = 0.18215  # SD 1.5's latent_format scale factor (core applies it in process_latent_in)
VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": RES, "in_channels": 3,
                                    "out_ch": 3, "ch": 32, "ch_mult": [2, 1, 1, 2], "num_res_blocks": 1,
                                    "attn_resolutions": [], "dropout": 0.0}}
# SD 1.5's UNet layout (spatial transformers, 8 heads, no adm), as small as trains here: 32/64
# channels, text cross-attention at the 4x4 level and in the middle; context_dim = the text width.
UNET = {"image_size": RES // 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
        "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "adm_in_channels": None,
        "use_temporal_attention": False, "use_spatial_transformer": True, "legacy": False, "num_classes": None,
        "use_checkpoint": False}
FEW_STEP_T = (999, 749, 666, 499, 333, 249)  # the timesteps of core's simple scheduler at 1-4 steps
RENDER_SETTINGS = ((("euler", "simple"), (1, 2, 4), (1.0,)), (("lcm", "sgm_uniform"), (1, 2, 4), (1.0,)),
                   (("euler", "simple"), (4,), (2.0,)), (("lcm", "sgm_uniform"), (4,), (2.0,)))
RECOMMENDED = {"sampler": "euler", "scheduler": "simple", "steps": 4, "cfg": 2.0}  # best measured (sd/metrics.json)


def import_comfy() -> None:
    """Put ComfyUI on ``sys.path`` (``COMFYUI_DIR`` or the repository's ``.comfyui``), on the CPU."""
    root = Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()
    if not (root / "comfy").is_dir():
        raise SystemExit(f"stage sd needs ComfyUI: no {root}/comfy (set COMFYUI_DIR)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401


def init_weights(module: torch.nn.Module) -> None:
    """Core's layers skip initialisation (they expect loaded weights): initialise as torch would."""
    for m in module.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
                break


def text_config(hf_config) -> dict:
    """The mini CLIP text tower's config in the form ``comfy.sd1_clip.SDClipModel`` reads."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
            "hidden_act", "vocab_size", "layer_norm_eps", "projection_dim")
    return {**{k: getattr(hf_config, k) for k in keys}, "model_type": "clip_text_model", "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 49407}


def vision_config(hf_config) -> dict:
    """The vision tower's config in the form ``comfy.clip_vision.ClipVisionModel`` reads."""
    from ...engine.prior import CLIP_MEAN, CLIP_STD

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
            "image_size", "patch_size", "num_channels", "projection_dim", "layer_norm_eps")
    return {**{k: getattr(hf_config, k) for k in keys}, "model_type": "clip_vision_model",
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}


def pixels_pm1(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(cfg: Config, pixels: np.ndarray):
    """Core ``AutoencoderKL`` (small config), trained on crops; returns it rescaled to SD 1.5's latent spread."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    rng = seed_all(cfg.seed + 7)
    vae = AutoencoderKL(**copy.deepcopy(VAE))
    init_weights(vae)
    x_all = pixels_pm1(pixels)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.sd_vae_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(cfg.sd_vae_steps):
        x = x_all[rng.choice(len(x_all), cfg.sd_vae_batch, replace=False)]
        if step % 8 != 7:  # a 32 px crop on the 8 px latent grid
            oy, ox = (int(v) * 8 for v in rng.integers(0, (RES - 32) // 8 + 1, 2))
            x = x[..., oy:oy + 32, ox:ox + 32]
        mean = vae.quant_conv(vae.encoder(x))[:, :VAE["embed_dim"]]
        rec = vae.decode(mean)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 0.01 * (mean.pow(2).mean() - 1).pow(2)
        update(opt, loss, cfg.sd_vae_lr, step, cfg.sd_vae_steps, clip=vae.parameters())
        if step % 100 == 0 or step == cfg.sd_vae_steps - 1:
            log(f"sd vae step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        spread = encode(vae, x_all[:512]).std().item()
        k = (1.0 / LATENT_SCALE) / spread  # encoder mean * k, decoder input / k: the same autoencoder
        vae.quant_conv.weight[:VAE["embed_dim"]] *= k
        vae.quant_conv.bias[:VAE["embed_dim"]] *= k
        vae.post_quant_conv.weight /= k
    log(f"sd vae: latent std {spread:.3f} rescaled by {k:.3f} to {1 / LATENT_SCALE:.3f}")
    return vae


@torch.no_grad()
def encode(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Deterministic latents (the posterior mode, as core's VAE.encode returns)."""
    return torch.cat([vae.encode(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def text_table(clip, texts: list[str], batch: int = 256) -> torch.Tensor:
    """Cross-attention context ``[len(texts), 77, width]`` exactly as core ``CLIPTextEncode`` makes it
    (batched through the same encoder; checked against ``encode_from_tokens`` on a few texts)."""
    encoder = clip.cond_stage_model.clip_l
    ids = [[t for t, _ in clip.tokenize(text)["l"][0]] for text in texts]
    table = torch.cat([encoder(ids[i:i + batch])[0].float() for i in range(0, len(ids), batch)])
    for i in range(0, len(texts), max(1, len(texts) // 3)):
        ref = clip.encode_from_tokens(clip.tokenize(texts[i])).float()
        diff = (ref[0] - table[i]).abs().max().item()
        assert ref.shape[1] == table.shape[1] and diff < 1e-4, (texts[i], diff)
    return table


def train_unet(cfg: Config, model, latents: torch.Tensor, context: torch.Tensor, caption_ids: np.ndarray,
               empty_id: int) -> dict[str, torch.Tensor]:
    """Train ``model`` (core SD 1.5 ``BaseModel``) in place; returns the EMA weights of its UNet."""
    import comfy.ldm.modules.attention as attention

    rng = seed_all(cfg.seed + 8)
    unet = model.diffusion_model
    init_weights(unet)
    with torch.no_grad():
        unet.out[-1].weight.zero_()  # SD's zero-initialised output conv
        unet.out[-1].bias.zero_()
    unet.train().requires_grad_(True)
    sigmas = model.model_sampling.sigmas.float()
    x0_all = model.process_latent_in(latents)  # * 0.18215: unit-variance latents, as core samples them
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.sd_unet_lr, weight_decay=0.0)
    few = torch.tensor(FEW_STEP_T)
    default_attention = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch  # core picks sub-quadratic on CPU: 3x slower here
    t0 = time.time()
    try:
        for step in range(cfg.sd_unet_steps):
            idx = rng.choice(len(x0_all), cfg.sd_unet_batch, replace=False)
            pick = caption_ids[idx, rng.integers(0, caption_ids.shape[1], len(idx))]
            pick[rng.random(len(idx)) < cfg.sd_uncond] = empty_id
            ctx = context[torch.from_numpy(pick)]
            t = torch.from_numpy(rng.integers(0, 1000, len(idx)))
            use_few = torch.from_numpy(rng.random(len(idx)) < 0.5)
            t = torch.where(use_few, few[torch.from_numpy(rng.integers(0, len(few), len(idx)))], t)
            sigma = sigmas[t]
            x0 = x0_all[idx]
            noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
            denoised = model.apply_model(x0 + sigma[:, None, None, None] * noise, sigma, c_crossattn=ctx)
            loss = ((denoised - x0).pow(2).mean(dim=(1, 2, 3)) * (1 + sigma.pow(-2))).mean()
            update(opt, loss, cfg.sd_unet_lr, step, cfg.sd_unet_steps, clip=unet.parameters())
            with torch.no_grad():
                decay = min(cfg.sd_ema, (1 + step) / (10 + step))
                for k, v in unet.state_dict().items():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            if step % 200 == 0 or step == cfg.sd_unet_steps - 1:
                log(f"sd unet step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    finally:
        attention.optimized_attention = default_attention
    unet.eval().requires_grad_(False)
    return ema


def save_sd(folder: Path, unet_sd: dict, vae, text_sd: dict, vision_sd: dict, configs: dict) -> None:
    from safetensors.torch import save_file

    from ...miniworld_sd import CONFIG, FILES, UNET_PREFIX, VISION_CONFIG

    folder.mkdir(parents=True, exist_ok=True)

    def fp16(sd: dict) -> dict:
        return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()
                if not k.endswith("position_ids")}

    save_file(fp16({UNET_PREFIX + k: v for k, v in unet_sd.items()}), str(folder / FILES["unet"]))
    save_file(fp16(vae.state_dict()), str(folder / FILES["vae"]))
    save_file(fp16(text_sd), str(folder / FILES["text_encoder"]))
    save_file(fp16(vision_sd), str(folder / FILES["clip_vision"]))
    (folder / VISION_CONFIG).write_text(json.dumps(configs["clip_vision"], indent=2) + "\n")
    (folder / CONFIG).write_text(json.dumps(configs, indent=2) + "\n")


def render(sd, prompt: str, n: int, seed: int, sampler: str, scheduler: str, steps: int, cfg: float) -> torch.Tensor:
    """Text -> IMAGE through core: CLIPTextEncode's conditioning, common_ksampler's sampling, VAEDecode."""
    import comfy.sample

    def cond(text: str) -> list:
        c, pooled = sd.clip.encode_from_tokens(sd.clip.tokenize(text), return_pooled=True)
        return [[c, {"pooled_output": pooled}]]

    latent = torch.zeros(n, 4, RES // 8, RES // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(sd.model, noise, steps, cfg, sampler, scheduler, cond(prompt), cond(""), latent,
                                  denoise=1.0, seed=seed, disable_pbar=True)
    return sd.vae.decode(samples)


@torch.no_grad()
def measure_sd(cfg: Config, out: Path, test_pixels: np.ndarray, test_scenes: list) -> dict:
    """Accuracies of the saved bundle, loaded through the shipped loader and rendered with core's sampler."""
    from ...miniworld_sd import load_miniworld_sd
    from ...engine.prior import load_prior
    from .judge import load_judge

    sd = load_miniworld_sd(out / "sd")
    judge = load_judge(out / "judge")
    metrics: dict = {"renders": [], "n_per_kind": cfg.sd_eval_per_kind, "size": RES}
    truth = [k for k in W.KINDS for _ in range(cfg.sd_eval_per_kind)]
    sheet = None
    for (sampler, scheduler), steps_list, cfgs in RENDER_SETTINGS:
        for steps in steps_list:
            for guidance in cfgs:
                t = time.time()
                images = torch.cat([render(sd, W.caption_for({"kind": kind}, 1), cfg.sd_eval_per_kind, 1000 + i,
                                           sampler, scheduler, steps, guidance) for i, kind in enumerate(W.KINDS)])
                acc = float(np.mean([p["kind"] == k for p, k in zip(judge.predict(images), truth)]))
                metrics["renders"].append({"sampler": sampler, "scheduler": scheduler, "steps": steps,
                                           "cfg": guidance, "judge_kind": acc, "seconds": round(time.time() - t, 1)})
                log(f"sd render {sampler}/{scheduler} {steps} steps cfg {guidance}: judge kind {acc:.3f}")
                if {"sampler": sampler, "scheduler": scheduler, "steps": steps, "cfg": guidance} == RECOMMENDED:
                    sheet = images
    pixels = (sheet.clamp(0, 1) * 255).round().byte().numpy()
    W.contact_sheet(pixels, columns=cfg.sd_eval_per_kind, scale=2).save(out / "sd" / "renders.png")
    # The VAE alone: reconstructions of held-out world images, judged.
    images = W.to_image_tensor(test_pixels)
    rec = sd.vae.decode(sd.vae.encode(images))
    labels = [s.labels() for s in test_scenes]
    metrics["vae_reconstruction"] = {k: v for k, v in judge.accuracy(rec, labels).items()}
    metrics["vae_reconstruction"]["mse"] = F.mse_loss(rec, images).item()
    # CLIP vision through core vs the trained transformers tower; zero-shot kind through core objects.
    vision = load_prior(str(out / "prior")).image_encoder
    from ...engine.prior import CLIP_MEAN, CLIP_STD, preprocess_images

    ref = vision(pixel_values=preprocess_images(images, vision.config.image_size, CLIP_MEAN, CLIP_STD)).image_embeds
    core = sd.clip_vision.encode_image(images)["image_embeds"].float()
    texts = torch.cat([sd.clip.encode_from_tokens(sd.clip.tokenize(W.caption_for({"kind": k}, 1)),
                                                  return_pooled=True)[1].float() for k in W.KINDS])
    pred = (F.normalize(core, dim=-1) @ F.normalize(texts, dim=-1).T).argmax(-1)
    kinds = torch.tensor([W.KINDS.index(s.kind) for s in test_scenes])
    metrics["clip_vision"] = {"width": int(core.shape[-1]),
                              "cosine_core_vs_transformers": F.cosine_similarity(core, ref).min().item(),
                              "zero_shot_kind_core_objects": (pred == kinds).float().mean().item()}
    metrics["recommended"] = RECOMMENDED
    return metrics


def train_sd(cfg: Config, out: Path) -> dict:
    """Train, save and measure the SD bundle in ``out / 'sd'``; returns its metrics (also in sd/metrics.json)."""
    import_comfy()
    from ...engine.prior import load_prior
    from ...miniworld_sd import build_clip, build_model
    from .train_setup import make_split

    t_start = time.time()
    timings: dict[str, float] = {}
    loaded = load_prior(str(out / "prior"))
    text_hf, vision_hf = loaded.text_encoder, loaded.image_encoder
    configs = {"format": "miniworld-sd/1", "family": "SD15", "resolution": RES, "latent_scale": LATENT_SCALE,
               "unet": {**UNET, "context_dim": text_hf.config.hidden_size}, "vae": VAE, "text_encoder": text_config(text_hf.config),
               "clip_vision": vision_config(vision_hf.config), "recommended": RECOMMENDED}
    text_sd = {k: v.float() for k, v in text_hf.state_dict().items()}
    vision_sd = {k: v.float() for k, v in vision_hf.state_dict().items()}

    t = time.time()
    data = make_split(cfg.sd_images, cfg.seed + 400, cfg.res)
    vae = train_vae(cfg, data.pixels)
    timings["vae"] = round(time.time() - t, 1)

    t = time.time()
    latents = encode(vae, pixels_pm1(data.pixels))
    clip = build_clip(text_sd, configs["text_encoder"], torch.float32)
    rng = seed_all(cfg.seed + 9)
    captions = [[W.caption(s, rng)[0] for _ in range(cfg.sd_captions)] for s in data.scenes]
    texts = sorted({c for row in captions for c in row} | {""})
    index = {text: i for i, text in enumerate(texts)}
    context = text_table(clip, texts)
    caption_ids = np.array([[index[c] for c in row] for row in captions])
    timings["latents_and_text"] = round(time.time() - t, 1)
    log(f"sd: {len(latents)} latents, {len(texts)} distinct captions encoded ({timings['latents_and_text']:.0f} s)")

    t = time.time()
    model = build_model(None, configs["unet"], torch.float32).model
    unet_sd = train_unet(cfg, model, latents, context, caption_ids, index[""])
    timings["unet"] = round(time.time() - t, 1)
    save_sd(out / "sd", unet_sd, vae, text_sd, vision_sd, configs)
    timings["train_total"] = round(time.time() - t_start, 1)

    t = time.time()
    test = make_split(cfg.sd_eval_test, cfg.seed + 200, cfg.res)
    metrics = measure_sd(cfg, out, test.pixels, test.scenes)
    timings["eval"] = round(time.time() - t, 1)
    metrics.update(timings_s=timings, wall_s=round(time.time() - t_start, 1), torch=torch.__version__,
                   load_average=list(os.getloadavg()),
                   config={k: v for k, v in vars(cfg).items() if k.startswith("sd_") or k in ("seed", "threads")})
    (out / "sd" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"sd: done in {metrics['wall_s']:.0f} s (training {timings['train_total']:.0f} s)")
    return metrics
