"""Creative optimisation (§5.2, §6): train a placeholder token and/or a prior LoRA.

Each step draws fresh seeded noise, runs the few prior denoising steps *with gradients* for
"a photo of a <token>", scores the embedding with the loss terms and takes an AdamW step.
Every ``gate.every`` steps the current state is rendered and the gate asked whether it is still
the subject: "yes" makes that state the fallback, "no" ends the run with the fallback.
The shared prior is left as it was: the training adapter is removed when the run ends.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import __version__
from .concept import LORA_TARGETS, Concept, activate_concept, add_lora, lora_state
from .gate import ValidityGate, Verdict
from .losses import AnchorTerm, LossTerm, objective
from .norm import GaussianNorm
from .prior import Prior
from .render import Renderer
from .sampling import build_prefix, denoise, initial_latents
from .steplog import RunLog, StepRecord

TRAIN_MODES = ("both", "token", "lora")


class StopOptimisation(Exception):
    """Raised by a step callback to cancel: the run returns its last good state."""


@dataclass
class OptimConfig:
    """Defaults follow the paper (§6); ``steps`` is the maximum, the gate may stop earlier."""

    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 1e-2
    train: str = "both"
    rank: int = 10
    alpha: float = 10.0
    targets: tuple[str, ...] = LORA_TARGETS
    prior_steps: int = 5
    guidance: float = 4.0
    seed: int = 0
    template: str = "a photo of a {token}"
    negative_prompt: str = ""
    token: str = ""

    def prompt(self, token: str, subject: str) -> str:
        """The prompt a concept is trained and sampled with: the template around its token, or around the
        subject word when only the LoRA was trained (no token)."""
        return self.template.format(token=token or subject)

    def validate(self) -> None:
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {self.train!r}.")
        if self.steps < 1 or self.rank < 1:
            raise ValueError("steps and rank must be at least 1.")
        if self.prior_steps < 2:
            raise ValueError("prior_steps must be at least 2: the unCLIP scheduler spaces timesteps over steps - 1.")
        if "{token}" not in self.template:
            raise ValueError("The prompt template must contain '{token}', e.g. 'a photo of a {token}'.")


@dataclass
class OptimResult:
    """What a run kept, how it went, and (when the gate said no) the state it refused.

    ``rejected`` is the token + LoRA at the step the gate rejected (None otherwise): the run itself
    returns the last accepted state, but automatic trials sample the refused one to learn where
    not to go again.
    """

    concept: Concept
    log: list[StepRecord]
    stop_reason: str
    steps_run: int
    accepted_step: int
    path: list[torch.Tensor] = field(default_factory=list)  # embedding per step, for plots
    snapshots: dict[int, Concept] = field(default_factory=dict)  # concept at requested steps (sweeps)
    rejected: Concept | None = None  # the state the gate rejected (stop_reason "gate_rejected")

    def run_log(self) -> RunLog:
        """The records and how the run ended, as the log output and the saved log carry them."""
        return RunLog(self.log, self.stop_reason, self.steps_run, self.accepted_step)


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


def _generate(view: Prior, prompt: str, negative: str, cfg: OptimConfig, generator: torch.Generator) -> torch.Tensor:
    cache = build_prefix(view.transformer, view.encode_prompt([negative, prompt]))
    return denoise(view, cache, initial_latents(view, 1, generator), cfg.prior_steps, cfg.guidance, generator).float()


class CreativeOptimizer:
    """One optimisation run; create it, then call :meth:`run`.

    ``start``: a learned concept to begin from instead of the subject word's embedding and a fresh
    LoRA (image variations continue from the image's inversion). Its token embedding is used when
    the token is trained, its LoRA when the LoRA is; the LoRA must have the run's rank and targets.
    """

    def __init__(self, prior: Prior, norm: GaussianNorm, subject: str, terms: Sequence[LossTerm], cfg: OptimConfig,
                 gate: ValidityGate | None = None, renderer: Renderer | None = None, *,
                 start: Concept | None = None) -> None:
        cfg.validate()
        if not subject.strip():
            raise ValueError("The subject is empty: name what the concept must remain, e.g. 'vehicle'.")
        if norm.prior_identity and norm.prior_identity != prior.identity:
            raise ValueError(f"The norm was fitted on embeddings of prior '{norm.prior_identity}', not of the "
                             f"prior given ('{prior.identity}'). Fit the norm on a bank from this prior.")
        if norm.embed_dim != prior.embedding_dim:
            raise ValueError(f"The norm is {norm.embed_dim}-d but the prior makes {prior.embedding_dim}-d embeddings.")
        if gate is not None and renderer is None:
            raise ValueError("The validity gate needs a renderer to turn embeddings into images.")
        if start is not None:
            start.check_base(prior.identity)
            if start.lora_state and cfg.train != "token" and (start.lora_rank, tuple(start.lora_targets)) != (
                    cfg.rank, tuple(cfg.targets)):
                raise ValueError(f"The starting concept's LoRA has rank {start.lora_rank} on {start.lora_targets}, "
                                 f"the run rank {cfg.rank} on {tuple(cfg.targets)}: use the same rank and targets.")
        self.prior, self.norm, self.subject, self.cfg = prior.with_concept(None), norm, subject, cfg
        self.terms = tuple(terms)
        self.gate, self.renderer, self.start = gate, renderer, start
        self.anchor = next((t for t in terms if isinstance(t, AnchorTerm)), None)
        self.token = (cfg.token or placeholder_for(subject)) if cfg.train != "lora" else ""
        self.adapter = f"creative_train_{time.monotonic_ns()}"

    def _prompt(self) -> str:
        return self.cfg.prompt(self.token, self.subject)

    def _setup(self) -> tuple[Prior, torch.nn.Parameter | None, list[torch.nn.Parameter]]:
        cfg, tf = self.cfg, self.prior.transformer
        activate_concept(tf, None)  # other concepts' adapters may be active on the shared prior
        start = self.start
        vector = None
        if cfg.train in ("both", "token"):
            if start is not None and start.token_embedding is not None:
                initial = start.token_embedding.detach().float().clone()
            else:
                initial = subject_embedding(self.prior, self.subject)
            vector = torch.nn.Parameter(initial.to(self.prior.device))
        if cfg.train in ("both", "lora"):
            add_lora(tf, self.adapter, cfg.rank, cfg.alpha, cfg.targets, cfg.seed)
            if start is not None and start.lora_state:
                from peft import set_peft_model_state_dict

                with torch.no_grad():
                    set_peft_model_state_dict(tf, start.lora_state, adapter_name=self.adapter)
            tf.set_adapter(self.adapter)
            tf.enable_adapters()
        lora_params = [p for n, p in tf.named_parameters() if self.adapter in n]
        for p in lora_params:
            p.requires_grad_(True)
        concept = Concept(self.token, vector) if vector is not None else None
        return self.prior.with_concept(concept), vector, lora_params

    def _snapshot(self, vector: torch.Tensor | None) -> dict[str, Any]:
        lora = lora_state(self.prior.transformer, self.adapter) if self.cfg.train != "token" else {}
        return {"vector": None if vector is None else vector.detach().float().cpu().clone(), "lora": lora}

    def _render_check(self, view: Prior, step: int) -> Verdict:
        with torch.no_grad():
            e = _generate(view, self._prompt(), self.cfg.negative_prompt, self.cfg,
                          torch.Generator("cpu").manual_seed(self.cfg.seed))
            images = self.renderer(e)
        return self.gate.ask(images, self.subject, step)

    def _metrics(self, e: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            out = {"log_likelihood": float(self.norm.log_prob(e.double()).mean()),
                   "mahalanobis": float(self.norm.mahalanobis(e.double()).mean())}
            if self.anchor is not None:
                out["anchor_cos"] = float(self.anchor.cosine(e).mean())
        return out

    def run(self, callback: Callable[[StepRecord], None] | None = None,
            snapshot_at: frozenset[int] = frozenset()) -> OptimResult:
        """Optimise; ``callback(record)`` after each step may raise :class:`StopOptimisation`.

        ``snapshot_at``: steps (0 = before training) whose state is also returned as a concept,
        for creativity-vs-steps sweeps: the current state, or with a gate the last state it
        accepted. Steps after an early stop get the state that was kept.
        """
        cfg = self.cfg
        view, vector, lora_params = self._setup()
        try:
            params = ([vector] if vector is not None else []) + lora_params
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            good, good_step = self._snapshot(vector), 0
            log: list[StepRecord] = []
            path, reason, step, rejected = [], "max_steps", 0, None
            snapshots = {0: self._concept(good, 0, 0, "snapshot")} if 0 in snapshot_at else {}
            for step in range(1, cfg.steps + 1):
                t0 = time.perf_counter()
                e = _generate(view, self._prompt(), cfg.negative_prompt, cfg,
                              torch.Generator("cpu").manual_seed(step_seed(cfg.seed, step)))
                loss, values = objective(self.terms, e)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                metrics = self._metrics(e.detach())
                path.append(e.detach().cpu()[0])
                verdict = None
                if self.gate is not None and (self.gate.due(step) or step == cfg.steps):
                    verdict = self._render_check(view, step)
                    if not verdict.passed:
                        reason = "gate_rejected"
                        rejected = self._concept(self._snapshot(vector), step, step, reason)
                    else:
                        good, good_step = self._snapshot(vector), step
                record = StepRecord(step, float(loss.detach()), values, metrics, time.perf_counter() - t0, verdict)
                log.append(record)
                if step in snapshot_at and reason == "max_steps":  # with a gate: what it last vouched for
                    state, kept = (good, good_step) if self.gate is not None else (self._snapshot(vector), step)
                    snapshots[step] = self._concept(state, step, kept, "snapshot")
                if callback is not None:
                    try:
                        callback(record)
                    except StopOptimisation:
                        reason = "cancelled" if reason != "gate_rejected" else reason
                if reason != "max_steps":
                    break
            if self.gate is None:
                good, good_step = self._snapshot(vector), step
            final = self._concept(good, step, good_step, reason)
            snapshots.update({s: final for s in snapshot_at if s not in snapshots})
            return OptimResult(final, log, reason, step, good_step, path, snapshots, rejected)
        finally:
            self._teardown()

    def _concept(self, state: dict[str, Any], steps_run: int, accepted: int, reason: str) -> Concept:
        cfg = self.cfg
        meta = {"base_prior": self.prior.identity, "prior_family": self.prior.family, "subject": self.subject,
                "steps_run": steps_run, "accepted_step": accepted, "stop_reason": reason, "seed": cfg.seed,
                "prompt_template": cfg.template, "loss_weights": {t.name: t.weight for t in self.terms},
                "config": {k: v for k, v in asdict(cfg).items() if k != "targets"},
                "norm": {k: self.norm.provenance.get(k) for k in ("dims", "count")},
                "gate": None if self.gate is None else {"question": self.gate.question, "every": self.gate.every,
                                                        "threshold": self.gate.threshold},
                "package_version": __version__}
        return Concept(self.token, state["vector"], state["lora"], cfg.rank, cfg.alpha, tuple(cfg.targets), meta)

    def _teardown(self) -> None:
        tf = self.prior.transformer
        if self.adapter in (getattr(tf, "peft_config", None) or {}):
            tf.delete_adapters(self.adapter)
        tf.requires_grad_(False)
