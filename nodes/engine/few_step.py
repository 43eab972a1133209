"""Few-step sampling with gradients: the SD path's render, differentiable in the model's weights.

ComfyUI's samplers run without gradients (k-diffusion's are ``torch.no_grad`` functions), so the
creative optimiser renders with its own loop over the same ingredients: the model's denoiser
``denoised(x, sigma)`` (x0 prediction, as ComfyUI's model wrapper gives it), the sigmas of the
scheduler the user chose, and the model's noise scaling. The two samplers few-step models are
published with are here, written as k-diffusion writes them, so that with the same sigmas and
noise they follow ComfyUI's ``euler`` and ``lcm`` step for step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SAMPLERS = ("euler", "lcm")  # differentiable here; the bank node may use any sampler of core's list

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,C,h,w], sigma [B]) -> x0
NoiseScaling = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, noise, latent)


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} cannot render with gradients here; the creative optimiser supports "
                         f"{', '.join(SAMPLERS)} (the few-step LoRAs' samplers: Hyper-SD / LCM / Lightning).")


def sample(denoised: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, sampler: str, *,
           noise_scaling: NoiseScaling, step_noise: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """The latent after sampling from pure noise along ``sigmas`` (descending, ending at 0).

    ``noise_scaling(sigma, noise, latent)`` is the model's (``model_sampling.noise_scaling``);
    ``step_noise(i)`` the fresh noise LCM adds after step ``i`` (seeded by the caller)."""
    check_sampler(sampler)
    x = noise_scaling(sigmas[0], noise, torch.zeros_like(noise))
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(noise.shape[0])
        x0 = denoised(x, sigma)
        if sampler == "euler":
            d = (x - x0) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:  # lcm: jump to the prediction, re-noise to the next sigma
            x = x0
            if float(sigmas[i + 1]) > 0:
                fresh = step_noise(i) if step_noise is not None else torch.randn_like(x)
                x = noise_scaling(sigmas[i + 1], fresh, x)
    return x
