"""The "norm": PCA of an embedding bank plus a full-covariance Gaussian in PCA space.

Eq. 3-4 of the paper: ``ẽ = W (e - μ0)`` with W the top-k PCA directions, ``Ĝ(ẽ) = N(ẽ | 0, Σ)``.
Fitting uses scikit-learn (PCA, Ledoit-Wolf covariance); scoring is a differentiable torch
function of raw D-dimensional embeddings so the optimiser can backpropagate through it.
Negative clusters reuse the same PCA (μ0, W) with their own mean and covariance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .bank import EmbeddingBank



class NormFitError(ValueError):
    """A bank that cannot be fitted; the message says how to fix it."""


def _checked_matrix(embeds: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(embeds.detach().cpu().double() if isinstance(embeds, torch.Tensor) else embeds, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise NormFitError(f"The {what} is empty: sample or select some embeddings first.")
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    if bad:
        raise NormFitError(f"The {what} has {bad} row(s) with NaN or inf values; resample it (e.g. in float32).")
    return x


def _rows(data: EmbeddingBank | torch.Tensor | np.ndarray, what: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A bank's or a tensor's embeddings as a checked float64 matrix, and its provenance ({} for a bare tensor)."""
    if isinstance(data, EmbeddingBank):
        return _checked_matrix(data.embeds, what), dict(data.provenance)
    return _checked_matrix(data, what), {}


def _regularised_covariance(z: np.ndarray, floor: float) -> np.ndarray:
    """Ledoit-Wolf shrinkage plus a small ridge: positive definite even when n < k."""
    from sklearn.covariance import LedoitWolf

    cov = LedoitWolf(assume_centered=False).fit(z).covariance_ if z.shape[0] > 1 else np.zeros((z.shape[1],) * 2)
    return cov + floor * np.eye(z.shape[1])


@dataclass
class GaussianNorm:
    """μ0 ``[D]``, PCA basis W ``[k, D]``, Gaussian mean ``[k]`` and covariance Σ ``[k, k]`` (float64)."""

    mean0: torch.Tensor
    components: torch.Tensor
    center: torch.Tensor
    covariance: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)

    _on: dict[torch.device, tuple[torch.Tensor, ...]] = field(default_factory=dict, init=False, repr=False,
                                                               compare=False)

    def __post_init__(self) -> None:
        self._chol = torch.linalg.cholesky(self.covariance)
        self._log_norm = (torch.log(torch.diagonal(self._chol)).sum()
                          + 0.5 * self.dims * math.log(2 * math.pi))

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """μ0, W, the Gaussian's mean, its Cholesky factor and log-normaliser on ``device``, copied there once: the
        optimiser scores an embedding every step, and a fresh host-to-device copy each time would wait on the
        device. The tensors are never changed in place (a cluster is a new norm), so the copies stay valid."""
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.mean0, self.components, self.center, self._chol,
                                                            self._log_norm))
        return self._on[device]

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def prior_identity(self) -> str:
        return str(self.provenance.get("prior", ""))

    @classmethod
    def from_bank(cls, bank: EmbeddingBank | torch.Tensor, dims: int = 50, *, ridge: float = 1e-6) -> "GaussianNorm":
        """A new norm fitted to ``bank``: PCA to ``dims`` and a regularised Gaussian of the projected bank.
        (A constructor, so not named ``fit``: scikit-learn's ``fit`` fits an existing estimator and returns it.)"""
        from sklearn.decomposition import PCA

        x, provenance = _rows(bank, "bank")
        n, d = x.shape
        if dims < 1 or dims > d:
            raise NormFitError(f"PCA dims ({dims}) must be between 1 and the embedding width ({d}).")
        if dims >= n:
            raise NormFitError(f"PCA dims ({dims}) must be smaller than the bank size ({n}): "
                               f"sample at least {dims + 1} embeddings or lower the PCA dims.")
        pca = PCA(n_components=dims, svd_solver="full").fit(x)
        z = pca.transform(x)
        floor = ridge * float(pca.explained_variance_.mean())
        cov = _regularised_covariance(z, floor)
        meta = {"prior": provenance.get("prior", ""), "bank": provenance, "dims": dims, "count": n,
                "explained_variance_ratio": float(pca.explained_variance_ratio_.sum())}
        t = torch.from_numpy
        norm = cls(t(pca.mean_.copy()), t(pca.components_.copy()), torch.zeros(dims, dtype=torch.float64),
                   t(cov), meta)
        # the bank's rarest sample: where a creative term with a ceiling stops pushing (CreativeTerm.beyond)
        meta["lowest_log_prob"] = float(norm.log_prob(t(x).double()).min())
        return norm

    @classmethod
    def along(cls, bank: EmbeddingBank | torch.Tensor, axes: list[torch.Tensor], *,
              ridge: float = 1e-6) -> "GaussianNorm":
        """A norm of ``bank`` along named directions only, in place of PCA's: each axis is a set of alternatives'
        embeddings ``[n_i, D]`` (e.g. the text embeddings of "a red car", "a blue car", ...), and the space is the
        span of their differences within each axis. Low density there means an unusual *value on those axes*
        (a colour or setting unusual for the bank), mostly not an unusual size, position or blend (the directions
        are not made orthogonal to those)."""
        x, provenance = _rows(bank, "bank")
        alternatives = [_checked_matrix(a, "axis") for a in axes]
        if not alternatives or any(a.shape[0] < 2 or a.shape[1] != x.shape[1] for a in alternatives):
            raise NormFitError(f"Give at least one axis of at least two {x.shape[1]}-d embeddings of alternatives.")
        span = np.concatenate([a - a.mean(axis=0) for a in alternatives])
        _, s, vt = np.linalg.svd(span, full_matrices=False)
        basis = vt[s > 1e-6 * s[0]] if s[0] > 0 else vt[:0]
        if len(basis) == 0:
            raise NormFitError("The axes' alternatives are all the same embedding: they name no direction.")
        mean0 = x.mean(axis=0)
        z = (x - mean0) @ basis.T
        cov = _regularised_covariance(z, ridge * float(z.var(axis=0).mean()))
        meta = {"prior": provenance.get("prior", ""), "bank": provenance, "dims": len(basis), "count": len(x),
                "along": [len(a) for a in alternatives]}
        t = torch.from_numpy
        norm = cls(t(mean0), t(basis.copy()), torch.zeros(len(basis), dtype=torch.float64), t(cov), meta)
        meta["lowest_log_prob"] = float(norm.log_prob(t(x)).min())
        return norm

    def fit_cluster(self, embeds: torch.Tensor | EmbeddingBank, *, ridge: float = 1e-3) -> "GaussianNorm":
        """A Gaussian of other embeddings in *this* PCA space (for negative clusters)."""
        x, provenance = _rows(embeds, "cluster")
        if x.shape[1] != self.embed_dim:
            raise NormFitError(f"The cluster's embeddings are {x.shape[1]}-d but the norm is {self.embed_dim}-d: "
                               "they come from a different prior.")
        z = (x - self.mean0.numpy()) @ self.components.numpy().T
        floor = ridge * float(torch.diagonal(self.covariance).mean())
        meta = {"prior": provenance.get("prior", self.prior_identity), "cluster_of": provenance, "count": len(x)}
        return replace(self, center=torch.from_numpy(z.mean(axis=0)),
                       covariance=torch.from_numpy(_regularised_covariance(z, floor)), provenance=meta)

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """ẽ = W (e − μ0), differentiable, computed in float64."""
        e64 = e.to(torch.float64)
        mean0, components = self._tensors(e64.device)[:2]
        return (e64 - mean0) @ components.T

    def whiten(self, e: torch.Tensor) -> torch.Tensor:
        """Whitened PCA coordinates y = L⁻¹(ẽ − μ) (Σ = L Lᵀ): unit-variance, uncorrelated under the Gaussian,
        so Euclidean distances there are Mahalanobis distances. Float64, differentiable."""
        center, chol = self._tensors(e.device)[2:4]
        z = self.project(e) - center
        return torch.linalg.solve_triangular(chol, z.T, upper=False).T

    def mahalanobis(self, e: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of raw embeddings ``[B, D]`` to the Gaussian's centre."""
        return self.whiten(e).pow(2).sum(-1).sqrt().to(e.dtype)

    def log_prob(self, e: torch.Tensor) -> torch.Tensor:
        """log Ĝ(ẽ) for raw embeddings ``[B, D]``; differentiable in ``e``."""
        y = self.whiten(e)
        return (-0.5 * y.pow(2).sum(-1) - self._tensors(e.device)[4]).to(e.dtype)
