"""The user's own SD 1.5 / SDXL model as a creative run's generator (issue 17): ComfyUI's side of it.

The prior path's generator is the diffusion prior; here the "prior" is a few-step SD model itself:
an embedding is the CLIP vision embedding of a render. :class:`SDGenerator` satisfies the engine's
``Generator`` protocol with ComfyUI's own objects (MODEL, CLIP, VAE, CLIP_VISION). Training is
core's TrainLoraNode recipe: a clone of the MODEL carries LoRA adapters from ``comfy.weight_adapter``
as weight wrappers on the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every
self- and cross-attention of the UNet's transformer blocks), so the input MODEL is never patched.
Each step renders through core's own CFG guider (its conds, CFG, model sampling) with a few-step
sampler that keeps gradients (``engine.few_step``), decodes with the VAE's own decoder and embeds
with :class:`..engine.clip_vision.DifferentiableClipVision` over the CLIP vision model's tensors.
The learned state is core's ``LORA_MODEL`` dict (``diffusion_model.<module>.lora_up.weight`` /
``.lora_down.weight`` / ``.alpha``), the layout core's SaveLoRA writes and LoraLoader reads.

A run may instead (or also) train a token: one new input embedding per CLIP tower of the text encoder,
put into the prompt the way core puts an ``embedding:name`` there (core's tokenizer places a tensor in
the token list; its text encoder reads it in place of a word), so the prompt is encoded with gradients
through core's own CLIP. Saved in core's embedding file layout (:data:`EMBEDDING_KEYS`), it is then
usable in any prompt as ``embedding:<file name>``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.utils.checkpoint

import comfy.model_management as mm
import comfy.samplers
import comfy.supported_models as families
from comfy.patcher_extension import WrappersMP
from comfy.weight_adapter.lora import LoRAAdapter

from .engine import budget, few_step
from .engine.bank import EmbeddingBank
from .engine.clip_vision import DifferentiableClipVision
from .engine.safetensors_io import save_tensors

if TYPE_CHECKING:
    from .engine.gate import GateCheck
    from .engine.optimizer import CreativeRun, OptimConfig

SUPPORTED = {"SD 1.5": families.SD15, "SDXL": families.SDXL}
# Subclasses of a supported family that cannot render from noise and a prompt alone.
NEEDS_AN_IMAGE = (families.SD15_instructpix2pix, families.SDXL_instructpix2pix)
MAX_RENDER_STEPS = 8
DIFFUSION_MODEL = WrappersMP.DIFFUSION_MODEL
ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")  # the LoRA's target layers
TRAIN_CHOICES = {"lora": "lora", "token": "token", "token+lora": "both"}  # shown -> OptimConfig.train
# Core's embedding files by family: the key of each tower's vector (token-list key -> file key), as
# comfy.sd1_clip.load_embed reads them (SD 1.5: the single tensor; SDXL: by the tokenizer's embedding_key).
EMBEDDING_KEYS = {"SD 1.5": {"l": "emb_params"}, "SDXL": {"l": "clip_l", "g": "clip_g"}}
CHECKPOINTING = "creative_gradient_checkpointing"  # the key of the run's wrapper on its MODEL clone
TRAINING_TOKEN = "creative-training-token"  # the name the token has in the training prompt (never a file)


def family(model: Any) -> str:
    """The model's family name, or a refusal naming the supported ones (before any work)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    name = type(config).__name__ if config is not None else type(model).__name__
    if config is not None and not isinstance(config, NEEDS_AN_IMAGE):
        for label, cls in SUPPORTED.items():
            if isinstance(config, cls):
                return label
    raise ValueError(f"The MODEL is a {name} model; the SD path supports {' and '.join(SUPPORTED)} checkpoints "
                     "(with or without a few-step LoRA such as Hyper-SD, LCM or Lightning). Load one of those.")


def clip_vision_config(clip_vision: Any) -> dict[str, Any]:
    """The transformers-style config of a ComfyUI CLIP_VISION, read off its modules (core keeps no config)."""
    from comfy.clip_model import ACTIVATIONS, CLIPVisionModelProjection

    model = clip_vision.model
    if not isinstance(model, CLIPVisionModelProjection):
        raise ValueError(f"The CLIP_VISION is a {type(model).__name__}, not a CLIP ViT: use a CLIP vision model "
                         "with an image projection (e.g. CLIP-ViT-L-14 or CLIP-ViT-H-14, the IP-Adapter ones).")
    vision = model.vision_model
    siglip = getattr(vision.embeddings, "class_embedding", None) is None
    layer = vision.encoder.layers[0]
    act = next((k for k, v in ACTIVATIONS.items() if v is layer.mlp.activation), "quick_gelu")
    patch = vision.embeddings.patch_embedding
    config = {"model_type": "siglip_vision_model" if siglip else "clip_vision_model",
              "hidden_size": int(patch.weight.shape[0]), "intermediate_size": int(layer.mlp.fc1.weight.shape[0]),
              "num_hidden_layers": len(vision.encoder.layers), "num_attention_heads": int(layer.self_attn.heads),
              "num_channels": int(patch.weight.shape[1]), "image_size": int(clip_vision.image_size),
              "patch_size": int(patch.weight.shape[-1]), "hidden_act": act,
              "layer_norm_eps": float(layer.layer_norm1.eps), "image_mean": list(clip_vision.image_mean),
              "image_std": list(clip_vision.image_std)}
    if isinstance(model.visual_projection, torch.nn.Module):
        config["projection_dim"] = int(model.visual_projection.weight.shape[0])
    return config


def vision_of(clip_vision: Any) -> DifferentiableClipVision:
    """Differentiable CLIP image embeddings over the CLIP_VISION's own tensors, where they are now."""
    return DifferentiableClipVision(clip_vision_config(clip_vision), dict(clip_vision.model.named_parameters()))


def encode(clip: Any, text: str) -> list:
    """CONDITIONING of ``text`` exactly as core's CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


@dataclass(frozen=True)
class RenderSettings:
    """How the generator renders: few steps, CFG, core's sampler and scheduler names, the image size."""

    steps: int = 1
    cfg: float = 1.0
    sampler: str = "euler"
    scheduler: str = "sgm_uniform"
    width: int = 512
    height: int = 512

    def check(self, *, differentiable: bool) -> None:
        """Refuse settings the render cannot use, naming what to change. ``differentiable``: the optimiser's
        render, which only has the samplers that keep gradients."""
        if not 1 <= int(self.steps) <= MAX_RENDER_STEPS:
            raise ValueError(f"render steps must be 1 to {MAX_RENDER_STEPS} (a few-step model; now {self.steps}).")
        if self.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is not one of core's: {comfy.samplers.KSampler.SCHEDULERS}.")
        if differentiable:
            few_step.check_sampler(self.sampler)
        elif self.sampler not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of core's samplers.")
        if self.width % 8 or self.height % 8 or min(self.width, self.height) < 16:
            raise ValueError(f"width and height must be multiples of 8, at least 16 (now {self.width}x{self.height}).")

    def latent(self, model: Any, batch: int = 1) -> torch.Tensor:
        """The empty latent core's EmptyLatentImage makes for this size."""
        channels = model.get_model_object("latent_format").latent_channels
        return torch.zeros(batch, channels, self.height // 8, self.width // 8)

    def meta(self) -> dict[str, Any]:
        return {"steps": self.steps, "cfg": self.cfg, "sampler": self.sampler, "scheduler": self.scheduler,
                "width": self.width, "height": self.height}


def noise(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """Core's KSampler noise for ``seed`` (``comfy.sample.prepare_noise``), without seeding torch globally."""
    return torch.randn(latent.shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=latent.dtype)


class _FewStepSampler(comfy.samplers.Sampler):
    """A core Sampler that renders with gradients: the engine's few-step loop over core's CFG guider, with
    the model's noise scaling as core's KSAMPLER applies it (``max_denoise`` at the first sigma) and LCM's
    fresh noise drawn as k-diffusion's default noise sampler draws it (seeded by the sampling seed)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        max_denoise, first = self.max_denoise(model_wrap, sigmas), float(sigmas[0])
        generator = torch.Generator(device=noise.device).manual_seed(int(extra_args.get("seed") or 0))

        def scaling(sigma, n, latent):
            return ms.noise_scaling(sigma, n, latent, max_denoise and float(sigma) == first)

        x = few_step.sample(lambda x, s: model_wrap(x, s, **extra_args), noise, sigmas, self.name,
                            noise_scaling=scaling,
                            step_noise=lambda i: torch.randn(noise.shape, dtype=noise.dtype, device=noise.device,
                                                             generator=generator))
        return ms.inverse_noise_scaling(sigmas[-1], x)


def checkpointed_call(executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A core DIFFUSION_MODEL wrapper: with gradients on, the UNet call keeps only its inputs and runs again in
    the backward pass (``torch.utils.checkpoint``), so the render steps' activations never coexist. Placed at
    the UNet's own forward, not around the sampler's model call: the guider's state is gone by the backward."""
    if not torch.is_grad_enabled():
        return executor(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(executor, *args, use_reentrant=False, **kwargs)


PRIOR_ONLY_SETTINGS = ("prior_steps", "guidance", "template", "negative_prompt", "token")  # OptimConfig's, unused here


@dataclass
class LearnedEmbedding:
    """A trained token as core's embedding file holds it: file key -> ``[1, width]`` (CPU, fp32)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, stem: str | Path) -> Path:
        """Write ``<stem>_00001.safetensors`` (the first free number: never over another file); a prompt then
        uses it as ``embedding:<that name>`` when it lies in one of ComfyUI's embeddings folders."""
        return save_tensors(Path(stem).with_suffix(".safetensors"), self.tensors, self.meta, numbered=True)


@dataclass
class LearnedLoRA:
    """What an SD run learns: core's ``LORA_MODEL`` dict (CPU tensors; empty when only a token was trained),
    the token when one was trained, and the run's metadata."""

    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    embedding: LearnedEmbedding | None = None

    def weights(self) -> "LoRAWeights":
        """The LoRA as core's ``LORA_MODEL``, carrying this run's metadata for Save SD LoRA."""
        return LoRAWeights(self.state, self.meta)


class LoRAWeights(dict):
    """Core's ``LORA_MODEL`` (LoRA key -> tensor, what core SaveLoRA writes and LoraLoader reads) that also
    carries how it was made, so that a saved file says which model family, prompt and settings it belongs to.
    A dict, so every core node that takes a ``LORA_MODEL`` takes it unchanged."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None):
        super().__init__(tensors)
        self.meta = dict(meta or {})

    def save(self, stem: str | Path) -> Path:
        """Write ``<stem>_00001.safetensors`` (the first free number: never over another file) with the LoRA keys
        core's LoraLoader reads and the metadata in the safetensors header."""
        return save_tensors(Path(stem).with_suffix(".safetensors"), self, self.meta, numbered=True)


class SDState(NamedTuple):
    """A training snapshot: the LoRA (core's LORA_MODEL layout) and the token (token-list key -> vector)."""

    lora: dict[str, torch.Tensor]
    token: dict[str, torch.Tensor]


def token_prompt(template: str, subject: str, name: str = TRAINING_TOKEN) -> str:
    """``template`` with ``embedding:<name>`` where ``{subject}`` is, else where the subject word first is."""
    marker = f"embedding:{name}"
    if "{subject}" in template:
        return template.replace("{subject}", marker)
    found = re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", template) if subject.strip() else None
    if found is None:
        raise ValueError(f"Training a token needs a place for it in the prompt: write {{subject}} (or the subject "
                         f"{subject!r}) in it; now {template!r}.")
    return template[:found.start()] + marker + template[found.end():]


def text_towers(clip: Any, family_name: str) -> dict[str, str]:
    """The CLIP's towers for a token (token-list key -> embedding file key), or a refusal naming the mismatch."""
    keys = EMBEDDING_KEYS[family_name]
    have = set(clip.tokenize("x"))
    if have != set(keys):
        raise ValueError(f"The CLIP has text encoder(s) {sorted(have)}, but a {family_name} token needs "
                         f"{sorted(keys)}: use the checkpoint's own CLIP.")
    return keys


def token_init(clip: Any, tower: str, subject: str) -> torch.Tensor:
    """``[1, width]``: the mean input embedding of the subject's tokens in ``tower`` (one token: its own row)."""
    tokenizer = getattr(clip.tokenizer, f"clip_{tower}")
    end = -1 if tokenizer.tokenizer_adds_end_token else None
    ids = tokenizer.tokenizer(subject)["input_ids"][tokenizer.tokens_start:end]
    table = getattr(clip.cond_stage_model, f"clip_{tower}").transformer.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].detach().float().mean(0, keepdim=True).cpu()


@contextlib.contextmanager
def inline_embedding(clip: Any, vectors: dict[str, torch.Tensor], name: str = TRAINING_TOKEN) -> Iterator[list]:
    """While open, core's tokenizers resolve ``embedding:<name>`` to ``vectors[tower]`` (no file), exactly where
    and how they place an embedding file's tensor; every other ``embedding:`` still loads from its folder.
    Core has no hook for an embedding held in memory, so each tower's tokenizer gets an instance-level
    ``_try_get_embedding`` for the duration (restored on exit). Yields a list that records each use."""
    used: list[str] = []
    saved = []
    for tower, vector in vectors.items():
        tokenizer = getattr(clip.tokenizer, f"clip_{tower}")
        original = tokenizer._try_get_embedding

        def resolve(text, tower=tower, vector=vector, original=original):
            words = text.split()  # core's own split: the name is the first word, the rest is parsed as text
            if not words or words[0].rstrip(",") != name:
                return original(text)
            used.append(tower)
            rest, leftover = words[0][len(name):], " ".join(words[1:])
            return vector, (f"{rest} {leftover}" if rest else leftover)

        saved.append((tokenizer, tokenizer.__dict__.get("_try_get_embedding"), tokenizer.embedding_directory))
        tokenizer._try_get_embedding = resolve
        if tokenizer.embedding_directory is None:  # core looks for embeddings only where it has a folder
            tokenizer.embedding_directory = []
    try:
        yield used
    finally:
        for tokenizer, own, directory in saved:
            tokenizer.__dict__.pop("_try_get_embedding", None)
            if own is not None:
                tokenizer._try_get_embedding = own
            tokenizer.embedding_directory = directory


@dataclass(eq=False)
class SDGenerator:
    """A creative run's generator over the user's SD 1.5 / SDXL model (``engine.optimizer.Generator``).

    Checked on creation: the family, the CLIP vision model (a CLIP ViT with projection) and the render
    settings. ``identity`` is the CLIP vision embedding space, so a norm fitted on a bank of this
    generator (or of any SD model embedded by the same CLIP vision model) is accepted and any other refused.
    ``template``: the prompt with ``{subject}`` unfilled, where a trained token goes (default: ``prompt``).
    ``checkpointing``: recompute each render step's UNet call and the VAE decode in the backward pass.
    """

    model: Any
    clip: Any
    vae: Any
    clip_vision: Any
    prompt: str
    negative: str
    render: RenderSettings
    template: str = ""
    checkpointing: bool = False
    draws_images = True

    def __post_init__(self) -> None:
        self.family = family(self.model)
        self.render.check(differentiable=True)
        self.vision = vision_of(self.clip_vision)
        self.identity = self.vision.identity
        self.embedding_dim = self.vision.width
        self.image_size = (self.render.height, self.render.width)

    def model_patchers(self) -> list:
        """The ComfyUI models a host loads before a phase (the UNet loads itself when sampling)."""
        return [self.vae.patcher, self.clip_vision.patcher]

    def check_start(self, start: Any, config: OptimConfig) -> None:
        raise ValueError("The SD path starts from the model itself; it cannot continue a prior's concept.")

    def check_run(self, run: CreativeRun) -> None:
        """Refuse a token run the CLIP or the prompt cannot take, before any work."""
        if run.config.train.token:
            text_towers(self.clip, self.family)
            token_prompt(self.template or self.prompt, run.subject)

    def training_estimate(self, run: CreativeRun, *, on_gpu: bool) -> budget.Estimate:
        self.check_run(run)
        render, model, samples, train = self.render, self.model, run.config.samples, run.config.train
        rows = 2 if render.cfg > 1.0 else 1
        latent = render.latent(model, rows * samples)
        vae_dtype = self.vae.vae_dtype
        layers = attention_weights(model).values() if train.lora else ()
        lora = sum(rank_params(m.weight.shape, run.config.rank) for m in layers)
        merged = sum(m.weight.numel() for m in layers) * compute_dtype(model).itemsize
        weights = weights_of(model, self.vae, self.clip_vision)
        if train.token:
            weights.append(("text encoder weights", self.clip.patcher.model_size()))
        return budget.sd_training_estimate(
            weights=weights, unet_call=unet_call_bytes(model, latent.shape),
            attention_maps=attention_map_bytes(model, latent.shape),
            merged=merged, decode=self.vae.memory_used_decode(latent[:samples].shape, vae_dtype),
            vision_call=vision_bytes(self.vision, samples), render_steps=render.steps, lora_params=lora,
            gated=run.check is not None, width=render.width, height=render.height, rank=run.config.rank,
            text_call=text_bytes(self.clip) if train.token else 0,
            token_params=sum(text_widths(self.clip).values()) if train.token else 0,
            checkpointing=self.checkpointing)

    def open_training(self, run: CreativeRun) -> SDTraining:
        return SDTraining(self, run)


def unet_call_bytes(model: Any, shape: torch.Size) -> int:
    """One UNet call's working memory by ComfyUI's formula for attention that materialises its maps
    (``BaseModel.memory_required`` on a CPU: 0.15 MiB per latent pixel and row x the model's
    ``memory_usage_factor``, for fp32), in the model's dtype. On a GPU ComfyUI uses its memory-efficient
    attention formula, which sizes inference only; a step with gradients keeps every layer's activations
    whatever the attention kernel, so the training estimate reads this one (its factor was measured with it)."""
    pixels = int(shape[0]) * math.prod(int(d) for d in shape[2:])
    return int(pixels * 0.15 * model.model.memory_usage_factor * 2**20 * compute_dtype(model).itemsize / 4)


# ComfyUI's attention functions that build each head's tokens x tokens map as a tensor (its fallbacks when PyTorch's
# scaled-dot-product attention, xformers, flash or sage attention are off: the CPU's sub-quadratic one, for one).
# With gradients autograd keeps those maps for the backward pass; the others recompute them there.
MAP_KEEPING_ATTENTION = ("attention_basic", "attention_sub_quad", "attention_split")


def attention_map_bytes(model: Any, shape: torch.Size) -> int:
    """The self-attention maps one UNet call with gradients keeps, where ComfyUI's attention materialises them:
    ``rows x heads x tokens²`` per self-attention layer, tokens at that layer's resolution.

    They grow with the square of the pixels, which the working-memory formula (:func:`unet_call_bytes`, linear
    in them) cannot follow: at 512 px an SD 1.5 UNet keeps 2.7 GiB of them, more than the rest of the call's
    activations (tests/benchmarks/bench_sd_path.py --parts). Cross-attention maps (77 keys a prompt chunk) are
    left to the linear formula."""
    import comfy.ldm.modules.attention as attention
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    if getattr(attention.optimized_attention, "__name__", "") not in MAP_KEEPING_ATTENTION:
        return 0
    unet = model.model.diffusion_model
    rows, height, width = int(shape[0]), int(shape[-2]), int(shape[-1])
    total, factor = 0, 1
    blocks = [*unet.input_blocks, *([unet.middle_block] if unet.middle_block is not None else []),
              *unet.output_blocks]
    for block in blocks:
        for layer in block:
            if isinstance(layer, attention.SpatialTransformer):
                tokens = -(-height // factor) * -(-width // factor)
                total += sum(b.attn1.heads for b in layer.transformer_blocks) * rows * tokens ** 2
            elif isinstance(layer, Downsample):
                factor *= 2
            elif isinstance(layer, Upsample):
                factor //= 2
    return total * compute_dtype(model).itemsize


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the UNet computes in (fp8 weights compute in their manual-cast dtype)."""
    return model.model.manual_cast_dtype or model.model.get_dtype()


def weights_of(model: Any, vae: Any, clip_vision: Any) -> list[tuple[str, int]]:
    """The generator's weights as ComfyUI sizes them (``ModelPatcher.model_size``)."""
    return [("UNet weights", model.model_size()), ("VAE weights", vae.patcher.model_size()),
            ("CLIP vision weights", clip_vision.patcher.model_size())]


def thaw(module: torch.nn.Module) -> None:
    """Make ``module``'s tensors usable by autograd, values unchanged.

    ComfyUI runs every node, its loaders included, under ``torch.inference_mode()``, and autograd
    cannot save an inference tensor for the backward pass (a frozen layer's weight is saved for its
    input's gradient). Each such parameter or buffer is replaced by an ordinary copy, one tensor at a
    time (the old one is freed when nothing else holds it); the module is shared with the input MODEL,
    which computes exactly as before."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


def text_encoders(clip: Any) -> dict[str, torch.nn.Module]:
    """The CLIP's text towers by token-list key (core's ``CLIPTextModel_`` of each)."""
    return {tower: getattr(clip.cond_stage_model, f"clip_{tower}").transformer.text_model
            for tower in clip.tokenize("x")}


def text_widths(clip: Any) -> dict[str, int]:
    """Each text tower's input embedding width (a token's size there)."""
    return {tower: int(m.embeddings.token_embedding.weight.shape[1]) for tower, m in text_encoders(clip).items()}


def text_bytes(clip: Any) -> int:
    """One text encoding with its backward (a trained token): :func:`vision_bytes`' per-layer count over each
    tower's 77 tokens, in its weights' dtype. The formula was measured for CLIP vision, not for the text."""
    total = 0
    for tower, m in text_encoders(clip).items():
        tokens = int(getattr(clip.tokenizer, f"clip_{tower}").max_length)
        layer = m.encoder.layers[0]
        hidden, inner = int(layer.mlp.fc1.weight.shape[1]), int(layer.mlp.fc1.weight.shape[0])
        per_layer = tokens * (4 * hidden + 2 * inner + int(layer.self_attn.heads) * tokens)
        total += len(m.encoder.layers) * per_layer * layer.mlp.fc1.weight.dtype.itemsize
    return total


def attention_weights(model: Any) -> dict[str, torch.nn.Module]:
    """The LoRA's target layers: ``diffusion_model.<module>`` -> the attention projection (a comfy.ops layer)."""
    return {f"diffusion_model.{name}": m for name, m in model.model.diffusion_model.named_modules()
            if ATTENTION.search(name) and hasattr(m, "weight_function") and getattr(m, "weight", None) is not None}


def rank_params(shape: torch.Size, rank: int) -> int:
    """Values of one rank-``rank`` LoRA on a weight of ``shape``: up (out x r) and down (r x in)."""
    return rank * (int(shape[0]) + int(math.prod(shape[1:])))


def vision_bytes(vision: DifferentiableClipVision, batch: int) -> int:
    """One CLIP vision pass with its backward: per token and layer about four hidden-wide and two
    intermediate-wide values and the attention map, in the pass's dtype, plus the weight copies the pass
    casts (a CPU runs an fp16 model in fp32). Measured at CLIP ViT-L/14 (224 px, fp16 on CPU when the pass ran in
    fp16, tests/benchmarks/bench_sd_path.py's parts): 177 MiB; the activation count gives 193 MiB."""
    c = vision.config
    tokens = (int(c["image_size"]) // int(c["patch_size"])) ** 2 + 1
    per_layer = tokens * (4 * int(c["hidden_size"]) + 2 * int(c["intermediate_size"])
                          + int(c["num_attention_heads"]) * tokens)
    return batch * int(c["num_hidden_layers"]) * per_layer * vision.dtype.itemsize + vision.cast_bytes


class SDTraining:
    """One run's training session on an SD model (``engine.optimizer.Training``): LoRA adapters on a clone
    and/or a token (one vector per text tower, started from the subject word's input embedding)."""

    def __init__(self, generator: SDGenerator, run: CreativeRun) -> None:
        self.gen, self.run = generator, run
        config, clip = run.config, generator.clip
        generator.check_run(run)
        self.patcher = generator.model.clone()
        self.adapters: dict[str, torch.nn.Module] = {}
        if config.train.lora:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                for key, layer in attention_weights(self.patcher).items():
                    adapter = LoRAAdapter.create_train(layer.weight, rank=config.rank, alpha=config.lora_alpha)
                    self.patcher.add_weight_wrapper(f"{key}.weight", adapter)
                    self.adapters[key] = adapter
        if generator.checkpointing:
            self.patcher.add_wrapper_with_key(DIFFUSION_MODEL, CHECKPOINTING, checkpointed_call)
        self.token: dict[str, torch.nn.Parameter] = {}
        if config.train.token:
            self.towers = text_towers(clip, generator.family)
            device = clip.patcher.load_device
            self.token = {tower: torch.nn.Parameter(token_init(clip, tower, run.subject).to(device))
                          for tower in self.towers}
            self.token_prompt = token_prompt(generator.template or generator.prompt, run.subject)
        self.params = [p for a in self.adapters.values() for n, p in a.named_parameters() if n != "alpha"]
        self.params += list(self.token.values())
        for p in self.params:
            p.requires_grad_(True)
        self.negative = encode(clip, generator.negative)
        if self.token:
            mm.load_models_gpu([clip.patcher], force_full_load=True)
            thaw(clip.cond_stage_model)
        else:
            self.positive = encode(clip, generator.prompt)
        mm.load_models_gpu([self.patcher, generator.vae.patcher, generator.clip_vision.patcher],
                           force_full_load=True)
        for module in (self.patcher.model, generator.vae.first_stage_model, generator.clip_vision.model):
            thaw(module)
        self._vision: DifferentiableClipVision | None = None

    def conditioning(self) -> list:
        """The positive CONDITIONING: fixed for a LoRA run; with a token, the prompt encoded now through core's
        CLIP with the token in its place, with gradients to the token."""
        if not self.token:
            return self.positive
        clip = self.gen.clip
        with inline_embedding(clip, {t: v.view(1, -1) for t, v in self.token.items()}) as used:
            tokens = clip.tokenize(self.token_prompt)
        if sorted(set(used)) != sorted(self.token):
            raise ValueError(f"The token did not reach the prompt {self.token_prompt!r}: put a space before "
                             "{subject}, as core needs before 'embedding:'.")
        # Core's CLIP layers add their residuals in place (``x += ...``) over a tensor a layer norm saved for
        # its backward; autograd would refuse that. Saving a copy of each tensor on the token's path (those
        # that require grad: activations, never the frozen weights) keeps what the backward needs.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone() if t.requires_grad else t, lambda t: t):
            return clip.encode_from_tokens_scheduled(tokens)

    def latent(self, seed: int) -> torch.Tensor:
        """The rendered latent for noise ``seed``, with gradients to the LoRA (core's guider, few-step sampler)."""
        render, patcher = self.gen.render, self.patcher
        empty = render.latent(patcher, self.run.config.samples)
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), render.scheduler,
                                                 render.steps)
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(self.conditioning(), self.negative)
        guider.set_cfg(render.cfg)
        return guider.sample(noise(empty, seed), empty, _FewStepSampler(render.sampler), sigmas, seed=int(seed))

    def images(self, seed: int) -> torch.Tensor:
        """IMAGE ``[samples, H, W, 3]`` of noise ``seed``: the VAE's own decoder and output processing, with gradients
        (``VAE.decode`` writes into a preallocated buffer and may fall back to tiles)."""
        vae = self.gen.vae
        mm.load_models_gpu([vae.patcher], force_full_load=True)
        latent = self.latent(seed).to(vae.device, vae.vae_dtype)
        decode = vae.first_stage_model.decode
        if self.gen.checkpointing and torch.is_grad_enabled():
            decoded = torch.utils.checkpoint.checkpoint(decode, latent, use_reentrant=False)
        else:
            decoded = decode(latent)
        return vae.process_output(decoded.float()).movedim(1, -1)

    def vision(self) -> DifferentiableClipVision:
        """The CLIP vision embedding over the model's current tensors: built again only when ComfyUI replaced
        one (a move to another device keeps the tensors; building it costs a meta skeleton of the model)."""
        cv = self.gen.clip_vision
        mm.load_models_gpu([cv.patcher], force_full_load=True)
        current = dict(cv.model.named_parameters())
        if self._vision is None or any(current.get(n) is not t for n, t in self._vision.tensors.items()):
            self._vision = vision_of(cv)
        return self._vision

    def embed(self, seed: int) -> torch.Tensor:
        return self.vision()(self.images(seed)).float()

    def check_images(self, seed: int, check: GateCheck, on_phase: budget.PhaseCallback) -> torch.Tensor:
        on_phase(budget.RENDER)
        with torch.no_grad():
            return self.images(seed).detach().float().cpu()

    def snapshot(self) -> SDState:
        """The LoRA as core's LORA_MODEL dict and the token's vectors (CPU copies)."""
        return SDState({f"{key}.{name}": p.detach().float().cpu().clone()
                        for key, adapter in self.adapters.items() for name, p in adapter.named_parameters()},
                       {tower: v.detach().float().cpu().clone().view(1, -1) for tower, v in self.token.items()})

    def restore(self, state: SDState) -> None:
        """Put a snapshot's LoRA and token back into the trained parameters."""
        with torch.no_grad():
            for key, adapter in self.adapters.items():
                for name, p in adapter.named_parameters():
                    p.copy_(state.lora[f"{key}.{name}"].to(p))
            for tower, v in self.token.items():
                v.copy_(state.token[tower].to(v))

    def learned(self, state: SDState, meta: dict[str, Any]) -> LearnedLoRA:
        gen = self.gen
        # the run's settings without the prior's own (its steps, guidance and template): a saved file then says
        # only what this run used, and its prompt is the one above
        config = {k: v for k, v in meta.get("config", {}).items() if k not in PRIOR_ONLY_SETTINGS}
        meta = {k: v for k, v in meta.items() if k != "prompt_template"}
        meta = {"generator": "sd", "family": gen.family, "space": gen.identity, "prompt": gen.prompt,
                "negative_prompt": gen.negative, "render": gen.render.meta(), "lora_targets": ATTENTION.pattern,
                **meta, "config": config}
        embedding = None
        if state.token:
            embedding = LearnedEmbedding({self.towers[t]: v for t, v in state.token.items()},
                                         {**meta, "subject": self.run.subject, "training_prompt": self.token_prompt})
        return LearnedLoRA(dict(state.lora), meta, embedding)

    def close(self) -> None:
        """Take the adapters off the clone and off the layers they were attached to (the layers are shared
        with the input MODEL), and stop their gradients."""
        ours = {id(a) for a in self.adapters.values()}
        for key, layer in attention_weights(self.patcher).items():
            layer.weight_function = [f for f in layer.weight_function if id(f) not in ours]
            self.patcher.weight_wrapper_patches.pop(f"{key}.weight", None)
        for p in self.params:
            p.requires_grad_(False)


def sd_sample_bank(generator_parts: tuple[Any, Any, Any, Any], prompt: str, negative: str, render: RenderSettings,
                   *, count: int, batch_size: int, seed: int, progress=None) -> tuple[EmbeddingBank, torch.Tensor]:
    """An SD model's typical set: ``count`` renders of ``prompt`` with core's own sampler (batch ``b`` with
    seed ``seed + b``), embedded by the CLIP vision model. Returns the bank (its space = the CLIP vision
    model's identity) and the first renders (up to 16) for a preview."""
    import comfy.sample

    model, clip, vae, clip_vision = generator_parts
    positive, negative_cond = encode(clip, prompt), encode(clip, negative)
    parts, previews = [], []
    vision = None
    for b, start in enumerate(range(0, count, batch_size)):
        rows = min(batch_size, count - start)
        with torch.no_grad():  # outside ComfyUI's executor grad is on, and core's VAE weights require grad:
            # a decode would then record its whole graph, and every kept preview would hold it alive
            empty = render.latent(model, rows)
            latent = comfy.sample.sample(model, noise(empty, seed + b), render.steps, render.cfg, render.sampler,
                                         render.scheduler, positive, negative_cond, empty, seed=seed + b,
                                         disable_pbar=True)
            images = vae.decode(latent)
            mm.load_models_gpu([clip_vision.patcher], force_full_load=True)
            vision = vision_of(clip_vision)
            parts.append(vision(images).float().cpu())
        if sum(len(p) for p in previews) < 16:
            previews.append(images[:16].float().cpu())
        if progress is not None:
            progress(start + rows, count)
    provenance = {"kind": "sd", "prior": vision.identity, "family": family(model), "prompt": prompt,
                  "negative_prompt": negative, "seed": int(seed), "count": int(count), "batch_size": int(batch_size),
                  "render": render.meta()}
    return EmbeddingBank(torch.cat(parts), provenance), torch.cat(previews)[:16]


def bank_estimate(model: Any, vae: Any, clip_vision: Any, render: RenderSettings, batch: int) -> budget.Estimate:
    """Memory of one bank batch, from ComfyUI's own numbers (UNet call with CFG rows, decode, CLIP vision)."""
    latent = render.latent(model, batch * (2 if render.cfg > 1.0 else 1))
    return budget.sd_bank_estimate(
        weights=weights_of(model, vae, clip_vision), unet_call=model.model.memory_required(latent.shape),
        decode=vae.memory_used_decode(latent[:batch].shape, vae.vae_dtype),
        vision_call=vision_bytes(vision_of(clip_vision), batch), batch=batch, width=render.width,
        height=render.height)
