"""The mini world: seeded procedural scenes drawn with PIL, their captions and ground-truth labels.

A scene is one object (a *kind*) of a *colour* and a *size*, at a position, facing left or
right, on a *background*. Vehicles are car, truck, bus, boat and airplane; the others are tree,
flower (plants), house (a building) and fish (an animal), so the category words "vehicle",
"plant", "building" and "animal" mean something to models trained here.

The factors are not independent: each kind has its own colour and background distribution
(:data:`COLOUR_PRIOR`, :data:`BACKGROUND_PRIOR`), as in photographs, where most buses are yellow
and most boats are on water. Some combinations are deliberately **rare** (probability <=
:data:`RARE_THRESHOLD` given the kind): purple vehicles, boats on grass or on a road, cars on
water, fish in the sky, ... They are what a creative search should find: valid members of the
kind that the prior's typical samples seldom show. :func:`probability` and :func:`is_rare` say
how typical any labelled scene is, so an evaluation can score rarity without any model.

Everything is deterministic: the same ``seed`` gives the same scenes, captions and pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import torch

SIZE = 64  # native image size in pixels; drawn at SUPERSAMPLE x this and downsampled (antialiasing)
SUPERSAMPLE = 2

VEHICLES = ("car", "truck", "bus", "boat", "airplane")
OTHERS = ("tree", "flower", "house", "fish")
KINDS = VEHICLES + OTHERS
CATEGORY = {**{k: "vehicle" for k in VEHICLES}, "tree": "plant", "flower": "plant", "house": "building",
            "fish": "animal"}
CATEGORIES = ("vehicle", "plant", "building", "animal")

COLOURS = {  # RGB of the object's main surface (jittered per scene)
    "red": (214, 38, 38), "orange": (244, 132, 24), "yellow": (242, 210, 36), "green": (34, 140, 52),
    "blue": (36, 72, 214), "purple": (138, 44, 178), "white": (240, 240, 240), "black": (32, 32, 36)}
BACKGROUNDS = ("road", "grass", "water", "sky", "sand")
BACKGROUND_PHRASE = {"road": "on a road", "grass": "on grass", "water": "on water", "sky": "in the sky",
                     "sand": "on sand"}
SIZES = {"small": 0.54, "medium": 0.7, "large": 0.86}  # object box side as a fraction of the canvas

# P(colour | kind). Purple is common for flowers (so models know the colour) and rare (1 %) for vehicles.
COLOUR_PRIOR: dict[str, dict[str, float]] = {
    "car": {"red": .25, "blue": .20, "white": .15, "black": .15, "yellow": .10, "green": .07, "orange": .07,
            "purple": .01},
    "truck": {"red": .22, "blue": .20, "white": .20, "black": .10, "yellow": .12, "green": .08, "orange": .07,
              "purple": .01},
    "bus": {"yellow": .36, "red": .22, "blue": .14, "white": .14, "green": .07, "orange": .06, "purple": .01},
    "boat": {"white": .34, "red": .20, "blue": .16, "yellow": .10, "orange": .10, "black": .09, "purple": .01},
    "airplane": {"white": .50, "blue": .14, "red": .14, "black": .09, "yellow": .06, "orange": .06, "purple": .01},
    "tree": {"green": .70, "orange": .12, "yellow": .10, "red": .08},
    "flower": {"red": .20, "yellow": .20, "purple": .20, "white": .15, "orange": .15, "blue": .10},
    "house": {"red": .25, "white": .25, "yellow": .20, "blue": .15, "orange": .10, "green": .05},
    "fish": {"orange": .30, "yellow": .20, "blue": .20, "red": .15, "green": .05, "purple": .05, "black": .05},
}
# P(background | kind).
BACKGROUND_PRIOR: dict[str, dict[str, float]] = {
    "car": {"road": .75, "grass": .15, "sand": .09, "water": .01},
    "truck": {"road": .75, "sand": .15, "grass": .09, "water": .01},
    "bus": {"road": .90, "grass": .09, "water": .01},
    "boat": {"water": .90, "sand": .07, "grass": .015, "road": .015},
    "airplane": {"sky": .85, "road": .10, "grass": .04, "water": .01},
    "tree": {"grass": .80, "sand": .10, "sky": .10},
    "flower": {"grass": .85, "sand": .10, "sky": .05},
    "house": {"grass": .70, "sand": .20, "road": .10},
    "fish": {"water": .97, "sand": .02, "sky": .01},
}
RARE_THRESHOLD = 0.02

# Caption templates: (text, label keys it states). {a_*} is the article before that word.
TEMPLATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Professional high-quality photo of {a_kind} {kind}. photorealistic, 4k, HQ.", ("kind",)),
    ("a photo of {a_kind} {kind}", ("kind",)),
    ("a photo of {a_colour} {colour} {kind}", ("kind", "colour")),
    ("{a_colour} {colour} {kind} {background}", ("kind", "colour", "background")),
    ("a photo of {a_kind} {kind} {background}", ("kind", "background")),
    ("a photo of {a_size} {size} {colour} {kind}", ("kind", "colour", "size")),
    ("a photo of {a_category} {category}", ("category",)),
    ("Professional high-quality photo of {a_category} {category}. photorealistic, 4k, HQ.", ("category",)),
    ("a photo of {a_colour} {colour} {category}", ("category", "colour")),
)
# How often each template is drawn (kind-level captions dominate, as in the paper's prompts).
TEMPLATE_WEIGHTS = (0.12, 0.16, 0.16, 0.12, 0.08, 0.08, 0.12, 0.06, 0.10)

LABEL_KEYS = ("kind", "colour", "background", "size")
VOCAB = {"kind": KINDS, "colour": tuple(COLOURS), "background": BACKGROUNDS, "size": tuple(SIZES),
         "category": CATEGORIES}


@dataclass(frozen=True)
class Scene:
    """One image's ground truth. ``x``/``y`` is the object's centre in 0..1, ``facing`` -1 or +1."""

    kind: str
    colour: str
    background: str
    size: str
    x: float
    y: float
    facing: int
    seed: int  # drives the small random details (colour jitter, background texture)

    @property
    def category(self) -> str:
        return CATEGORY[self.kind]

    @property
    def is_vehicle(self) -> bool:
        return self.category == "vehicle"

    def labels(self) -> dict[str, str]:
        return {"kind": self.kind, "colour": self.colour, "background": self.background, "size": self.size,
                "category": self.category}

    def to_dict(self) -> dict:
        return asdict(self)


def probability(kind: str, colour: str, background: str) -> float:
    """P(colour, background | kind) in the training distribution (colour and background independent given kind)."""
    return COLOUR_PRIOR[kind].get(colour, 0.0) * BACKGROUND_PRIOR[kind].get(background, 0.0)


def rarity(scene: Scene | dict) -> dict[str, float]:
    """P(colour | kind) and P(background | kind) of a labelled scene."""
    labels = scene.labels() if isinstance(scene, Scene) else scene
    kind = labels["kind"]
    return {"colour": COLOUR_PRIOR[kind].get(labels["colour"], 0.0),
            "background": BACKGROUND_PRIOR[kind].get(labels["background"], 0.0)}


def is_rare(scene: Scene | dict) -> bool:
    """True when the scene's colour or background is rare (or unseen) for its kind."""
    return min(rarity(scene).values()) <= RARE_THRESHOLD


def kinds_of(subject: str) -> list[str]:
    """The kinds a subject covers: a category's kinds, a kind itself, none for any other word."""
    return [kind for kind, category in CATEGORY.items() if subject in (kind, category)]


def rare_combinations(kinds: Iterable[str] = KINDS, *, unseen: bool = False) -> list[tuple[str, str, str, float]]:
    """Every (kind, factor, value, probability) with 0 < P(value | kind) <= RARE_THRESHOLD; with ``unseen`` also
    the values the world never draws for the kind (P = 0: a purple tree), which :func:`is_rare` calls rare too."""
    out = []
    for kind in kinds:
        for factor, prior in (("colour", COLOUR_PRIOR[kind]), ("background", BACKGROUND_PRIOR[kind])):
            values = VOCAB[factor] if unseen else prior
            out += [(kind, factor, v, prior.get(v, 0.0)) for v in values
                    if (unseen or prior[v] > 0) and prior.get(v, 0.0) <= RARE_THRESHOLD]
    return out


def _choice(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    p = np.array([table[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def sample_scenes(n: int, seed: int, kinds: Iterable[str] = KINDS, *, uniform: bool = False) -> list[Scene]:
    """``n`` scenes from the world's distribution (kinds uniform), deterministic in ``seed``.

    ``uniform``: colour and background drawn uniformly from the whole vocabulary, independent of the kind, so every
    combination (a purple bus, a fish in the sky) is as common as any other: what a judge must see to read each
    factor on its own instead of guessing the kind from its usual colour or background."""
    rng = np.random.default_rng(seed)
    kinds = tuple(kinds)
    flat = {key: dict.fromkeys(VOCAB[key], 1.0) for key in ("colour", "background")}
    scenes = []
    for _ in range(n):
        kind = kinds[int(rng.integers(len(kinds)))]
        colour = _choice(rng, flat["colour"] if uniform else COLOUR_PRIOR[kind])
        background = _choice(rng, flat["background"] if uniform else BACKGROUND_PRIOR[kind])
        size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
        slack = (1.0 - SIZES[size]) / 2
        x, y = (0.5 + float(rng.uniform(-slack, slack)) * 0.6 for _ in range(2))
        facing = int(rng.choice((-1, 1)))
        scenes.append(Scene(kind, colour, background, size, round(x, 4), round(y, 4), facing,
                            int(rng.integers(2 ** 31))))
    return scenes


def rare_scenes(per_value: int, seed: int, kinds: Iterable[str] = KINDS) -> list[Scene]:
    """``per_value`` scenes of each kind with each of its rare or unseen values (:func:`rare_combinations`) forced,
    the other factors drawn as the world draws them: ground truth for whether a judge reads a rare combination.
    Every value of a kind is forced on the same ``per_value`` scenes, so only the forced factor differs."""
    return [replace(s, **{factor: value}) for kind, factor, value, _ in rare_combinations(kinds, unseen=True)
            for s in sample_scenes(per_value, seed, (kind,))]


def make_scene(kind: str, colour: str, background: str, size: str = "medium", x: float = 0.5, y: float = 0.5,
               facing: int = 1, seed: int = 0) -> Scene:
    """A scene with chosen factors (any combination, including ones the distribution never draws)."""
    for key, value in (("kind", kind), ("colour", colour), ("background", background), ("size", size)):
        if value not in VOCAB[key]:
            raise ValueError(f"unknown {key} {value!r}; choose one of {', '.join(VOCAB[key])}")
    return Scene(kind, colour, background, size, x, y, facing, seed)


# ----------------------------------------------------------------------------------------- captions

def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator, template: int | None = None) -> tuple[str, dict[str, str]]:
    """A caption of ``scene`` from a random template, and the labels it states (what it is true of).

    Before a vowel the article is usually "an" but sometimes "a", as people (and prompt
    templates such as "a photo of a {subject}") write it.
    """
    if template is None:
        template = int(rng.choice(len(TEMPLATES), p=np.array(TEMPLATE_WEIGHTS) / sum(TEMPLATE_WEIGHTS)))
    text, keys = TEMPLATES[template]
    labels = scene.labels()
    words = {**labels, "background": BACKGROUND_PHRASE[scene.background]}
    for key in ("kind", "colour", "size", "category"):
        a = article(labels[key])
        words[f"a_{key}"] = "a" if a == "an" and rng.random() < 0.3 else a
    out = text.format(**words)
    return out[0].lower() + out[1:] if text.startswith("{") else out, {k: labels[k] for k in keys}


def caption_for(labels: dict[str, str], template: int = 1) -> str:
    """The caption of a template for given labels, with the standard article (no randomness)."""
    text, keys = TEMPLATES[template]
    missing = [k for k in keys if k not in labels]
    if missing:
        raise ValueError(f"template {template} needs {missing}")
    words = {**labels}
    if "background" in labels:
        words["background"] = BACKGROUND_PHRASE[labels["background"]]
    for key in ("kind", "colour", "size", "category"):
        if key in labels:
            words[f"a_{key}"] = article(labels[key])
    return text.format(**words)


def matches(labels: dict[str, str], stated: dict[str, str]) -> bool:
    """Whether a caption that states ``stated`` is true of an image with ``labels``."""
    return all(labels.get(k) == v for k, v in stated.items())


# ----------------------------------------------------------------------------------------- drawing

def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 14) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _shade(rgb: tuple[int, ...], f: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * f, 0, 255)) for c in rgb)


def _background(draw: ImageDraw.ImageDraw, kind: str, s: int, rng: np.random.Generator) -> None:
    if kind == "sky":
        for row in range(s):
            t = row / s
            draw.line([(0, row), (s, row)], fill=(int(120 + 80 * t), int(185 + 45 * t), int(240 + 10 * t)))
        if rng.random() < 0.7:  # a cloud
            cx, cy, r = rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.4) * s, s * 0.08
            for dx in (-1.2, 0, 1.2):
                draw.ellipse([cx + dx * r - r, cy - r, cx + dx * r + r, cy + r], fill=(250, 250, 252))
    elif kind == "grass":
        draw.rectangle([0, 0, s, s], fill=_jitter((112, 186, 76), rng, 8))
        for _ in range(40):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            draw.line([(x, y), (x + rng.uniform(-2, 2) * s / 64, y - 3 * s / 64)], fill=(84, 152, 58),
                      width=max(1, s // 64))
    elif kind == "water":
        draw.rectangle([0, 0, s, s], fill=_jitter((58, 118, 186), rng, 8))
        for _ in range(14):
            x, y, w = rng.uniform(-0.1, 1) * s, rng.uniform(0, 1) * s, rng.uniform(0.08, 0.2) * s
            draw.arc([x, y, x + w, y + w * 0.4], 200, 340, fill=(138, 186, 232), width=max(1, s // 64))
    elif kind == "road":
        draw.rectangle([0, 0, s, s], fill=_jitter((112, 112, 116), rng, 6))
        y = rng.uniform(0.55, 0.8) * s
        for x0 in np.arange(rng.uniform(0, 0.2) * s, s, 0.25 * s):
            draw.rectangle([x0, y, x0 + 0.12 * s, y + 0.025 * s], fill=(236, 236, 236))
    elif kind == "sand":
        draw.rectangle([0, 0, s, s], fill=_jitter((226, 200, 146), rng, 8))
        for _ in range(50):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            draw.point((x, y), fill=(196, 168, 116))
    else:
        raise ValueError(f"unknown background {kind!r}")


def _object(draw: ImageDraw.ImageDraw, scene: Scene, s: int, rng: np.random.Generator) -> None:
    colour = _jitter(COLOURS[scene.colour], rng)
    line = (20, 20, 24) if scene.colour != "black" else (90, 90, 96)
    side = SIZES[scene.size] * s
    cx, cy = scene.x * s, scene.y * s
    w = max(1, s // 48)

    def P(u: float, v: float) -> tuple[float, float]:  # unit box (-0.5..0.5, y down) -> pixels
        return cx + scene.facing * u * side, cy + v * side

    def box(u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (x0, y0), (x1, y1) = P(u0, v0), P(u1, v1)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def poly(points: list[tuple[float, float]], fill: tuple[int, ...]) -> None:
        draw.polygon([P(u, v) for u, v in points], fill=fill, outline=line, width=w)

    def wheel(u: float, v: float, r: float = 0.11) -> None:
        draw.ellipse(box(u - r, v - r, u + r, v + r), fill=(40, 40, 44), outline=(10, 10, 10), width=w)
        draw.ellipse(box(u - r / 2.5, v - r / 2.5, u + r / 2.5, v + r / 2.5), fill=(170, 170, 176))

    glass = (176, 220, 240)
    k = scene.kind
    if k == "car":
        poly([(-0.24, -0.02), (-0.14, -0.26), (0.18, -0.26), (0.3, -0.02)], colour)
        poly([(-0.12, -0.04), (-0.06, -0.21), (0.01, -0.21), (0.01, -0.04)], glass)
        poly([(0.05, -0.04), (0.05, -0.21), (0.15, -0.21), (0.24, -0.04)], glass)
        draw.rounded_rectangle(box(-0.5, -0.04, 0.5, 0.2), radius=side * 0.06, fill=colour, outline=line, width=w)
        wheel(-0.28, 0.2)
        wheel(0.28, 0.2)
    elif k == "truck":
        draw.rectangle(box(-0.5, -0.34, 0.16, 0.2), fill=colour, outline=line, width=w)
        poly([(0.18, -0.22), (0.38, -0.22), (0.5, -0.04), (0.5, 0.2), (0.18, 0.2)], colour)
        poly([(0.24, -0.17), (0.36, -0.17), (0.44, -0.05), (0.24, -0.05)], glass)
        for u in (-0.36, -0.14, 0.34):
            wheel(u, 0.22, 0.1)
    elif k == "bus":  # tall and long, a band of windows, a door: unlike the low car
        draw.rounded_rectangle(box(-0.5, -0.38, 0.5, 0.22), radius=side * 0.05, fill=colour, outline=line, width=w)
        draw.rectangle(box(-0.44, -0.3, 0.32, -0.1), fill=glass, outline=line, width=w)
        for u in (-0.25, -0.06, 0.13):
            draw.line([P(u, -0.3), P(u, -0.1)], fill=line, width=w)
        draw.rectangle(box(0.37, -0.3, 0.47, 0.16), fill=glass, outline=line, width=w)
        wheel(-0.3, 0.22, 0.1)
        wheel(0.28, 0.22, 0.1)
    elif k == "boat":
        draw.line([P(0.0, 0.06), P(0.0, -0.48)], fill=(90, 60, 30), width=2 * w)
        poly([(0.03, -0.45), (0.03, 0.0), (0.36, 0.0)], (246, 244, 236))
        poly([(-0.5, 0.04), (0.5, 0.04), (0.34, 0.3), (-0.34, 0.3)], colour)
    elif k == "airplane":
        poly([(-0.08, -0.02), (0.14, -0.02), (-0.16, -0.42), (-0.28, -0.42)], _shade(colour, 0.85))
        draw.ellipse(box(-0.5, -0.1, 0.5, 0.1), fill=colour, outline=line, width=w)
        poly([(-0.5, -0.02), (-0.36, -0.02), (-0.44, -0.3), (-0.52, -0.3)], colour)
        poly([(-0.08, 0.02), (0.14, 0.02), (-0.16, 0.42), (-0.28, 0.42)], colour)
        for u in (0.02, 0.12, 0.22, 0.32):
            draw.ellipse(box(u - 0.025, -0.05, u + 0.025, -0.0), fill=glass)
    elif k == "tree":
        draw.rectangle(box(-0.07, 0.05, 0.07, 0.5), fill=(110, 70, 36), outline=line, width=w)
        draw.ellipse(box(-0.36, -0.5, 0.36, 0.18), fill=colour, outline=line, width=w)
        draw.ellipse(box(-0.2, -0.38, 0.02, -0.18), fill=_shade(colour, 1.15))
    elif k == "flower":
        draw.line([P(0, -0.1), P(0, 0.5)], fill=(40, 120, 40), width=3 * w)
        poly([(0, 0.25), (0.2, 0.12), (0.26, 0.2)], (50, 140, 50))
        for a in np.linspace(0, 2 * np.pi, 6, endpoint=False):
            u, v = 0.19 * np.cos(a), -0.18 + 0.19 * np.sin(a)
            draw.ellipse(box(u - 0.13, v - 0.13, u + 0.13, v + 0.13), fill=colour, outline=line, width=w)
        centre = (120, 72, 30) if scene.colour in ("yellow", "orange") else (246, 206, 50)
        draw.ellipse(box(-0.09, -0.27, 0.09, -0.09), fill=centre, outline=line, width=w)
    elif k == "house":
        draw.rectangle(box(-0.34, -0.08, 0.34, 0.48), fill=colour, outline=line, width=w)
        poly([(-0.46, -0.06), (0.0, -0.48), (0.46, -0.06)], (120, 52, 40))
        draw.rectangle(box(0.06, 0.16, 0.2, 0.48), fill=(90, 56, 30), outline=line, width=w)
        draw.rectangle(box(-0.24, 0.04, -0.06, 0.2), fill=glass, outline=line, width=w)
    elif k == "fish":
        poly([(0.22, 0.0), (0.5, -0.22), (0.5, 0.22)], _shade(colour, 0.9))
        draw.ellipse(box(-0.44, -0.22, 0.32, 0.22), fill=colour, outline=line, width=w)
        poly([(-0.06, -0.18), (0.1, -0.34), (0.14, -0.16)], _shade(colour, 0.9))
        draw.ellipse(box(-0.32, -0.08, -0.2, 0.04), fill=(250, 250, 250), outline=line, width=w)
        draw.ellipse(box(-0.29, -0.05, -0.24, 0.0), fill=(10, 10, 10))
    else:
        raise ValueError(f"unknown kind {k!r}")


def draw(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as an ``[size, size, 3]`` uint8 RGB array (deterministic in the scene)."""
    rng = np.random.default_rng(scene.seed)
    s = size * SUPERSAMPLE
    image = Image.new("RGB", (s, s))
    canvas = ImageDraw.Draw(image)
    _background(canvas, scene.background, s, rng)
    _object(canvas, scene, s, rng)
    if SUPERSAMPLE > 1:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def draw_many(scenes: list[Scene], size: int = SIZE) -> np.ndarray:
    """``[N, size, size, 3]`` uint8."""
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = draw(scene, size)
    return out


def to_image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> ComfyUI IMAGE (torch float32 in 0..1)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels)).float() / 255.0


def label_indices(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per label key, the index of each scene's value in :data:`VOCAB` (int64 ``[N]``)."""
    return {key: np.array([VOCAB[key].index(s.labels()[key]) for s in scenes], dtype=np.int64)
            for key in (*LABEL_KEYS, "category")}


def contact_sheet(pixels: np.ndarray, columns: int = 8, scale: int = 1) -> Image.Image:
    """A grid of images, for looking at the world or at renders."""
    n, h, w, _ = pixels.shape
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i in range(n):
        sheet.paste(Image.fromarray(pixels[i]), ((i % columns) * w, (i // columns) * h))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST) if scale > 1 else sheet
