"""The diffusion prior: text prompt -> CLIP image embedding (Kandinsky 2.1 / 2.2, Karlo unCLIP).

All three share diffusers' ``PriorTransformer``, a CLIP text encoder with projection, the CLIP
tokenizer and ``UnCLIPScheduler``; Kandinsky folders add a CLIP vision encoder for images.
:class:`Prior` holds those parts plus an optional learned concept (placeholder token + LoRA),
and :func:`load_prior` reads them from a local diffusers folder without touching the network.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .optimizer import CreativeRun, OptimConfig
    from .prior_training import PriorTraining

from . import budget
from .compat import dtype_kwargs
from .concept import Concept, activate_concept, placeholder_embeddings
from .model_shapes import PriorShape
from .layouts import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, Layout, first_missing

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LAYOUTS: dict[str, Layout] = {
    "kandinsky": {
        "prior": (("config.json",), DIFFUSERS_WEIGHTS),
        "text_encoder": (("config.json",), TRANSFORMERS_WEIGHTS),
        "tokenizer": (("vocab.json", "tokenizer.json"),),
        "scheduler": (("scheduler_config.json",),),
    },
    "karlo": {
        "prior": (("config.json",), DIFFUSERS_WEIGHTS),
        "text_encoder": (("config.json",), TRANSFORMERS_WEIGHTS),
        "tokenizer": (("vocab.json", "tokenizer.json"),),
        "prior_scheduler": (("scheduler_config.json",),),
    },
}
FAMILIES = {
    "KandinskyPriorPipeline": "kandinsky-2.1",
    "KandinskyV22PriorPipeline": "kandinsky-2.2",
    "UnCLIPPipeline": "karlo",
    "UnCLIPImageVariationPipeline": "karlo",
}


class PriorFolderError(ValueError):
    """A folder that is not a usable diffusion prior; the message names what is missing."""


@dataclass
class PromptEmbeds:
    """Text-encoder outputs for P prompts: projected embedding, token states and their mask."""

    text_embeds: torch.Tensor  # [P, D]
    hidden_states: torch.Tensor  # [P, T, W]
    mask: torch.Tensor  # [P, T] bool


@dataclass(frozen=True)
class PromptTokens:
    """Tokenised prompts: ids ``[P, T]`` and their mask ``[P, T]`` (bool)."""

    input_ids: torch.Tensor
    mask: torch.Tensor


@dataclass
class Prior:
    """A loaded prior. ``with_concept`` returns a view sharing the modules, never a copy."""

    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    image_encoder: torch.nn.Module | None = None
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    family: str = "unknown"
    source: str = ""
    identity: str = ""
    concept: Concept | None = None
    _tokenizers: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.identity:
            self.identity = prior_identity(self.family, self.transformer, self.text_encoder)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def embedding_dim(self) -> int:
        return int(self.transformer.config.embedding_dim)

    @property
    def token_width(self) -> int:
        """Width of the text encoder's token embeddings: what a concept's token embedding must have."""
        return int(self.text_encoder.get_input_embeddings().embedding_dim)

    def check_concept(self, concept: Concept) -> None:
        """Refuse ``concept`` when it was made for another prior (its base tag, or its token's width)."""
        concept.check_base(self.identity)
        concept.check_token_width(self.token_width)

    def managed_modules(self) -> dict[str, torch.nn.Module]:
        """The torch modules a host's memory manager moves together (the first one keys the model)."""
        parts = {"transformer": self.transformer, "text_encoder": self.text_encoder,
                 "image_encoder": self.image_encoder}
        return {name: module for name, module in parts.items() if module is not None}

    def sampling_estimate(self, prompt: str, negative_prompt: str, *, batch: int, steps: int, guidance: float,
                          on_gpu: bool) -> budget.Estimate:
        """Memory of sampling ``batch`` embeddings of ``prompt`` at once (the prompt as this view tokenizes it)."""
        tokens = budget.prompt_token_count(self.tokenizer_for_concept(), prompt, negative_prompt)
        return budget.sampling_estimate(PriorShape.of(self), prompt_tokens=tokens, batch=batch, steps=steps,
                                        guidance=guidance, on_gpu=on_gpu)

    def training_estimate(self, run: CreativeRun, *, on_gpu: bool) -> budget.Estimate:
        """Memory of the run's optimisation steps: the subject word stands in for the placeholder, and one
        token more is counted for it."""
        config = run.config
        tokens = budget.prompt_token_count(self.tokenizer, config.prompt("", run.subject), config.negative_prompt) + 1
        return budget.training_estimate(PriorShape.of(self), prompt_tokens=tokens, prior_steps=config.prior_steps,
                                        guidance=config.guidance, rank=config.rank, train=str(config.train),
                                        batch=config.samples, on_gpu=on_gpu)

    def check_start(self, start: Concept, config: OptimConfig) -> None:
        """A run may continue from a concept of this prior whose LoRA has the run's rank and targets."""
        self.check_concept(start)
        if start.lora_state and config.train.lora and (start.lora_rank, tuple(start.lora_targets)) != (
                config.rank, config.targets):
            raise ValueError(f"The starting concept's LoRA has rank {start.lora_rank} on {start.lora_targets}, "
                             f"the run rank {config.rank} on {config.targets}: use the same rank and targets.")

    def open_training(self, run: CreativeRun) -> PriorTraining:
        """A training session of ``run`` on this prior (token and/or LoRA)."""
        from .prior_training import PriorTraining

        return PriorTraining(self, run)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Prior":
        for module in (self.transformer, self.text_encoder, self.image_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    def with_concept(self, concept: Concept | None) -> "Prior":
        """A view of this prior that understands ``concept.token`` and carries its LoRA."""
        if concept is not None:
            self.check_concept(concept)
        return dataclasses.replace(self, concept=concept, _tokenizers=self._tokenizers)

    def tokenizer_for_concept(self) -> PreTrainedTokenizerBase:
        """The tokenizer, extended with the active concept's placeholder token (cached)."""
        if self.concept is None or self.concept.token_embedding is None:
            return self.tokenizer
        token = self.concept.token
        if token not in self._tokenizers:
            tok = copy.deepcopy(self.tokenizer)
            tok.add_tokens([token])
            self._tokenizers[token] = tok
        return self._tokenizers[token]

    def encode_prompt(self, prompts: list[str], full_length: bool = False) -> PromptEmbeds:
        """Encode prompts as diffusers' prior pipelines do, up to the longest prompt by default.

        CLIP's text encoder is causal and the pipelines pass it no padding mask, so the states of
        the real tokens never depend on the padding after them; the prior masks padding out too.
        Stopping at the longest prompt therefore gives the same states for a fraction of the work
        (a 77-position copy, ``full_length=True``, is only needed to call diffusers' forward).
        """
        return self.encode_tokens(self.tokenize(prompts, full_length))

    def tokenize(self, prompts: list[str], full_length: bool = False) -> PromptTokens:
        """The ids and mask :meth:`encode_tokens` takes, on the prior's device: a training run tokenises its
        prompt once and encodes it every step (the tokenizer is Python, slow next to a GPU step)."""
        tokenizer = self.tokenizer_for_concept()
        padding = "max_length" if full_length else "longest"
        ids = tokenizer(prompts, padding=padding, max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        return PromptTokens(ids.input_ids.to(self.device), ids.attention_mask.bool().to(self.device))

    def encode_tokens(self, tokens: PromptTokens) -> PromptEmbeds:
        """The text encoder's outputs for tokenised prompts, with this view's concept token in its place."""
        with placeholder_embeddings(self.text_encoder, self.tokenizer_for_concept(), self.concept):
            out = self.text_encoder(tokens.input_ids)
        return PromptEmbeds(out.text_embeds, out.last_hidden_state, tokens.mask)

    def activate(self) -> None:
        """Switch the shared transformer's LoRA adapters to this view's concept."""
        activate_concept(self.transformer, self.concept)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of ``images`` ``[B, H, W, 3]`` in 0..1 (for negative clusters)."""
        if self.image_encoder is None:
            raise PriorFolderError(
                f"The prior at '{self.source}' has no image_encoder/ folder, so it cannot encode images. "
                "Use a Kandinsky prior folder that includes image_encoder/, or pass embeddings instead.")
        size = int(getattr(self.image_encoder.config, "image_size", 224))
        pixels = preprocess_images(images, size, self.image_mean, self.image_std)
        enc = self.image_encoder
        param = next(enc.parameters())
        return enc(pixels.to(param.device, param.dtype)).image_embeds.float()

    @torch.no_grad()
    def zero_image_embed(self) -> torch.Tensor:
        """Embedding of a black image: Kandinsky's unconditional image embedding for decoders."""
        if self.image_encoder is None:
            return torch.zeros(1, self.embedding_dim)
        size = int(getattr(self.image_encoder.config, "image_size", 224))
        param = next(self.image_encoder.parameters())
        zeros = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
        return self.image_encoder(zeros).image_embeds.float()


def preprocess_images(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """ComfyUI IMAGE ``[B,H,W,3]`` -> CLIP pixel values: resize short side, centre crop, normalise."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Expected images of shape [B, H, W, 3], got {tuple(images.shape)}.")
    x = images.float().permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bicubic", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def _portable_config(config: dict) -> str:
    """A config as JSON without the keys that record where and with what it was loaded."""
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")},
                      sort_keys=True, default=str)


def prior_identity(family: str, transformer: torch.nn.Module, text_encoder: torch.nn.Module) -> str:
    """A content fingerprint of the prior: configs plus a few weight tensors, cheap to compute.

    Hashing multi-GB files would take minutes; configs + the positional embedding, the output
    statistics and the text projection differ between any two trained priors. Load paths and
    library versions are left out, so the same prior in another folder or on another machine
    keeps its identity (and accepts its concepts).
    """
    h = hashlib.sha256()
    h.update(_portable_config(dict(transformer.config)).encode())
    h.update(_portable_config(text_encoder.config.to_dict()).encode())
    state = transformer.state_dict()
    for key in ("positional_embedding", "clip_mean", "clip_std", "prd_embedding"):
        if key in state:
            h.update(state[key].detach().float().cpu().numpy().tobytes())
    proj = getattr(text_encoder, "text_projection", None)
    if proj is not None:
        h.update(proj.weight.detach().float().cpu().numpy().tobytes())
    return f"{family}:{h.hexdigest()[:16]}"


def detect_layout(folder: str | os.PathLike) -> tuple[str, str]:
    """Return (layout, family) of a prior folder, or raise naming the missing file."""
    root = Path(folder)
    if not root.is_dir():
        raise PriorFolderError(f"'{root}' is not a folder. Point this at a diffusers-format prior folder.")
    family = "unknown"
    index = root / "model_index.json"
    if index.is_file():
        family = FAMILIES.get(json.loads(index.read_text()).get("_class_name", ""), "unknown")
    layout = "karlo" if (root / "prior_scheduler").is_dir() or family == "karlo" else "kandinsky"
    missing = first_missing(root, LAYOUTS[layout])
    if missing is not None:
        raise PriorFolderError(
            f"'{root}' is not a complete diffusion prior: missing {missing}. Expected the layout of "
            "kandinsky-community/kandinsky-2-1-prior, kandinsky-community/kandinsky-2-2-prior or "
            "kakaobrain/karlo-v1-alpha.")
    if family == "unknown":
        width = json.loads((root / "prior" / "config.json").read_text()).get("embedding_dim")
        family = {768: "kandinsky-2.1", 1280: "kandinsky-2.2"}.get(width, "unknown")
    return layout, family


def load_prior(source: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Prior:
    """Load a prior from a local diffusers folder (safetensors only, no remote code, never the network;
    the loader node downloads first when the user allows it)."""
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    root = Path(source).expanduser()
    layout, family = detect_layout(root)
    common = dict(local_files_only=True, use_safetensors=True)
    transformer = PriorTransformer.from_pretrained(root / "prior", **dtype_kwargs("diffusers", dtype), **common)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder", **dtype_kwargs("transformers", dtype),
                                                              **common)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    scheduler = UnCLIPScheduler.from_pretrained(root / ("prior_scheduler" if layout == "karlo" else "scheduler"))
    image_encoder, mean, std = None, CLIP_MEAN, CLIP_STD
    if (root / "image_encoder" / "config.json").is_file():
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            root / "image_encoder", **dtype_kwargs("transformers", dtype), **common)
        proc = root / "image_processor" / "preprocessor_config.json"
        if proc.is_file():
            cfg = json.loads(proc.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    for module in (transformer, text_encoder, image_encoder):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return Prior(transformer, text_encoder, tokenizer, scheduler, image_encoder, mean, std,
                 family=family, source=str(root))
