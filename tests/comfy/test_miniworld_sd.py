"""The mini world in SD 1.5 form (``models/miniworld/sd/``) through core ComfyUI, in-process.

``CreativeMiniWorldSDLoader`` must hand out ComfyUI's own objects, so that core's nodes run on
them unchanged: CLIPTextEncode -> KSampler (few steps) -> VAEDecode, and CLIPVisionEncode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import comfy_harness

SD_DIR = Path(__file__).resolve().parents[2] / "models" / "miniworld" / "sd"
JUDGE_DIR = SD_DIR.parent / "judge"
KINDS = ("car", "truck", "bus", "boat", "airplane", "tree", "flower", "house", "fish")


@pytest.fixture(scope="module")
def loaded(pack_nodes):
    return comfy_harness.execute_node(pack_nodes["CreativeMiniWorldSDLoader"], "test-sd-loader", dtype="auto")


@pytest.fixture(scope="module")
def core(comfy_inprocess):
    return comfy_inprocess.nodes


def render(core, loaded, prompts: list[str], seed: int = 0, steps: int = 4, sampler: str = "lcm",
           scheduler: str = "sgm_uniform", batch: int = 1, cfg: float = 1.0) -> torch.Tensor:
    """Core nodes only: CLIPTextEncode x2, EmptyLatentImage, KSampler, VAEDecode (as the executor runs them)."""
    model, clip, vae, _ = loaded
    with torch.inference_mode():
        negative, = core.CLIPTextEncode().encode(clip, "")
        latent, = core.EmptyLatentImage().generate(64, 64, batch)
        images = []
        for prompt in prompts:
            positive, = core.CLIPTextEncode().encode(clip, prompt)
            samples, = core.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
            images.append(core.VAEDecode().decode(vae, samples)[0])
    return torch.cat(images)


def test_loader_outputs_are_core_objects(loaded, comfy_inprocess):
    import comfy.clip_vision
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    model, clip, vae, clip_vision = loaded
    assert type(model) is comfy.model_patcher.ModelPatcher
    assert type(model.model) is comfy.model_base.BaseModel
    assert type(model.model.model_config).__name__ == "SD15"
    assert isinstance(model.model.model_config, comfy.supported_models.SD15)
    assert type(clip) is comfy.sd.CLIP and type(vae) is comfy.sd.VAE
    assert type(clip_vision) is comfy.clip_vision.ClipVisionModel
    assert vae.downscale_ratio == 8 and vae.latent_channels == 4


def test_schema_outputs_core_types(pack_nodes):
    schema = pack_nodes["CreativeMiniWorldSDLoader"].GET_SCHEMA()
    assert [o.io_type for o in schema.outputs] == ["MODEL", "CLIP", "VAE", "CLIP_VISION"]
    assert schema.display_name == "Load Mini-World SD (Creative)"


@pytest.mark.parametrize("sampler,scheduler,steps", [("lcm", "sgm_uniform", 4), ("euler", "simple", 1)])
def test_core_text_to_image(core, loaded, sampler, scheduler, steps):
    images = render(core, loaded, ["a photo of a car", "a photo of a fish"], sampler=sampler, scheduler=scheduler,
                    steps=steps)
    assert images.shape == (2, 64, 64, 3)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert (images[0] - images[1]).abs().mean() > 0.05  # the prompt conditions the render


def test_clip_vision_encode_width(core, loaded):
    clip_vision = loaded[3]
    width = json.loads((SD_DIR / "config.json").read_text())["clip_vision"]["projection_dim"]
    image = render(core, loaded, ["a photo of a bus"])
    with torch.inference_mode():
        out, = core.CLIPVisionEncode().encode(clip_vision, image, "center")
    assert out["image_embeds"].shape == (1, width)
    assert torch.isfinite(out["image_embeds"]).all()


def test_renders_show_the_prompted_kind(core, loaded):
    """The independent judge recognises the prompted kind in 4-step renders well above chance (1/9;
    measured 0.567 on 90 renders at these settings, models/miniworld/sd/metrics.json)."""
    from creative_generation.nodes.testbed.miniworld.judge import load_judge

    judge = load_judge(JUDGE_DIR)
    images = render(core, loaded, [f"a photo of a{'n' if k[0] in 'aeiou' else ''} {k}" for k in KINDS], batch=4,
                    sampler="euler", scheduler="simple", cfg=2.0)
    predicted = [p["kind"] for p in judge.predict(images)]
    truth = [k for k in KINDS for _ in range(4)]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy >= 0.3, (accuracy, predicted)


def test_missing_bundle_says_how_to_rebuild(tmp_path, comfy_inprocess):
    from creative_generation.nodes.miniworld_sd import load_miniworld_sd

    with pytest.raises(FileNotFoundError, match="--stages sd"):
        load_miniworld_sd(tmp_path)
