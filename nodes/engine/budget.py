"""Pre-flight memory estimate of a sampling or optimisation run (ComfyUI-free).

A run that cannot fit should be refused before it starts, with numbers, instead of failing
with an out-of-memory error at step 700. This module turns parameter counts, dtypes, batch
sizes, step counts and layer widths into bytes; the nodes compare the result with the free
memory ComfyUI reports (``nodes/memory.py``).

What is counted, per component (bytes = values x bytes per value of the component's dtype):

* **weights** of the prior (transformer + CLIP text encoder + image encoder), the decoder
  (UNet + MoVQ [+ Kandinsky 2.1's text encoder]) and the MLLM: their parameters and buffers.
* **training state** of the optimiser: LoRA + token parameters, their gradients, AdamW's two
  moments and the optimiser's snapshot of the last state that passed the gate (5 copies).
* **training activations**: what autograd keeps for backward while the prompt goes through the
  text encoder, the prompt prefix through every prior layer, and ``prior_steps`` denoising
  steps with classifier-free guidance (two rows per sample) through every layer. Frozen
  linear layers keep nothing (autograd saves a frozen weight's input only for the weight's
  own gradient); LoRA adapters keep their input; see :func:`prior_layer_saved_values`.
* **sampling activations**: the prompt prefix cache (keys and values of every layer) plus the
  largest per-layer working set of one denoising step over ``2 x batch`` rows.
* **render activations** (heuristic): UNet skip connections and working set at the latent
  resolution for ``2 x batch`` rows (CFG), or the MoVQ decode at full resolution, whichever
  is larger.
* **MLLM forward** (heuristic): one forward over the image + question tokens, with the KV
  cache, the largest layer's working set and the vision tower's.

A run has phases; only the models a phase uses must be on the device during it, since
ComfyUI can move the others out (``load_models_gpu``). :meth:`Estimate.peak` is the largest
phase, the memory the run needs at minimum; :meth:`Estimate.all_resident` keeps every model
on the device at once (no swapping between phases).

The activation formulas are checked against live-tensor peaks measured on small real models
(``tests/engine/test_budget.py``) and, at full size, by ``tests/benchmarks/bench_real_shapes.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .model_shapes import DecoderShape, MLLMShape, PriorShape

MIB = 1024**2
GIB = 1024**3

# Components (``Part.model``) whose weights move with one ComfyUI-managed model.
PRIOR, DECODER, MLLM = "prior", "decoder", "mllm"
# Phases of a run, as hosts hear them (the optimiser's on_phase) to load what the phase uses.
SAMPLING, TRAINING, RENDER, JUDGE = "sampling", "training step", "gate check: render", "gate check: MLLM"
TRAINING_STATE = "training state"
PhaseCallback = Callable[[str], None]  # hears a phase's name before a run enters it

# Copies of each trainable value alive during a step: parameter, gradient (of the previous
# step, freed only at zero_grad), AdamW exp_avg and exp_avg_sq, the gate's snapshot.
TRAINING_COPIES = 5
LORA_TARGETS = 4  # to_q, to_k, to_v, to_out.0: square width x width projections
STEP_TOKENS = 3  # the prior's step-dependent tokens: timestep, noisy latent, readout


class InsufficientMemoryError(RuntimeError):
    """The run cannot fit the device's free memory; the message lists needed vs free per component."""


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per value: fp32 4, fp16/bf16 2 (names or torch dtypes)."""
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64}[dtype]
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(
        dtype, str(dtype).replace("torch.", ""))


def fmt_bytes(n: float) -> str:
    """``1.23 GiB`` / ``45.6 MiB`` / ``12 KiB``."""
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def fmt_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} k"


# --------------------------------------------------------------------------- pure arithmetic


def lora_parameters(width: int, layers: int, rank: int, targets: int = LORA_TARGETS) -> int:
    """A rank-``rank`` LoRA on ``targets`` square ``width x width`` projections in each layer: A and B."""
    return targets * layers * rank * 2 * width


def training_state_bytes(trainable: int, dtype: torch.dtype | str = torch.float32,
                         copies: int = TRAINING_COPIES) -> int:
    return int(trainable) * copies * dtype_bytes(dtype)


def prior_layer_saved_values(tokens: int, width: int, ff_width: int, heads: int, keys: int, lora_rank: int = 0,
                             lora_targets: int = LORA_TARGETS) -> int:
    """Values one prior transformer layer keeps for backward (frozen weights, optional LoRA on attention).

    Per query token: the inputs of the two layer norms (2 W), q, k and v for the attention
    matmuls (3 W), the GELU input (F) and the attention probabilities (heads x keys). With LoRA,
    also the normed input the q/k/v adapters read and the merged heads ``to_out``'s adapter reads
    (2 W) and each adapter's rank-r intermediate. Frozen linear layers keep no inputs: autograd
    saves a weight's input only for that weight's own gradient.
    """
    per_token = 5 * width + ff_width + heads * keys
    if lora_rank:
        per_token += 2 * width + lora_rank * lora_targets
    return tokens * per_token


def clip_text_saved_values(tokens: int, width: int, ff_width: int, heads: int, layers: int) -> int:
    """Values CLIP's text encoder keeps for backward when only its input embedding is trained.

    Per token and layer: the two layer-norm inputs (2 W), q, k, v and the attention output (4 W),
    quick-GELU's input and sigmoid (2 F) and the attention probabilities (heads x tokens).
    """
    return layers * tokens * (6 * width + 2 * ff_width + heads * tokens)


def prior_training_activation_bytes(*, width: int, layers: int, heads: int, ff_width: int, prompt_tokens: int,
                                    prior_steps: int, batch: int = 1, guided: bool = True, dtype=torch.float32,
                                    lora_rank: int = 10, text_width: int = 0, text_layers: int = 0,
                                    text_heads: int = 1, text_ff_width: int = 0, text_trained: bool = True) -> int:
    """Autograd's saved activations for one optimiser step (the peak is at the end of the forward).

    Two prompts (the unconditional one and the template with the token) go through the text
    encoder (only when the token is trained: otherwise nothing upstream needs a gradient) and
    through every prior layer as the prefix (``prompt_tokens + 1`` positions each: the text
    and the projected prompt embedding). Each denoising step then runs 3 tokens for each of
    ``batch`` x (2 with CFG) rows, attending to the prefix and to themselves.
    """
    rows = batch * (2 if guided else 1)
    prefix = prompt_tokens + 1
    per_layer = (prior_layer_saved_values(2 * prefix, width, ff_width, heads, prefix, lora_rank)
                 + prior_steps * prior_layer_saved_values(rows * STEP_TOKENS, width, ff_width, heads,
                                                          prefix + STEP_TOKENS, lora_rank))
    values = layers * per_layer
    if text_trained and text_layers:
        values += clip_text_saved_values(2 * prompt_tokens, text_width, text_ff_width, text_heads, text_layers)
    return values * dtype_bytes(dtype)


def prior_sampling_activation_bytes(*, width: int, layers: int, heads: int, ff_width: int, prompt_tokens: int,
                                    batch: int, guided: bool = True, dtype=torch.float32, embed_dim: int = 0) -> int:
    """Peak working memory of sampling one batch without gradients.

    The prefix cache holds keys and values of both prompts in every layer; a denoising step
    then holds, per token, the layer's input, normed input, q, k, v and the residual stream
    (about 8 W) plus the feed-forward hidden state before and after GELU (2 F), or, if larger,
    the attention scores, their concatenation and softmax (3 x heads x keys). For small batches
    the prefix pass over both prompts is the larger working set.
    """
    rows = batch * (2 if guided else 1)
    prefix = prompt_tokens + 1
    cache = layers * 2 * 2 * prefix * width
    per_token = max(8 * width + 2 * ff_width, 6 * width + 3 * heads * (prefix + STEP_TOKENS))
    step = rows * STEP_TOKENS * per_token + 8 * rows * max(embed_dim, 1)
    build = 2 * prefix * max(8 * width + 2 * ff_width, 6 * width + 3 * heads * prefix)  # the prefix pass itself
    return (cache + max(step, build)) * dtype_bytes(dtype)


def unet_activation_bytes(*, height: int, width: int, latent_factor: int, channels: Iterable[int],
                          layers_per_block: int, batch: int = 1, guided: bool = True, dtype=torch.float32) -> int:
    """Heuristic peak of one UNet call: skip connections + the top level's working set.

    ``channels`` are the UNet's ``block_out_channels``; the latent is ``height/latent_factor`` x
    ``width/latent_factor``. The down path keeps ``layers_per_block + 1`` feature maps per level
    for the up path; the first up block at full latent resolution holds about four maps of the
    concatenated width. Attention runs through scaled-dot-product kernels that do not
    materialise the attention map (measured on CPU; flash/memory-efficient kernels on GPU).
    """
    channels = list(channels)
    rows = batch * (2 if guided else 1)
    pixels = max(1, (height // latent_factor) * (width // latent_factor))
    skips = sum((layers_per_block + 1) * c * (pixels // 4**i) for i, c in enumerate(channels))
    top = 4 * (channels[0] + channels[min(1, len(channels) - 1)]) * pixels
    return rows * (skips + top) * dtype_bytes(dtype)


def movq_activation_bytes(*, height: int, width: int, channels: Iterable[int], batch: int = 1,
                          dtype=torch.float32) -> int:
    """Heuristic peak of the MoVQ decode: ~11 maps of its first width at full resolution (its
    spatial norms interpolate the latent to every resolution and modulate the group norm)."""
    channels = list(channels)
    return batch * 11 * channels[0] * height * width * dtype_bytes(dtype)


def mllm_activation_bytes(*, tokens: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                          vision_tokens: int = 0, vision_hidden: int = 0, vision_intermediate: int = 0,
                          vision_heads: int = 1, dtype=torch.float32) -> int:
    """Heuristic peak of one yes/no forward (no gradients, last-position logits only).

    The language model keeps its KV cache (2 x layers x tokens x kv width) and the embeddings;
    one layer at a time holds ~6 hidden-wide and 3 intermediate-wide values per token plus the
    attention map (heads x tokens^2, as if materialised). The vision tower's layer working set
    comes first and is freed before the language model runs; the larger of the two counts.
    """
    head_dim = hidden // max(1, heads)
    kv_cache = 2 * layers * tokens * kv_heads * head_dim
    text = kv_cache + 2 * tokens * hidden + tokens * (6 * hidden + 3 * intermediate) + heads * tokens * tokens
    vision = 0
    if vision_tokens:
        vision = (2 * vision_tokens * vision_hidden + vision_tokens * (4 * vision_hidden + 2 * vision_intermediate)
                  + vision_heads * vision_tokens * vision_tokens)
    return max(text, vision + 2 * tokens * hidden) * dtype_bytes(dtype)


# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Part:
    """One component of a run's memory."""

    name: str
    bytes: int
    detail: str = ""
    model: str = ""  # PRIOR / DECODER / MLLM for weights that move with that model; "" for working memory


@dataclass(frozen=True)
class Phase:
    name: str
    parts: tuple[str, ...]  # names of the parts alive in this phase


@dataclass
class Estimate:
    """Parts (bytes each), the phases they are alive in, and what to change when it does not fit."""

    what: str
    parts: list[Part]
    phases: list[Phase]
    hints: list[str] = field(default_factory=list)

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def phase_bytes(self, phase: Phase, resident: Iterable[str] = ()) -> int:
        """Bytes the phase adds; weights of models in ``resident`` (already counted as used) add nothing."""
        resident = set(resident)
        return sum(p.bytes for p in self.parts if p.name in phase.parts and not (p.model and p.model in resident))

    def peak(self, resident: Iterable[str] = ()) -> int:
        """The largest phase: the least free memory the run needs (ComfyUI swaps models between phases)."""
        return max(self.phase_bytes(ph, resident) for ph in self.phases)

    def peak_phase(self, resident: Iterable[str] = ()) -> Phase:
        return max(self.phases, key=lambda ph: self.phase_bytes(ph, resident))

    def all_resident(self, resident: Iterable[str] = ()) -> int:
        """Every model's weights on the device at once, plus the largest working memory of any phase."""
        resident = set(resident)
        weights = sum(p.bytes for p in self.parts if p.model and p.model not in resident)
        work = max(sum(p.bytes for p in self.parts if p.name in ph.parts and not p.model) for ph in self.phases)
        return weights + work

    def table(self, resident: Iterable[str] = ()) -> str:
        resident = set(resident)
        lines = []
        for p in self.parts:
            note = " (already in memory)" if p.model and p.model in resident else ""
            lines.append(f"  {p.name + ':':<28}{fmt_bytes(p.bytes):>11}  {p.detail}{note}")
        lines.append("  phases (models a phase does not use can be moved out by ComfyUI): " + "; ".join(
            f"{ph.name} {fmt_bytes(self.phase_bytes(ph, resident))}" for ph in self.phases))
        return "\n".join(lines)

    def check(self, free: int, *, device: str = "the device", resident: Iterable[str] = (),
              reclaimable: int = 0) -> None:
        """Raise :class:`InsufficientMemoryError` when the peak exceeds ``free`` + ``reclaimable``.

        ``free``: the device's free memory now; ``reclaimable``: what ComfyUI can free by
        unloading loaded models (ours included); ``resident``: models whose weights already sit
        in memory that stays used whatever happens (a CPU run: load and offload device are one).
        """
        resident = set(resident)
        need = self.peak(resident)
        avail = free + reclaimable
        if need <= avail:
            return
        phase = self.peak_phase(resident)
        also = f" + {fmt_bytes(reclaimable)} ComfyUI can free by unloading models" if reclaimable else ""
        todo = "\n".join(f"  - {h}" for h in self.hints) or "  - use a device with more memory"
        raise InsufficientMemoryError(
            f"Not enough memory on {device} for this {self.what}: it needs {fmt_bytes(need)} at its peak "
            f"({phase.name}) but only {fmt_bytes(free)} is free{also}; short by {fmt_bytes(need - avail)}.\n"
            f"{self.table(resident)}\nTo make it fit:\n{todo}")


def _weights_part(name: str, model: str, params: int, nbytes: int, dtype: torch.dtype) -> Part:
    return Part(name, nbytes, f"{fmt_count(params)} params, {dtype_name(dtype)}", model)


def _dtype_hint(what: str, dtype: torch.dtype, nbytes: int, node: str, on_gpu: bool) -> list[str]:
    if on_gpu and dtype == torch.float32:
        return [f"load the {what} in bf16 or fp16 (dtype on {node}): saves about {fmt_bytes(nbytes / 2)}"]
    return []


def sampling_estimate(prior: PriorShape, *, prompt_tokens: int, batch: int, steps: int, guidance: float,
                      on_gpu: bool = True) -> Estimate:
    """Memory of a Prior Sampler run: the prior's weights plus one batch's working memory."""
    guided = guidance > 1.0
    act = prior_sampling_activation_bytes(width=prior.width, layers=prior.layers, heads=prior.heads,
                                          ff_width=prior.ff_width, prompt_tokens=prompt_tokens, batch=batch, guided=guided,
                                          dtype=prior.dtype, embed_dim=prior.embed_dim)
    parts = [_weights_part("prior weights", PRIOR, prior.params, prior.weight_bytes, prior.dtype),
             Part("sampling activations", act,
                  f"batch {batch}{' x2 (CFG)' if guided else ''}, {steps} steps, {dtype_name(prior.dtype)}")]
    per_100 = act / max(1, batch) * 100
    hints = [(f"lower batch_size (about {fmt_bytes(per_100)} per 100 embeddings at this size; note that another "
              "batch size draws a different bank for the same seed)")]
    hints += _dtype_hint("prior", prior.dtype, prior.weight_bytes, "Load Diffusion Prior", on_gpu)
    return Estimate("prior sampling run", parts, [Phase(SAMPLING, tuple(p.name for p in parts))], hints)


def training_estimate(prior: PriorShape, *, prompt_tokens: int, prior_steps: int, guidance: float, rank: int,
                      train: str = "both", batch: int = 1, on_gpu: bool = True) -> Estimate:
    """Memory of the optimiser's training steps: the prior's weights, the trained values and their
    AdamW state, and the activations kept for the backward pass."""
    guided = guidance > 1.0
    trains_lora, trains_token = train in ("both", "lora"), train in ("both", "token")
    lora = lora_parameters(prior.width, prior.layers, rank) if trains_lora else 0
    trainable = lora + (prior.text_width if trains_token else 0)
    state = training_state_bytes(trainable, torch.float32)
    act = prior_training_activation_bytes(
        width=prior.width, layers=prior.layers, heads=prior.heads, ff_width=prior.ff_width,
        prompt_tokens=prompt_tokens, prior_steps=prior_steps, batch=batch, guided=guided, dtype=prior.dtype,
        lora_rank=rank if trains_lora else 0, text_width=prior.text_width, text_layers=prior.text_layers,
        text_heads=prior.text_heads, text_ff_width=prior.text_ff_width, text_trained=trains_token)
    parts = [_weights_part("prior weights", PRIOR, prior.params, prior.weight_bytes, prior.dtype),
             Part(TRAINING_STATE, state, f"LoRA rank {rank} + token: {fmt_count(trainable)} values x "
                                         f"{TRAINING_COPIES} (param, grad, 2 AdamW moments, snapshot), fp32"),
             Part("training activations", act, f"{prior_steps} prior steps with gradients"
                                               f"{', CFG' if guided else ''}, batch {batch}, {dtype_name(prior.dtype)}")]
    hints = _dtype_hint("prior", prior.dtype, prior.weight_bytes, "Load Diffusion Prior", on_gpu)
    if prior_steps > 5:
        hints.append(f"lower prior_steps (activations grow with it; now {prior_steps}, paper: 5)")
    if trains_lora and rank > 16:
        hints.append(f"lower lora_rank (now {rank}, paper: 10)")
    return Estimate("optimisation run", parts, [Phase(TRAINING, tuple(p.name for p in parts))], hints)


def mllm_estimate(mllm: MLLMShape, *, tokens: int, vision_tokens: int, on_gpu: bool = True) -> Estimate:
    """Memory of one yes/no question to an MLLM: its weights and one forward (a heuristic)."""
    act = mllm_activation_bytes(tokens=max(1, tokens), hidden=mllm.hidden, layers=mllm.layers,
                                intermediate=mllm.intermediate, heads=mllm.heads, kv_heads=mllm.kv_heads,
                                vision_tokens=vision_tokens, vision_hidden=mllm.vision_hidden,
                                vision_intermediate=mllm.vision_intermediate, vision_heads=mllm.vision_heads,
                                dtype=mllm.dtype)
    parts = [_weights_part("MLLM weights", MLLM, mllm.params, mllm.weight_bytes, mllm.dtype),
             Part("MLLM forward", act, f"{tokens} tokens ({vision_tokens} image patches), "
                                       f"{dtype_name(mllm.dtype)} (heuristic)")]
    hints = [f"use a smaller MLLM for the gate (weights now {fmt_bytes(mllm.weight_bytes)}; a ~2 B model such "
             f"as Qwen2-VL-2B-Instruct needs about {fmt_bytes(2.2e9 * dtype_bytes(mllm.dtype))} in "
             f"{dtype_name(mllm.dtype)})"]
    hints += _dtype_hint("MLLM", mllm.dtype, mllm.weight_bytes, "Load Multimodal LLM", on_gpu)
    return Estimate("gate question", parts, [Phase(JUDGE, tuple(p.name for p in parts))], hints)


def gate_check_estimate(drawing: Estimate | None, asking: Estimate | None) -> Estimate | None:
    """A gate check: the render's phases (named :data:`RENDER`), then the question (:data:`JUDGE`)."""
    if drawing is None and asking is None:
        return None
    parts, phases, hints = [], [], []
    if drawing is not None:
        single = len(drawing.phases) == 1
        phases += [Phase(RENDER if single else f"{RENDER} ({ph.name})", ph.parts) for ph in drawing.phases]
        parts, hints = [*drawing.parts], [*drawing.hints]
    if asking is not None:
        parts += asking.parts
        phases += asking.phases
        hints += asking.hints
    return Estimate("gate check", parts, phases, hints)


def optimisation_estimate(training: Estimate, checking: Estimate | None = None) -> Estimate:
    """A Creative LoRA Optimizer run: its training phase and, with a gate, the check's phases, during which
    the training state stays alive (the prior's weights and activations may be moved out)."""
    if checking is None:
        return training
    phases = [*training.phases, *(Phase(ph.name, (TRAINING_STATE, *ph.parts)) for ph in checking.phases)]
    return Estimate(training.what, [*training.parts, *checking.parts], phases, [*checking.hints, *training.hints])


def phase_work(estimate: Estimate, phase: str) -> int:
    """Working memory (no model weights) of the phases named ``phase`` (or ``phase (...)``): the most any needs."""
    named = [ph for ph in estimate.phases if ph.name == phase or ph.name.startswith(f"{phase} (")]
    return max((sum(p.bytes for p in estimate.parts if p.name in ph.parts and not p.model) for ph in named),
               default=0)


def phase_models(estimate: Estimate, phase: str) -> set[str]:
    """The model kinds whose weights the phases named ``phase`` use."""
    named = [ph for ph in estimate.phases if ph.name == phase or ph.name.startswith(f"{phase} (")]
    return {p.model for p in estimate.parts if p.model and any(p.name in ph.parts for ph in named)}


def render_estimate(decoder: DecoderShape, *, height: int, width: int, guidance: float, batch: int = 1,
                    on_gpu: bool = True) -> Estimate:
    """Memory of drawing ``batch`` embeddings with a Kandinsky decoder: its weights plus the larger of
    the UNet's and the MoVQ decode's working memory."""
    guided = guidance > 1.0
    unet = unet_activation_bytes(height=height, width=width, latent_factor=decoder.latent_factor,
                                 channels=decoder.unet_channels, layers_per_block=decoder.layers_per_block,
                                 batch=batch, guided=guided, dtype=decoder.dtype)
    movq = movq_activation_bytes(height=height, width=width, channels=decoder.movq_channels, batch=batch,
                                 dtype=decoder.dtype)
    parts = [_weights_part("decoder weights", DECODER, decoder.params, decoder.weight_bytes, decoder.dtype),
             Part("render activations", max(unet, movq), f"{width}x{height}{', CFG' if guided else ''}"
                                                         f"{f', batch {batch}' if batch > 1 else ''}, "
                                                         f"{dtype_name(decoder.dtype)} (heuristic)")]
    hints = [f"render smaller (Decoder Renderer width/height; now {width}x{height})"
             + (f" or fewer at once (count; now {batch})" if batch > 1 else "")]
    hints += _dtype_hint("decoder", decoder.dtype, decoder.weight_bytes, "Load Kandinsky Decoder", on_gpu)
    return Estimate("render", parts, [Phase("render", tuple(p.name for p in parts))], hints)


def prompt_token_count(tokenizer, *prompts: str) -> int:
    """Tokens of the longest prompt (the prefix the prior keeps), capped at the tokenizer's maximum."""
    longest = max(len(tokenizer(p).input_ids) for p in prompts) if prompts else 1
    return min(longest, int(getattr(tokenizer, "model_max_length", 77) or 77))


# Autograd's share of an SD-path training step over the host's own working-memory number for the same call,
# measured by tests/benchmarks/bench_sd_path.py --parts (SD 1.5 shapes, random weights, fp32 on CPU, live-tensor
# peaks of one call with its backward pass). UNet render step: 317 MiB at 64 px, 889 MiB at 256 px, i.e. the
# LoRA-merged weights of the adapted layers (357 MiB: each call makes and keeps them) plus about 3.5 x ComfyUI's
# 154 MiB at 256 px. VAE decode: 2.7 x ComfyUI's number at both sizes. A whole 256 px step measured 2,460 MiB;
# its estimate is 2,759 MiB (the parts' peaks do not all coincide). At 512 px the UNet step measured 5,506 MiB:
# the self-attention maps the CPU's attention keeps grow with the square of the pixels (2.7 GiB there, 0.17 GiB at
# 256 px), so they are counted apart (sd_generator.attention_map_bytes), not through this factor.
SD_UNET_GRAD = 3.5
SD_DECODE_GRAD = 3.0


def sd_training_estimate(*, weights: Iterable[tuple[str, int]], unet_call: int, merged: int, decode: int,
                         vision_call: int, render_steps: int, lora_params: int, gated: bool, width: int, height: int,
                         rank: int, text_call: int = 0, token_params: int = 0, attention_maps: int = 0,
                         checkpointing: bool = False) -> Estimate:
    """Memory of the SD path's training steps from the host's own numbers: the generator's weights (UNet, VAE,
    CLIP vision: ``(name, bytes)``), the working memory of one UNet call on the (CFG-doubled) latent, of one VAE
    decode and of one CLIP vision pass (ComfyUI's ``memory_required`` / ``memory_used_decode``), and the LoRA.

    A step renders with gradients, so autograd keeps each render step's UNet activations until the backward
    pass: one call's share (``merged``, the bytes of the adapted layers' LoRA-merged weights, which each call
    makes and keeps, plus :data:`SD_UNET_GRAD` x its working set, plus the ``attention_maps`` it keeps where
    the attention materialises them) is counted once per render step, then the
    decode's (:data:`SD_DECODE_GRAD` x) and the vision pass's. With ``checkpointing`` the render steps and the
    decode keep only their inputs and are computed again one at a time in the backward pass, so only the
    largest of them counts, once. A trained token adds the text encoding with gradients (``text_call``, kept
    alongside the rest) and its ``token_params`` values. With a gate, a check renders once more without
    gradients while the training state stays alive.
    """
    weights = [Part(name, int(nbytes), "", PRIOR) for name, nbytes in weights]
    trained = lora_params + token_params
    what = " + ".join(([f"LoRA rank {rank}"] if lora_params else []) + (["token"] if token_params else []))
    state = Part(TRAINING_STATE, training_state_bytes(trained), f"{what}: {fmt_count(trained)} "
                 f"values x {TRAINING_COPIES} (param, grad, 2 AdamW moments, snapshot), fp32")
    unet, decoded = merged + SD_UNET_GRAD * unet_call + attention_maps, SD_DECODE_GRAD * decode
    if checkpointing:
        kept = max(unet, decoded)
        how = f"{render_steps} render steps and the VAE decode recomputed one at a time (gradient checkpointing)"
    else:
        kept = render_steps * unet + decoded
        how = f"{render_steps} render steps with gradients and the VAE decode"
    act = Part("training activations", int(kept + vision_call + text_call),
               f"{how} at {width}x{height}, CLIP vision" + (", the text encoder" if text_call else ""))
    parts = [*weights, state, act]
    phases = [Phase(TRAINING, tuple(p.name for p in parts))]
    if gated:
        draw = Part("gate render", int(max(unet_call, decode, vision_call)), f"one render at {width}x{height}, "
                    "no gradients")
        parts.append(draw)
        phases.append(Phase(RENDER, (*(p.name for p in weights), TRAINING_STATE, draw.name)))
    hints = [f"render smaller (width/height; now {width}x{height}): activations grow with the pixels",
             f"use fewer render steps (now {render_steps}): each keeps its activations for the backward pass"]
    if not checkpointing:
        hints.append("turn gradient_checkpointing on: the render steps and the decode are recomputed in the backward "
                     "pass instead of kept")
    if rank > 16:
        hints.append(f"lower lora_rank (now {rank}, paper: 10)")
    return Estimate("SD optimisation run", parts, phases, hints)


def sd_bank_estimate(*, weights: Iterable[tuple[str, int]], unet_call: int, decode: int, vision_call: int,
                     batch: int, width: int, height: int) -> Estimate:
    """Memory of rendering and embedding one batch of an SD bank (no gradients): the weights plus the largest
    working set of the batch's UNet call, decode or CLIP vision pass (ComfyUI's own numbers for the batch)."""
    parts = [Part(name, int(nbytes), "", PRIOR) for name, nbytes in weights]
    parts.append(Part("sampling activations", int(max(unet_call, decode, vision_call)),
                      f"batch {batch} at {width}x{height}"))
    hints = [f"lower batch_size (now {batch})", f"render smaller (width/height; now {width}x{height})"]
    return Estimate("SD bank", parts, [Phase(SAMPLING, tuple(p.name for p in parts))], hints)
