"""Tiny random image-text-to-text models in their real folder layouts.

Families: LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Janus, Idefics3 and SmolVLM. Each is the real
transformers architecture shrunk to 32-d, 2 layers and 32-64 px images, saved with a processor
(PIL image processor, word-level tokenizer, the family's released chat template and special
tokens) so :func:`..mllm.load_mllm` reads it exactly as it reads a downloaded checkpoint. A
yes/no forward takes milliseconds; the answers are random but deterministic per seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Words the gate's prompts use; anything else (an unusual subject) becomes [UNK], which is fine
# for a random model. "Yes"/"yes"/"No"/"no" must be distinct tokens for the judge.
WORDS = (
    "Is", "this", "still", "a", "an", "?", "Yes", "yes", "No", "no", "or", ".", ",", ":",
    "You", "are", "helpful", "assistant", "user", "system", "USER", "ASSISTANT", "User", "Assistant", "photo", "of",
    "vehicle", "car", "dog", "cat", "pet", "fruit", "alien", "handbag", "building", "bird", "plant", "animal",
    "creature", "image", "red", "blue",
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

JANUS_TEMPLATE = (  # deepseek-community/Janus-Pro-*'s template (transformers' Janus conversion script)
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: {%elif message['role']|lower=='assistant'%}<|Assistant|>:"
    "{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' and "
    "message['content'][0]['text']=='')%} {%endif%}{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}{%if not loop.first%}{{'\n'}}{%endif%}<image_placeholder>"
    "{%if not loop.last%}{{'\n'}}{%endif%}{%elif content['type']=='text'%}{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}{%else%}{{text}}"
    "{%endif%}{%endif%}{%endfor%}{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}{{seps[0]}}{%else%}{{seps[1]}}{%endif%}{%endif%}{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}")
JANUS_SPECIALS = ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
                  "<\uff5c\u2581pad\u2581\uff5c>", "<|User|>", "<|Assistant|>", "<image_placeholder>",
                  "<begin_of_image>", "<end_of_image>")

# HuggingFaceM4/Idefics3-8B-Llama3's template; SmolVLM's is the same with <|im_start|> for the BOS.
IDEFICS3_TEMPLATE = (
    "{{ bos }}{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
IDEFICS3_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                     *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
# Idefics3 / SmolVLM: resize to 64 px on the long side, split into 32 px tiles (+ a global view).
IDEFICS3_PIXELS = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}


def word_tokenizer(specials: tuple[str, ...], *, words: tuple[str, ...] = WORDS, adds_bos: bool = False,
                   **special_roles: object) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer over ``words``; ``specials`` are never split (``<image>`` ...).

    Real checkpoints ship BPE/SentencePiece vocabularies; a word-level one keeps the files
    tiny and the yes/no tokens unambiguous, and loads through the same ``AutoTokenizer`` path.
    ``adds_bos`` prepends ``bos_token`` on encode, as Llama-family tokenizers do, so a chat
    template that writes its own BOS can be checked for a doubled one.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(("[UNK]", *specials, *words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if adds_bos:
        bos = special_roles["bos_token"]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special_roles)


def _pil_image_processor(family: str, name: str) -> type:
    """A family's PIL image processor: ``<name>Pil`` in transformers 5, plain ``<name>`` (the slow one) in 4.x."""
    import importlib

    try:
        return getattr(importlib.import_module(f"transformers.models.{family}.image_processing_pil_{family}"), f"{name}Pil")
    except ModuleNotFoundError:
        return getattr(importlib.import_module(f"transformers.models.{family}.image_processing_{family}"), name)


def build_tiny_llava_next(folder: str | Path, seed: int = 0) -> Path:
    """Save a seeded tiny LLaVA-NeXT (CLIP vision tower + Llama) with its processor into ``folder``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    LlavaNextImageProcessorPil = _pil_image_processor("llava_next", "LlavaNextImageProcessor")  # noqa: N806

    folder = Path(folder)
    tokenizer = word_tokenizer(("<s>", "</s>", "<pad>", "<image>"), adds_bos=True, bos_token="<s>", eos_token="</s>",
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

    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 2}
    return _build_qwen_vl(Path(folder), seed, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision)


def build_tiny_qwen2_5_vl(folder: str | Path, seed: int = 0) -> Path:
    """Save a seeded tiny Qwen2.5-VL: windowed-attention vision tower (one windowed, one full block).

    The 16 px window holds 2x2 merged patches, so a 32 px image really has several windows.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
              "window_size": 16, "fullatt_block_indexes": [1]}
    return _build_qwen_vl(Path(folder), seed, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, vision)


def _build_qwen_vl(folder: Path, seed: int, config_class: type, model_class: type, processor_class: type,
                   vision: dict) -> Path:
    """Qwen2-VL and Qwen2.5-VL share tokens, template, image grid and M-RoPE text model, not the vision tower."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )

    tokenizer = word_tokenizer(QWEN2_VL_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = tokenizer.convert_tokens_to_ids
    config = config_class(
        vision_config={**vision, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     # M-RoPE splits head_dim / 2 = 8 rotary pairs over (time, height, width).
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     "bos_token_id": None, "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>")},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    processor = processor_class(image_processor=Qwen2VLImageProcessorPil(**QWEN2_VL_PIXELS), tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(**QWEN2_VL_PIXELS),
                                chat_template=QWEN2_VL_TEMPLATE)
    return _save(folder, model_class, config, processor, seed)


def build_tiny_janus(folder: str | Path, seed: int = 0) -> Path:
    """Save a seeded tiny Janus (SigLIP-style tower + aligner + Llama, plus the unused VQ image generator).

    Laid out like deepseek-community/Janus-Pro-1B: a tokenizer that adds BOS, the default system
    prompt switched on, and 16 image tokens (32 px / 8 px patches) between begin/end-of-image.
    """
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus.image_processing_pil_janus import (
        JanusImageProcessorPil,
    )

    bos, eos, pad = JANUS_SPECIALS[:3]
    tokenizer = word_tokenizer(JANUS_SPECIALS, adds_bos=True, bos_token=bos, eos_token=eos, pad_token=pad,
                               extra_special_tokens={"image_token": "<image_placeholder>",
                                                     "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})
    ids = tokenizer.convert_tokens_to_ids
    config = JanusConfig(
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "bos_token_id": ids(bos), "eos_token_id": ids(eos),
                     "pad_token_id": ids(pad)},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2,
                       "image_size": 32, "patch_size": 8, "projection_dim": 32, "depth": 2, "num_image_tokens": 16},
        # GroupNorm(32) sets the VQ floor at 32 channels; this part only generates images and stays unused.
        vq_config={"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "base_channels": 32,
                   "channel_multiplier": [1, 1], "num_res_blocks": 1, "projection_dim": 32,
                   "image_token_embed_dim": 32},
        image_token_id=ids("<image_placeholder>"))
    processor = JanusProcessor(image_processor=JanusImageProcessorPil(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, chat_template=JANUS_TEMPLATE, use_default_system_prompt=True,
                               num_image_tokens=16)
    return _save(Path(folder), JanusForConditionalGeneration, config, processor, seed)


def build_tiny_idefics3(folder: str | Path, seed: int = 0) -> Path:
    """Save a seeded tiny Idefics3 (SigLIP tower + pixel-shuffle connector + Llama) with its processor.

    Images are resized to 64 px on the long side and split into 32 px tiles plus a global view,
    each tile becoming 4 image tokens (4x4 patches shuffled by 2), so the row/column tokens appear.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    bos = "<|begin_of_text|>"
    tokenizer = word_tokenizer((bos, "<|end_of_text|>", *IDEFICS3_SPECIALS), adds_bos=True, bos_token=bos,
                               eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    config = _idefics3_config(Idefics3Config, tokenizer)
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**IDEFICS3_PIXELS), tokenizer=tokenizer,
                                  image_seq_len=4, chat_template=IDEFICS3_TEMPLATE.replace("{{ bos }}", bos))
    return _save(Path(folder), Idefics3ForConditionalGeneration, config, processor, seed)


def build_tiny_smolvlm(folder: str | Path, seed: int = 0) -> Path:
    """Save a seeded tiny SmolVLM, Idefics3's architecture with SmolLM's ``<|im_start|>`` prompt.

    transformers' ``SmolVLMProcessor`` needs the ``num2words`` package and a torchvision video
    processor, exactly as loading a real SmolVLM does.
    """
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMProcessor,
    )
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )
    from transformers.models.smolvlm.video_processing_smolvlm import (
        SmolVLMVideoProcessor,
    )

    bos = "<|im_start|>"
    tokenizer = word_tokenizer((bos, "<|im_end|>", "<video>", *IDEFICS3_SPECIALS), bos_token=bos,
                               eos_token="<end_of_utterance>", pad_token="<|im_end|>")
    config = _idefics3_config(SmolVLMConfig, tokenizer)
    processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessorPil(**IDEFICS3_PIXELS), tokenizer=tokenizer,
                                 video_processor=SmolVLMVideoProcessor(), image_seq_len=4,
                                 chat_template=IDEFICS3_TEMPLATE.replace("{{ bos }}", bos))
    return _save(Path(folder), SmolVLMForConditionalGeneration, config, processor, seed)



def _idefics3_config(config_class: type, tokenizer: PreTrainedTokenizerFast) -> object:
    """Idefics3 and SmolVLM configs: 32 px SigLIP tiles of 8 px patches, pixel shuffle by 2, tiny Llama."""
    ids = tokenizer.convert_tokens_to_ids
    return config_class(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        scale_factor=2, image_token_id=ids("<image>"))


def _save(folder: Path, model_class: type, config: object, processor: object, seed: int) -> Path:
    """Initialise the model from ``seed`` and save it with its processor, safetensors only."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
