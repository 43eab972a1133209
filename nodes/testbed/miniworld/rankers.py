"""Can a density in CLIP space tell the world's rare combinations? (issue 20, the ``rankers`` study)

Every method of the variants study ranks (or pushes) by the norm's Gaussian, and none shows the world's rare
combinations (a purple bus, a fish in the sky) in more than a few per cent of its renders. This study asks
whether another density would: for one subject and seed it draws a fresh pool of the subject's typical
samples, renders and judges every one once, and ranks the pool by densities fitted on the norm's own bank,
all in the norm's PCA space:

- the norm's Gaussian (what rare select uses), and Gaussians on its first 2, 4, 8 and 16 components;
- Gaussian mixtures of 4, 8 and 16 components (scikit-learn, full covariances), which can give a small
  cluster of rare combinations a density of its own;
- the distance to the k-th nearest bank sample (k = 5, 20), the density estimate that assumes no shape;
- one Gaussian per *kind* of the subject's category (car, truck, bus, boat, airplane for "vehicle"), each fitted
  on a bank of the paper's prompt with the kind's word: a purple bus or a boat on grass is rare only given its
  kind, which a density of the whole category can miss. Scored as their equal mixture and as the likeliest kind.

Each ranker's row is its ``samples`` lowest-density pool members: the share the judge reads as a rare
combination, validity, and the share both; ``rare_percentile`` is where the pool's valid rare combinations sit
in its ranking (0 = rarest first, 0.5 = the ranker does not see them at all). Two bounds sit beside them: the
pool itself (``pool``: what a random pick gets) and ``best possible`` (the pool's valid rare combinations ranked
first: no ranker can beat it, and it is small when the prior seldom samples them at all); ``best possible, drawn
again`` renders those same picks with the next render seed, so the share still rare says how much of a rare
render belongs to the embedding, which any ranker or method acts on, and how much to the render's noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors

from ...engine.bank import PAPER_TEMPLATE, sample_bank
from ...engine.gate import draw
from ...engine.norm import GaussianNorm
from . import world

POOL_SEED = 40_000  # the pool of seed s is drawn with POOL_SEED + s: no other study's bank
POOL = 2000
KIND_SEED = 50_000  # the kind banks' seed: no other study's bank
KIND_RANKERS = ("kind Gaussians, mixture", "kind Gaussians, likeliest kind")
AGAIN = "best possible, drawn again (render seed + 1)"
RENDER_BATCH = 250

Ranker = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (bank z, pool z) -> pool scores, low = rare


def _gaussian(dims: int) -> Ranker:
    def score(bank: np.ndarray, pool: np.ndarray) -> np.ndarray:
        norm = GaussianNorm.from_bank(torch.from_numpy(bank[:, :dims]), dims)
        return norm.log_prob(torch.from_numpy(pool[:, :dims])).numpy()
    return score


def _mixture(components: int) -> Ranker:
    def score(bank: np.ndarray, pool: np.ndarray) -> np.ndarray:
        gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, random_state=0).fit(bank)
        return gmm.score_samples(pool)
    return score


def _neighbours(k: int) -> Ranker:
    def score(bank: np.ndarray, pool: np.ndarray) -> np.ndarray:
        distance, _ = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(pool)
        return -distance[:, -1]
    return score


def rankers(dims: int) -> dict[str, Ranker]:
    """Every ranker of the study, by label, for a norm of ``dims`` components."""
    out = {f"Gaussian, {dims} components (the norm)": _gaussian(dims)}
    out |= {f"Gaussian, first {d} components": _gaussian(d) for d in (2, 4, 8, 16) if d < dims}
    out |= {f"Gaussian mixture, {k}": _mixture(k) for k in (4, 8, 16)}
    out |= {f"{k}th nearest bank sample": _neighbours(k) for k in (5, 20)}
    return out


def _judged(subj, embeds: torch.Tensor, render_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each embedding rendered once (the evaluator's renderer, its seed moved by ``render_seed``) and judged:
    (valid, rare)."""
    judge, renderer = subj.evaluator.judge, subj.evaluator.renderer
    renderer = replace(renderer, settings=replace(renderer.settings, seed=renderer.settings.seed + render_seed))
    valid, rare = [], []
    for i in range(0, len(embeds), RENDER_BATCH):
        images = draw(renderer, embeds[i:i + RENDER_BATCH])
        valid.append(judge.is_subject(images, subj.name).bool().numpy())
        rare.append(judge.is_rare(images, subj.name).bool().numpy())
    return np.concatenate(valid), np.concatenate(rare)


def _judged_pool(prior, subj, seed: int, size: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A fresh pool of the subject's typical samples, each rendered once and judged: (embeddings, valid, rare)."""
    pool = sample_bank(prior, subj.prompt, size, batch_size=500, seed=POOL_SEED + seed).embeds
    return pool, *_judged(subj, pool)


def _row(label: str, subj, seed: int, valid: np.ndarray, rare: np.ndarray, seconds: float,
         rare_percentile: float | None = None) -> dict:
    return {"config": label, "subject": subj.name, "seed": seed, "step": None, "rare": float(rare.mean()),
            "validity": float(valid.mean()), "creativity_rare": float((valid & rare).mean()),
            "rare_percentile": rare_percentile, "seconds": round(seconds, 2)}


def _mean_percentile(score: np.ndarray, members: np.ndarray) -> float | None:
    """Where ``members`` sit, on average, in the pool ranked rarest first (0 = rarest, 1 = most typical;
    0.5 = the ranker does not see them); None when the pool holds none."""
    if not members.any():
        return None
    ranks = np.argsort(np.argsort(score, kind="stable"), kind="stable") / (len(score) - 1)
    return float(ranks[members].mean())


def _kind_norms(prior, subj, norm: GaussianNorm, size: int) -> list[GaussianNorm]:
    """One Gaussian per kind of the subject's category (a bank of the paper's prompt with the kind's word), in
    the subject norm's PCA space: the densities a user gets by naming the subject's sub-concepts."""
    out = []
    for kind in world.kinds_of(subj.name):
        bank = sample_bank(prior, PAPER_TEMPLATE.format(subject=kind), size, batch_size=500, seed=KIND_SEED).embeds
        z = norm.project(bank.double())
        out.append(GaussianNorm.from_bank(z, z.shape[1]))
    return out


def _kind_rankers(kind_norms: list[GaussianNorm]) -> dict[str, Ranker]:
    def scores(pool: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(pool)
        return np.stack([n.log_prob(z).numpy() for n in kind_norms])
    mixture, likeliest = KIND_RANKERS
    return {mixture: lambda bank, pool: logsumexp(scores(pool), axis=0),
            likeliest: lambda bank, pool: scores(pool).max(axis=0)}


def ranker_rows(prior, subj, seeds: list[int], samples: int, pool_size: int = POOL) -> list[dict]:
    """The study's rows for one subject and each seed."""
    norm = subj.evaluator.norm
    bank = norm.project(subj.evaluator.bank.embeds.double()).numpy()
    kinds = _kind_rankers(_kind_norms(prior, subj, norm, len(bank)))
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        embeds, valid, rare = _judged_pool(prior, subj, seed, pool_size)
        rows.append(_row(f"pool ({pool_size})", subj, seed, valid, rare, time.perf_counter() - start))
        best = np.argsort(~(valid & rare), kind="stable")[:samples]
        rows.append(_row("best possible", subj, seed, valid[best], rare[best], 0.0))
        # the same picks drawn again with another render seed: how much of "rare" is the embedding's, not the draw's
        rows.append(_row(AGAIN, subj, seed, *_judged(subj, embeds[best], render_seed=1), 0.0))
        pool = norm.project(embeds.double()).numpy()
        for label, score in (rankers(norm.dims) | kinds).items():
            start = time.perf_counter()
            scores = score(bank, pool)
            rarest = np.argsort(scores, kind="stable")[:samples]
            rows.append(_row(label, subj, seed, valid[rarest], rare[rarest], time.perf_counter() - start,
                             _mean_percentile(scores, valid & rare)))
    return rows
