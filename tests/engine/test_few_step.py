"""The differentiable few-step samplers follow k-diffusion's euler and lcm and pass gradients."""

from __future__ import annotations

import pytest
import torch

from creative_generation.nodes.engine.few_step import sample


def scaling(sigma, noise, latent):
    return latent + noise * sigma


def test_euler_reaches_a_fixed_point_denoiser_and_passes_gradients():
    target = torch.randn(1, 4, 8, 8)
    w = torch.tensor(0.5, requires_grad=True)
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0])
    out = sample(lambda x, s: w * target + 0 * x, torch.randn(1, 4, 8, 8), sigmas, "euler", noise_scaling=scaling)
    assert torch.allclose(out, 0.5 * target, atol=1e-5)  # the last step lands on the prediction
    out.sum().backward()
    assert w.grad is not None and torch.isclose(w.grad, target.sum(), rtol=1e-4)


def test_lcm_renoises_between_steps_and_ends_on_the_prediction():
    seen = []
    noises = [torch.full((1, 4, 2, 2), 2.0)]

    def denoise(x, s):
        seen.append((x.clone(), float(s[0])))
        return torch.ones_like(x)

    out = sample(denoise, torch.zeros(1, 4, 2, 2), torch.tensor([10.0, 1.0, 0.0]), "lcm", noise_scaling=scaling,
                 step_noise=lambda i: noises[i])
    assert [s for _, s in seen] == [10.0, 1.0]
    assert torch.allclose(seen[1][0], torch.ones(1, 4, 2, 2) + 2.0)  # prediction re-noised to sigma 1
    assert torch.equal(out, torch.ones(1, 4, 2, 2))


def test_other_samplers_are_refused_with_the_supported_ones():
    with pytest.raises(ValueError, match="euler, lcm"):
        sample(lambda x, s: x, torch.zeros(1, 1, 1, 1), torch.tensor([1.0, 0.0]), "dpmpp_2m", noise_scaling=scaling)
