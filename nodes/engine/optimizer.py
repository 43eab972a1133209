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

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

import torch

from . import __version__, budget, cancel
from .concept import LORA_TARGETS, Concept, activate_concept, add_lora, lora_state
from .gate import GateCheck, Verdict
from .losses import AnchorTerm, LossTerm, objective
from .norm import GaussianNorm
from .prior import Prior
from .sampling import build_prefix, denoise, initial_latents
from .steplog import RunLog, StepRecord

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

    def __post_init__(self) -> None:
        if self.train not in TrainMode._value2member_map_:
            raise ValueError(f"train must be one of {[m.value for m in TrainMode]}, got {self.train!r}.")
        object.__setattr__(self, "train", TrainMode(self.train))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.steps < 1 or self.rank < 1:
            raise ValueError("steps and rank must be at least 1.")
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


def placeholder_for(subject: str, prefix: str = "creative") -> str:
    """A token that names its subject and cannot be a word of the tokenizer: ``<creative-red-car>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", subject.lower()).strip("-") or "concept"
    return f"<{prefix}-{slug}>"


def subject_embedding(prior: Prior, subject: str) -> torch.Tensor:
    """Mean input-embedding row of the subject word's tokens: the token's starting point."""
    ids = prior.tokenizer(subject, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"The subject {subject!r} has no tokens.")
    table = prior.text_encoder.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].mean(0).detach().clone().float()


def step_seed(seed: int, step: int) -> int:
    """The noise seed of one optimisation step. Wrapped to the 64 bits a torch generator takes, so
    every seed a widget allows works (seeds below about 1.8e13 keep the noise they always had)."""
    return (seed * 1_000_003 + step) % 2**64


def _generate(view: Prior, prompt: str, negative: str, config: OptimConfig, generator: torch.Generator) -> torch.Tensor:
    cache = build_prefix(view.transformer, view.encode_prompt([negative, prompt]))
    return denoise(view, cache, initial_latents(view, 1, generator), config.prior_steps, config.guidance,
                   generator).float()


@dataclass(frozen=True)
class CreativeRun:
    """One optimisation run as a value: what is trained, against what, held back by what. Checked once, on
    creation; it sizes its own memory from its parts (:meth:`memory_estimate`) and :meth:`run` executes it.

    ``generator``: the model that makes embeddings (the diffusion prior). ``check``: the validity gate with
    its renderer. ``start``: a learned concept to begin from instead of the subject word's embedding and a
    fresh LoRA (image variations continue from the image's inversion); its LoRA must have the run's rank
    and targets. Automatic trials, image variations and the sweep derive further runs with :meth:`with_`.
    """

    generator: Prior
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
        if norm.prior_identity and norm.prior_identity != prior.identity:
            raise ValueError(f"The norm was fitted on embeddings of prior '{norm.prior_identity}', not of the "
                             f"prior given ('{prior.identity}'). Fit the norm on a bank from this prior.")
        if norm.embed_dim != prior.embedding_dim:
            raise ValueError(f"The norm is {norm.embed_dim}-d but the prior makes {prior.embedding_dim}-d embeddings.")
        if start is not None:
            start.check_base(prior.identity)
            if start.lora_state and config.train.lora and (start.lora_rank, tuple(start.lora_targets)) != (
                    config.rank, config.targets):
                raise ValueError(f"The starting concept's LoRA has rank {start.lora_rank} on {start.lora_targets}, "
                                 f"the run rank {config.rank} on {config.targets}: use the same rank and targets.")

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
        config = self.config  # the subject word stands in for the placeholder (one token more is counted)
        training = self.generator.training_estimate(
            config.prompt("", self.subject), config.negative_prompt, prior_steps=config.prior_steps,
            guidance=config.guidance, rank=config.rank, train=str(config.train), on_gpu=on_gpu)
        checking = None if self.check is None else self.check.memory_estimate(1, self.subject, on_gpu=on_gpu)
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
        return _Training(self, on_phase or (lambda phase: None)).run(
            on_step, snapshot_at, stage, offset, total or self.config.steps)


class _Training:
    """The mutable side of one run: the training adapter, the optimiser, the last accepted state."""

    def __init__(self, spec: CreativeRun, on_phase: PhaseCallback) -> None:
        self.spec, self.on_phase = spec, on_phase
        self.prior = spec.generator.with_concept(None)
        self.adapter = f"creative_train_{time.monotonic_ns()}"

    def _setup(self) -> tuple[Prior, torch.nn.Parameter | None, list[torch.nn.Parameter]]:
        spec, config, tf = self.spec, self.spec.config, self.prior.transformer
        activate_concept(tf, None)  # other concepts' adapters may be active on the shared prior
        start, vector = spec.start, None
        if config.train.token:
            if start is not None and start.token_embedding is not None:
                initial = start.token_embedding.detach().float().clone()
            else:
                initial = subject_embedding(self.prior, spec.subject)
            vector = torch.nn.Parameter(initial.to(self.prior.device))
        if config.train.lora:
            add_lora(tf, self.adapter, config.rank, config.lora_alpha, config.targets, config.seed)
            if start is not None and start.lora_state:
                from peft import set_peft_model_state_dict

                with torch.no_grad():
                    set_peft_model_state_dict(tf, start.lora_state, adapter_name=self.adapter)
            tf.set_adapter(self.adapter)
            tf.enable_adapters()
        lora_params = [p for n, p in tf.named_parameters() if self.adapter in n]
        for p in lora_params:
            p.requires_grad_(True)
        concept = Concept(spec.token, vector) if vector is not None else None
        return self.prior.with_concept(concept), vector, lora_params

    def _snapshot(self, vector: torch.Tensor | None) -> dict[str, Any]:
        lora = lora_state(self.prior.transformer, self.adapter) if self.spec.config.train.lora else {}
        return {"vector": None if vector is None else vector.detach().float().cpu().clone(), "lora": lora}

    def _gate_check(self, view: Prior, step: int) -> Verdict:
        spec = self.spec
        with torch.no_grad():
            e = _generate(view, spec.prompt, spec.config.negative_prompt, spec.config,
                          torch.Generator("cpu").manual_seed(spec.config.seed))
            verdict = spec.check.judge(e, spec.subject, step, on_phase=self.on_phase)
        self.on_phase(budget.TRAINING)
        return verdict

    def _metrics(self, e: torch.Tensor) -> dict[str, float]:
        anchor = next((t for t in self.spec.terms if isinstance(t, AnchorTerm)), None)
        with torch.no_grad():
            out = {"log_likelihood": float(self.spec.norm.log_prob(e.double()).mean()),
                   "mahalanobis": float(self.spec.norm.mahalanobis(e.double()).mean())}
            if anchor is not None:
                out["anchor_cos"] = float(anchor.cosine(e).mean())
        return out

    def run(self, on_step: StepCallback | None, snapshot_at: frozenset[int], stage: str, offset: int,
            total: int) -> OptimResult:
        spec, config = self.spec, self.spec.config
        gated = spec.check is not None
        self.on_phase(budget.TRAINING)
        view, vector, lora_params = self._setup()
        try:
            params = ([vector] if vector is not None else []) + lora_params
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            good, good_step = self._snapshot(vector), 0
            records: list[StepRecord] = []
            path, reason, step, rejected = [], StopReason.MAX_STEPS, 0, None
            snapshots = {0: (good, 0)} if 0 in snapshot_at else {}
            for step in range(1, config.steps + 1):
                cancel.point()
                t0 = time.perf_counter()
                e = _generate(view, spec.prompt, config.negative_prompt, config,
                              torch.Generator("cpu").manual_seed(step_seed(config.seed, step)))
                loss, values = objective(spec.terms, e)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                metrics = self._metrics(e.detach())
                path.append(e.detach().cpu()[0])
                verdict = None
                if gated and (spec.check.gate.due(step) or step == config.steps):
                    verdict = self._gate_check(view, step)
                    if not verdict.passed:
                        reason, rejected = StopReason.GATE_REJECTED, self._snapshot(vector)
                    else:
                        good, good_step = self._snapshot(vector), step
                record = StepRecord(step, float(loss.detach()), values, metrics, time.perf_counter() - t0, verdict)
                records.append(record)
                if step in snapshot_at and reason is StopReason.MAX_STEPS:  # with a gate: what it last vouched for
                    snapshots[step] = (good, good_step) if gated else (self._snapshot(vector), step)
                if on_step is not None:
                    on_step(StepEvent(record, stage, offset + step, total))
                if reason is not StopReason.MAX_STEPS:
                    break
            if not gated:
                good, good_step = self._snapshot(vector), step
            log = RunLog(records, reason, step, good_step)
            final = self._concept(good, log)
            kept = {s: self._concept(state, RunLog([], "snapshot", s, at)) for s, (state, at) in snapshots.items()}
            kept.update({s: final for s in snapshot_at if s not in kept})
            refused = None if rejected is None else self._concept(rejected, RunLog([], reason, step, step))
            return OptimResult(final, log, path, kept, refused)
        finally:
            self._teardown()

    def _concept(self, state: dict[str, Any], log: RunLog) -> Concept:
        """The learned state as a concept; its metadata records how the run went (from its log)."""
        spec, config = self.spec, self.spec.config
        meta = {"base_prior": self.prior.identity, "prior_family": self.prior.family, "subject": spec.subject,
                "steps_run": log.steps_run, "accepted_step": log.accepted_step, "stop_reason": str(log.stop_reason),
                "seed": config.seed, "prompt_template": config.template,
                "loss_weights": {t.name: t.weight for t in spec.terms},
                "config": {k: (str(v) if k == "train" else v) for k, v in asdict(config).items() if k != "targets"},
                "norm": {k: spec.norm.provenance.get(k) for k in ("dims", "count")},
                "gate": None if spec.check is None else spec.check.gate.provenance(),
                "package_version": __version__}
        return Concept(spec.token, state["vector"], state["lora"], config.rank, config.lora_alpha,
                       config.targets, meta)

    def _teardown(self) -> None:
        tf = self.prior.transformer
        if self.adapter in (getattr(tf, "peft_config", None) or {}):
            tf.delete_adapters(self.adapter)
        tf.requires_grad_(False)
