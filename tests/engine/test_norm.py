"""The norm (PCA + Gaussian) against scikit-learn and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA

from creative_generation.nodes.engine.bank import EmbeddingBank
from creative_generation.nodes.engine.norm import GaussianNorm, NormFitError


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(40, 40))
    return torch.from_numpy(rng.normal(size=(300, 40)) * np.linspace(3, 0.1, 40) @ basis + 5.0)


def test_projection_matches_sklearn_pca(data):
    norm = GaussianNorm.from_bank(data, 10)
    ref = PCA(n_components=10, svd_solver="full").fit(data.numpy()).transform(data.numpy())
    assert np.allclose(norm.project(data).numpy(), ref, atol=1e-9)


def test_log_prob_matches_scipy(data):
    norm = GaussianNorm.from_bank(EmbeddingBank(data.float(), {"prior": "p:1"}), 12)
    z = norm.project(data).numpy()
    ref = multivariate_normal(mean=np.zeros(12), cov=norm.covariance.numpy()).logpdf(z)
    assert np.allclose(norm.log_prob(data).numpy(), ref, atol=1e-6, rtol=0)
    assert np.linalg.eigvalsh(norm.covariance.numpy()).min() > 0
    inv = np.linalg.inv(norm.covariance.numpy())
    assert np.allclose(norm.mahalanobis(data).numpy() ** 2, np.einsum("ij,jk,ik->i", z, inv, z), rtol=1e-8)
    assert norm.provenance["prior"] == "p:1"


def test_full_covariance_is_estimated_not_assumed_diagonal(data):
    """Ledoit-Wolf in PCA space: nearly diagonal (PCA decorrelates) but fitted as a full matrix."""
    norm = GaussianNorm.from_bank(data, 12)
    from sklearn.covariance import LedoitWolf

    ref = LedoitWolf().fit(norm.project(data).numpy()).covariance_
    assert np.allclose(norm.covariance.numpy(), ref, atol=1e-6 * np.trace(ref))


def test_log_prob_is_differentiable(data):
    norm = GaussianNorm.from_bank(data, 8)
    e = data[:3].clone().requires_grad_(True)
    norm.log_prob(e).sum().backward()
    assert e.grad is not None and torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda x: norm.log_prob(x), (data[:2].clone().requires_grad_(True),))


def test_singular_bank_stays_positive_definite():
    """A bank with zero spread in some directions (tiny random priors give this) still fits."""
    rng = np.random.default_rng(1)
    x = np.zeros((100, 20))
    x[:, :3] = rng.normal(size=(100, 3)) * 1e-3
    norm = GaussianNorm.from_bank(torch.from_numpy(x), 10)
    assert torch.isfinite(norm.log_prob(torch.from_numpy(x))).all()


@pytest.mark.parametrize("dims,rows,message", [(30, 30, "smaller than the bank size"), (41, 300, "embedding width"),
                                               (0, 300, "between 1")])
def test_bad_dims(data, dims, rows, message):
    with pytest.raises(NormFitError, match=message):
        GaussianNorm.from_bank(data[:rows], dims)


def test_bad_rows(data):
    bad = data.clone()
    bad[3, 0] = float("nan")
    bad[7, 2] = float("inf")
    with pytest.raises(NormFitError, match="2 row"):
        GaussianNorm.from_bank(bad, 5)
    with pytest.raises(NormFitError, match="empty"):
        GaussianNorm.from_bank(data[:0], 5)


def test_cluster_shares_pca(data):
    norm = GaussianNorm.from_bank(data, 10)
    cluster = norm.fit_cluster(data[:30])
    assert torch.equal(cluster.components, norm.components) and torch.equal(cluster.mean0, norm.mean0)
    assert torch.allclose(cluster.center, norm.project(data[:30]).mean(0))
    assert cluster.log_prob(data[:30]).mean() > cluster.log_prob(data[200:]).mean()
    single = norm.fit_cluster(data[:1])
    assert torch.isfinite(single.log_prob(data)).all()
    with pytest.raises(NormFitError, match="different prior"):
        norm.fit_cluster(data[:, :20])


def test_norm_along_named_directions_sees_only_those_directions(data):
    """GaussianNorm.along: the space is the span of each axis' differences; moving a sample along an axis makes it
    rarer, moving it orthogonally to every axis does not change its density."""
    rng = np.random.default_rng(2)
    colours, settings = torch.from_numpy(rng.normal(size=(4, 40))), torch.from_numpy(rng.normal(size=(3, 40)))
    norm = GaussianNorm.along(EmbeddingBank(data.float(), {"prior": "p:1"}), [colours, settings])
    assert norm.dims == 3 + 2 and norm.provenance["along"] == [4, 3] and norm.provenance["prior"] == "p:1"
    span = torch.cat([colours - colours.mean(0), settings - settings.mean(0)])
    assert torch.allclose(norm.components @ norm.components.T, torch.eye(5, dtype=torch.float64), atol=1e-10)
    assert torch.linalg.matrix_rank(torch.cat([norm.components, span])) == 5  # the same span
    orthogonal = torch.from_numpy(rng.normal(size=40))
    orthogonal -= norm.components.T @ (norm.components @ orthogonal)
    e = data[:5]
    assert torch.allclose(norm.log_prob(e + 10 * orthogonal), norm.log_prob(e), atol=1e-9)
    assert (norm.log_prob(e + 10 * (colours[0] - colours[1])) < norm.log_prob(e)).all()
    assert norm.provenance["lowest_log_prob"] == pytest.approx(float(norm.log_prob(data).min()))
    with pytest.raises(NormFitError, match="two 40-d"):
        GaussianNorm.along(data, [colours[:1]])
    with pytest.raises(NormFitError, match="two 40-d"):
        GaussianNorm.along(data, [])
    with pytest.raises(NormFitError, match="no direction"):
        GaussianNorm.along(data, [torch.stack([colours[0], colours[0]])])
    with pytest.raises(NormFitError, match="two 40-d"):
        GaussianNorm.along(data, [colours[:, :20]])
