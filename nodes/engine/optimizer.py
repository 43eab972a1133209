"""Creative optimisation (§5.2, §6): train a placeholder token and/or a prior LoRA.

A run is a value, :class:`CreativeRun`: the generator (the diffusion prior), the norm, the subject,
the loss terms, the config, the gate check and an optional starting concept, checked once. Each
step of :meth:`CreativeRun.run` draws fresh seeded noise, runs the few prior denoising steps *with
gradients* for "a photo of a <token>", scores the embedding with the loss terms and takes an AdamW
step. Every ``gate.every`` steps the current state is rendered and the gate asked whether it is
still the subject: "yes" makes that state the fallback, "no" ends the run with the fallback.
The shared prior is left as it was: the training adapter is removed when the run ends, also when
the user cancels (the engine's cancel point raises before a step).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

import torch

from . import __version__, budget, cancel
from .concept import LORA_TARGETS, Concept
from .gate import NEEDS_RENDERER, GateCheck, Verdict
from .losses import AnchorTerm, LossTerm, objective_tensors, term_space
from .norm import GaussianNorm
from .steplog import RunLog, StepRecord

log = logging.getLogger(__name__)

# On an accelerator, the longest a step callback waits for its records: reading them makes the host wait for the
# device, so they are read in batches (at every gate check, and at the end of the run, in any case).
READ_EVERY_S = 0.5


class TrainMode(StrEnum):
    """What a run trains: the placeholder token's embedding, the prior's LoRA, or both (the paper)."""

    BOTH = "both"
    TOKEN = "token"
    LORA = "lora"

    @property
    def token(self) -> bool:
        return self is not TrainMode.LORA

    @property
    def lora(self) -> bool:
        return self is not TrainMode.TOKEN


class StopReason(StrEnum):
    """Why a run ended. A user's cancel is no reason: it raises from the engine's cancel point."""

    MAX_STEPS = "max_steps"
    GATE_REJECTED = "gate_rejected"


class RejectPolicy(StrEnum):
    """What a "no" from the gate does. STOP is the paper's: the run ends on the last accepted state.
    ROLLBACK returns to the last accepted state, halves the learning rate and goes on (a fresh AdamW), so a
    run that stepped too far tries a smaller step instead of ending; after ``rollbacks`` of them it stops."""

    STOP = "stop"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class OptimConfig:
    """Defaults follow the paper (§6); ``steps`` is the maximum, the gate may stop earlier. Checked on creation."""

    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 1e-2
    train: TrainMode = TrainMode.BOTH
    rank: int = 10
    lora_alpha: float = 10.0
    targets: tuple[str, ...] = LORA_TARGETS
    prior_steps: int = 5
    guidance: float = 4.0  # the prior's classifier-free guidance scale
    seed: int = 0
    template: str = "a photo of a {token}"
    negative_prompt: str = ""
    token: str = ""
    samples: int = 1  # noise samples per step (the paper: 1): the loss is their mean, the gate judges them all
    on_reject: RejectPolicy = RejectPolicy.STOP
    rollbacks: int = 3  # with ROLLBACK: the "no" after this many rollbacks stops the run

    def __post_init__(self) -> None:
        for name, enum in (("train", TrainMode), ("on_reject", RejectPolicy)):
            if getattr(self, name) not in enum._value2member_map_:
                raise ValueError(f"{name} must be one of {[m.value for m in enum]}, got {getattr(self, name)!r}.")
            object.__setattr__(self, name, enum(getattr(self, name)))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.steps < 1 or self.rank < 1:
            raise ValueError("steps and rank must be at least 1.")
        if self.samples < 1:
            raise ValueError("samples (noise draws per step) must be at least 1.")
        if self.rollbacks < 0:
            raise ValueError("rollbacks cannot be negative.")
        if self.prior_steps < 2:
            raise ValueError("prior_steps must be at least 2: the unCLIP scheduler spaces timesteps over steps - 1.")
        if "{token}" not in self.template:
            raise ValueError("The prompt template must contain '{token}', e.g. 'a photo of a {token}'.")

    def prompt(self, token: str, subject: str) -> str:
        """The prompt a concept is trained and sampled with: the template around its token, or around the
        subject word when only the LoRA was trained (no token)."""
        return self.template.format(token=token or subject)


@dataclass
class OptimResult:
    """What a run kept, its log, and (when the gate said no) the state it refused.

    ``rejected`` is the token + LoRA at the step the gate rejected (None otherwise): the run itself
    returns the last accepted state, but automatic trials sample the refused one to learn where
    not to go again. How the run ended lives in ``log`` only.
    """

    concept: Concept
    log: RunLog
    path: list[torch.Tensor] = field(default_factory=list)  # embedding per step, for plots
    snapshots: dict[int, Concept] = field(default_factory=dict)  # concept at requested steps (sweeps)
    rejected: Concept | None = None  # the state the gate rejected

    @property
    def records(self) -> list[StepRecord]:
        return self.log.records

    @property
    def stop_reason(self) -> StopReason:
        return StopReason(self.log.stop_reason)

    @property
    def steps_run(self) -> int:
        return self.log.steps_run

    @property
    def accepted_step(self) -> int:
        return self.log.accepted_step


@dataclass(frozen=True)
class StepEvent:
    """What a run reports after each step: the record, and where it stands in the whole job.

    ``stage`` names the run inside a larger job ("creative", "inversion", "trial 2", "both, seed 1");
    ``done`` / ``total`` count steps over the whole job, for one progress bar.
    """

    record: StepRecord
    stage: str = ""
    done: int = 0
    total: int = 0


StepCallback = Callable[[StepEvent], None]
PhaseCallback = budget.PhaseCallback


class Training(Protocol):
    """A generator's side of one run, open while it trains: the values AdamW moves, a differentiable
    embedding per noise seed, the images the gate judges, snapshots of the learned state."""

    params: list[torch.nn.Parameter]

    def embed(self, seed: int) -> torch.Tensor:
        """The embeddings ``[samples, D]`` (float32) of the current state for this noise seed (the run's
        ``config.samples`` noise draws), with gradients."""

    def check_images(self, seed: int, check: GateCheck, on_phase: PhaseCallback) -> torch.Tensor:
        """The images ``[B, H, W, 3]`` the gate judges of the current state (no gradients)."""

    def snapshot(self) -> object:
        """A copy of the learned state, to roll back to."""

    def restore(self, state: object) -> None:
        """Set the learned values to a snapshot (a rollback)."""

    def learned(self, state: object, meta: dict[str, Any]) -> Any:
        """A snapshot as what the run returns (a concept), with the run's ``meta`` plus the generator's own."""

    def close(self) -> None:
        """Leave the shared model as it was (remove training adapters, stop gradients)."""


class Generator(Protocol):
    """What a run trains and draws embeddings from (the diffusion prior; a few-step SD model)."""

    identity: str  # the embedding space its outputs live in; a norm or loss term of another space is refused
    embedding_dim: int
    # A generator with ``draws_images = True`` renders the gate's images itself (``Training.check_images``), so
    # its run's GateCheck has no renderer, and it says the ``image_size`` (height, width) it draws.

    def check_start(self, start: Any, config: OptimConfig) -> None:
        """Refuse a starting state this generator cannot continue from."""

    def training_estimate(self, run: CreativeRun, *, on_gpu: bool) -> budget.Estimate:
        """Memory of the run's training steps (and of the gate's renders when the generator draws them)."""

    def open_training(self, run: CreativeRun) -> Training:
        """Start training for ``run``: the returned session must be closed."""


def placeholder_for(subject: str, prefix: str = "creative") -> str:
    """A token that names its subject and cannot be a word of the tokenizer: ``<creative-red-car>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", subject.lower()).strip("-") or "concept"
    return f"<{prefix}-{slug}>"


def step_seed(seed: int, step: int) -> int:
    """The noise seed of one optimisation step. Wrapped to the 64 bits a torch generator takes, so
    every seed a widget allows works (seeds below about 1.8e13 keep the noise they always had)."""
    return (seed * 1_000_003 + step) % 2**64


@dataclass(frozen=True)
class CreativeRun:
    """One optimisation run as a value: what is trained, against what, held back by what. Checked once, on
    creation; it sizes its own memory from its parts (:meth:`memory_estimate`) and :meth:`run` executes it.

    ``generator``: the model that makes embeddings (the diffusion prior). ``check``: the validity gate with
    its renderer. ``start``: a learned concept to begin from instead of the subject word's embedding and a
    fresh LoRA (image variations continue from the image's inversion); its LoRA must have the run's rank
    and targets. Automatic trials, image variations and the sweep derive further runs with :meth:`with_`.
    """

    generator: Generator
    norm: GaussianNorm
    subject: str
    terms: tuple[LossTerm, ...]
    config: OptimConfig
    check: GateCheck | None = None
    start: Concept | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(self.terms))
        config, prior, norm, start = self.config, self.generator, self.norm, self.start
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError("The subject is empty: name what the concept must remain, e.g. 'vehicle'.")
        if norm.embed_dim != prior.embedding_dim:  # first: the plainer message when the widths differ
            raise ValueError(f"The norm is {norm.embed_dim}-d but the generator makes {prior.embedding_dim}-d "
                             "embeddings (another prior, or another CLIP vision model). Fit the norm on a bank "
                             "from this generator.")
        if norm.prior_identity and norm.prior_identity != prior.identity:
            raise ValueError(f"The norm was fitted on embeddings of '{norm.prior_identity}', not of the "
                             f"generator given ('{prior.identity}'). Fit the norm on a bank from this generator.")
        for term in self.terms:
            space = term_space(term)
            if space and space != prior.identity:
                raise ValueError(
                    f"The loss term '{term.name}' compares embeddings of '{space}', not of the generator's space "
                    f"('{prior.identity}'): its target would be meaningless here. A text anchor lives in its prior's "
                    "space; in a CLIP vision model's space the image anchor (SD Image Anchor: to given images or a "
                    "bank) is the pullback. Build the term from this generator's embeddings.")
        if self.check is not None and self.check.renderer is None and not getattr(prior, "draws_images", False):
            raise ValueError(NEEDS_RENDERER)
        if start is not None:
            prior.check_start(start, config)

    def with_(self, **changes: Any) -> CreativeRun:
        """The same run with some parts changed (checked again)."""
        return replace(self, **changes)

    @property
    def token(self) -> str:
        """The placeholder the run trains (empty when only the LoRA is trained)."""
        return (self.config.token or placeholder_for(self.subject)) if self.config.train.token else ""

    @property
    def prompt(self) -> str:
        return self.config.prompt(self.token, self.subject)

    def models(self) -> dict[str, object]:
        """The run's models by memory kind, for a host that loads them (budget.PRIOR / DECODER / MLLM)."""
        out: dict[str, object] = {budget.PRIOR: self.generator}
        if self.check is not None:
            out.update(self.check.models())
        return out

    def memory_estimate(self, *, on_gpu: bool) -> budget.Estimate:
        """Peak memory of the run, phase by phase: training steps and, with a gate, its checks."""
        training = self.generator.training_estimate(self, on_gpu=on_gpu)
        checking = None if self.check is None else self.check.memory_estimate(
            self.config.samples, self.subject, on_gpu=on_gpu, image_size=getattr(self.generator, "image_size", None))
        return budget.optimisation_estimate(training, checking)

    def run(self, on_step: StepCallback | None = None, *, on_phase: PhaseCallback | None = None,
            snapshot_at: frozenset[int] = frozenset(), stage: str = "", offset: int = 0,
            total: int = 0) -> OptimResult:
        """Optimise. ``on_step(event)`` after every step; the engine's cancel point (``cancel.point``) is
        checked before every step. ``on_phase(name)`` before training and before each part of a gate check,
        so a host can load the models that phase uses. ``stage``, ``offset`` and ``total`` place this run's
        steps in a larger job's progress.

        ``snapshot_at``: steps (0 = before training) whose state is also returned as a concept, for
        creativity-vs-steps sweeps: the current state, or with a gate the last state it accepted. Steps after
        an early stop get the state that was kept.
        """
        return _Loop(self, on_phase or (lambda phase: None)).run(
            on_step, snapshot_at, stage, offset, total or self.config.steps)


def fused_wanted(params: list[torch.nn.Parameter]) -> bool:
    """Whether to ask for the fused AdamW kernel: on CUDA, where it makes the whole update a few kernel launches.
    Elsewhere the multi-tensor kernel (older torch builds have no fused CPU kernel)."""
    return bool(params) and all(p.device.type == "cuda" for p in params)


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, notes: list[str]) -> torch.optim.AdamW:
    """AdamW with its multi-tensor kernels (a few launches per step instead of a few per tensor); on CUDA the fused
    kernel, falling back to the multi-tensor one where this torch lacks it for these tensors. A fallback is never
    an error: its reason goes to ``notes`` (the run's log) and to the logger."""
    if fused_wanted(params):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError) as err:
            note = f"fused AdamW unavailable ({type(err).__name__}: {err}); using the multi-tensor (foreach) AdamW"
            if note not in notes:
                notes.append(note)
                log.info(note)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


@dataclass
class _Pending:
    """One step's numbers, still where the step computed them: a step does not wait for the device to log them."""

    step: int
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    path: torch.Tensor  # the first noise draw's embedding [D]
    seconds: float
    verdict: Verdict | None


class _Records:
    """A run's records as they become known. A step's numbers wait here on the device (:class:`_Pending`) and are read
    to the host in one transfer when asked (:meth:`read`: at a gate check, at the end) or when ``on_step`` needs
    them: after every step on the CPU, where reading costs nothing, on an accelerator at most every
    :data:`READ_EVERY_S` (its events then arrive a few at a time)."""

    def __init__(self, on_step: StepCallback | None, stage: str, offset: int, total: int) -> None:
        self.on_step, self.stage, self.offset, self.total = on_step, stage, offset, total
        self.records: list[StepRecord] = []
        self.path: list[torch.Tensor] = []
        self.pending: list[_Pending] = []
        self.last_read = time.perf_counter()

    def add(self, step: _Pending) -> None:
        self.pending.append(step)
        if self.on_step is not None and (step.path.device.type == "cpu"
                                         or time.perf_counter() - self.last_read >= READ_EVERY_S):
            self.read()

    def read(self) -> None:
        """Every pending step to the host, then its event. The wait for the device is the device finishing the
        steps' work, so it is added to the last step's seconds."""
        if self.pending:
            t0 = time.perf_counter()
            pending, self.pending = self.pending, []
            scalars = [v.to(torch.float64) for p in pending for v in (p.loss, *p.terms.values(), *p.metrics.values())]
            paths = torch.stack([p.path for p in pending])
            host = torch.cat([torch.stack(scalars), paths.to(torch.float64).flatten()]).cpu()
            values = iter(host[:len(scalars)].tolist())
            self.path.extend(host[len(scalars):].view(paths.shape).to(paths.dtype))  # float32 round trip is exact
            waited = time.perf_counter() - t0
            done = [StepRecord(p.step, next(values), {name: next(values) for name in p.terms},
                               {name: next(values) for name in p.metrics},
                               p.seconds + (waited if p is pending[-1] else 0.0), p.verdict) for p in pending]
            self.records.extend(done)
            if self.on_step is not None:
                for record in done:
                    self.on_step(StepEvent(record, self.stage, self.offset + record.step, self.total))
        self.last_read = time.perf_counter()


class _Loop:
    """The mutable side of one run: the generator's training session, AdamW, the last accepted state."""

    def __init__(self, spec: CreativeRun, on_phase: PhaseCallback) -> None:
        self.spec, self.on_phase = spec, on_phase

    def _gate_check(self, training: Training, step: int) -> Verdict:
        spec = self.spec
        with torch.no_grad():
            images = training.check_images(spec.config.seed, spec.check, self.on_phase)
            self.on_phase(budget.JUDGE)
            verdict = spec.check.gate.ask(images, spec.subject, step)
        self.on_phase(budget.TRAINING)
        return verdict

    def _metrics(self, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """The log's metrics of ``e``, left on its device (read with the step's other numbers)."""
        anchor = next((t for t in self.spec.terms if isinstance(t, AnchorTerm)), None)
        with torch.no_grad():
            out = {"log_likelihood": self.spec.norm.log_prob(e.double()).mean(),
                   "mahalanobis": self.spec.norm.mahalanobis(e.double()).mean()}
            if anchor is not None:
                out["anchor_cos"] = anchor.cosine(e).mean()
        return out

    def run(self, on_step: StepCallback | None, snapshot_at: frozenset[int], stage: str, offset: int,
            total: int) -> OptimResult:
        """The steps. A step does not wait for the device: its numbers are read later, by :class:`_Records`."""
        spec, config = self.spec, self.spec.config
        gated = spec.check is not None
        self.on_phase(budget.TRAINING)
        training = spec.generator.open_training(spec)
        try:
            lr, rollbacks, notes = config.lr, 0, []
            opt = adamw(training.params, lr, config.weight_decay, notes)
            good, good_step = training.snapshot(), 0
            history = _Records(on_step, stage, offset, total)
            reason, step, rejected = StopReason.MAX_STEPS, 0, None
            snapshots = {0: (good, 0)} if 0 in snapshot_at else {}
            for step in range(1, config.steps + 1):
                cancel.point()
                t0 = time.perf_counter()
                e = training.embed(step_seed(config.seed, step))
                loss, values = objective_tensors(spec.terms, e)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                metrics = self._metrics(e.detach())
                verdict = None
                if gated and (spec.check.gate.due(step) or step == config.steps):
                    verdict = self._gate_check(training, step)
                    if not verdict.passed and config.on_reject is RejectPolicy.ROLLBACK and rollbacks < config.rollbacks:
                        training.restore(good)
                        lr, rollbacks = lr / 2, rollbacks + 1
                        opt = adamw(training.params, lr, config.weight_decay, notes)
                    elif not verdict.passed:
                        reason, rejected = StopReason.GATE_REJECTED, training.snapshot()
                    else:
                        good, good_step = training.snapshot(), step
                if step in snapshot_at and reason is StopReason.MAX_STEPS:  # with a gate: what it last vouched for
                    snapshots[step] = (good, good_step) if gated else (training.snapshot(), step)
                # the path follows the first noise draw (the paper's one sample)
                history.add(_Pending(step, loss.detach(), values, metrics, e.detach()[0], time.perf_counter() - t0,
                                     verdict))
                if verdict is not None:
                    history.read()
                if reason is not StopReason.MAX_STEPS:
                    break
            history.read()
            if not gated:
                good, good_step = training.snapshot(), step
            run_log = RunLog(history.records, reason, step, good_step, notes)
            final = training.learned(good, self._meta(run_log))
            kept = {s: training.learned(state, self._meta(RunLog([], "snapshot", s, at)))
                    for s, (state, at) in snapshots.items()}
            kept.update({s: final for s in snapshot_at if s not in kept})
            refused = None if rejected is None else training.learned(rejected, self._meta(RunLog([], reason, step,
                                                                                                  step)))
            return OptimResult(final, run_log, history.path, kept, refused)
        finally:
            training.close()

    def _meta(self, log: RunLog) -> dict[str, Any]:
        """What every learned state records of its run (the generator adds what identifies it)."""
        spec, config = self.spec, self.spec.config
        return {"subject": spec.subject, "steps_run": log.steps_run, "accepted_step": log.accepted_step,
                "stop_reason": str(log.stop_reason), "seed": config.seed, "prompt_template": config.template,
                "loss_weights": {t.name: t.weight for t in spec.terms},
                "config": {k: (str(v) if k == "train" else v) for k, v in asdict(config).items() if k != "targets"},
                "norm": {k: spec.norm.provenance.get(k) for k in ("dims", "count")},
                "gate": None if spec.check is None else spec.check.gate.provenance(),
                "package_version": __version__}
