"""Tiny random Kandinsky decoders (2.2 and 2.1) in the folder layouts of the real ones.

The sizes follow diffusers' own fast tests for ``KandinskyV22Pipeline`` and
``KandinskyPipeline``: a two-block UNet and a two-block MoVQ, so a 64x64 render with a few
steps takes a fraction of a second on a CPU. The UNet's image projection takes
``embed_dim``-wide embeddings, matching the tiny prior (``tiny/prior.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import XLMRobertaTokenizerFast

# The shape of a small UNet with Kandinsky's image conditioning (diffusers' Kandinsky tests).
_UNET = {
    "in_channels": 4, "out_channels": 8,  # twice the latent channels: mean and learned variance
    "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "block_out_channels": (32, 64), "layers_per_block": 1,
    "attention_head_dim": 4, "resnet_time_scale_shift": "scale_shift", "class_embed_type": None}
_MOVQ = {
    "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], "in_channels": 3, "out_channels": 3,
    "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "norm_type": "spatial",
    "num_vq_embeddings": 12, "vq_embed_dim": 4}
# Kandinsky's noise schedule (linear betas 0.00085..0.012, epsilon prediction).
_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012,
             "clip_sample": False, "steps_offset": 1, "prediction_type": "epsilon", "thresholding": False}
_TEXT_WIDTH = 32  # hidden width of the tiny 2.1 text encoder
_WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "car", "tree", "house", "flower")


def build_tiny_k22_decoder(folder: str | Path, *, embed_dim: int = 32, seed: int = 0) -> Path:
    """Save a seeded random decoder laid out like ``kandinsky-community/kandinsky-2-2-decoder``.

    It uses a DDPM scheduler, whose steps draw fresh noise, so tests also cover that the seed
    reaches the scheduler and not just the initial latents.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET, addition_embed_type="image", encoder_hid_dim_type="image_proj",
                                encoder_hid_dim=embed_dim, cross_attention_dim=32)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    _save_movq(folder)
    DDPMScheduler(**_SCHEDULE, variance_type="fixed_small").save_pretrained(folder / "scheduler")
    _write_index(folder, "KandinskyV22Pipeline", DDPMScheduler)
    return folder


def build_tiny_k21_decoder(folder: str | Path, *, embed_dim: int = 32, seed: int = 0) -> Path:
    """Save a seeded random decoder laid out like ``kandinsky-community/kandinsky-2-1``.

    Kandinsky 2.1 feeds the image embedding through the UNet's cross-attention width, so
    ``embed_dim`` is the UNet's ``cross_attention_dim`` and the text encoder projects to it too.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = _tiny_xlm_roberta_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder = MultilingualCLIP(MCLIPConfig(
        numDims=embed_dim, transformerDimensions=_TEXT_WIDTH, hidden_size=_TEXT_WIDTH, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=80,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet = UNet2DConditionModel(**_UNET, addition_embed_type="text_image", encoder_hid_dim_type="text_image_proj",
                                encoder_hid_dim=_TEXT_WIDTH, cross_attention_dim=embed_dim)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    _save_movq(folder)
    DDIMScheduler(**_SCHEDULE, set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    _write_index(folder, "KandinskyPipeline", DDIMScheduler, text_encoder=["kandinsky", "MultilingualCLIP"],
                 tokenizer=["transformers", "XLMRobertaTokenizerFast"])
    return folder


def _save_movq(folder: Path) -> None:
    from diffusers import VQModel

    VQModel(**_MOVQ).save_pretrained(folder / "movq", safe_serialization=True)


def _write_index(folder: Path, pipeline: str, scheduler: type, **extra: list[str]) -> None:
    """``model_index.json``: how diffusers (and our loader) tells the two decoders apart."""
    index = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", scheduler.__name__], "movq": ["diffusers", "VQModel"], **extra}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _tiny_xlm_roberta_tokenizer() -> XLMRobertaTokenizerFast:
    """An XLM-RoBERTa tokenizer over a few words and letters, built without downloads.

    Special tokens sit at XLM-R's ids (<s>=0, <pad>=1, </s>=2, <unk>=3); single letters make
    any lower-case prompt tokenisable, whole words get better (higher) Unigram scores. The
    ``tokenizers`` pipeline is spelled out (it is what transformers 5 builds from ``vocab=``)
    because transformers 4.x can only build this class from a SentencePiece file.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import XLMRobertaTokenizerFast

    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [(f"\u2581{w}", -2.0) for w in _WORDS]
    letters = [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -3.0)]
    backend = Tokenizer(Unigram(vocab=specials + words + letters + [("<mask>", 0.0)], unk_id=3, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=backend, model_max_length=77, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                   mask_token="<mask>")
