"""Renderers: CLIP image embeddings -> images (Kandinsky 2.2 and 2.1 decoders).

The paper's search happens in CLIP image-embedding space; a decoder only turns the chosen
embeddings into pixels. :class:`Renderer` is that one step (a callable), so the nodes can swap decoders.
:class:`KandinskyDecoder` wraps diffusers' own ``KandinskyV22Pipeline`` / ``KandinskyPipeline``
(their denoising loops, classifier-free guidance and post-processing are reused unchanged),
and :func:`load_decoder` reads either from a local diffusers folder without touching the network.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import budget, cancel, render_cost
from .compat import dtype_kwargs
from .model_shapes import DecoderShape
from .layouts import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, Layout, first_missing

if TYPE_CHECKING:
    from diffusers import KandinskyPipeline, KandinskyV22Pipeline

ProgressCallback = Callable[[int, int], None]  # (done, total); raising from it cancels

# model_index.json "_class_name" -> decoder family.
FAMILIES = {"KandinskyV22Pipeline": "kandinsky-2.2", "KandinskyPipeline": "kandinsky-2.1"}
_COMMON: Layout = {
    "unet": (("config.json",), DIFFUSERS_WEIGHTS),
    "scheduler": (("scheduler_config.json",),),
    "movq": (("config.json",), DIFFUSERS_WEIGHTS),
}
LAYOUTS: dict[str, Layout] = {  # family -> layout
    "kandinsky-2.2": _COMMON,
    "kandinsky-2.1": {
        **_COMMON,
        "text_encoder": (("config.json",), TRANSFORMERS_WEIGHTS),
        "tokenizer": (("tokenizer.json", "sentencepiece.bpe.model"),),
    },
}
_EXPECTED = "kandinsky-community/kandinsky-2-2-decoder or kandinsky-community/kandinsky-2-1"


class Renderer(Protocol):
    """What the gate, the evaluator and Render Embeddings draw with: ``renderer(embeds) -> images``.

    A renderer also says the size it draws at and sizes its own memory, so a host can check a
    render before it starts without knowing what draws (a Kandinsky decoder, a core model)."""

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images it draws."""

    def memory_estimate(self, count: int, *, on_gpu: bool) -> budget.Estimate | None:
        """Memory of drawing ``count`` embeddings at once (``None``: a renderer that cannot be sized)."""

    def check_time(self, count: int, *, on_gpu: bool, threads: int) -> None:
        """Refuse drawing ``count`` embeddings that no machine like this one finishes in reasonable time."""

    def __call__(self, embeds: torch.Tensor, progress: ProgressCallback | None = None) -> torch.Tensor:
        """Draw ``embeds`` ``[B, D]`` as ``[B, H, W, 3]`` float32 in 0..1 on the CPU."""


class Decoder(Protocol):
    """A model that draws CLIP image embeddings with per-call settings (:class:`KandinskyDecoder`)."""

    def render(self, embeds: torch.Tensor, *, negative_embeds: torch.Tensor | None = None, seed: int = 0,
               steps: int = 25, guidance: float = 4.0, height: int = 512, width: int = 512,
               progress: ProgressCallback | None = None) -> torch.Tensor:
        """Render ``embeds`` ``[B, D]`` to ``[B, H, W, 3]`` float32 in 0..1 on the CPU."""


class DecoderFolderError(ValueError):
    """A folder that is not a usable Kandinsky decoder; the message names what is missing."""


@dataclass
class KandinskyDecoder:
    """A loaded Kandinsky 2.2 or 2.1 decoder, rendering through the diffusers pipeline.

    ``prompt`` conditions only Kandinsky 2.1, whose UNet also reads text; it is empty by
    default so that the image comes from the embedding, which is what the paper optimises.
    Kandinsky 2.2 has no text input and ignores it.
    """

    pipeline: KandinskyV22Pipeline | KandinskyPipeline
    family: str
    source: str = ""
    prompt: str = ""

    @property
    def embed_dim(self) -> int:
        """Width of the image embeddings the UNet's image projection takes."""
        return int(self.pipeline.unet.encoder_hid_proj.image_embeds.in_features)

    def managed_modules(self) -> dict[str, torch.nn.Module]:
        """The torch modules a host's memory manager moves together (the first one keys the model)."""
        pipe = self.pipeline
        parts = {"unet": pipe.unet, "movq": pipe.movq, "text_encoder": getattr(pipe, "text_encoder", None)}
        return {name: module for name, module in parts.items() if module is not None}

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this (diffusers rounds others up silently)."""
        return int(self.pipeline.movq_scale_factor) ** 2

    def render(self, embeds: torch.Tensor, *, negative_embeds: torch.Tensor | None = None, seed: int = 0,
               steps: int = 25, guidance: float = 4.0, height: int = 512, width: int = 512,
               progress: ProgressCallback | None = None) -> torch.Tensor:
        """Render ``embeds`` ``[B, D]`` to ``[B, H, W, 3]`` float32 in 0..1 on the CPU.

        ``negative_embeds`` (``[1, D]`` or ``[B, D]``) is the unconditional branch of
        classifier-free guidance and defaults to zeros; callers with a prior should pass its
        zero-image embedding (:meth:`Prior.zero_image_embed`), which is what Kandinsky was
        trained with. The seed drives a CPU generator, so a seed gives the same image on any
        device. ``progress(step, total)`` runs after each denoising step (step = steps done);
        raising from it aborts the render.
        """
        self._check_size(height, width)
        embeds = self._check_embeds(embeds, "embeds")
        if negative_embeds is None:
            negative_embeds = torch.zeros_like(embeds)
        negative_embeds = self._check_embeds(negative_embeds, "negative_embeds")
        if negative_embeds.shape[0] not in (1, embeds.shape[0]):
            raise ValueError(f"negative_embeds has {negative_embeds.shape[0]} rows; expected 1 or "
                             f"{embeds.shape[0]} (one per embedding).")
        args = {"image_embeds": embeds, "negative_image_embeds": negative_embeds.expand_as(embeds),
                "height": height, "width": width, "num_inference_steps": steps, "guidance_scale": guidance,
                "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "np"}
        if self.family == "kandinsky-2.1":
            args |= {"prompt": [self.prompt] * embeds.shape[0], "callback": self._legacy_callback(progress)}
        else:
            args |= {"callback_on_step_end": self._step_end_callback(progress)}
        with cancellable(self.pipeline.unet, self.pipeline.movq):  # stops within a step or the final decode
            return torch.from_numpy(self.pipeline(**args).images)  # "np" output: float32 [B, H, W, 3] in 0..1

    def _check_embeds(self, embeds: torch.Tensor, name: str) -> torch.Tensor:
        """Reject wrong shapes here: inside the UNet they surface as opaque matmul errors."""
        if embeds.ndim != 2:
            raise ValueError(f"{name} must be [batch, width], got shape {tuple(embeds.shape)}.")
        if embeds.shape[1] != self.embed_dim:
            raise ValueError(
                f"{name} are {embeds.shape[1]}-wide but this {self.family} decoder expects {self.embed_dim}-wide "
                "CLIP image embeddings. Use a prior from the same model family as the decoder.")
        unet = self.pipeline.unet
        return embeds.to(device=unet.device, dtype=unet.dtype)

    def _check_size(self, height: int, width: int) -> None:
        multiple = self.size_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple} for this decoder, "
                             f"got {height}x{width}.")

    def _total_steps(self) -> int:
        return len(self.pipeline.scheduler.timesteps)

    def _step_end_callback(self, progress: ProgressCallback | None) -> Callable | None:
        """Adapt ``progress`` to diffusers' ``callback_on_step_end`` (Kandinsky 2.2)."""
        if progress is None:
            return None

        def on_step_end(pipe, i: int, t, tensors: dict) -> dict:
            progress(i + 1, self._total_steps())
            return {}  # change nothing in the loop

        return on_step_end

    def _legacy_callback(self, progress: ProgressCallback | None) -> Callable | None:
        """Adapt ``progress`` to the legacy ``callback(step, t, latents)`` (Kandinsky 2.1 has no other)."""
        if progress is None:
            return None
        return lambda step, t, latents: progress(step + 1, self._total_steps())


ATTENTION_CHUNK_MACS = 1 << 28  # multiply-adds per attention chunk: tens of ms on one CPU core


@contextlib.contextmanager
def cancellable(*modules: torch.nn.Module) -> Iterator[None]:
    """Within the block, every sub-module call of ``modules`` is a cancel point, and so is every
    chunk of a long attention (:func:`chunked_attention`).

    One denoising step or the final decode of a large image can take minutes on a CPU; the
    per-step callback alone would not stop them, and at 1024 px and above one attention call
    over all pixels is itself tens of seconds to minutes (its cost grows with the square of the
    pixels). The torch-function mode is this thread's only, so other threads are not affected.
    """
    handles = [m.register_forward_pre_hook(lambda *_: cancel.point())
               for module in modules for name, m in module.named_modules()
               if not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))]
    try:
        with _ChunkedAttention():
            yield
    finally:
        for handle in handles:
            handle.remove()


class _ChunkedAttention(TorchFunctionMode):
    """Routes ``scaled_dot_product_attention`` through :func:`chunked_attention`; every other call as is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return chunked_attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                      **options) -> torch.Tensor:
    """``scaled_dot_product_attention`` in chunks of query rows with a cancel point before each.

    Exact: each query row attends to all keys on its own, so the rows can be computed apart (a
    mask is cut the same way unless it is broadcast over the rows). Causal attention, whose rows
    depend on their position, and dropout run as one call.
    """
    rows, keys, width = query.shape[-2], key.shape[-2], query.shape[-1]
    chunk = max(1, ATTENTION_CHUNK_MACS // max(1, keys * (width + value.shape[-1]) * query[..., 0, 0].numel()))
    if is_causal or dropout_p or chunk >= rows:
        cancel.point()
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, **options)
    cut_mask = attn_mask is not None and attn_mask.ndim >= 2 and attn_mask.shape[-2] == rows
    parts = []
    for start in range(0, rows, chunk):
        cancel.point()
        rows_here = slice(start, start + chunk)
        mask = attn_mask[..., rows_here, :] if cut_mask else attn_mask
        parts.append(F.scaled_dot_product_attention(query[..., rows_here, :], key, value, attn_mask=mask,
                                                    **options))
    return torch.cat(parts, dim=-2)


def detect_decoder_family(folder: str | os.PathLike) -> str:
    """Return the family of a decoder folder, or raise naming the first missing file."""
    root = Path(folder)
    if not root.is_dir():
        raise DecoderFolderError(f"'{root}' is not a folder. Point this at a diffusers-format decoder folder.")
    index = root / "model_index.json"
    if not index.is_file():
        raise DecoderFolderError(f"'{root}' is not a complete decoder: missing model_index.json. "
                                 f"Expected the layout of {_EXPECTED}.")
    name = json.loads(index.read_text()).get("_class_name", "")
    if name not in FAMILIES:
        raise DecoderFolderError(f"'{root}' holds a {name or 'unknown pipeline'}, not a Kandinsky decoder "
                                 f"(KandinskyV22Pipeline or KandinskyPipeline). Expected the layout of {_EXPECTED}.")
    family = FAMILIES[name]
    missing = first_missing(root, LAYOUTS[family])
    if missing is not None:
        raise DecoderFolderError(f"'{root}' is not a complete {family} decoder: missing {missing}. "
                                 f"Expected the layout of {_EXPECTED}.")
    return family


def load_decoder(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> KandinskyDecoder:
    """Load a Kandinsky 2.2 or 2.1 decoder folder (offline, safetensors only, no remote code)."""
    from diffusers import KandinskyPipeline, KandinskyV22Pipeline

    family = detect_decoder_family(folder)
    cls = KandinskyV22Pipeline if family == "kandinsky-2.2" else KandinskyPipeline
    pipeline = cls.from_pretrained(folder, **dtype_kwargs("diffusers", dtype), local_files_only=True, use_safetensors=True)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)  # progress goes through the caller's callback
    return KandinskyDecoder(pipeline, family, source=str(folder))


@dataclass(frozen=True)
class RenderSettings:
    """How a renderer draws: fixed per graph so the gate always judges comparable images."""

    steps: int = 25
    guidance: float = 4.0
    height: int = 512
    width: int = 512
    seed: int = 0


@dataclass(frozen=True)
class DecoderRenderer:
    """A decoder plus its settings and negative embedding: ``renderer(embeds) -> images``.

    This is what the optimiser's gate calls and what the decode node uses, so both draw the
    same way. ``negative_embeds`` is the prior's zero-image embedding when a prior is known.
    """

    decoder: Decoder
    settings: RenderSettings = RenderSettings()
    negative_embeds: torch.Tensor | None = None

    def managed_modules(self) -> dict[str, torch.nn.Module]:
        """The decoder's modules: a renderer is loaded by loading its decoder."""
        return self.decoder.managed_modules()

    @property
    def image_size(self) -> tuple[int, int]:
        return self.settings.height, self.settings.width

    def check_time(self, count: int, *, on_gpu: bool, threads: int) -> None:
        """Refuse a render no machine like this one finishes in reasonable time, naming the size that does
        (``render_cost.py``); a decoder without a diffusers pipeline is not sized."""
        cost, s = render_cost.DecoderCost.of(self.decoder), self.settings
        if cost is not None:
            render_cost.check_render_time(cost, height=s.height, width=s.width, steps=s.steps, guidance=s.guidance,
                                          batch=count, multiple=self.decoder.size_multiple, on_gpu=on_gpu,
                                          threads=threads)

    def memory_estimate(self, count: int, *, on_gpu: bool) -> budget.Estimate | None:
        """The decoder's weights plus the working memory of drawing ``count`` embeddings at these settings;
        ``None`` for a decoder without a diffusers pipeline to read its shape from."""
        shape, s = DecoderShape.of(self.decoder), self.settings
        if shape is None:
            return None
        return budget.render_estimate(shape, height=s.height, width=s.width, guidance=s.guidance, batch=count,
                                      on_gpu=on_gpu)

    def __call__(self, embeds: torch.Tensor, progress: ProgressCallback | None = None) -> torch.Tensor:
        s = self.settings
        return self.decoder.render(embeds, negative_embeds=self.negative_embeds, seed=s.seed, steps=s.steps,
                                   guidance=s.guidance, height=s.height, width=s.width, progress=progress)
