"""Training on the diffusion prior: a placeholder token and/or a peft LoRA on its transformer (§5.2).

The prior's side of a :class:`..optimizer.CreativeRun`: each step runs the few prior denoising steps
*with gradients* for "a photo of a <token>" from fresh seeded noise; the gate judges the state's
embedding drawn by the run's renderer; the learned state is a :class:`..concept.Concept`. The shared
prior is left as it was: the training adapter is removed when the session closes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .concept import Concept, activate_concept, add_lora, lora_state
from .gate import GateCheck, draw
from .sampling import build_prefix, denoise, initial_latents

if TYPE_CHECKING:
    from .budget import PhaseCallback
    from .optimizer import CreativeRun, OptimConfig
    from .prior import Prior, PromptEmbeds


def subject_embedding(prior: Prior, subject: str) -> torch.Tensor:
    """Mean input-embedding row of the subject word's tokens: the token's starting point."""
    ids = prior.tokenizer(subject, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"The subject {subject!r} has no tokens.")
    table = prior.text_encoder.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].mean(0).detach().clone().float()


def generate(view: Prior, emb: PromptEmbeds, config: OptimConfig, seed: int) -> torch.Tensor:
    """``config.samples`` embeddings ``[samples, D]`` from noise of ``seed`` for the encoded ``[negative, prompt]``
    pair ``emb``, differentiable in the view's concept (one seeded generator draws the whole batch, as the prior
    pipeline draws a batch)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    cache = build_prefix(view.transformer, emb)
    return denoise(view, cache, initial_latents(view, config.samples, generator), config.prior_steps,
                   config.guidance, generator).float()


class PriorTraining:
    """One run's training session on a prior (the :class:`..optimizer.Training` of a prior)."""

    def __init__(self, prior: Prior, run: CreativeRun) -> None:
        self.run, self.prior = run, prior.with_concept(None)
        self.adapter = f"creative_train_{time.monotonic_ns()}"
        try:
            self._open()
        except BaseException:  # a half-opened session (e.g. a starting LoRA of the wrong shape) is closed here
            self.close()
            raise

    def _open(self) -> None:
        run = self.run
        config, tf, start = run.config, self.prior.transformer, run.start
        activate_concept(tf, None)  # other concepts' adapters may be active on the shared prior
        self.vector = None
        if config.train.token:
            if start is not None and start.token_embedding is not None:
                initial = start.token_embedding.detach().float().clone()
            else:
                initial = subject_embedding(self.prior, run.subject)
            self.vector = torch.nn.Parameter(initial.to(self.prior.device))
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
        self.params = ([self.vector] if self.vector is not None else []) + lora_params
        self.view = self.prior.with_concept(Concept(run.token, self.vector) if self.vector is not None else None)
        # The prompt is tokenised once per run. Its encoding depends only on the token: with the token frozen
        # (LoRA only, which acts on the prior's transformer) the text encoder runs once and its output is reused.
        self.tokens = self.view.tokenize([config.negative_prompt, run.prompt])
        self.fixed = None
        if self.vector is None:
            with torch.no_grad():
                self.fixed = self.view.encode_tokens(self.tokens)

    def prompt_embeds(self) -> PromptEmbeds:
        """The encoded ``[negative, prompt]`` pair of the current state: with the trained token, encoded now."""
        return self.fixed if self.fixed is not None else self.view.encode_tokens(self.tokens)

    def embed(self, seed: int) -> torch.Tensor:
        return generate(self.view, self.prompt_embeds(), self.run.config, seed)

    def check_images(self, seed: int, check: GateCheck, on_phase: PhaseCallback) -> torch.Tensor:
        with torch.no_grad():
            return draw(check.renderer, self.embed(seed), on_phase)

    def snapshot(self) -> dict[str, Any]:
        lora = lora_state(self.prior.transformer, self.adapter) if self.run.config.train.lora else {}
        return {"vector": None if self.vector is None else self.vector.detach().float().cpu().clone(), "lora": lora}

    def restore(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            if self.vector is not None:
                self.vector.copy_(state["vector"].to(self.vector))
            if state["lora"]:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.prior.transformer, state["lora"], adapter_name=self.adapter)

    def learned(self, state: dict[str, Any], meta: dict[str, Any]) -> Concept:
        config = self.run.config
        meta = {"base_prior": self.prior.identity, "prior_family": self.prior.family, **meta}
        return Concept(self.run.token, state["vector"], state["lora"], config.rank, config.lora_alpha,
                       config.targets, meta)

    def close(self) -> None:
        tf = self.prior.transformer
        if self.adapter in (getattr(tf, "peft_config", None) or {}):
            tf.delete_adapters(self.adapter)
        tf.requires_grad_(False)
