"""Diagnostics drawn with PIL (no plotting dependency): per-step curves and a 2-D embedding map.

Both return ComfyUI IMAGE tensors ``[1, H, W, 3]`` in 0..1 so they can go straight to a
preview or save node.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from .norm import GaussianNorm

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
MARGIN = 40


def _to_image(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _scaler(values: np.ndarray, lo_px: float, hi_px: float):
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    span = hi - lo if hi > lo else 1.0
    return lambda v: lo_px + (float(v) - lo) / span * (hi_px - lo_px), lo, hi


def _panel(draw: ImageDraw.ImageDraw, box, title: str, series: dict[str, tuple[list, list]], marks=()) -> None:
    """One line chart in ``box``; each series is (x, y); ``marks`` are (x, colour) vertical ticks."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(160, 160, 160))
    draw.text((x0 + 4, y0 - 14), title, fill=(0, 0, 0))
    xs = np.array([x for sx, _ in series.values() for x in sx] or [0, 1], dtype=float)
    ys = np.array([y for _, sy in series.values() for y in sy if math.isfinite(y)] or [0, 1], dtype=float)
    fx, _, _ = _scaler(xs, x0 + 4, x1 - 4)
    fy, lo, hi = _scaler(ys, y1 - 4, y0 + 4)
    draw.text((x1 - 90, y1 + 2), f"step {int(xs.min())}-{int(xs.max())}", fill=(90, 90, 90))
    draw.text((x0 - 36, y0), f"{hi:.3g}", fill=(90, 90, 90))
    draw.text((x0 - 36, y1 - 10), f"{lo:.3g}", fill=(90, 90, 90))
    for x, colour in marks:
        draw.line([(fx(x), y0), (fx(x), y1)], fill=colour, width=1)
    for i, (name, (sx, sy)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [(fx(x), fy(y)) for x, y in zip(sx, sy) if math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        draw.text((x0 + 6 + 110 * i, y0 + 4), name, fill=colour)


def plot_log(log: list[dict], width: int = 768, height: int = 512) -> torch.Tensor:
    """Loss terms (top) and log-likelihood under the norm (bottom) per step; gate checks marked."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in log]
    skip = {"step", "seconds", "log_likelihood", "mahalanobis", "anchor_cos", "gate_p_yes", "gate_passed",
            "gate_question", "gate_image"}
    names = [k for k in (log[0] if log else {}) if k not in skip and isinstance(log[0][k], (int, float))]
    marks = [(r["step"], (44, 160, 44) if r["gate_passed"] else (214, 39, 40)) for r in log if "gate_passed" in r]
    half = height // 2
    _panel(draw, (MARGIN, 24, width - 10, half - 16), "loss terms",
           {n: (steps, [float(r.get(n, float("nan"))) for r in log]) for n in names}, marks)
    _panel(draw, (MARGIN, half + 24, width - 10, height - 20), "log-likelihood under the norm (gate: green yes, red no)",
           {"log p": (steps, [float(r["log_likelihood"]) for r in log])} if log else {}, marks)
    return _to_image(img)


def _ellipse(gaussian: GaussianNorm, sigmas: float, n: int = 64) -> np.ndarray:
    """Points of the ``sigmas`` contour of a Gaussian on PCA axes 1-2."""
    vals, vecs = np.linalg.eigh(gaussian.covariance[:2, :2].numpy())
    t = np.linspace(0, 2 * np.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)], 1) * np.sqrt(np.maximum(vals, 0)) * sigmas
    return circle @ vecs.T + gaussian.center[:2].numpy()


def plot_embedding_map(norm: GaussianNorm, bank: torch.Tensor | None = None, path: list[torch.Tensor] = (),
                       clusters: list[tuple[str, GaussianNorm]] = (), size: int = 512) -> torch.Tensor:
    """PCA axes 1-2 of the norm: its 1σ/2σ contours and bank cloud, the optimisation path, negative clusters."""
    grey, reds, blue = (150, 150, 150), [(214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)], (31, 119, 180)
    cloud = norm.project(bank.double())[:, :2].numpy() if bank is not None and len(bank) else np.zeros((0, 2))
    track = norm.project(torch.stack(list(path)).double())[:, :2].numpy() if len(path) else np.zeros((0, 2))
    contours = [(grey, _ellipse(norm, k)) for k in (1, 2)]
    contours += [(reds[i % len(reds)], _ellipse(g, 2)) for i, (_, g) in enumerate(clusters)]
    every = np.concatenate([cloud, track] + [c for _, c in contours])
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    fx, _, _ = _scaler(every[:, 0], MARGIN, size - 10)
    fy, _, _ = _scaler(every[:, 1], size - MARGIN, 24)
    draw.rectangle((MARGIN, 24, size - 10, size - MARGIN), outline=(160, 160, 160))
    draw.text((MARGIN, 6), "embedding map: PCA axes 1-2 of the norm (grey: typical 1σ/2σ)", fill=(0, 0, 0))
    for x, y in cloud:
        draw.ellipse([fx(x) - 1.5, fy(y) - 1.5, fx(x) + 1.5, fy(y) + 1.5], fill=(190, 190, 190))
    for colour, pts in contours:
        draw.line([(fx(x), fy(y)) for x, y in pts], fill=colour, width=1)
    for i, (label, g) in enumerate(clusters):
        cx, cy = g.center[:2].tolist()
        draw.text((fx(cx) + 4, fy(cy) - 6), label, fill=reds[i % len(reds)])
    if len(track):
        pts = [(fx(x), fy(y)) for x, y in track]
        if len(pts) > 1:
            draw.line(pts, fill=blue, width=2)
        (sx, sy), (ex, ey) = pts[0], pts[-1]
        draw.ellipse([sx - 4, sy - 4, sx + 4, sy + 4], outline=blue, width=2)
        draw.ellipse([ex - 4, ey - 4, ex + 4, ey + 4], fill=blue)
        draw.text((MARGIN + 4, size - MARGIN + 4), "optimisation path (o start, * end)", fill=blue)
    return _to_image(img)
