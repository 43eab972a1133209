"""Tiny random checkpoints that ComfyUI's own loaders detect as real model families.

Built at test time from ComfyUI's own classes (``comfy.ldm``), seeded, saved as fp16
safetensors; never committed. Needs ComfyUI importable in this process
(:func:`comfy_harness.import_comfy`). Recipe: ``shared/docs/comfyui.md`` §12.

``build_tiny_sd21_unclip_l`` makes a checkpoint that ``load_checkpoint_guess_config`` (so
core ``unCLIPCheckpointLoader`` and ``CheckpointLoaderSimple``) detects as
``SD21UnclipL`` / ``model_base.SD21UNCLIP``, i.e. what SD 2.1 unCLIP-L
(``stabilityai/stable-diffusion-2-1-unclip-small``, 768-d image embeddings) loads as:

* UNet: detection pins ``model_channels=320, context_dim=1024, adm_in_channels=1536`` (768-d
  image embedding + 768-d noise-level embedding), a linear transformer and 64-channel heads;
  everything else is as small as the key-based detection allows: one level
  (``channel_mult=[1]``), one res block, one transformer block per side, none in the middle.
* VAE: a TAESD (``taesd_encoder.*`` / ``taesd_decoder.*`` keys), which ``comfy.sd.VAE`` picks
  by its keys; 2.4 M params instead of the SD VAE's 84 M. Same 4 latent channels, 8x scale.
* No text encoder and no CLIP vision tower: the loader returns ``CLIP = None`` (so
  ``CLIPTextEncode`` cannot run on it; tests hand-build CONDITIONING instead) and
  ``CLIP_VISION = None`` (our prior supplies the image embeddings).
"""

from __future__ import annotations

import time
from pathlib import Path

SD21_UNCLIP_L_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-1,
    context_dim=1024, use_linear_in_transformer=True, num_head_channels=64, num_heads=-1, use_spatial_transformer=True,
    adm_in_channels=1536, num_classes="sequential", use_checkpoint=False, legacy=False)

UNCLIP_L_EMBED_DIM = 768  # width of the image embeddings SD 2.1 unCLIP-L takes (CLIP ViT-L/14)


def build_tiny_sd21_unclip_l(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD 2.1 unCLIP-L checkpoint (fp16 safetensors) to ``path`` and return it."""
    import torch

    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sd = {}
    with torch.inference_mode(False), torch.no_grad():
        unet = UNetModel(**SD21_UNCLIP_L_UNET, dtype=torch.float32)
        for k, v in unet.state_dict().items():
            sd[f"model.diffusion_model.{k}"] = v.to(torch.float16).contiguous()
        vae = TAESD(latent_channels=4)
        for k, v in vae.state_dict().items():
            sd[f"first_stage_model.{k}"] = v.to(torch.float16).contiguous()
    tmp = path.with_name(path.name + f".{time.monotonic_ns()}.tmp")
    comfy.utils.save_torch_file(sd, str(tmp))
    tmp.replace(path)  # atomic: a half-written checkpoint is never visible under its name
    return path
