"""One memory budget with ComfyUI: our models under its model management, and pre-flight checks.

The prior, the decoder and the MLLM are plain torch modules (diffusers / transformers). Each
is wrapped in a ``comfy.model_patcher.ModelPatcher`` with ComfyUI's load device (the GPU) and
offload device (normally the CPU), loaded with ``comfy.model_management.load_models_gpu`` right
before a node uses it, and from then on listed in ``current_loaded_models``: ComfyUI's "Unload
models" (``POST /free``), its eviction when another model needs room, and its memory reports
all cover them, exactly as they cover a checkpoint.

* Loaders put weights on the offload device in the dtype chosen for the load device;
  :func:`use` moves a model to the load device (a no-op move on a CPU-only machine, where both
  are the CPU, but the model is still registered).
* Our modules cannot run split across devices (they have no ``comfy.ops`` casting layers), so
  :class:`WholeModelPatcher` loads and unloads them all-or-nothing.
* During an optimisation run the MLLM is loaded for each gate check and offloaded right after;
  the decoder stays loaded until ComfyUI needs its room; the prior is reloaded with its training
  memory reserved after every check (:func:`gated_models`).
* One entry point per kind of run, taking the engine objects (and the optimiser's config):
  :func:`prepare_sampling`, :func:`prepare_optimisation`, :func:`prepare_rendering`. Each
  estimates the run's peak memory (``engine/budget.py``; a core-model renderer from ComfyUI's own
  estimates), refuses with numbers and what to change a run that cannot fit, and loads the models.
* Engine models say which torch modules move together (``managed_modules()``); :func:`register`
  puts them under one ModelPatcher.

The engine stays ComfyUI-free: only this module (and the nodes) import ``comfy``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

import comfy.model_management as mm
import comfy.model_patcher
import torch

from .engine import budget, model_shapes
from .engine.gate import ValidityGate, YesNoJudge
from .engine.mllm import MLLMJudge
from .engine.optimizer import OptimConfig
from .engine.prior import Prior
from .engine.render import ProgressCallback, Renderer

PATCHER_ATTR = "_creative_patcher"  # set on the model's main module; shared by every view of the model
log = logging.getLogger(__name__)


class Managed(Protocol):
    """An engine model ComfyUI can manage: it names the torch modules that move together."""

    def managed_modules(self) -> dict[str, torch.nn.Module]: ...


M = TypeVar("M", bound=Managed)


class _Modules(torch.nn.Module):
    """One model's torch modules under one ModelPatcher, so ComfyUI moves them together."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleDict(modules)
        self.device = device  # ModelPatcher reads and updates this

    def get_dtype(self) -> torch.dtype:  # ModelPatcher.model_dtype()
        return next(self.parameters()).dtype


# Named per model so ComfyUI's log says "Requested to load CreativePrior".
class CreativePrior(_Modules):
    pass


class CreativeDecoder(_Modules):
    pass


class CreativeMLLM(_Modules):
    pass


class WholeModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher for modules without ComfyUI's casting layers: always entirely on one device.

    ComfyUI's low-VRAM mode moves part of a model out and casts weights on the fly inside
    ``comfy.ops`` layers; diffusers/transformers layers would instead see weights on two devices.
    So a partial load loads everything, and a partial unload frees nothing (ComfyUI then unloads
    the whole model).
    """

    def partially_load(self, device_to: torch.device, extra_memory: float = 0, *args: object, **kwargs: object) -> int:
        return super().partially_load(device_to, 1e32, *args, **kwargs)

    def partially_unload(self, device_to: torch.device, memory_to_free: float = 0, *args: object,
                         **kwargs: object) -> int:
        return 0


def devices(kind: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) ComfyUI assigns: the MLLM offloads like a text encoder."""
    offload = mm.text_encoder_offload_device() if kind == budget.MLLM else mm.unet_offload_device()
    return mm.get_torch_device(), offload


HOLDERS: dict[str, type[_Modules]] = {budget.PRIOR: CreativePrior, budget.DECODER: CreativeDecoder,
                                      budget.MLLM: CreativeMLLM}


def register(model: M, kind: str) -> M:
    """Put an engine model (``Prior``, ``KandinskyDecoder``, ``MLLMJudge``: anything with
    ``managed_modules()``) under model management as one ComfyUI model of ``kind``; returns it."""
    modules = model.managed_modules()
    load, offload = devices(kind)
    key = next(iter(modules.values()))
    holder = HOLDERS[kind](modules, next(key.parameters()).device)
    key.__dict__[PATCHER_ATTR] = WholeModelPatcher(holder, load_device=load, offload_device=offload)
    return model


def patcher_of(obj: object) -> WholeModelPatcher | None:
    """The patcher of a prior, decoder, renderer, MLLM judge or gate; ``None`` if it is not managed.

    Views of one model (a prior with a concept, a renderer of a decoder, a gate of a judge) expose
    the same modules, so they share the patcher kept on the first of them."""
    if obj is None:
        return None
    if isinstance(obj, comfy.model_patcher.ModelPatcher):
        return obj
    modules = getattr(obj, "managed_modules", None)
    key = next(iter(modules().values()), None) if callable(modules) else None
    return key.__dict__.get(PATCHER_ATTR) if isinstance(key, torch.nn.Module) else None


def _patchers(objs: tuple[object, ...]) -> list[WholeModelPatcher]:
    out: list[WholeModelPatcher] = []
    for obj in objs:
        p = patcher_of(obj)
        if p is not None and all(p is not q for q in out):
            out.append(p)
    return out


def use(*objs: object, memory_required: int = 0) -> list[WholeModelPatcher]:
    """Load these models onto ComfyUI's compute device (registering them), keeping ``memory_required``
    bytes free for the work that follows; ComfyUI unloads other models if it must."""
    patchers = _patchers(objs)
    if patchers:
        mm.load_models_gpu(patchers, memory_required=int(memory_required), force_full_load=True)
    return patchers


def offload(*objs: object) -> None:
    """Move these models back to their offload device and out of ComfyUI's loaded list."""
    patchers = _patchers(objs)
    if not patchers:
        return
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if any(loaded.model is p for p in patchers):
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
    mm.soft_empty_cache()


def is_loaded(obj: object) -> bool:
    """Whether ComfyUI lists this model among its loaded models."""
    p = patcher_of(obj)
    return p is not None and any(loaded.model is p for loaded in mm.current_loaded_models)


# --------------------------------------------------------------------------- pre-flight


def _resident(obj: object) -> bool:
    """Weights that occupy the compute device's memory whatever ComfyUI does: load device = offload
    device (a CPU-only machine, --gpu-only), or a model we do not manage."""
    p = patcher_of(obj)
    return p is None or p.load_device == p.offload_device


def check(estimate: budget.Estimate, models: dict[str, object],
          device: torch.device | None = None) -> budget.Estimate:
    """Refuse (``InsufficientMemoryError``) when the estimate cannot fit ComfyUI's free memory; returns
    the estimate that was checked (on a GPU with ComfyUI's reserve added; the one given is not changed).

    On a GPU, memory ComfyUI can free by unloading models (any, ours included) counts as
    available, and ComfyUI's reserve (``--reserve-vram``) as needed. Weights that stay in the
    device's memory anyway (CPU-only: they were loaded into RAM) are already used, not needed.
    """
    device = device or mm.get_torch_device()
    free = int(mm.get_free_memory(device))
    reclaimable = 0
    if device.type != "cpu":
        reclaimable = int(sum(loaded.model_loaded_memory() for loaded in mm.current_loaded_models
                              if loaded.device == device and loaded.model is not None))
        reserve = budget.Part("ComfyUI reserve", int(mm.extra_reserved_memory()), "--reserve-vram")
        estimate = dataclasses.replace(
            estimate, parts=[*estimate.parts, reserve],
            phases=[dataclasses.replace(ph, parts=(*ph.parts, reserve.name)) for ph in estimate.phases])
    resident = {kind for kind, obj in models.items() if obj is not None and _resident(obj)}
    estimate.check(free, device=str(device), resident=resident, reclaimable=reclaimable)
    everything = estimate.all_resident(resident)
    if everything > free + reclaimable:
        log.info("Creative Generation: %s needs %s with every model on %s at once; it fits only by moving "
                 "models in and out between phases (slower).", estimate.what, budget.fmt_bytes(everything), device)
    return estimate


def prepare_sampling(prior: Prior, prompt: str, negative_prompt: str, *, count: int, batch_size: int, steps: int,
                     guidance: float) -> budget.Estimate:
    """Before a Prior Sampler run: refuse it if it cannot fit, else load the prior with room for one batch."""
    device = mm.get_torch_device()
    tokens = budget.prompt_token_count(prior.tokenizer_for_concept(), prompt, negative_prompt)
    estimate = budget.sampling_estimate(model_shapes.PriorShape.of(prior), prompt_tokens=tokens,
                                        batch=min(batch_size, count), steps=steps, guidance=guidance,
                                        on_gpu=device.type != "cpu")
    estimate = check(estimate, {budget.PRIOR: prior}, device)
    use(prior, memory_required=estimate.part("sampling activations").bytes)
    return estimate


def _mllm_tokens(judge: MLLMJudge, question: str, height: int, width: int, patch: int) -> tuple[int, int]:
    """(input tokens, vision patches) the judge's processor makes of a ``width`` x ``height`` image."""
    try:
        from PIL import Image

        inputs = judge.inputs(Image.new("RGB", (width, height)), question)
        pixels = inputs.get("pixel_values")
        temporal = int(getattr(getattr(judge.model.config, "vision_config", None), "temporal_patch_size", 1) or 1)
        return int(inputs["input_ids"].shape[-1]), model_shapes.vision_patches(pixels, patch, temporal)
    except Exception as error:  # an unusual processor: fall back to a generous guess
        log.debug("Creative Generation: could not count MLLM tokens (%s); assuming 2,048", error)
        return 2048, 2048


def _optimisation_estimate(prior: Prior, subject: str, cfg: OptimConfig, gate: ValidityGate | None,
                           renderer: Renderer | None, on_gpu: bool) -> budget.Estimate:
    prompt = cfg.prompt("", subject)  # the subject word stands in for the placeholder, which may take one more token
    tokens = budget.prompt_token_count(prior.tokenizer, prompt, cfg.negative_prompt) + 1
    decoder_shape, render = None, (512, 512, 4.0)
    decoder = getattr(renderer, "decoder", None)
    if renderer is not None:
        decoder_shape = model_shapes.DecoderShape.of(decoder)
        s = getattr(renderer, "settings", None)
        if s is not None:
            render = (int(s.height), int(s.width), float(s.guidance))
    judge = getattr(gate, "judge", None)
    mllm_shape, m_tokens, m_patches = None, 0, 0
    if judge is not None and isinstance(getattr(judge, "model", None), torch.nn.Module):
        mllm_shape = model_shapes.MLLMShape.of(judge.model)
        question = gate.question.format(subject=gate.subject or subject)
        m_tokens, m_patches = _mllm_tokens(judge, question, render[0], render[1], mllm_shape.vision_patch)
    return budget.optimisation_estimate(
        model_shapes.PriorShape.of(prior), prompt_tokens=tokens, prior_steps=cfg.prior_steps, guidance=cfg.guidance,
        rank=cfg.rank, train=cfg.train, decoder=decoder_shape, render=render, mllm=mllm_shape, mllm_tokens=m_tokens,
        mllm_vision_tokens=m_patches, on_gpu=on_gpu)


def prepare_optimisation(prior: Prior, subject: str, cfg: OptimConfig, gate: ValidityGate | None = None,
                         renderer: Renderer | None = None) -> tuple[ValidityGate | None, Renderer | None]:
    """Before a Creative LoRA Optimizer run (or a sweep of them) with ``cfg``: refuse it if training and
    the gate checks cannot fit, else load the prior for training and return the gate and renderer wrapped
    so that each check loads what it needs (:func:`gated_models`)."""
    device = mm.get_torch_device()
    if hasattr(renderer, "memory_estimate"):
        check_renderer(renderer)  # a core-model renderer sizes itself; a Kandinsky decoder is in the estimate
    estimate = _optimisation_estimate(prior, subject, cfg, gate, renderer, device.type != "cpu")
    decoder, judge = getattr(renderer, "decoder", None), getattr(gate, "judge", None)
    estimate = check(estimate, {budget.PRIOR: prior, budget.DECODER: decoder, budget.MLLM: judge}, device)
    return gated_models(prior, gate, renderer, estimate)


def render_estimate(renderer: Renderer, count: int = 1) -> budget.Estimate | None:
    """What drawing ``count`` embeddings at once takes: the renderer's own estimate (``memory_estimate``,
    e.g. the core renderer's from ComfyUI's model and VAE), or a Kandinsky decoder's from its shape;
    ``None`` for a renderer the pack cannot size."""
    own = getattr(renderer, "memory_estimate", None)
    if callable(own):
        return own(count)
    shape = model_shapes.DecoderShape.of(getattr(renderer, "decoder", None))
    s = getattr(renderer, "settings", None)
    if shape is None or s is None:
        return None
    return budget.render_estimate(shape, height=int(s.height), width=int(s.width), guidance=float(s.guidance),
                                  batch=count, on_gpu=mm.get_torch_device().type != "cpu")


def check_renderer(renderer: Renderer, count: int = 1) -> budget.Estimate | None:
    """Refuse a render of ``count`` embeddings at once that cannot fit (e.g. 16384 x 16384), before it starts."""
    estimate = render_estimate(renderer, count)
    if estimate is None:
        return None
    return check(estimate, {budget.DECODER: getattr(renderer, "decoder", None)})


def prepare_rendering(renderer: Renderer, count: int) -> None:
    """Before Render Embeddings: refuse a render that cannot fit, else load the decoder with room for it."""
    estimate = check_renderer(renderer, count)
    work = 0 if estimate is None else sum(p.bytes for p in estimate.parts if not p.model)
    use(renderer, memory_required=work)


def _work(estimate: budget.Estimate, *names: str) -> int:
    return sum(p.bytes for p in estimate.parts if p.name in names)


# --------------------------------------------------------------------------- an optimisation run


class ManagedJudge:
    """A gate judge whose model is loaded for each question and offloaded right after."""

    def __init__(self, inner: YesNoJudge, before: Callable[[], None], after: Callable[[], None]) -> None:
        self.inner, self._before, self._after = inner, before, after

    def p_yes(self, images: torch.Tensor, question: str) -> torch.Tensor:
        self._before()
        try:
            return self.inner.p_yes(images, question)
        finally:
            self._after()

    def __getattr__(self, name: str) -> object:  # history, family, ... of the wrapped judge
        if name.startswith("__") or name in ("inner", "_before", "_after"):  # copy/pickle probes, half-built
            raise AttributeError(name)
        return getattr(self.inner, name)


class ManagedRenderer:
    """A renderer whose decoder is loaded (with room for the render) before it draws."""

    def __init__(self, inner: Renderer, before: Callable[[], None]) -> None:
        self.inner, self._before = inner, before

    def __call__(self, embeds: torch.Tensor, progress: ProgressCallback | None = None) -> torch.Tensor:
        self._before()
        return self.inner(embeds, progress=progress)

    def __getattr__(self, name: str) -> object:  # settings, decoder, ...
        if name.startswith("__") or name in ("inner", "_before"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def gated_models(prior: Prior, gate: ValidityGate | None, renderer: Renderer | None,
                 estimate: budget.Estimate) -> tuple[ValidityGate | None, Renderer | None]:
    """Load the prior for training; return the gate and renderer wrapped so that each check loads the
    decoder, then the MLLM, offloads the MLLM afterwards and reloads the prior for the next step."""
    training = _work(estimate, "training state", "training activations")
    use(prior, memory_required=training)
    if renderer is not None and patcher_of(renderer) is not None:
        draws, rendering = renderer, _work(estimate, "render activations")
        renderer = ManagedRenderer(draws, lambda: use(draws, memory_required=rendering))
    if gate is not None and patcher_of(gate.judge) is not None:
        judge, asking = gate.judge, _work(estimate, "MLLM forward")

        def after() -> None:
            offload(judge)
            use(prior, memory_required=training)

        gate = dataclasses.replace(gate, judge=ManagedJudge(judge, lambda: use(judge, memory_required=asking), after))
    return gate, renderer
