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

from dataclasses import dataclass

import torch

from .concept import Concept
from .losses import AnchorTerm, CreativeTerm
from .optimizer import CreativeRun, OptimResult, PhaseCallback, StepCallback
from .rare_start import invert


@dataclass
class VariationsResult:
    image_embeds: torch.Tensor  # [1, D], the image in the prior's CLIP image space
    image_log_likelihood: float  # under the norm
    inversion: OptimResult
    creative: OptimResult

    @property
    def concept(self) -> Concept:
        return self.creative.concept


def image_variations(run: CreativeRun, images: torch.Tensor, *, inversion_steps: int = 200,
                     inversion_lr: float = 1e-2, image_weight: float = 1.0, on_step: StepCallback | None = None,
                     on_phase: PhaseCallback | None = None) -> VariationsResult:
    """Invert ``images`` into a token (+ LoRA), then optimise creatively from there, anchored to the image.

    ``run`` is the creative stage (its terms, e.g. a text anchor, are kept and the creative term and the
    image anchor are put in front); the inversion uses the same token, LoRA shape and prior settings with
    ``inversion_steps`` and ``inversion_lr``, no gate, and the image anchor as its only term. ``on_step``
    hears both stages ("inversion", then "creative"), counted as one job.
    """
    if inversion_steps < 1:
        raise ValueError(f"inversion_steps must be at least 1, got {inversion_steps}.")
    anchor = AnchorTerm.from_images(run.generator, images, image_weight)
    target = anchor.target[None]  # [1, D]: the image in the prior's CLIP image space
    total = inversion_steps + run.config.steps
    inversion = invert(run, anchor, inversion_steps, inversion_lr, on_step=on_step, on_phase=on_phase, total=total)
    creative = run.with_(terms=(CreativeTerm(run.norm), anchor, *run.terms), start=inversion.concept).run(
        on_step, on_phase=on_phase, stage="creative", offset=inversion_steps, total=total)
    with torch.no_grad():
        image_ll = float(run.norm.log_prob(target.double())[0])
    return VariationsResult(target, image_ll, inversion, creative)
