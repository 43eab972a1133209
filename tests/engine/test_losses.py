"""Loss terms against independent computations; the negative cluster must repel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from creative_generation.nodes.engine.losses import AnchorTerm, CreativeTerm, negative_cluster, objective
from creative_generation.nodes.engine.norm import GaussianNorm


@pytest.fixture(scope="module")
def norm():
    rng = np.random.default_rng(0)
    return GaussianNorm.from_bank(torch.from_numpy(rng.normal(size=(200, 32)) * np.linspace(2, 0.2, 32)), 8)


def test_creative_is_mean_log_density(norm):
    e = torch.randn(4, 32, dtype=torch.float64)
    ref = multivariate_normal(np.zeros(8), norm.covariance.numpy()).logpdf(norm.project(e).numpy()).mean()
    assert abs(float(CreativeTerm(norm)(e)) - ref) < 1e-8


def test_anchor_uses_prior_text_projection(prior):
    term = AnchorTerm.from_prior(prior, "a photo of a vehicle", weight=2.0)
    ids = prior.tokenizer(["a photo of a vehicle"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        target = prior.text_encoder(ids.input_ids).text_embeds[0]
    e = torch.randn(3, 32)
    ref = 1 - torch.nn.functional.cosine_similarity(e, target[None], dim=-1).mean()
    assert torch.allclose(term(e), ref, atol=1e-6) and term.weight == 2.0
    with pytest.raises(ValueError, match="anchor text is empty"):
        AnchorTerm.from_prior(prior, "  ")


def test_negative_cluster_repels(norm):
    """Gradient descent on +α·log Ĝ_neg moves a point *away* from the unwanted cluster (Eq. 7, sign fixed)."""
    rng = np.random.default_rng(1)
    unwanted = torch.from_numpy(rng.normal(size=(40, 32)) * 0.1 + 1.0)
    term = negative_cluster(norm, unwanted, alpha=0.5, label="ugly")
    e = (unwanted.mean(0, keepdim=True) + 0.05).requires_grad_(True)
    before = float(term.cluster.log_prob(e))
    opt = torch.optim.SGD([e], lr=1e-3)
    for _ in range(20):
        opt.zero_grad()
        (term.weight * term(e)).backward()
        opt.step()
    assert float(term.cluster.log_prob(e)) < before
    assert term.name == "ugly" and term.weight == 0.5


def test_evaluate_weights_and_unique_names(norm):
    e = torch.randn(2, 32, dtype=torch.float64)
    a, b = CreativeTerm(norm, 1.0), CreativeTerm(norm, 3.0)
    total, values = objective([a, b], e)
    assert set(values) == {"creative", "creative_2"}
    assert torch.allclose(total, 4 * a(e))


def test_creative_ceiling_pushes_only_samples_above_it():
    """With a ceiling, a sample rarer than it adds nothing (and no gradient); the others add their excess."""
    from creative_generation.nodes.engine.bank import EmbeddingBank

    rng = np.random.default_rng(1)
    bank = EmbeddingBank(torch.from_numpy(rng.normal(size=(300, 32)) * np.linspace(2, 0.2, 32)).float())
    norm = GaussianNorm.from_bank(bank, 8)
    term = CreativeTerm.beyond(norm, margin=1.0)
    lowest = float(norm.log_prob(bank.embeds.double()).min())
    assert term.ceiling == pytest.approx(lowest - 1.0)
    typical = bank.embeds[:3].double().requires_grad_(True)
    far = (bank.embeds[3:4].double() * 40).requires_grad_(True)
    e = torch.cat([typical, far])
    lls = norm.log_prob(e)
    assert float(lls[3]) < term.ceiling < float(lls[:3].min())
    value = term(e)
    assert float(value) == pytest.approx(float((lls[:3] - term.ceiling).sum() / 4))
    value.backward()
    assert float(far.grad.abs().sum()) == 0.0 and float(typical.grad.abs().sum()) > 0
