"""The optimisation run's node inputs, defined once, and the one way nodes turn them into a run.

Every node that optimises (Creative LoRA Optimizer, Auto Trials, Image Variations, the creativity
sweep) declares these inputs with the functions below, in the order its saved workflows have them,
and builds its :class:`CreativeRun` with :func:`build_run`; Rare Select shares the gate inputs and
the gate rule. A node's own wording goes in ``tooltip``; ranges, defaults and meaning stay here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from comfy_api.latest import io

from . import comfy_bridge as cb
from . import inputs
from . import sockets as s
from .engine.gate import NEEDS_RENDERER, GateCheck, ValidityGate
from .engine.losses import LossTerm
from .engine.norm import GaussianNorm
from .engine.optimizer import CreativeRun, Generator, OptimConfig, StepEvent
from .engine.render import Renderer

TEMPLATE = OptimConfig.template


def steps(tooltip: str = "Maximum steps (paper: good results in ~50, at most 1,000; the gate may stop earlier).",
          name: str = "steps") -> io.Int.Input:
    return io.Int.Input(name, default=50, min=1, max=100_000, tooltip=tooltip)


def learning_rate(tooltip: str = "AdamW learning rate (paper: 1e-4).", name: str = "learning_rate",
                  default: float = 1e-4) -> io.Float.Input:
    step = 1e-4 if default >= 1e-2 else 1e-5
    return io.Float.Input(name, default=default, min=1e-7, max=1.0, step=step, round=1e-7, tooltip=tooltip)


def lora_rank(optional: bool = False) -> io.Int.Input:
    return io.Int.Input("lora_rank", default=10, min=1, max=256, optional=optional, tooltip="LoRA rank (paper: 10).")


def train(choices: Mapping[str, str] = s.TRAIN_CHOICES,
          tooltip: str = "What to train (paper: token + LoRA).") -> io.Combo.Input:
    return io.Combo.Input("train", options=list(choices), default="token + LoRA", tooltip=tooltip)


def seed(tooltip: str = "Seeds the LoRA init, the per-step noise and the gate's render.") -> io.Int.Input:
    return io.Int.Input("seed", **s.SEED, control_after_generate=True, tooltip=tooltip)


def prompt_template(optional: bool = True,
                    tooltip: str = "Prompt the concept is trained in; {token} is the placeholder.") -> io.String.Input:
    return io.String.Input("prompt_template", default=TEMPLATE, optional=optional, tooltip=tooltip)


def guidance(optional: bool = True) -> io.Float.Input:
    return io.Float.Input("guidance", default=4.0, min=0.0, max=30.0, step=0.1, optional=optional,
                          tooltip="Prior guidance while training.")


def prior_steps(optional: bool = True) -> io.Int.Input:
    return io.Int.Input("prior_steps", default=5, min=2, max=100, optional=optional,
                        tooltip="Prior steps, with gradients (paper: 5; the unCLIP scheduler needs at least 2).")


def gate(tooltip: str = "Validity gate (needs a renderer).") -> io.Input:
    return s.Gate.Input("gate", optional=True, tooltip=tooltip)


def renderer(tooltip: str = "Draws the concept for the gate.") -> io.Input:
    return s.Renderer.Input("renderer", optional=True, tooltip=tooltip)


def loss_terms(tooltip: str = "Anchor / negative-cluster terms.") -> io.Input:
    return s.Loss.Input("loss_terms", optional=True, tooltip=tooltip)


def problem(subject: object = None, template: object = None, gate: object = None, renderer: object = None,
            subject_hint: str = "name what the concept must remain, e.g. 'vehicle'.") -> str | None:
    """What is wrong with the shared inputs, for ``validate_inputs`` (``None``: nothing, or linked and checked
    when the value arrives)."""
    return next((p for p in (
        inputs.text_problem("subject", subject, subject_hint) if isinstance(subject, str) else None,
        inputs.template_problem("prompt_template", template, {"token"}, {"token"}) if isinstance(template, str)
        else None,
        NEEDS_RENDERER if gate is not None and renderer is None else None) if p), None)


def build_run(prior: Generator, norm: GaussianNorm, subject: str, terms: Iterable[LossTerm], *,
              gate: ValidityGate | None = None, renderer: Renderer | None = None, steps: int = 50,
              learning_rate: float = 1e-4, lora_rank: int = 10, train: str = "token + LoRA", seed: int = 0,
              prompt_template: str = TEMPLATE, guidance: float = 4.0, prior_steps: int = 5,
              train_choices: Mapping[str, str] = s.TRAIN_CHOICES, samples: int = 1) -> CreativeRun:
    """The run the shared inputs describe (the LoRA's alpha equals its rank, so its scale is 1). ``prior``: the
    generator (a diffusion prior, or the SD generator, which draws the gate's images itself)."""
    config = OptimConfig(steps=steps, lr=learning_rate, train=train_choices[train], rank=lora_rank,
                         lora_alpha=float(lora_rank), prior_steps=prior_steps, guidance=guidance, seed=seed,
                         template=prompt_template, samples=samples)
    check = GateCheck.of(gate, renderer, generator_draws=getattr(prior, "draws_images", False))
    return CreativeRun(prior, norm, subject, tuple(terms), config, check)


def describe(event: StepEvent) -> str:
    """One line of progress text: where the job stands, the loss, the norm's log-likelihood, the gate."""
    record = event.record
    parts = [f"{event.stage}, step {record.step}" if event.stage else f"step {record.step}",
             f"loss {record.loss:.4g}", f"log p {record.log_likelihood:.4g}"]
    if "anchor_cos" in record.metrics:
        parts.append(f"anchor cos {record.metrics['anchor_cos']:.3f}")
    if record.gate is not None:
        parts.append(f"gate P(yes) {record.gate.p_yes:.3f} -> {'yes' if record.gate.passed else 'NO'}")
    return ", ".join(parts)


def reporter(progress: cb.Progress) -> Callable[[StepEvent], None]:
    """The step callback every optimising node gives its run: progress bar, text, the gate's image as preview."""
    def on_step(event: StepEvent) -> None:
        verdict = event.record.gate
        progress(event.done, describe(event), preview=None if verdict is None else verdict.image, total=event.total)
    return on_step
