"""Can the mini world draw its rare combinations at all? (issue 20, the ``named`` study)

No method of the variants study shows the world's rare combinations in more than a few per cent of its renders.
This study asks for them by name, the most a method could hope for: for every kind of the subject and every
colour or setting that is rare (or unseen) for that kind, it samples the prior with the combination in the
prompt ("a photo of a purple car", "a photo of a boat on a road"), renders every sample and judges it. Per prompt:

- ``embedding_reads``: the share of the prior's embeddings whose zero-shot reading (nearest of the prior's text
  embeddings of "a photo of a {colour} {kind}" for every colour, or of the kind in every setting) is the named
  value: whether the prior puts the combination into the embedding;
- ``render_reads``: the share of renders the independent judge reads the named value on, and ``kind_kept`` the
  share it reads the named kind on: whether the decoder draws what the embedding holds;
- ``rare``, ``validity`` (the judge calls it the subject) and ``creativity_rare`` (both), as in the variants study.

A ``{subject}: every named`` row per seed averages the subject's prompts. A low ``render_reads`` under a high
``embedding_reads`` means the decoder, not the prior or a creative method, is what keeps the combinations out.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ...engine.gate import draw
from ...engine.sampling import sample_embeddings
from . import world
from .judge import shows

NAMED_SEED = 60_000  # the prompts' samples of seed s are drawn with NAMED_SEED + s: no other study's
VALUES = ("embedding_reads", "render_reads", "kind_kept", "rare", "validity", "creativity_rare")


def named_combinations(subject: str) -> list[tuple[str, str, str]]:
    """(kind, "colour" or "background", value) for every rare (or unseen) value of every kind of ``subject`` (a
    category, or a kind itself)."""
    kinds = world.kinds_of(subject)
    if not kinds:
        raise ValueError(f"{subject!r} is no kind or category of the mini world: {', '.join(world.VOCAB['kind'])}; "
                         f"{', '.join(world.CATEGORIES)}")
    return [combination[:3] for combination in world.rare_combinations(kinds, unseen=True)]


def _phrase(kind: str, axis: str, value: str) -> str:
    if axis == "colour":
        return f"a photo of a {value} {kind}"
    return f"a photo of a {kind} {world.BACKGROUND_PHRASE[value]}"


def _zero_shot(prior, embeds: torch.Tensor, kind: str, axis: str) -> list[str]:
    """The axis value whose prompt's text embedding is nearest (cosine) to each embedding."""
    values = world.VOCAB[axis]
    with torch.no_grad():
        text = prior.with_concept(None).encode_prompt([_phrase(kind, axis, v) for v in values]).text_embeds
    nearest = (F.normalize(embeds.float(), dim=-1) @ F.normalize(text.float().cpu(), dim=-1).T).argmax(-1)
    return [values[i] for i in nearest.tolist()]


def named_rows(prior, subj, seeds: list[int], samples: int) -> list[dict]:
    """The study's rows for one subject: one per named combination and seed, and the subject's mean per seed."""
    judge, renderer = subj.evaluator.judge, subj.evaluator.renderer
    rows = []
    for seed in seeds:
        mine = []
        for kind, axis, value in named_combinations(subj.name):
            start = time.perf_counter()
            prompt = _phrase(kind, axis, value)
            embeds = sample_embeddings(prior, prompt, samples, batch_size=samples, seed=NAMED_SEED + seed)
            images = draw(renderer, embeds)
            labels = judge.judge.predict(images)
            valid = np.array([shows(label, subj.name) for label in labels])
            rare = np.array([world.is_rare(label) for label in labels])
            mine.append({"config": prompt, "subject": subj.name, "seed": seed, "step": None,
                         "embedding_reads": float(np.mean([v == value for v in _zero_shot(prior, embeds, kind, axis)])),
                         "render_reads": float(np.mean([label[axis] == value for label in labels])),
                         "kind_kept": float(np.mean([label["kind"] == kind for label in labels])),
                         "rare": float(rare.mean()), "validity": float(valid.mean()),
                         "creativity_rare": float((valid & rare).mean()),
                         "seconds": round(time.perf_counter() - start, 2)})
        rows += mine + [{"config": f"{subj.name}: every named", "subject": subj.name, "seed": seed, "step": None,
                         **{k: float(np.mean([r[k] for r in mine])) for k in (*VALUES, "seconds")}}]
    return rows
