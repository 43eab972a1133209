"""Loss terms of the creative objective (Eq. 5-8); a list of terms is the objective.

Each term has a ``name``, a ``weight`` and maps embeddings ``[B, D]`` to a scalar. The total is
``sum(weight * term(e))``. Terms are small frozen objects, so ComfyUI can pass and chain them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .bank import EmbeddingBank, encode_image
from .norm import GaussianNorm
from .prior import Prior


class LossTerm(Protocol):
    """What the optimiser needs of a term: a name for the log, a weight, and a scalar of ``e [B, D]``."""

    name: str
    weight: float

    def __call__(self, e: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class CreativeTerm:
    """Eq. 5, ``log Ĝ(ẽ)``: minimising it pushes the embedding into the norm's tails.

    ``ceiling`` (a log-likelihood; None = the paper's unbounded term): only the part of each sample's
    log-likelihood above it counts, ``mean(max(log Ĝ(ẽ) − ceiling, 0))``, so a sample stops being pushed
    once it is rarer than the ceiling (e.g. beyond every sample of the norm's bank, :meth:`beyond`) and the
    anchor and gate are not fought by a push that never ends."""

    norm: GaussianNorm
    weight: float = 1.0
    name: str = "creative"
    ceiling: float | None = None

    @classmethod
    def beyond(cls, norm: GaussianNorm, weight: float = 1.0, margin: float = 0.0) -> "CreativeTerm":
        """A term that pushes each sample until it is rarer than every sample of the bank the norm was fitted
        on (less ``margin``): past the typical region's last sample, not without end."""
        if "lowest_log_prob" not in norm.provenance:
            raise ValueError("This norm does not know its bank's rarest sample (it was not fitted by Norm Gaussian "
                             "Fit from a bank): fit it again, or turn the beyond-the-bank ceiling off.")
        lowest = float(norm.provenance["lowest_log_prob"])
        return cls(norm, float(weight), ceiling=lowest - float(margin))

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        ll = self.norm.log_prob(e)
        return ll.mean() if self.ceiling is None else (ll - self.ceiling).clamp(min=0).mean()


@dataclass(frozen=True)
class AnchorTerm:
    """Eq. 6, ``1 − cos(e, φ(P_pos))``: pulls the embedding back toward the category text."""

    target: torch.Tensor  # [D], the prior's projected text embedding of the category prompt
    text: str = ""
    weight: float = 1.0
    name: str = "anchor"
    space: str = ""  # the embedding space ``target`` lives in (a prior's identity, a CLIP vision model's)
    _on: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_prior(cls, prior: Prior, text: str, weight: float = 1.0) -> "AnchorTerm":
        """φ is the prior's own CLIP text encoder (its projected text embedding)."""
        if not text.strip():
            raise ValueError("The anchor text is empty: give the category, e.g. 'a photo of a vehicle'.")
        with torch.no_grad():
            target = prior.with_concept(None).encode_prompt([text]).text_embeds[0].float().cpu()
        return cls(target, text, float(weight), space=prior.identity)

    @classmethod
    def from_images(cls, prior: Prior, images: torch.Tensor, weight: float = 1.0) -> "AnchorTerm":
        """The image anchor, ``1 − cos(e, image embedding)``: holds variations to a given image (the mean of the
        prior's own CLIP image embeddings of ``images``) as the text anchor holds a concept to its category."""
        return cls(encode_image(prior, images)[0], "", float(weight), "image_anchor", prior.identity)

    @classmethod
    def from_embeds(cls, embeds: torch.Tensor, space: str, weight: float = 1.0) -> "AnchorTerm":
        """The image anchor toward the mean of image embeddings ``[N, D]`` of the space ``space`` (on the SD path:
        a CLIP vision model's embeddings of given images or of a bank)."""
        if embeds.ndim != 2 or embeds.shape[0] < 1:
            raise ValueError(f"The image anchor needs embeddings [N, D], got shape {tuple(embeds.shape)}.")
        return cls(embeds.detach().float().mean(0).cpu(), "", float(weight), "image_anchor", space)

    def cosine(self, e: torch.Tensor) -> torch.Tensor:
        if e.device not in self._on:  # copied to the device once, not every optimiser step
            self._on[e.device] = self.target.to(e.device)
        return F.cosine_similarity(e.float(), self._on[e.device][None], dim=-1)

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.cosine(e)).mean()


@dataclass(frozen=True)
class NegativeClusterTerm:
    """Eq. 7 with the sign that matches the paper's intent: ``+α · log Ĝ_neg(ẽ)`` repels.

    The paper prints ``−α log Ĝ_neg``; minimising that would *raise* the likelihood under the
    unwanted cluster, i.e. attract toward it, contradicting "repel new samples from this
    unfavorable region". We implement the stated intent.
    """

    cluster: GaussianNorm  # fitted with the norm's own PCA (GaussianNorm.fit_cluster)
    weight: float = 1.0  # α
    name: str = "negative"

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        return self.cluster.log_prob(e).mean()


def negative_cluster(norm: GaussianNorm, embeds: torch.Tensor | EmbeddingBank, alpha: float = 1.0,
                     label: str = "negative") -> NegativeClusterTerm:
    """Fit a cluster of unwanted embeddings in the norm's PCA space and wrap it as a repelling term."""
    return NegativeClusterTerm(norm.fit_cluster(embeds), float(alpha), label)


def term_space(term: LossTerm) -> str:
    """The embedding space a term compares in ("" when it does not say): an anchor's own, a cluster's norm's."""
    if isinstance(term, AnchorTerm):
        return term.space
    norm = getattr(term, "cluster", None) or getattr(term, "norm", None)
    return norm.prior_identity if isinstance(norm, GaussianNorm) else ""


def objective(terms: Iterable[LossTerm], e: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted total and each term's unweighted value (names made unique for the log)."""
    total, values = objective_tensors(terms, e)
    return total, {key: float(value) for key, value in values.items()}


def objective_tensors(terms: Iterable[LossTerm], e: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`objective` with each term's value left a detached tensor on ``e``'s device, so an optimiser step
    need not wait for the device to log them (it reads them all at once, when it needs them)."""
    total = e.new_zeros((), dtype=torch.float64)
    values: dict[str, torch.Tensor] = {}
    for term in terms:
        value = term(e)
        total = total + term.weight * value.to(torch.float64)
        key, i = term.name, 2
        while key in values:
            key, i = f"{term.name}_{i}", i + 1
        values[key] = value.detach()
    return total, values
