"""What a memory estimate needs to know about a loaded model: parameter counts, bytes, widths.

Read from the torch modules and their configs (diffusers / transformers), never from files;
``budget.py`` turns these shapes into bytes per phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def module_bytes(*modules: torch.nn.Module | None) -> tuple[int, int]:
    """(parameter count, bytes) of parameters and buffers, shared storages counted once (tied weights)."""
    seen: set[tuple[int, int]] = set()
    count = nbytes = 0
    for module in modules:
        if module is None:
            continue
        for t in (*module.parameters(), *module.buffers()):
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
            if key in seen:
                continue
            seen.add(key)
            nbytes += t.numel() * t.element_size()
            if isinstance(t, torch.nn.Parameter):
                count += t.numel()
    return count, nbytes


def _setting(config: object, *names: str, default: object = None) -> object:
    """The first of ``names`` a config (dict or object) sets; configs name the same size differently."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class PriorShape:
    """What the estimate needs to know about a loaded prior."""

    params: int
    weight_bytes: int
    dtype: torch.dtype
    width: int
    layers: int
    heads: int
    ff_width: int
    embed_dim: int
    text_width: int
    text_layers: int
    text_heads: int
    text_ff_width: int

    @classmethod
    def of(cls, prior) -> PriorShape:
        """From a :class:`..prior.Prior` (its transformer, text encoder and image encoder)."""
        tf, te = prior.transformer, prior.text_encoder
        params, nbytes = module_bytes(tf, te, prior.image_encoder)
        c, tc = tf.config, te.config
        heads = int(c.num_attention_heads)
        width = heads * int(c.attention_head_dim)
        return cls(params, nbytes, prior.dtype, width, int(c.num_layers), heads, 4 * width, int(c.embedding_dim),
                   int(tc.hidden_size), int(tc.num_hidden_layers), int(tc.num_attention_heads),
                   int(tc.intermediate_size))


@dataclass(frozen=True)
class DecoderShape:
    params: int
    weight_bytes: int
    dtype: torch.dtype
    latent_factor: int
    unet_channels: tuple[int, ...]
    layers_per_block: int
    movq_channels: tuple[int, ...]

    @classmethod
    def of(cls, decoder) -> DecoderShape | None:
        """From a :class:`..render.KandinskyDecoder` (``None`` for renderers without a diffusers pipeline)."""
        pipe = getattr(decoder, "pipeline", None)
        if pipe is None or getattr(pipe, "unet", None) is None:
            return None
        unet, movq = pipe.unet, pipe.movq
        params, nbytes = module_bytes(unet, movq, getattr(pipe, "text_encoder", None))
        movq_channels = tuple(int(c) for c in movq.config.block_out_channels)
        return cls(params, nbytes, unet.dtype, 2 ** (len(movq_channels) - 1),
                   tuple(int(c) for c in unet.config.block_out_channels), int(unet.config.layers_per_block),
                   movq_channels)


@dataclass(frozen=True)
class MLLMShape:
    params: int
    weight_bytes: int
    dtype: torch.dtype
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_heads: int = 1
    vision_patch: int = 14

    @classmethod
    def of(cls, model) -> MLLMShape:
        """From a transformers image-text-to-text model (its text and vision configs)."""
        params, nbytes = module_bytes(model)
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = int(_setting(text, "hidden_size", "d_model", default=1024))
        heads = int(_setting(text, "num_attention_heads", "n_head", default=max(1, hidden // 64)))
        vision = _setting(config, "vision_config", default=None)
        v_hidden = v_inter = 0
        v_heads, patch = 1, 14
        if vision is not None:
            v_hidden = int(_setting(vision, "hidden_size", "embed_dim", default=0))
            # Qwen2-VL: embed_dim is the tower's width (its hidden_size is the merger's output)
            v_hidden = int(_setting(vision, "embed_dim", default=v_hidden)) or v_hidden
            ratio = _setting(vision, "mlp_ratio", default=None)
            v_inter = int(_setting(vision, "intermediate_size", default=(ratio or 4) * v_hidden))
            v_heads = int(_setting(vision, "num_attention_heads", "num_heads", default=max(1, v_hidden // 64)))
            patch = int(_setting(vision, "patch_size", default=14))
        return cls(params, nbytes, next(model.parameters()).dtype, hidden,
                   int(_setting(text, "num_hidden_layers", "n_layer", default=24)),
                   int(_setting(text, "intermediate_size", default=4 * hidden)), heads,
                   int(_setting(text, "num_key_value_heads", default=heads)), v_hidden, v_inter, v_heads, patch)


def vision_patches(pixel_values: torch.Tensor | None, patch: int, temporal: int = 1) -> int:
    """Patches a vision tower sees for processor output ``pixel_values`` (any layout: values / (3 p^2 t))."""
    if pixel_values is None:
        return 0
    return max(1, math.ceil(pixel_values.numel() / (3 * patch * patch * max(1, temporal))))
