"""Tiny SD 1.5 / SDXL core objects (MODEL, CLIP, VAE, CLIP_VISION) built from small configs, for the SD path's tests.

Core's checkpoint detection pins SD 1.5's widths (context 768, 320 channels) and its CLIP / CLIP
vision loaders recognise only full-size layer counts, so these are built through core's own
classes instead (``shared/docs/comfyui.md`` §14): a ``comfy.supported_models.SD15`` model config
around a small UNet (so the MODEL's family is SD 1.5 exactly as for a real checkpoint), a TAESD
VAE (``comfy.sd.VAE`` picks it by its keys), ``comfy.sd.CLIP`` around an ``SD1ClipModel`` whose
``SDClipModel`` has a small dict config, and ``comfy.clip_vision.ClipVisionModel`` from a small
JSON config. SDXL (``sdxl_objects``): a ``supported_models.SDXL`` config around a small UNet with
SDXL's 2816-d ``adm`` input, and core's ``SDXLClipModel`` layout (CLIP-L + CLIP-G, the context their
concatenation, the pooled output G's 1280-d projection) with small encoders. Weights are seeded (``tiny_sdxl._randomise``); built under inference mode, as
ComfyUI's loaders run, so a test sees the tensors a real graph hands the nodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from tiny_sdxl import _randomise, vae_state_dict

LATENT_SCALE = 0.01  # TAESD's own input scale (``vae_scale``), see vae()
CONTEXT = 64  # text width = the UNet's cross-attention width
UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
            channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
            transformer_depth_middle=1, context_dim=CONTEXT, use_linear_in_transformer=False,
            use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_temporal_attention=False)
TEXT = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": CONTEXT, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 2,
        "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": CONTEXT, "torch_dtype": "float32",
        "vocab_size": 49408}
VISION = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_channels": 3, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu",
          "layer_norm_eps": 1e-5, "projection_dim": 32,
          "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


# CLIP-G: core's text projection is hidden x hidden, and SDXL's adm reads a 1280-d pooled output, so G keeps
# its real width (with 3 layers: core's penultimate-layer option needs more than 2).
SDXL_G = dict(hidden_size=1280, num_attention_heads=20, num_hidden_layers=3, projection_dim=1280)
SDXL_UNET = dict(UNET, context_dim=CONTEXT + SDXL_G["hidden_size"], use_linear_in_transformer=True, adm_in_channels=2816,
                 num_classes="sequential", model_channels=64)  # SDXL's config pins 64-channel heads


def model(seed: int = 0, family=None, unet: dict | None = None):
    """A MODEL (``ModelPatcher``) whose ``model_config`` is ``family`` (default ``supported_models.SD15``)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = (family or comfy.supported_models.SD15)(dict(unet or UNET))
    config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        skeleton = UNetModel(**{k: v for k, v in config.unet_config.items() if k != "disable_unet_model_creation"})
    sd = {f"model.diffusion_model.{k}": v.float() for k, v in _randomise(skeleton, seed).items()}
    base = config.get_model(sd, "model.diffusion_model.", device=mm.unet_offload_device())
    base.load_model_weights(sd, "model.diffusion_model.")
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def vae(seed: int = 0):
    import comfy.sd

    sd = {k[len("first_stage_model."):]: v.float() for k, v in vae_state_dict(seed).items()}
    # A random UNet's renders are latents of std ~100; TAESD's decoder starts with tanh(x / 3) * 3, so
    # without this scale nearly every value would saturate (no gradient, near-binary images).
    sd["vae_scale"] = torch.tensor(LATENT_SCALE)
    return comfy.sd.VAE(sd=sd)


def clip(seed: int = 0):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": dict(TEXT)}
    out = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    out.cond_stage_model.load_state_dict(_randomise(out.cond_stage_model, seed + 1), strict=False)
    return out


def sdxl_clip(seed: int = 0):
    """A CLIP in core's SDXL layout (``SDXLTokenizer``, ``SDXLClipModel``) with two small encoders."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    class SmallSDXLClip(comfy.sdxl_clip.SDXLClipModel):
        """Core's SDXL text model with small CLIP-L / CLIP-G configs (core's own are fixed full-size)."""

        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, textmodel_json_config=dict(TEXT, num_hidden_layers=3),
                                                     model_options={**model_options, "model_name": "clip_l"})
            self.clip_g = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=dict(TEXT, **SDXL_G), return_projected_pooled=True,
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
                model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    out = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, SmallSDXLClip),
                        model_options={"dtype": torch.float32})
    out.cond_stage_model.load_state_dict(_randomise(out.cond_stage_model, seed + 1), strict=False)
    return out


def clip_vision(tmp: Path, seed: int = 0, config: dict | None = None):
    """A CLIP_VISION (``ClipVisionModel``) from a small JSON config written under ``tmp``."""
    import comfy.clip_vision

    path = Path(tmp) / f"clip_vision_{seed}_{(config or VISION)['projection_dim']}.json"
    path.write_text(json.dumps(config or VISION))
    out = comfy.clip_vision.ClipVisionModel(str(path))
    out.load_sd({k: v.float() for k, v in _randomise(out.model, seed + 2).items()})
    return out


def objects(tmp: Path, seed: int = 0) -> SimpleNamespace:
    """``.model``, ``.clip``, ``.vae``, ``.clip_vision``: one tiny SD 1.5 set, built under inference mode."""
    with torch.inference_mode():
        return SimpleNamespace(model=model(seed), clip=clip(seed), vae=vae(seed), clip_vision=clip_vision(tmp, seed))


def sdxl_objects(tmp: Path, seed: int = 0) -> SimpleNamespace:
    """The same set in SDXL form (``supported_models.SDXL``), built under inference mode."""
    import comfy.supported_models

    with torch.inference_mode():
        return SimpleNamespace(model=model(seed, comfy.supported_models.SDXL, SDXL_UNET), clip=sdxl_clip(seed),
                               vae=vae(seed), clip_vision=clip_vision(tmp, seed))
