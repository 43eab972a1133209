"""Tiny random checkpoints that ComfyUI detects as SDXL or SD 2.1 unCLIP (L or H), for tests.

Built from ComfyUI's own classes (``UNetModel`` from ``comfy.ldm...openaimodel`` and the SD
``AutoencoderKL``) with the keys a real single-file checkpoint has (``model.diffusion_model.*``
+ ``first_stage_model.*``) and **no text encoder**: tests build CONDITIONING by hand
(:func:`sdxl_conditioning`, :func:`sd21_conditioning`). Detection goes through core's
``model_detection`` exactly as for a downloaded file, so what a test loads is a real
``model_base.SDXL`` / ``model_base.SD21UNCLIP`` with its CLIP-embedding noise augmentor.

What detection pins, and what we shrink (see ``comfy/supported_models.py``):

* SDXL: ``model_channels=320, context_dim=2048, adm_in_channels=2816``, linear transformers and
  input transformer depths ``[0, 0, 2, 2, 10, 10]`` (six input res blocks). Free, so tiny: every
  level stays at 320 channels (``channel_mult=[1, 1, 1]``), no transformers on the output side
  or in the middle. About 80 M parameters; a 64 px image is an 8x8 latent, so a step is cheap.
* SD 2.1 unCLIP-L/H: ``model_channels=320, context_dim=1024``, linear transformers,
  ``adm_in_channels`` 1536 (L, 768-d image embeddings) or 2048 (H, 1024-d); one level, one block.
* VAE: a TAESD (``taesd_encoder.*`` / ``taesd_decoder.*`` keys, which ``comfy.sd.VAE`` picks
  by its keys; TAESDXL has the same layout): 2.4 M parameters instead of the fixed 84 M of the
  SD/SDXL ``AutoencoderKL``. Same 4 latent channels and 8x scale, so nothing else changes.

Weights are seeded random (never committed; build at test time). Needs ComfyUI importable
(``comfy_harness.import_comfy()`` first).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0] * 9,
    transformer_depth_middle=-1, context_dim=2048, adm_in_channels=2816, num_classes="sequential",
    use_linear_in_transformer=True, use_spatial_transformer=True, num_head_channels=64, legacy=False,
)
SD21_UNCLIP_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-1, context_dim=1024,
    num_classes="sequential", use_linear_in_transformer=True, use_spatial_transformer=True, num_head_channels=64,
    legacy=False,
)
UNCLIP_ADM = {"L": 1536, "H": 2048}  # adm_in_channels = 2 x image-embedding width (embedding + noise level)

_VAE_CACHE: dict[int, dict[str, torch.Tensor]] = {}


def _randomise(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded fp16 weights, uniform with std 1/sqrt(fan-in) (core's layers skip init; uniform
    fp16 is several times faster to draw than normal fp32), norms at 1, biases at 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        t = torch.empty(p.shape, dtype=torch.float16)
        if p.ndim >= 2 and p.numel():  # (an empty tensor has nothing to draw)
            bound = math.sqrt(3.0 / p[0].numel())
            t.uniform_(-bound, bound, generator=g)
        elif name.endswith("weight"):  # 1-d weights are norm scales (GroupNorm, LayerNorm)
            t.fill_(1.0)
        else:
            t.zero_()
        out[name] = t
    return out


def unet_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**config)
    return {UNET_PREFIX + k: v for k, v in _randomise(unet, seed).items()}


def vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random TAESD (core builds its convs without init, like the UNet's layers)."""
    if seed not in _VAE_CACHE:
        from comfy.taesd.taesd import TAESD

        with torch.device("meta"):
            vae = TAESD(latent_channels=4)
        sd = _randomise(vae, seed)
        sd["vae_scale"], sd["vae_shift"] = torch.ones((), dtype=torch.float16), torch.zeros((), dtype=torch.float16)
        _VAE_CACHE[seed] = {VAE_PREFIX + k: v for k, v in sd.items()}
    return dict(_VAE_CACHE[seed])


@functools.lru_cache(maxsize=1)
def _sdxl_state_dict(seed: int) -> dict[str, torch.Tensor]:
    return {**unet_state_dict(SDXL_UNET, seed), **vae_state_dict(seed)}


def sdxl_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A full single-file SDXL-layout checkpoint (UNet + VAE, no text encoders); built once per
    seed and process (in-process tests and the server's checkpoint file share it)."""
    return dict(_sdxl_state_dict(seed))


def sd21_unclip_state_dict(variant: str = "L", seed: int = 0) -> dict[str, torch.Tensor]:
    """A single-file SD 2.1 unCLIP-L (768-d) or -H (1024-d) layout checkpoint, no text/vision encoder."""
    return {**unet_state_dict(dict(SD21_UNCLIP_UNET, adm_in_channels=UNCLIP_ADM[variant]), seed),
            **vae_state_dict(seed)}


def load(state_dict: dict[str, torch.Tensor]):
    """``(MODEL, VAE)`` through core's own checkpoint detection (what CheckpointLoaderSimple runs)."""
    import comfy.sd

    out = comfy.sd.load_state_dict_guess_config(dict(state_dict), output_vae=True, output_clip=False)
    return out[0], out[2]


def save(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def sdxl_conditioning(batch: int = 1, seed: int = 1) -> list:
    """Hand-made SDXL CONDITIONING (what CLIPTextEncode with CLIP-L + bigG would give): 2048-d
    context and a 1280-d pooled output, plus the size keys SDXL's ``encode_adm`` reads."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, 2048, generator=g) * 0.1,
             {"pooled_output": torch.randn(batch, 1280, generator=g) * 0.1, "width": 64, "height": 64}]]


def sd21_conditioning(batch: int = 1, seed: int = 1) -> list:
    """Hand-made SD 2.x CONDITIONING (OpenCLIP-H text: 1024-d context)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, 1024, generator=g) * 0.1, {"pooled_output": torch.randn(batch, 1024, generator=g)}]]


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - manual helper
    """``python tests/comfy/tiny_sdxl.py OUT_DIR``: write tiny_sdxl.safetensors and tiny_sd21_unclip_l.safetensors."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfy_harness

    comfy_harness.import_comfy()
    out = Path((argv or sys.argv[1:] or ["."])[0])
    save(sdxl_state_dict(), out / "tiny_sdxl.safetensors")
    save(sd21_unclip_state_dict("L"), out / "tiny_sd21_unclip_l.safetensors")


if __name__ == "__main__":  # pragma: no cover
    main()
