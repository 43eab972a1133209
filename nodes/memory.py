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
* Engine values size themselves: a prior, a renderer, a gate's judge, a :class:`CreativeRun` and an
  evaluator each return a ``budget.Estimate`` (parts, the phases they are alive in, hints). This
  module only compares an estimate with ComfyUI's free memory (:func:`check`, refusing with the
  numbers and what to change) and loads: one entry point per kind of work
  (:func:`prepare_sampling`, :func:`prepare_run`, :func:`prepare_sweep`, :func:`prepare_selection`,
  :func:`prepare_rendering`). A run then tells its :class:`PhaseLoader` each phase it enters
  (training, the gate's render, the gate's question): the phase's models are loaded with room for
  its working memory, and an MLLM is offloaded as soon as a phase no longer asks it.
* Engine models say which torch modules move together (``managed_modules()``); :func:`register`
  puts them under one ModelPatcher.

The engine stays ComfyUI-free: only this module (and the nodes) import ``comfy``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol, TypeVar

import comfy.model_management as mm
import comfy.model_patcher
import torch

from .engine import budget
from .engine.evaluation import EVAL_JUDGE, Evaluator
from .engine.gate import GateCheck
from .engine.optimizer import CreativeRun
from .engine.prior import Prior
from .engine.render import Renderer

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


def _own_patchers(obj: object) -> list[comfy.model_patcher.ModelPatcher] | None:
    """The ComfyUI models of an object made of core models (the SD generator: its VAE and CLIP vision), or
    ``None`` for anything else."""
    own = getattr(obj, "model_patchers", None)
    return list(own()) if callable(own) else None


def _patchers(objs: tuple[object, ...]) -> list[comfy.model_patcher.ModelPatcher]:
    out: list[comfy.model_patcher.ModelPatcher] = []
    for obj in objs:
        found = _own_patchers(obj)
        for p in found if found is not None else [patcher_of(obj)]:
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


# --------------------------------------------------------------------------- pre-flight


def _resident(obj: object) -> bool:
    """Weights that occupy the compute device's memory whatever ComfyUI does: load device = offload
    device (a CPU-only machine, --gpu-only), or a model we do not manage."""
    own = _own_patchers(obj)
    if own is not None:
        return all(p.load_device == p.offload_device for p in own)
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


def on_gpu() -> bool:
    return mm.get_torch_device().type != "cpu"


def prepare_sampling(prior: Prior, prompt: str, negative_prompt: str, *, count: int, batch_size: int, steps: int,
                     guidance: float) -> budget.Estimate:
    """Before a Prior Sampler run: refuse it if it cannot fit, else load the prior with room for one batch."""
    estimate = prior.sampling_estimate(prompt, negative_prompt, batch=min(batch_size, count), steps=steps,
                                       guidance=guidance, on_gpu=on_gpu())
    estimate = check(estimate, {budget.PRIOR: prior})
    use(prior, memory_required=budget.phase_work(estimate, budget.SAMPLING))
    return estimate


class PhaseLoader:
    """The host side of a checked run: as the run enters a phase (``on_phase(name)``), load the models that
    phase uses with room for its working memory; an MLLM is offloaded as soon as a phase does not ask it."""

    TRANSIENT = (budget.MLLM, EVAL_JUDGE)  # loaded only while they answer

    def __init__(self, estimate: budget.Estimate, models: dict[str, object]) -> None:
        self.estimate, self.models = estimate, models
        self._asked: set[str] = set()

    def __call__(self, phase: str) -> None:
        kinds = budget.phase_models(self.estimate, phase)
        for kind in [k for k in self._asked if k not in kinds]:
            offload(self.models[kind])
            self._asked.discard(kind)
        self._asked |= kinds & set(self.TRANSIENT)
        use(*(self.models.get(kind) for kind in sorted(kinds)),
            memory_required=budget.phase_work(self.estimate, phase))


def prepare_run(run: CreativeRun) -> PhaseLoader:
    """Before an optimisation run (a Creative LoRA Optimizer, each trial, variation or sweep run): refuse it
    if training and the gate checks cannot fit, else return the loader the run calls at each phase."""
    models = run.models()
    return PhaseLoader(check(run.memory_estimate(on_gpu=on_gpu()), models), models)


def prepare_sweep(run: CreativeRun, evaluator: Evaluator) -> PhaseLoader:
    """Before a creativity sweep: its runs (``run`` with or without gate: the one given holds the gate if any)
    and every measurement (sampling, rendering, the independent judge) must fit."""
    estimate = run.memory_estimate(on_gpu=on_gpu())
    measuring = evaluator.memory_estimate(run, on_gpu=on_gpu())
    parts = {p.name: p for p in [*measuring.parts, *estimate.parts]}  # shared model weights counted once
    combined = budget.Estimate("creativity sweep", list(parts.values()), [*estimate.phases, *measuring.phases],
                               [*measuring.hints, *estimate.hints])
    models = {**run.models(), budget.DECODER: evaluator.renderer, EVAL_JUDGE: evaluator.judge}
    return PhaseLoader(check(combined, models), models)


def prepare_selection(gate_check: GateCheck | None, renderer: Renderer | None, subject: str,
                      batch: int) -> PhaseLoader:
    """Before Rare Select: rendering a batch of candidates and judging them must fit."""
    drawing = None if renderer is None else renderer.memory_estimate(batch, on_gpu=on_gpu())
    gate = None if gate_check is None else gate_check.gate
    asking = None if gate is None else gate.memory_estimate(subject, *renderer.image_size, on_gpu=on_gpu())
    estimate = budget.gate_check_estimate(drawing, asking)
    models = {budget.DECODER: renderer, budget.MLLM: gate}
    if estimate is None:
        return PhaseLoader(budget.Estimate("selection", [], [budget.Phase(budget.RENDER, ())]), models)
    return PhaseLoader(check(estimate, models), models)


@dataclasses.dataclass(frozen=True)
class CoreModels:
    """Core ComfyUI models (MODEL, a VAE's and a CLIP vision's patchers) that load themselves as core's sampling
    and decoding do: a check needs only whether their weights already sit in the device's memory."""

    patchers: tuple[comfy.model_patcher.ModelPatcher, ...]

    def model_patchers(self) -> list[comfy.model_patcher.ModelPatcher]:
        return list(self.patchers)


def prepare_sd_bank(estimate: budget.Estimate, patchers: tuple[comfy.model_patcher.ModelPatcher, ...]) -> None:
    """Before an SD Embedding Bank run: refuse a batch that cannot fit (``estimate``: from ComfyUI's own
    numbers for the batch)."""
    check(estimate, {budget.PRIOR: CoreModels(tuple(patchers))})


def check_renderer(renderer: Renderer, count: int = 1) -> budget.Estimate | None:
    """Refuse a render of ``count`` embeddings at once that cannot fit (e.g. 16384 x 16384) or cannot
    finish in reasonable time, before it starts."""
    renderer.check_time(count, on_gpu=on_gpu(), threads=torch.get_num_threads())
    estimate = renderer.memory_estimate(count, on_gpu=on_gpu())
    if estimate is None:
        return None
    return check(estimate, {budget.DECODER: renderer})


def prepare_rendering(renderer: Renderer, count: int) -> None:
    """Before Render Embeddings: refuse a render that cannot fit, else load the decoder with room for it."""
    estimate = check_renderer(renderer, count)
    work = 0 if estimate is None else max(budget.phase_work(estimate, ph.name) for ph in estimate.phases)
    use(renderer, memory_required=work)
