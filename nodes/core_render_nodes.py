"""Rendering CLIP image embeddings through the user's own ComfyUI model (SD 2.1 unCLIP, SDXL).

A prior's image embedding plugs into core exactly where ``CLIPVisionEncode`` would: as the
``image_embeds`` of a ``CLIP_VISION_OUTPUT`` fed to ``unCLIPConditioning``. What matters is
the width: the model's CLIP-embedding noise augmentor has one (768 for SD 2.1 unCLIP-L, 1024
for unCLIP-H, 1280 for SDXL, whose "revision" path puts the embedding in its pooled slot), and
a mismatch only surfaces deep inside the UNet. :data:`WIDTHS` names which prior makes which
width; :func:`check_width` and :func:`model_embed_width` refuse mismatches early.

:class:`CoreRenderer` is the optimiser's renderer made of core pieces: per embedding, core
``unCLIPConditioning`` on the user's positive conditioning, core's sampler
(``comfy.sample.sample`` with the noise/latent preparation ``common_ksampler`` does) and core
``VAEDecode``. :class:`CoreRendererNode` (``CreativeCoreRenderer``) makes one, and
:class:`EmbedsToClipVision` (``CreativeEmbedsToCLIPVision``) hands embeddings to core's own
``unCLIPConditioning`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from comfy_api.latest import io

if TYPE_CHECKING:
    import comfy.clip_vision

from . import memory
from . import sockets as s
from .engine import budget
from .engine.render import ProgressCallback

# embedding width -> (image encoder and the priors that produce it, the core model that takes it)
WIDTHS: dict[int, tuple[str, str]] = {
    768: ("CLIP ViT-L/14: Kandinsky 2.1 and Karlo priors", "SD 2.1 unCLIP-L"),
    1024: ("CLIP ViT-H/14: no prior of this pack; core CLIPVisionEncode with a ViT-H encoder", "SD 2.1 unCLIP-H"),
    1280: ("CLIP ViT-bigG/14: Kandinsky 2.2 prior", "SDXL revision through core unCLIPConditioning"),
}
ANY = "any"
TARGETS: dict[str, int | None] = {
    ANY: None,
    "SD 2.1 unCLIP-L (768)": 768,
    "SD 2.1 unCLIP-H (1024)": 1024,
    "SDXL revision (1280)": 1280,
}


def compatible_pairs() -> str:
    return "; ".join(f"{w}-d ({enc}) -> {model}" for w, (enc, model) in WIDTHS.items())


def _source(width: int, prior: str = "") -> str:
    known = WIDTHS.get(width)
    what = f"{width}-d" + (f" ({known[0]})" if known else "")
    return what + (f" from prior '{prior}'" if prior else "")


def check_width(width: int, target: str = ANY, prior: str = "") -> None:
    """Refuse embeddings of a width the target (or, with "any", every target) cannot take."""
    if target not in TARGETS:
        raise ValueError(f"Unknown target '{target}'; choose one of {list(TARGETS)}.")
    needed = TARGETS[target]
    if needed is None:
        if width not in WIDTHS:
            raise ValueError(f"These embeddings are {_source(width, prior)}; no unCLIP/revision model takes that "
                             f"width. Compatible: {compatible_pairs()}.")
        return
    if width != needed:
        raise ValueError(f"These embeddings are {_source(width, prior)}, but target '{target}' needs {needed}-d "
                         f"CLIP image embeddings ({WIDTHS[needed][0]}). Use a matching prior or pick the target "
                         f"that fits. Compatible: {compatible_pairs()}.")


def model_embed_width(model) -> int:
    """Width of the CLIP image embeddings a core MODEL's unCLIP path takes, or raise.

    It is the width of the model's ``CLIPEmbeddingNoiseAugmentation`` (SD 2.1 unCLIP: 768 or
    1024; SDXL and its refiner: 1280). Models without one ignore ``unclip_conditioning``.
    """
    from comfy.ldm.modules.encoders.noise_aug_modules import CLIPEmbeddingNoiseAugmentation

    base = getattr(model, "model", None)
    augmentor = getattr(base, "noise_augmentor", None)
    if not isinstance(augmentor, CLIPEmbeddingNoiseAugmentation):
        name = type(base).__name__ if base is not None else type(model).__name__
        raise ValueError(f"This MODEL ({name}) does not take CLIP image embeddings: load an SD 2.1 unCLIP (L or H) "
                         f"or an SDXL checkpoint. Compatible: {compatible_pairs()}.")
    return int(augmentor.data_mean.shape[-1])


def clip_vision_output(embeds: torch.Tensor) -> comfy.clip_vision.Output:
    """A core ``CLIP_VISION_OUTPUT`` whose ``image_embeds`` are ``embeds`` (detached float32 copy)."""
    import comfy.clip_vision

    out = comfy.clip_vision.Output()
    out["image_embeds"] = embeds.detach().to(torch.float32).clone()
    return out


def unclip_conditioning(conditioning: list, embeds: torch.Tensor, strength: float, noise_augmentation: float) -> list:
    """Core ``unCLIPConditioning`` itself, applied to one embedding row ``[1, D]``.

    Several rows in one CLIP_VISION_OUTPUT would be blended by core (``unclip_adm`` sums
    them), so callers wanting one image per embedding call this once per row.
    """
    import nodes

    return nodes.unCLIPConditioning().apply_adm(conditioning, clip_vision_output(embeds), strength,
                                                noise_augmentation)[0]


@dataclass(frozen=True)
class CoreRenderSettings:
    """How a :class:`CoreRenderer` samples; fixed per graph so the gate judges comparable images."""

    steps: int = 20
    cfg: float = 7.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    seed: int = 0
    strength: float = 1.0
    noise_augmentation: float = 0.0


@dataclass(frozen=True, eq=False)
class CoreRenderer:
    """``renderer(embeds [B, D], progress=None) -> images [B, H, W, 3]`` (float32 0..1, CPU)
    through a core MODEL + VAE, as ``unCLIPConditioning -> KSampler -> VAEDecode`` would.

    Every embedding is rendered on its own with the same seed, so an embedding gives the same
    image wherever it sits in the batch. Sampling runs under ``torch.inference_mode()`` as in
    ComfyUI's executor, also when called from the optimiser (which runs with inference mode
    off); the embeddings are detached first and the images come back as ordinary tensors.
    ``progress(done, total)`` counts sampler steps over the whole batch; every step is also a
    cancel point.
    """

    model: Any
    vae: Any
    positive: list
    negative: list
    settings: CoreRenderSettings = CoreRenderSettings()

    @property
    def embed_width(self) -> int:
        return model_embed_width(self.model)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.settings.height, self.settings.width

    def check_time(self, count: int, *, on_gpu: bool, threads: int) -> None:
        """No time limit: ComfyUI's own sampler draws, and its every step is a cancel point."""

    def memory_estimate(self, count: int = 1, *, on_gpu: bool = True) -> budget.Estimate:
        """Memory of drawing ``count`` embeddings, from ComfyUI's own estimates: the sampler's minimum for one
        latent (``memory_required``, as ComfyUI's sampler computes it), the VAE decode of one 512 px tile (the
        floor core's decode falls back to) and the decoded images. The model's weights ComfyUI manages itself."""
        st = self.settings
        base = self.model.model
        channels = int(getattr(getattr(base, "latent_format", None), "latent_channels", 4))
        latent = [1, channels, max(1, st.height // 8), max(1, st.width // 8)]
        tile = [1, channels, min(latent[2], 64), min(latent[3], 64)]
        image = 3 * st.height * st.width * 4  # float32 RGB
        parts = [budget.Part("sampling", int(base.memory_required(latent)),
                             f"{st.width}x{st.height}, one image at a time (ComfyUI's estimate)"),
                 budget.Part("VAE decode", int(self.vae.memory_used_decode(tile, self.vae.vae_dtype)),
                             "one 512 px tile at least (ComfyUI's estimate)"),
                 budget.Part("images", image * count, f"{count} x {st.width}x{st.height} float32")]
        phases = [budget.Phase("sampling", ("sampling", "images")), budget.Phase("decode", ("VAE decode", "images"))]
        hints = [f"render smaller (Core Model Renderer width/height; now {st.width}x{st.height}; native sizes are "
                 "768 for SD 2.1 unCLIP and 1024 for SDXL)"]
        return budget.Estimate("render", parts, phases, hints)

    def __call__(self, embeds: torch.Tensor, progress: ProgressCallback | None = None) -> torch.Tensor:
        embeds = self._check(embeds)
        st = self.settings
        total = st.steps * embeds.shape[0]
        images = []
        with torch.inference_mode():
            for i in range(embeds.shape[0]):
                images.append(self._render_one(embeds[i:i + 1], i, total, progress))
        # Clone outside inference mode: inference tensors may not enter autograd-recorded ops later.
        return torch.cat(images).to(device="cpu", dtype=torch.float32).clamp(0.0, 1.0).clone()

    def _check(self, embeds: torch.Tensor) -> torch.Tensor:
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or not len(embeds):
            raise ValueError(f"embeds must be a non-empty [batch, width] tensor, got "
                             f"{tuple(getattr(embeds, 'shape', ())) or type(embeds).__name__}.")
        width = self.embed_width
        if embeds.shape[1] != width:
            target = WIDTHS.get(width, ("", f"this {width}-d model"))[1]
            raise ValueError(f"These embeddings are {_source(int(embeds.shape[1]))}, but the connected MODEL "
                             f"({type(self.model.model).__name__}, {target}) takes {width}-d CLIP image embeddings "
                             f"({WIDTHS.get(width, ('?',))[0]}). Compatible: {compatible_pairs()}.")
        return embeds.detach().to(device="cpu", dtype=torch.float32).clone()

    def _render_one(self, embed: torch.Tensor, index: int, total: int,
                    progress: ProgressCallback | None) -> torch.Tensor:
        import comfy.model_management
        import comfy.sample
        import nodes

        st = self.settings
        positive = unclip_conditioning(self.positive, embed, st.strength, st.noise_augmentation)
        latent = nodes.EmptyLatentImage().generate(st.width, st.height, 1)[0]["samples"]
        latent = comfy.sample.fix_empty_latent_channels(self.model, latent)
        noise = comfy.sample.prepare_noise(latent, st.seed)

        def on_step(step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            if progress is not None:
                progress(index * st.steps + min(step + 1, st.steps), total)

        samples = comfy.sample.sample(self.model, noise, st.steps, st.cfg, st.sampler_name, st.scheduler, positive,
                                      self.negative, latent, denoise=1.0, callback=on_step, disable_pbar=True,
                                      seed=st.seed)
        return nodes.VAEDecode().decode(self.vae, {"samples": samples})[0]


class EmbedsToClipVision(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeEmbedsToCLIPVision", display_name="Embeddings to CLIP Vision Output (Creative)",
            category=f"{s.CATEGORY}/render",
            description="Turns embeddings into a core CLIP_VISION_OUTPUT so core unCLIPConditioning -> KSampler can "
                        "render them: 768-d (Kandinsky 2.1 / Karlo priors) with SD 2.1 unCLIP-L, 1024-d with SD 2.1 "
                        "unCLIP-H, 1280-d (Kandinsky 2.2 prior) with SDXL (revision). Other widths are refused.",
            inputs=[s.Embeds.Input("embeds", tooltip="Embeddings from a prior, e.g. a concept's samples."),
                    io.Int.Input("start", default=0, min=0, tooltip="First embedding to pass on."),
                    io.Int.Input("count", default=1, min=1, max=64,
                                 tooltip="How many to pass on. unCLIPConditioning blends several into one "
                                         "conditioning (core sums them); for one image each use count 1 per node, "
                                         "or the Core Model Renderer."),
                    io.Combo.Input("target", options=list(TARGETS), default=ANY, optional=True,
                                   tooltip="The model the embeddings go to; their width must match it. 'any' accepts "
                                           "768, 1024 and 1280.")],
            outputs=[io.ClipVisionOutput.Output(display_name="clip_vision_output")])

    @classmethod
    def execute(cls, embeds, start, count, target="any") -> io.NodeOutput:
        check_width(embeds.dim, target, embeds.prior_identity)
        chosen = embeds.embeds[start:start + count]
        if not len(chosen):
            raise ValueError(f"start={start} is past the end of the bank ({len(embeds)} embeddings).")
        return io.NodeOutput(clip_vision_output(chosen))


class CoreRendererNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="CreativeCoreRenderer", display_name="Core Model Renderer (Creative)",
            category=f"{s.CATEGORY}/render",
            description="A renderer made of your own ComfyUI model: for each embedding, core unCLIPConditioning on "
                        "'positive', KSampler's sampler and VAEDecode. Feed it to the optimiser so the validity gate "
                        "judges images from your SD 2.1 unCLIP (768/1024-d embeddings) or SDXL (1280-d, revision) "
                        "checkpoint, and to Render Embeddings.",
            inputs=[io.Model.Input("model", tooltip="An SD 2.1 unCLIP (L: 768-d, H: 1024-d) or SDXL (1280-d) model."),
                    io.Vae.Input("vae", tooltip="The model's VAE, to decode the sampled latents."),
                    io.Conditioning.Input("positive", tooltip="Text conditioning the embedding is added to "
                                          "(through core unCLIPConditioning)."),
                    io.Conditioning.Input("negative", tooltip="Negative text conditioning (as for KSampler)."),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                                 tooltip="Noise seed; every embedding is drawn with it."),
                    io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampler steps (as for KSampler)."),
                    io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                                   tooltip="Classifier-free guidance (as for KSampler)."),
                    io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                                   tooltip="Sampler (as for KSampler)."),
                    io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                                   tooltip="Noise schedule (as for KSampler)."),
                    io.Int.Input("width", default=512, min=16, max=16384, step=8,
                                 tooltip="The gate only needs a recognisable image; native sizes are 768 (SD 2.1 "
                                         "unCLIP) and 1024 (SDXL)."),
                    io.Int.Input("height", default=512, min=16, max=16384, step=8, tooltip="Image height in pixels."),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                                   tooltip="unCLIPConditioning strength."),
                    io.Float.Input("noise_augmentation", default=0.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="unCLIPConditioning noise augmentation.")],
            outputs=[s.Renderer.Output(display_name="renderer")])

    @classmethod
    def execute(cls, model, vae, positive, negative, seed, steps, cfg, sampler_name, scheduler, width, height,
                strength, noise_augmentation) -> io.NodeOutput:
        model_embed_width(model)  # refuse a model without an unCLIP path here, not at the first gate check
        settings = CoreRenderSettings(steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                      width=width, height=height, seed=seed, strength=strength,
                                      noise_augmentation=noise_augmentation)
        renderer = CoreRenderer(model, vae, positive, negative, settings)
        memory.check_renderer(renderer)  # refuse a size that cannot be drawn here, not at the first render
        return io.NodeOutput(renderer)


NODES = [EmbedsToClipVision, CoreRendererNode]
