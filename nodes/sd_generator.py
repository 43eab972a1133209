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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import comfy.model_management as mm
import comfy.samplers
import comfy.supported_models as families
from comfy.weight_adapter.lora import LoRAAdapter

from .engine import budget, few_step
from .engine.bank import EmbeddingBank
from .engine.clip_vision import DifferentiableClipVision

if TYPE_CHECKING:
    from .engine.gate import GateCheck
    from .engine.optimizer import CreativeRun, OptimConfig

SUPPORTED = {"SD 1.5": families.SD15, "SDXL": families.SDXL}
# Subclasses of a supported family that cannot render from noise and a prompt alone.
NEEDS_AN_IMAGE = (families.SD15_instructpix2pix, families.SDXL_instructpix2pix)
MAX_RENDER_STEPS = 8
ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")  # the LoRA's target layers


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


@dataclass
class LearnedLoRA:
    """What an SD run learns: core's ``LORA_MODEL`` dict (CPU tensors) and the run's metadata."""

    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class SDGenerator:
    """A creative run's generator over the user's SD 1.5 / SDXL model (``engine.optimizer.Generator``).

    Checked on creation: the family, the CLIP vision model (a CLIP ViT with projection) and the render
    settings. ``identity`` is the CLIP vision embedding space, so a norm fitted on a bank of this
    generator (or of any SD model embedded by the same CLIP vision model) is accepted and any other refused.
    """

    model: Any
    clip: Any
    vae: Any
    clip_vision: Any
    prompt: str
    negative: str
    render: RenderSettings
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

    def training_estimate(self, run: CreativeRun, *, on_gpu: bool) -> budget.Estimate:
        render, model, samples = self.render, self.model, run.config.samples
        rows = 2 if render.cfg > 1.0 else 1
        latent = render.latent(model, rows * samples)
        vae_dtype = self.vae.vae_dtype
        layers = attention_weights(model).values()
        lora = sum(rank_params(m.weight.shape, run.config.rank) for m in layers)
        merged = sum(m.weight.numel() for m in layers) * compute_dtype(model).itemsize
        return budget.sd_training_estimate(
            weights=weights_of(model, self.vae, self.clip_vision), unet_call=unet_call_bytes(model, latent.shape),
            merged=merged, decode=self.vae.memory_used_decode(latent[:samples].shape, vae_dtype),
            vision_call=vision_bytes(self.vision, samples), render_steps=render.steps, lora_params=lora,
            gated=run.check is not None, width=render.width, height=render.height, rank=run.config.rank)

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


def attention_weights(model: Any) -> dict[str, torch.nn.Module]:
    """The LoRA's target layers: ``diffusion_model.<module>`` -> the attention projection (a comfy.ops layer)."""
    return {f"diffusion_model.{name}": m for name, m in model.model.diffusion_model.named_modules()
            if ATTENTION.search(name) and hasattr(m, "weight_function") and getattr(m, "weight", None) is not None}


def rank_params(shape: torch.Size, rank: int) -> int:
    """Values of one rank-``rank`` LoRA on a weight of ``shape``: up (out x r) and down (r x in)."""
    return rank * (int(shape[0]) + int(math.prod(shape[1:])))


def vision_bytes(vision: DifferentiableClipVision, batch: int) -> int:
    """One CLIP vision pass with its backward: per token and layer about four hidden-wide and two
    intermediate-wide values and the attention map, in the weights' dtype. Measured at CLIP ViT-L/14
    (224 px, fp16 on CPU, tests/benchmarks/bench_sd_path.py's parts): 177 MiB; this gives 193 MiB."""
    c = vision.config
    tokens = (int(c["image_size"]) // int(c["patch_size"])) ** 2 + 1
    per_layer = tokens * (4 * int(c["hidden_size"]) + 2 * int(c["intermediate_size"])
                          + int(c["num_attention_heads"]) * tokens)
    itemsize = vision.tensors["vision_model.embeddings.patch_embedding.weight"].dtype.itemsize
    return batch * int(c["num_hidden_layers"]) * per_layer * itemsize


class SDTraining:
    """One run's training session on an SD model (``engine.optimizer.Training``): LoRA adapters on a clone."""

    def __init__(self, generator: SDGenerator, run: CreativeRun) -> None:
        self.gen, self.run = generator, run
        config = run.config
        self.patcher = generator.model.clone()
        self.adapters: dict[str, torch.nn.Module] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for key, layer in attention_weights(self.patcher).items():
                adapter = LoRAAdapter.create_train(layer.weight, rank=config.rank, alpha=config.lora_alpha)
                self.patcher.add_weight_wrapper(f"{key}.weight", adapter)
                self.adapters[key] = adapter
        self.params = [p for a in self.adapters.values() for n, p in a.named_parameters() if n != "alpha"]
        for p in self.params:
            p.requires_grad_(True)
        self.positive, self.negative = encode(generator.clip, generator.prompt), encode(generator.clip,
                                                                                          generator.negative)
        mm.load_models_gpu([self.patcher, generator.vae.patcher, generator.clip_vision.patcher],
                           force_full_load=True)
        for module in (self.patcher.model, generator.vae.first_stage_model, generator.clip_vision.model):
            thaw(module)
        self._vision: DifferentiableClipVision | None = None

    def latent(self, seed: int) -> torch.Tensor:
        """The rendered latent for noise ``seed``, with gradients to the LoRA (core's guider, few-step sampler)."""
        render, patcher = self.gen.render, self.patcher
        empty = render.latent(patcher, self.run.config.samples)
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), render.scheduler,
                                                 render.steps)
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(self.positive, self.negative)
        guider.set_cfg(render.cfg)
        return guider.sample(noise(empty, seed), empty, _FewStepSampler(render.sampler), sigmas, seed=int(seed))

    def images(self, seed: int) -> torch.Tensor:
        """IMAGE ``[samples, H, W, 3]`` of noise ``seed``: the VAE's own decoder and output processing, with gradients
        (``VAE.decode`` writes into a preallocated buffer and may fall back to tiles)."""
        vae = self.gen.vae
        mm.load_models_gpu([vae.patcher], force_full_load=True)
        latent = self.latent(seed).to(vae.device, vae.vae_dtype)
        return vae.process_output(vae.first_stage_model.decode(latent).float()).movedim(1, -1)

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

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The LoRA as core's LORA_MODEL dict (CPU copies)."""
        return {f"{key}.{name}": p.detach().float().cpu().clone()
                for key, adapter in self.adapters.items() for name, p in adapter.named_parameters()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, adapter in self.adapters.items():
                for name, p in adapter.named_parameters():
                    p.copy_(state[f"{key}.{name}"].to(p))

    def learned(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> LearnedLoRA:
        gen = self.gen
        return LearnedLoRA(dict(state), {"generator": "sd", "family": gen.family, "space": gen.identity,
                                         "prompt": gen.prompt, "negative_prompt": gen.negative,
                                         "render": gen.render.meta(), "lora_targets": ATTENTION.pattern, **meta})

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
