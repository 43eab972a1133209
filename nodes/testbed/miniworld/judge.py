"""The independent judge: a small CNN that reads a mini-world image's kind, colour, background and size.

It is trained on the world's ground-truth labels only (never on CLIP, the prior or the MLLM),
and nothing in the creative optimiser uses it: it exists to *evaluate* what the pipeline made,
e.g. "is this rendered concept still a car, and is it a rare colour for a car?". Keeping it
out of the loop is what makes such an evaluation honest; the MLLM gate is the in-loop judge.

Saved as ``model.safetensors`` + ``config.json`` (architecture, head vocabularies, input size);
:func:`load_judge` reads them, refusing any other format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .world import CATEGORY

FORMAT = "miniworld-judge/1"
MEAN, STD = 0.5, 0.25


class LabelNet(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px), global average pooling, one linear head per label."""

    def __init__(self, heads: dict[str, int], width: int = 32) -> None:
        super().__init__()
        chans = (3, width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.AvgPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(chans[-1], n) for name, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x).mean(dim=(2, 3))
        return {name: head(h) for name, head in self.heads.items()}


def prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, 3]`` in 0..1 -> normalised ``[B, 3, size, size]`` (antialiased resize)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got {tuple(images.shape)}")
    x = images.float().permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return (x - MEAN) / STD


@dataclass
class LabelClassifier:
    """The independent judge's classifier, loaded: per-label ``probs`` / ``predict`` on ComfyUI images."""

    net: LabelNet
    labels: dict[str, list[str]]  # head -> class names
    input_size: int = 32
    source: str = ""

    @torch.no_grad()
    def probs(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per head, class probabilities ``[B, classes]``."""
        self.net.eval()
        outs: dict[str, list[torch.Tensor]] = {name: [] for name in self.labels}
        for start in range(0, images.shape[0], batch_size):
            logits = self.net(prepare(images[start:start + batch_size], self.input_size))
            for name in self.labels:
                outs[name].append(logits[name].softmax(-1))
        return {name: torch.cat(v) for name, v in outs.items()}

    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        """The most likely label of every head, per image."""
        probs = self.probs(images)
        best = {name: p.argmax(-1).tolist() for name, p in probs.items()}
        return [{name: self.labels[name][best[name][i]] for name in self.labels} for i in range(images.shape[0])]

    def accuracy(self, images: torch.Tensor, truth: list[dict[str, str]]) -> dict[str, float]:
        """Per head, the fraction of images whose predicted label equals ``truth``."""
        pred = self.predict(images)
        return {name: sum(p[name] == t[name] for p, t in zip(pred, truth)) / max(1, len(truth))
                for name in self.labels}


def save_judge(net: LabelNet, labels: dict[str, list[str]], folder: str | Path, *, width: int, input_size: int,
               extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()},
              str(folder / "model.safetensors"))
    config = {"format": FORMAT, "width": width, "input_size": input_size, "labels": labels,
              "normalise": {"mean": MEAN, "std": STD}, **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_judge(folder: str | Path) -> LabelClassifier:
    """Load a judge folder (``config.json`` + ``model.safetensors``) on the CPU in float32."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"{folder}: not a judge folder (needs config.json and model.safetensors)")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder}: config format {config.get('format')!r} is not {FORMAT!r}")
    labels = {name: list(names) for name, names in config["labels"].items()}
    net = LabelNet({name: len(names) for name, names in labels.items()}, width=int(config["width"]))
    net.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    return LabelClassifier(net.eval(), labels, int(config["input_size"]), str(folder))


@dataclass(frozen=True)
class KindJudge:
    """The independent judge as a validity judge: predicted kind (or its category) is the subject."""

    judge: LabelClassifier

    def is_subject(self, images: torch.Tensor, subject: str) -> torch.Tensor:
        return torch.tensor([shows(p, subject) for p in self.judge.predict(images)])


def shows(prediction: dict[str, str], subject: str) -> bool:
    """Whether a judged image is the subject: its predicted kind, or that kind's category, is the subject."""
    return prediction["kind"] == subject or CATEGORY[prediction["kind"]] == subject
