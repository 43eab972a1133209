"""Stage 5 of the mini world: the independent CNN classifier (:mod:`.judge`), from ground-truth labels
only; it measures validity in evaluations and is never used by the optimiser."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import world as W
from .train_decoder import render_embeds
from .train_setup import Config, Split, log, make_split, seed_all, update

if TYPE_CHECKING:
    from .judge import LabelClassifier, LabelNet


def train_judge(cfg: Config, split: Split) -> LabelNet:
    from .judge import LabelNet, prepare

    rng = seed_all(cfg.seed + 6)
    keys = W.LABEL_KEYS
    net = LabelNet({k: len(W.VOCAB[k]) for k in keys}, width=cfg.judge_width)
    x_all = prepare(split.images(), cfg.res)
    y_all = {k: torch.from_numpy(split.labels[k]) for k in keys}
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    t0 = time.time()
    for step in range(cfg.judge_steps):
        idx = torch.from_numpy(rng.choice(len(split.scenes), cfg.judge_batch, replace=False))
        x = x_all[idx]
        # Robustness to decoded images: random blur and noise (colours untouched: colour is a label).
        sigma = torch.from_numpy(rng.uniform(0, 1.2, len(idx)).astype(np.float32))
        blurred = _gaussian_blur(x, sigma)
        x = blurred + torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)) * 0.1 * float(rng.random())
        out = net(x)
        loss = sum(F.cross_entropy(out[k], y_all[k][idx]) for k in keys)
        update(opt, loss, 2e-3, step, cfg.judge_steps)
        if step % 150 == 0 or step == cfg.judge_steps - 1:
            log(f"judge step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return net.eval().requires_grad_(False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (sigma 0 = identity), 5-tap."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, 5]
    b, c, h, w = x.shape
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    out = sum(k[:, i, None, None, None] * xp[:, :, :, i:i + w] for i in range(5))[:, :, 2:2 + h]
    out = F.pad(out, (0, 0, 2, 2), mode="replicate")
    return sum(k[:, i, None, None, None] * out[:, :, i:i + h] for i in range(5))


def reading(judge: LabelClassifier, images: torch.Tensor, scenes: list[W.Scene]) -> dict[str, float]:
    """How well ``judge`` reads ``images`` of ``scenes``: the share whose kind, colour and background it reads
    right, and the share it calls a rare combination (all of them, when the scenes are :func:`world.rare_scenes`)."""
    labels = judge.predict(images)
    out = {key: float(np.mean([label[key] == getattr(s, key) for label, s in zip(labels, scenes)]))
           for key in ("kind", "colour", "background")}
    return out | {"called_rare": float(np.mean([W.is_rare(label) for label in labels])), "n": len(scenes)}


def _rendered(prior, decoder, images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """``decoder``'s renders of the mini CLIP's image embeddings of ``images`` (as the evaluation renders)."""
    with torch.no_grad():
        return torch.cat([render_embeds(prior, decoder, prior.encode_images(images[i:i + 250]), cfg)
                          for i in range(0, len(images), 250)])


def clip_reading(prior, images: torch.Tensor, scenes: list[W.Scene]) -> dict[str, float]:
    """How the mini CLIP's image embeddings of ``images`` read ``scenes`` zero-shot: the nearest text embedding
    among "a photo of a {kind}" for every kind, and given the true kind among every colour and every background
    (the captions the CLIP was trained on). What it cannot read, no prior sample or decoder render of that
    embedding can hold."""
    with torch.no_grad():
        img = F.normalize(prior.encode_images(images).float(), dim=-1)
        text = lambda captions: F.normalize(prior.encode_prompt(captions).text_embeds.float(), dim=-1)
        kinds = text([W.caption_for({"kind": k}, 1) for k in W.KINDS])
        given = {(k, key): text([W.caption_for({"kind": k, key: v}, t) for v in W.VOCAB[key]])
                 for k in {s.kind for s in scenes} for key, t in (("colour", 2), ("background", 4))}
    hits = {"kind": [W.KINDS[int((e @ kinds.T).argmax())] == s.kind for e, s in zip(img, scenes)]}
    for key in ("colour", "background"):
        hits[key] = [W.VOCAB[key][int((e @ given[s.kind, key].T).argmax())] == getattr(s, key)
                     for e, s in zip(img, scenes)]
    return {key: float(np.mean(h)) for key, h in hits.items()} | {"n": len(scenes)}


def measure_readings(cfg: Config, out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """How every judge in ``out`` (``judge``, ``judge_balanced``) reads the world's test scenes and its rare
    combinations, drawn and as every decoder there (``decoder``, ``decoder_balanced``) renders their CLIP image
    embeddings, and how the mini CLIP's own embeddings read them (:func:`clip_reading`); written to
    ``out/readings.json``. A rare combination drawn perfectly but misread says the judge leans on the world's
    correlations; one read when drawn but not when rendered, the decoder or the CLIP embedding it draws from."""
    from ...engine.prior import load_prior
    from ...engine.render import load_decoder
    from .judge import load_judge

    prior = load_prior(str(out / "prior"))
    sets = {"world test scenes": W.sample_scenes(cfg.eval_render * 4, cfg.seed + 200),
            "rare combinations": W.rare_scenes(16, cfg.seed + 600)}
    drawn = {what: W.to_image_tensor(W.draw_many(scenes)) for what, scenes in sets.items()}
    images = {(what, "drawn"): x for what, x in drawn.items()}
    for name in ("decoder", "decoder_balanced"):
        if (out / name).is_dir():
            decoder = load_decoder(str(out / name))
            images |= {(what, f"rendered by {name}"): _rendered(prior, decoder, x, cfg) for what, x in drawn.items()}
    judges = {name: load_judge(out / name) for name in ("judge", "judge_balanced") if (out / name).is_dir()}
    readings = {name: {f"{what}, {how}": reading(judge, x, sets[what]) for (what, how), x in images.items()}
                for name, judge in judges.items()}
    readings["mini CLIP zero-shot"] = {f"{what}, drawn": clip_reading(prior, x, sets[what]) for what, x in drawn.items()}
    (out / "readings.json").write_text(json.dumps(readings, indent=2) + "\n")
    for name, by in readings.items():
        for what, r in by.items():
            log(f"{name}, {what}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "n"))
    return readings


def train_balanced_judge(cfg: Config, folder: Path) -> None:
    """The judge trained on scenes whose colour and background are independent of the kind
    (:func:`world.sample_scenes` ``uniform``), saved in ``folder``. The world's judge learnt the world's
    correlations (a bus is yellow and on a road), so it misreads a purple bus's or a fish in the sky's kind; this
    one cannot lean on them (:func:`measure_readings`)."""
    net = train_judge(cfg, make_split(cfg.n_judge, cfg.seed + 500, cfg.res, uniform=True))
    save_trained_judge(cfg, net, folder, f"world scenes seed {cfg.seed + 500}, n={cfg.n_judge}, colour and background "
                                         "uniform and independent of the kind", "evaluation only")


def save_trained_judge(cfg: Config, net: LabelNet, folder: Path, trained_on: str, use: str) -> Path:
    """``net`` saved as a judge folder over the world's whole vocabulary, saying what it was trained on."""
    from .judge import save_judge

    return save_judge(net, {k: list(W.VOCAB[k]) for k in W.LABEL_KEYS}, folder, width=cfg.judge_width,
                      input_size=cfg.res, extra={"trained_on": trained_on, "use": use})
