"""The mini world in Stable Diffusion 1.5 form, handed to the graph as ComfyUI's own objects.

``models/miniworld/sd/`` holds a small SD-1.5-family model set trained on the procedural mini
world (``python nodes/testbed/run.py train --out models/miniworld --stages sd``): a UNet, a VAE,
the mini CLIP's text tower and its vision tower. Core's checkpoint detection only recognises
full-size models (a 768-wide CLIP-L text encoder, CLIP vision by layer count), so this module
builds the core objects from the bundled small configs itself, with core's own classes:

* MODEL: ``comfy.model_patcher.ModelPatcher`` over ``comfy.model_base.BaseModel`` whose config is
  ``comfy.supported_models.SD15`` (epsilon prediction, SD 1.5's noise schedule and latent scale);
* CLIP: ``comfy.sd.CLIP`` around ``comfy.sd1_clip.SD1ClipModel`` with a small text config (core's
  own CLIP BPE tokenizer; token ids identical to the mini CLIP's);
* VAE: ``comfy.sd.VAE`` built from a small ``AutoencoderKL`` config (8x downscale, 4 channels);
* CLIP_VISION: ``comfy.clip_vision.ClipVisionModel`` from the bundled JSON config.

Everything after :func:`load_miniworld_sd` is the path a user's real SD 1.5 checkpoint takes
(``CLIPTextEncode``, ``KSampler``, ``VAEDecode``, ``CLIPVisionEncode``, ``LoraLoader``).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch
from comfy_api.latest import io

from . import sockets as s

SD_DIR = Path(__file__).resolve().parents[1] / "models" / "miniworld" / "sd"
CONFIG = "config.json"
FILES = {"unet": "unet.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors",
         "clip_vision": "clip_vision.safetensors"}
VISION_CONFIG = "clip_vision_config.json"  # what comfy.clip_vision.ClipVisionModel reads
UNET_PREFIX = "model.diffusion_model."  # the keys of a single-file SD checkpoint's UNet
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MiniWorldSD(NamedTuple):
    """The four core objects, plus the bundle's config (resolution, recommended render settings)."""

    model: object  # comfy.model_patcher.ModelPatcher
    clip: object  # comfy.sd.CLIP
    vae: object  # comfy.sd.VAE
    clip_vision: object  # comfy.clip_vision.ClipVisionModel
    config: dict


def read_config(folder: str | Path = SD_DIR) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no mini-world SD bundle (missing {CONFIG}); rebuild it with "
                                "`python nodes/testbed/run.py train --out models/miniworld --stages sd`")
    return json.loads(path.read_text())


def _checked(result, what: str) -> None:
    """Refuse a partial load: missing weights would stay uninitialised (core's layers skip init)."""
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"mini-world SD {what}: {len(missing)} weights missing from the bundle, e.g. {missing[:3]}")


def build_model(unet_sd: dict[str, torch.Tensor] | None, unet_config: dict, dtype: torch.dtype | None = None):
    """MODEL: an SD 1.5 ``BaseModel`` (core ``SD15`` config) over a UNet of ``unet_config``.

    ``unet_sd`` (keys ``model.diffusion_model.*``) of None leaves the weights uninitialised (for
    training, which initialises them itself)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    model_config = comfy.supported_models.SD15(dict(unet_config))
    load_device = mm.get_torch_device()
    if dtype is None:
        params = comfy.utils.calculate_parameters(unet_sd or {}, UNET_PREFIX)
        dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(model_config.supported_inference_dtypes))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                 model_config.supported_inference_dtypes))
    model = model_config.get_model({}, "")
    if unet_sd is not None:
        sd = {k[len(UNET_PREFIX):]: v for k, v in unet_sd.items() if k.startswith(UNET_PREFIX)}
        _checked(model.diffusion_model.load_state_dict(model_config.process_unet_state_dict(sd), strict=False), "UNet")
    model = model.to(mm.unet_offload_device())
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def build_clip(te_sd: dict[str, torch.Tensor], text_config: dict, dtype: torch.dtype | None = None):
    """CLIP: ``comfy.sd.CLIP`` over core's SD1 text-encoder classes with a small config.

    The pooled output is the text tower's *projected* embedding (the CLIP joint space that
    CLIP_VISION's ``image_embeds`` live in); token embeddings for ``embedding:name`` have the
    text width."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.utils
    import folder_paths

    width = int(text_config["hidden_size"])
    encoder = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=copy.deepcopy(text_config),
                                return_projected_pooled=True)
    tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer,
                                  tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=width))
    target = comfy.supported_models_base.ClipTarget(tokenizer, functools.partial(comfy.sd1_clip.SD1ClipModel,
                                                                                 clip_model=encoder))
    options = {} if dtype is None else {"dtype": dtype}
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         parameters=comfy.utils.calculate_parameters(te_sd), model_options=options)
    missing, unexpected = clip.load_sd(te_sd)
    _checked(type("R", (), {"missing_keys": missing})(), "text encoder")
    return clip


def build_vae(vae_sd: dict[str, torch.Tensor], vae_config: dict, dtype: torch.dtype | None = None):
    """VAE: ``comfy.sd.VAE`` with a small ``AutoencoderKL`` config (``{"embed_dim", "ddconfig"}``)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        expected = set(AutoencoderKL(**copy.deepcopy(vae_config)).state_dict())
    missing = sorted(expected - set(vae_sd))
    if missing:
        raise ValueError(f"mini-world SD VAE: {len(missing)} weights missing from the bundle, e.g. {missing[:3]}")
    return comfy.sd.VAE(sd=dict(vae_sd), config={"params": copy.deepcopy(vae_config)}, dtype=dtype)


def build_clip_vision(cv_sd: dict[str, torch.Tensor], config_path: str | Path):
    """CLIP_VISION: ``comfy.clip_vision.ClipVisionModel`` from a JSON config of any size."""
    import comfy.clip_vision

    clip_vision = comfy.clip_vision.ClipVisionModel(str(config_path))
    _checked(clip_vision.load_sd(cv_sd), "CLIP vision")
    return clip_vision


def load_miniworld_sd(folder: str | Path = SD_DIR, dtype: str = "auto") -> MiniWorldSD:
    """The bundled mini-world SD 1.5 set as core objects ``(model, clip, vae, clip_vision, config)``.

    ``dtype`` ("auto", "fp32", "bf16", "fp16") is the UNet's weight dtype; "auto" lets core choose
    (fp32 on a CPU)."""
    import comfy.utils

    folder = Path(folder)
    config = read_config(folder)
    load = {name: comfy.utils.load_torch_file(str(folder / file), safe_load=True) for name, file in FILES.items()}
    unet_dtype = DTYPES.get(dtype)
    return MiniWorldSD(model=build_model(load["unet"], config["unet"], unet_dtype),
                       clip=build_clip(load["text_encoder"], config["text_encoder"]),
                       vae=build_vae(load["vae"], config["vae"]),
                       clip_vision=build_clip_vision(load["clip_vision"], folder / VISION_CONFIG),
                       config=config)


class MiniWorldSDLoader(io.ComfyNode):
    """Load Mini-World SD: the bundled mini world as core MODEL / CLIP / VAE / CLIP_VISION."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeMiniWorldSDLoader", display_name="Load Mini-World SD (Creative)",
            category=f"{s.CATEGORY}/loaders",
            description="The bundled mini world as a small Stable Diffusion 1.5 model set, built with ComfyUI's "
                        "own classes, so core CLIPTextEncode / KSampler / VAEDecode / CLIPVisionEncode / "
                        "LoraLoader work on it. Renders 64x64 (8x8 latents); few steps: euler or lcm, 1-4 steps.",
            inputs=[io.Combo.Input("dtype", options=s.DTYPES, default="auto",
                                   tooltip="UNet weight dtype; auto = core's choice for this device")],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE"), io.ClipVision.Output(display_name="CLIP_VISION")])

    @classmethod
    def execute(cls, dtype="auto") -> io.NodeOutput:
        loaded = load_miniworld_sd(SD_DIR, dtype if dtype in s.DTYPES else "auto")
        return io.NodeOutput(loaded.model, loaded.clip, loaded.vae, loaded.clip_vision)


NODES = [MiniWorldSDLoader]
