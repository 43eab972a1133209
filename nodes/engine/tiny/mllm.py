"""Tiny random image-text-to-text models (LLaVA-NeXT, Qwen2-VL) in their real folder layouts.

Each is the real transformers architecture shrunk to 32-d, 1-2 layers and 32-64 px images,
saved with a processor (PIL image processor, word-level tokenizer, the family's chat template)
so :func:`..mllm.load_mllm` reads it exactly as it reads a downloaded checkpoint. A yes/no
forward takes milliseconds; the answers are random but deterministic per seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Words the gate's prompts use; anything else (an unusual subject) becomes [UNK], which is fine
# for a random model. "Yes"/"yes"/"No"/"no" must be distinct tokens for the judge.
WORDS = (
    "Is", "this", "still", "a", "an", "?", "Yes", "yes", "No", "no", "or", ".", ",", ":",
    "You", "are", "helpful", "assistant", "user", "system", "USER", "ASSISTANT", "photo", "of",
    "vehicle", "car", "dog", "cat", "pet", "fruit", "alien", "handbag", "building", "bird", "plant", "animal",
    "creature",
)

LLAVA_NEXT_TEMPLATE = (  # llava-hf/llava-v1.6-vicuna's template: images first, then text
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

QWEN2_VL_TEMPLATE = (  # Qwen/Qwen2-VL-*-Instruct's template without the video and vision-id branches
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

QWEN2_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL's image grid: 4 px patches merged 2x2, images resized to 16..32 px a side.
QWEN2_VL_PIXELS = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 16 * 16,
                   "max_pixels": 32 * 32}


def word_tokenizer(specials: tuple[str, ...], **special_roles: str):
    """A fast word-level tokenizer over ``WORDS``; ``specials`` are never split (``<image>`` ...).

    Real checkpoints ship BPE/SentencePiece vocabularies; a word-level one keeps the files
    tiny and the yes/no tokens unambiguous, and loads through the same ``AutoTokenizer`` path.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(("[UNK]", *specials, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special_roles)


def build_tiny_llava_next(folder: str | Path, seed: int = 0) -> Path:
    """Save a seeded tiny LLaVA-NeXT (CLIP vision tower + Llama) with its processor into ``folder``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    folder = Path(folder)
    tokenizer = word_tokenizer(("<s>", "</s>", "<pad>", "<image>"), bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    ids = tokenizer.convert_tokens_to_ids
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>")),
        image_token_index=ids("<image>"), image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_TEMPLATE)
    return _save(folder, LlavaNextForConditionalGeneration, config, processor, seed)


def build_tiny_qwen2_vl(folder: str | Path, seed: int = 0) -> Path:
    """Save a seeded tiny Qwen2-VL (2-D RoPE vision tower + Qwen2 with M-RoPE) with its processor.

    transformers 5 insists on a video processor inside ``Qwen2VLProcessor`` and only has a
    torchvision one, so this (like loading a real Qwen2-VL) needs torchvision importable.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )

    folder = Path(folder)
    tokenizer = word_tokenizer(QWEN2_VL_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               additional_special_tokens=list(QWEN2_VL_SPECIALS))
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 2,
                       "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     # M-RoPE splits head_dim / 2 = 8 rotary pairs over (time, height, width).
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     "bos_token_id": None, "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>")},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**QWEN2_VL_PIXELS), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**QWEN2_VL_PIXELS),
                                 chat_template=QWEN2_VL_TEMPLATE)
    return _save(folder, Qwen2VLForConditionalGeneration, config, processor, seed)


def _save(folder: Path, model_class: type, config, processor, seed: int) -> Path:
    """Initialise the model from ``seed`` and save it with its processor, safetensors only."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
