"""Concept mixing: two or more learned concepts of one prior, combined with weights into a new concept.

The token vector is the weighted mean of the parents' vectors (a parent trained without a token
contributes its subject word's embedding, which is what its prompt used). The LoRA is peft's
weighted adapter combination with ``combination_type="cat"``: the parents' adapters are stacked,
each ``A`` scaled by its weight and LoRA scaling, so the mixed update is exactly
``Σ wᵢ · sᵢ · Bᵢ Aᵢ`` (rank = the sum of the parents' ranks, alpha = rank). Weights are
normalised to sum to one, so a 1:0 mix is the first concept and 1:1 is the midpoint. The result
is an ordinary :class:`Concept`, saved and loaded like any other; parents of different base
priors are refused.
"""

from __future__ import annotations

import time
import warnings

import torch

from . import __version__
from .concept import Concept, ConceptMismatchError, activate_concept, lora_config, lora_state
from .optimizer import placeholder_for
from .prior_training import subject_embedding
from .prior import Prior


def normalised_weights(weights: list[float]) -> list[float]:
    """Weights as fractions of their sum; refuses negative, non-finite or all-zero weights."""
    if any(not torch.isfinite(torch.tensor(float(w))) or w < 0 for w in weights):
        raise ValueError(f"Mixing weights must be finite and >= 0, got {weights}.")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("All mixing weights are 0: give at least one concept a positive weight.")
    return [float(w) / total for w in weights]


def _check_parents(prior: Prior, concepts: list[Concept]) -> None:
    if len(concepts) < 2:
        raise ValueError("Mixing needs at least two concepts.")
    bases = {c.meta.get("base_prior", "") for c in concepts}
    if len(bases) > 1:
        raise ConceptMismatchError(f"These concepts were trained on different priors ({sorted(bases)}); a mix only "
                                   "makes sense within one prior. Mix concepts trained on the same prior.")
    for c in concepts:
        prior.check_concept(c)
    with_lora = {c.lora_targets for c in concepts if c.lora_state}
    if len(with_lora) > 1:
        raise ValueError(f"The concepts' LoRAs sit on different modules ({sorted(with_lora)}); train them with the "
                         "same LoRA targets to mix them.")


def _token_vector(prior: Prior, concepts: list[Concept], weights: list[float]) -> torch.Tensor | None:
    if all(c.token_embedding is None for c in concepts):
        return None
    parts = [c.token_embedding.float().cpu() if c.token_embedding is not None
             else subject_embedding(prior, str(c.meta.get("subject", ""))).cpu() for c in concepts]
    return sum(w * v for w, v in zip(weights, parts))


def _mixed_lora(prior: Prior, concepts: list[Concept], weights: list[float]) -> tuple[dict[str, torch.Tensor], int]:
    """peft's ``add_weighted_adapter`` (cat) over the parents' adapters, loaded on the shared transformer."""
    from peft.tuners.lora import LoraModel

    parents = [(c, w) for c, w in zip(concepts, weights) if c.lora_state]
    if not parents:
        return {}, 0
    tf = prior.transformer
    for concept, _ in parents:
        activate_concept(tf, concept)  # loads each parent's adapter once (by its content hash)
    stamp = time.monotonic_ns()
    scratch, mixed = f"creative_mixscratch_{stamp}", f"creative_mixed_{stamp}"
    first = parents[0][0]
    configs = tf.peft_config  # the transformer's own registry: the tuner shares it, so nothing is lost
    configs[scratch] = lora_config(first.lora_rank, first.lora_alpha, first.lora_targets)
    try:
        with warnings.catch_warnings():  # peft warns that the model already has adapters: that is the point
            warnings.simplefilter("ignore", UserWarning)
            tuner = LoraModel(tf, configs, scratch)
        tuner.add_weighted_adapter([c.adapter_name for c, _ in parents], [w for _, w in parents], mixed,
                                   combination_type="cat")
        state = lora_state(tf, mixed)
        rank = int(configs[mixed].r)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tf.delete_adapters([n for n in (scratch, mixed) if n in configs])
        tf.requires_grad_(False)
    return state, rank


def mix_concepts(prior: Prior, concepts: list[Concept], weights: list[float], token: str = "") -> Concept:
    """A new concept from ``concepts`` mixed with ``weights`` (normalised), on the prior they were trained on."""
    if len(weights) != len(concepts):
        raise ValueError(f"{len(concepts)} concepts but {len(weights)} weights: give one weight per concept.")
    _check_parents(prior, concepts)
    w = normalised_weights(weights)
    vector = _token_vector(prior, concepts, w)
    state, rank = _mixed_lora(prior, concepts, w)
    subjects = list(dict.fromkeys(str(c.meta.get("subject", "")) for c in concepts))
    if vector is not None and not token:
        token = placeholder_for("-".join(subjects), "creative-mix")
    targets = next((c.lora_targets for c in concepts if c.lora_state), concepts[0].lora_targets)
    meta = {"base_prior": prior.identity, "prior_family": prior.family, "subject": subjects[0],
            "mixed_from": [{"token": c.token, "subject": c.meta.get("subject"), "adapter": c.adapter_name,
                            "weight": wi} for c, wi in zip(concepts, w)],
            "stop_reason": "mixed", "package_version": __version__}
    return Concept(token if vector is not None else "", vector, state, rank or concepts[0].lora_rank,
                   float(rank or concepts[0].lora_alpha), tuple(targets), meta)
