"""Creative variations of a given image (the paper's project-page extension).

Three steps built from the method's own parts:

1. the image is encoded with the prior's own CLIP image encoder, into the space the norm lives in
   (a prior without an image encoder is refused);
2. inversion: a token (optionally with the LoRA) is optimised so the prior's output for
   "a photo of a {token}" matches that embedding; it is the creative optimiser with the image
   anchor ``1 − cos(e, image embedding)`` as its only loss term;
3. the creative optimisation starts from the inverted token and LoRA, anchored to the image (the
   image anchor, beside any text anchor given) and gated as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .concept import Concept
from .gate import ValidityGate
from .losses import AnchorTerm, CreativeTerm, LossTerm
from .norm import GaussianNorm
from .optimizer import CreativeOptimizer, OptimConfig, OptimResult
from .prior import Prior
from .steplog import StepRecord


@dataclass
class VariationsResult:
    image_embeds: torch.Tensor  # [1, D], the image in the prior's CLIP image space
    image_log_likelihood: float  # under the norm
    inversion: OptimResult
    creative: OptimResult

    @property
    def concept(self) -> Concept:
        return self.creative.concept


def image_variations(prior: Prior, norm: GaussianNorm, images: torch.Tensor, subject: str, cfg: OptimConfig, *,
                     inversion_steps: int = 200, inversion_lr: float = 1e-2, image_weight: float = 1.0,
                     terms: Sequence[LossTerm] = (), gate: ValidityGate | None = None,
                     renderer: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     callback: Callable[[str, StepRecord], None] | None = None) -> VariationsResult:
    """Invert ``images`` into a token (+ LoRA), then optimise creatively from there, anchored to the image.

    ``cfg`` is the creative stage's configuration; the inversion uses the same token, LoRA shape and
    prior settings with ``inversion_steps`` and ``inversion_lr``. ``terms`` are added to the creative
    stage (e.g. a text anchor). ``callback(stage, record)``, stage "inversion" or "creative", runs after
    every step and may raise to cancel.
    """
    if inversion_steps < 1:
        raise ValueError(f"inversion_steps must be at least 1, got {inversion_steps}.")
    anchor = AnchorTerm.from_images(prior, images, image_weight)
    target = anchor.target[None]  # [1, D]: the image in the prior's CLIP image space
    invert_cfg = replace(cfg, steps=inversion_steps, lr=inversion_lr)
    hook = (lambda stage: None if callback is None else (lambda record: callback(stage, record)))
    inversion = CreativeOptimizer(prior, norm, subject, [replace(anchor, weight=1.0)], invert_cfg).run(
        hook("inversion"))
    creative = inversion  # a cancelled inversion is not continued
    if inversion.stop_reason != "cancelled":
        creative = CreativeOptimizer(prior, norm, subject, [CreativeTerm(norm), anchor, *terms], cfg, gate, renderer,
                                     start=inversion.concept).run(hook("creative"))
    with torch.no_grad():
        image_ll = float(norm.log_prob(target.double())[0])
    return VariationsResult(target, image_ll, inversion, creative)
