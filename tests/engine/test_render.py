"""Rendering CLIP image embeddings with tiny Kandinsky 2.2 / 2.1 decoders loaded from folders."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import KandinskyPipeline, KandinskyV22Pipeline

from creative_generation.nodes.engine.render import DecoderFolderError, detect_decoder_family, load_decoder
from creative_generation.nodes.testbed.tiny.decoder import build_tiny_k21_decoder, build_tiny_k22_decoder

FAMILIES = ["kandinsky-2.2", "kandinsky-2.1"]
PIPELINES = {"kandinsky-2.2": KandinskyV22Pipeline, "kandinsky-2.1": KandinskyPipeline}
FAST = {"steps": 2, "height": 64, "width": 64}


class Cancelled(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")  # spin-waits made tiny renders 3-10x slower


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {"kandinsky-2.2": build_tiny_k22_decoder(root / "k22"),
            "kandinsky-2.1": build_tiny_k21_decoder(root / "k21")}


@pytest.fixture(scope="module")
def decoders(folders):
    return {family: load_decoder(folder) for family, folder in folders.items()}


@pytest.fixture(params=FAMILIES)
def decoder(request, decoders):
    return decoders[request.param]


def embeddings(n: int, seed: int = 1, width: int = 32) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_family_and_width(decoder):
    assert detect_decoder_family(decoder.source) == decoder.family
    assert isinstance(decoder.pipeline, PIPELINES[decoder.family])
    assert decoder.embed_dim == 32


def test_output_is_a_comfy_image(decoder):
    images = decoder.render(embeddings(2), seed=0, steps=2, height=32, width=64)
    assert images.shape == (2, 32, 64, 3)  # [B, H, W, C], height before width
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.std() > 0.01
    assert not torch.equal(images[0], images[1])  # two embeddings, two images


def test_seeded(decoder):
    embeds = embeddings(1)
    first = decoder.render(embeds, seed=7, **FAST)
    assert torch.equal(first, decoder.render(embeds, seed=7, **FAST))
    assert (first - decoder.render(embeds, seed=8, **FAST)).abs().max() > 1e-3


@pytest.mark.parametrize("guidance, with_negative", [(4.0, True), (4.0, False), (1.0, False)])
def test_matches_diffusers_pipeline(decoder, guidance, with_negative):
    family = decoder.family
    ours = dataclasses.replace(decoder, prompt="a red cat") if family == "kandinsky-2.1" else decoder
    embeds = embeddings(2)
    negative = embeddings(1, seed=2) if with_negative else None
    got = ours.render(embeds, negative_embeds=negative, seed=3, steps=3, guidance=guidance, height=64, width=32)

    pipe = PIPELINES[family](**ours.pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    text = {"prompt": ["a red cat"] * 2} if family == "kandinsky-2.1" else {}
    expected = pipe(**text, image_embeds=embeds,
                    negative_image_embeds=torch.zeros(2, 32) if negative is None else negative.expand(2, -1),
                    generator=torch.Generator().manual_seed(3), num_inference_steps=3, guidance_scale=guidance,
                    height=64, width=32, output_type="np").images
    torch.testing.assert_close(got, torch.from_numpy(expected), atol=1e-5, rtol=0)


def test_negative_embeds_matter(decoder):
    embeds = embeddings(1)
    plain = decoder.render(embeds, seed=0, **FAST)
    assert (plain - decoder.render(embeds, negative_embeds=embeddings(1, seed=5), seed=0, **FAST)).abs().max() > 1e-3


def test_k21_prompt_conditions_and_defaults_to_empty(decoders):
    decoder = decoders["kandinsky-2.1"]
    assert decoder.prompt == ""
    embeds = embeddings(1)
    plain = decoder.render(embeds, seed=0, **FAST)
    prompted = dataclasses.replace(decoder, prompt="a photo of a dog").render(embeds, seed=0, **FAST)
    assert (plain - prompted).abs().max() > 1e-3


def test_k22_has_no_text_input_and_ignores_prompt(decoders):
    decoder = decoders["kandinsky-2.2"]
    embeds = embeddings(1)
    prompted = dataclasses.replace(decoder, prompt="a photo of a dog")
    assert torch.equal(decoder.render(embeds, seed=0, **FAST), prompted.render(embeds, seed=0, **FAST))


def test_width_mismatch_names_both_widths(decoder):
    with pytest.raises(ValueError, match=r"^embeds are 16-wide .* expects 32-wide"):
        decoder.render(embeddings(1, width=16), **FAST)
    with pytest.raises(ValueError, match=r"^negative_embeds are 768-wide .* expects 32-wide"):
        decoder.render(embeddings(1), negative_embeds=embeddings(1, width=768), **FAST)


def test_bad_shapes_and_sizes_are_refused(decoder):
    with pytest.raises(ValueError, match="negative_embeds has 2 rows; expected 1 or 3"):
        decoder.render(embeddings(3), negative_embeds=embeddings(2), **FAST)
    with pytest.raises(ValueError, match=r"\[batch, width\]"):
        decoder.render(embeddings(1)[0], **FAST)
    with pytest.raises(ValueError, match=f"multiples of {decoder.size_multiple} for this decoder, got 62x64"):
        decoder.render(embeddings(1), steps=2, height=62, width=64)


def test_progress_once_per_step_and_cancel(decoder):
    calls = []
    decoder.render(embeddings(1), progress=lambda step, total: calls.append((step, total)), **(FAST | {"steps": 3}))
    assert calls == [(1, 3), (2, 3), (3, 3)]

    def cancel_at_two(step: int, total: int) -> None:
        calls.append(step)
        if step == 2:
            raise Cancelled

    calls.clear()
    with pytest.raises(Cancelled):
        decoder.render(embeddings(1), progress=cancel_at_two, **(FAST | {"steps": 3}))
    assert calls == [1, 2]


@pytest.mark.parametrize("family, missing", [
    ("kandinsky-2.2", "unet/diffusion_pytorch_model.safetensors"),
    ("kandinsky-2.2", "movq/config.json"),
    ("kandinsky-2.2", "scheduler/scheduler_config.json"),
    ("kandinsky-2.2", "model_index.json"),
    ("kandinsky-2.1", "text_encoder/model.safetensors"),
    ("kandinsky-2.1", "tokenizer/tokenizer.json"),
    ("kandinsky-2.1", "movq/diffusion_pytorch_model.safetensors"),
])
def test_missing_part_is_named(folders, tmp_path, family, missing):
    broken = shutil.copytree(folders[family], tmp_path / "broken")
    (broken / missing).unlink()
    with pytest.raises(ValueError, match=f"missing {missing}"):
        load_decoder(broken)


def test_a_prior_folder_is_not_a_decoder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22PriorPipeline"}))
    with pytest.raises(DecoderFolderError, match="KandinskyV22PriorPipeline, not a Kandinsky decoder"):
        load_decoder(tmp_path)


def test_requested_dtype_reaches_the_pipeline(folders):
    """diffusers before 0.40 only knows ``torch_dtype``; given ``dtype`` it would load float32 silently."""
    decoder = load_decoder(folders["kandinsky-2.2"], dtype=torch.float64)
    assert {p.dtype for p in decoder.pipeline.unet.parameters()} == {torch.float64}
