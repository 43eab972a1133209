"""Diagnostics drawn with PIL (no plotting dependency): per-step curves and a 2-D embedding map.

Both return ComfyUI IMAGE tensors ``[1, H, W, 3]`` in 0..1 so they can go straight to a
preview or save node.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from .norm import GaussianNorm
from .steplog import StepRecord

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
MARGIN = 40


def _to_image(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _scaler(values: np.ndarray, lo_px: float, hi_px: float) -> tuple[Callable[[float], float], float, float]:
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    span = hi - lo if hi > lo else 1.0
    return lambda v: lo_px + (float(v) - lo) / span * (hi_px - lo_px), lo, hi


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each point (fewer at the start): the trend under per-step noise."""
    sums = np.cumsum(np.concatenate([np.zeros((1, *values.shape[1:])), values]), axis=0)
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo).reshape(-1, *[1] * (values.ndim - 1))


def _smoothing_window(n: int) -> int:
    """Each optimiser step draws fresh noise, so single steps scatter; a tenth of the run shows the trend."""
    return max(1, n // 10)


def _lighter(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * 0.65) for c in colour)


def _panel(draw: ImageDraw.ImageDraw, box, title: str, series: dict[str, tuple[list, list]], marks=(),
           smooth: int = 1) -> None:
    """One line chart in ``box``; each series is (x, y); ``marks`` are (x, colour) vertical ticks.

    ``smooth`` > 1 draws the raw values light and their trailing mean over ``smooth`` points on top."""
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
        finite = [(x, y) for x, y in zip(sx, sy) if math.isfinite(y)]
        pts = [(fx(x), fy(y)) for x, y in finite]
        if len(pts) > 1 and smooth > 1:
            draw.line(pts, fill=_lighter(colour), width=1)
            trend = _trailing_mean(np.array([y for _, y in finite], dtype=float), smooth)
            draw.line([(fx(x), fy(y)) for (x, _), y in zip(finite, trend)], fill=colour, width=2)
        elif len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)


def plot_log(log: list[StepRecord], width: int = 768, panel_height: int = 150) -> torch.Tensor:
    """One panel per curve (total loss, each loss term, log-likelihood, P(yes)), each on its own scale.

    Terms differ by orders of magnitude (log-density ~1e3-1e6, anchor ~1), so sharing an axis
    would flatten all but one. Gate checks are vertical ticks: green passed, red rejected. Per-step
    values are drawn light with their trailing mean (a tenth of the run) on top.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    if log:
        curves["loss"] = [(r.step, r.loss) for r in log]
        for name in log[0].terms:  # a term named like a metric keeps its own panel
            title = f"{name} (term)" if name in ("loss", "log_likelihood", "gate_p_yes") else name
            curves[title] = [(r.step, r.terms[name]) for r in log if name in r.terms]
        curves["log_likelihood"] = [(r.step, r.metrics["log_likelihood"]) for r in log]
    checks = [r for r in log if r.gate is not None]
    if checks:
        curves["gate_p_yes"] = [(r.step, r.gate.p_yes) for r in checks]
    marks = [(r.step, (44, 160, 44) if r.gate.passed else (214, 39, 40)) for r in checks]
    cols = 2
    rows = max(1, math.ceil(len(curves) / cols))
    img = Image.new("RGB", (width, rows * panel_height), "white")
    draw = ImageDraw.Draw(img)
    pw = width // cols
    for i, (name, series) in enumerate(curves.items()):
        x0, y0 = (i % cols) * pw + MARGIN, (i // cols) * panel_height + 20
        window = 1 if name == "gate_p_yes" else _smoothing_window(len(series))
        title = name if window == 1 else f"{name} (dark: mean of {window} steps)"
        _panel(draw, (x0, y0, x0 + pw - MARGIN - 10, y0 + panel_height - 40), title,
               {name: ([x for x, _ in series], [y for _, y in series])}, marks, window)
    if not curves:
        draw.text((10, 10), "no steps were run", fill=(0, 0, 0))
    return _to_image(img)


def _ellipse(gaussian: GaussianNorm, sigmas: float, n: int = 64) -> np.ndarray:
    """Points of the ``sigmas`` contour of a Gaussian on PCA axes 1-2."""
    vals, vecs = np.linalg.eigh(gaussian.covariance[:2, :2].numpy())
    t = np.linspace(0, 2 * np.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)], 1) * np.sqrt(np.maximum(vals, 0)) * sigmas
    return circle @ vecs.T + gaussian.center[:2].numpy()


def plot_embedding_map(norm: GaussianNorm, bank: torch.Tensor | None = None, path: list[torch.Tensor] = (),
                       clusters: list[tuple[str, GaussianNorm]] = (), size: int = 512) -> torch.Tensor:
    """PCA axes 1-2 of the norm: its 1 and 2 sigma contours and bank cloud, the optimisation path, negative clusters."""
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
    draw.text((MARGIN, 6), "embedding map: PCA axes 1-2 of the norm (grey: typical 1 and 2 sigma)", fill=(0, 0, 0))
    for x, y in cloud:
        draw.ellipse([fx(x) - 1.5, fy(y) - 1.5, fx(x) + 1.5, fy(y) + 1.5], fill=(190, 190, 190))
    for colour, pts in contours:
        draw.line([(fx(x), fy(y)) for x, y in pts], fill=colour, width=1)
    for i, (label, g) in enumerate(clusters):
        cx, cy = g.center[:2].tolist()
        draw.text((fx(cx) + 4, fy(cy) - 6), label, fill=reds[i % len(reds)])
    if len(track):
        pts = [(fx(x), fy(y)) for x, y in track]
        trend = [(fx(x), fy(y)) for x, y in _trailing_mean(track, _smoothing_window(len(track)))]
        if len(pts) > 1:
            draw.line(pts, fill=_lighter(blue), width=1)
            draw.line(trend, fill=blue, width=2)
        (sx, sy), (ex, ey) = trend[0], trend[-1]
        draw.ellipse([sx - 4, sy - 4, sx + 4, sy + 4], outline=blue, width=2)
        draw.ellipse([ex - 4, ey - 4, ex + 4, ey + 4], fill=blue)
        draw.text((MARGIN + 4, size - MARGIN + 4), "optimisation path: light per step, dark its trailing mean "
                  "(o start, * end)", fill=blue)
    return _to_image(img)


def plot_sweep(rows: list[dict], width: int = 768, height: int = 300) -> torch.Tensor:
    """Novelty percentile and validity against optimisation step, one line per configuration."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    half = width // 2
    for i, (metric, title) in enumerate((("novelty_percentile", "novelty: % of typical bank more likely"),
                                         ("validity", "validity: judge's 'is the subject' rate"))):
        series = {}
        for c in configs:
            pts = sorted((r["step"], r[metric]) for r in rows if r["config"] == c and r.get(metric) is not None)
            series[c] = ([x for x, _ in pts], [y for _, y in pts])
        x0 = i * half + MARGIN
        _panel(draw, (x0, 24, x0 + half - MARGIN - 10, height - 40), title, series)
    for j, c in enumerate(configs):
        draw.text((MARGIN + 110 * j, height - 16), c, fill=PALETTE[j % len(PALETTE)])
    return _to_image(img)


def annotate(images: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """Copies of ``images`` ``[B,H,W,3]`` with a caption strip (e.g. the gate's step and P(yes))."""
    out = []
    for image, label in zip(images, labels):
        pil = Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
        strip = Image.new("RGB", (pil.width, 14), "black")
        ImageDraw.Draw(strip).text((2, 1), label, fill=(255, 255, 255))
        canvas = Image.new("RGB", (pil.width, pil.height + 14))
        canvas.paste(pil, (0, 0))
        canvas.paste(strip, (0, pil.height))
        out.append(_to_image(canvas)[0])
    return torch.stack(out)
