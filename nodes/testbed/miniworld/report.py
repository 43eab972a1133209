"""The main job's report: how novel, valid and varied a run's creative concept is, from its saved files.

It reads only what the workflow wrote (the typical bank and the concept's samples as safetensors,
their decoded images as PNGs, the optimiser's JSON log), so it measures exactly the images a
person looks at. Validity comes from the mini world's INDEPENDENT judge (a classifier trained on
the world's ground truth, never seen by the optimiser or the gate), novelty and diversity from the
norm refitted on the saved bank (PCA + Gaussian fitting is deterministic, so it is the norm the
run used).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...engine.bank import EmbeddingBank
from ...engine.evaluation import Evaluator
from ...engine.norm import GaussianNorm
from . import world
from .judge import LabelClassifier, shows

FACTORS = ("kind", "colour", "background", "size")


@dataclass(frozen=True)
class RunFiles:
    """Where one run's outputs are."""

    bank: Path  # the typical bank (EmbeddingBank safetensors)
    samples: Path  # the concept's sampled embeddings
    typical_images: list[Path]  # renders of the bank's first embeddings, in order
    concept_images: list[Path]  # renders of the concept's samples, in order
    log: Path | None = None  # the optimiser's JSON log (CreativeSaveLog)


def load_pixels(paths: list[Path]) -> np.ndarray:
    """PNGs as uint8 ``[N, H, W, 3]`` (same size each, as one render node writes them)."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def sheet_of_files(paths: list[Path], columns: int = 8) -> Image.Image:
    """One image of many small renders, to look at a set at a glance."""
    return world.contact_sheet(load_pixels(paths), columns, scale=2)


def _describe(predictions: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    """How many images the judge puts in each class, per factor (most frequent first)."""
    return {f: dict(Counter(p[f] for p in predictions).most_common()) for f in FACTORS}


def measure_run(files: RunFiles, subject: str, pca_dims: int, judge: LabelClassifier) -> dict:
    """Novelty / validity / diversity of the typical renders and of the concept, plus what the judge sees."""
    bank = EmbeddingBank.load(files.bank)
    samples = EmbeddingBank.load(files.samples).embeds
    evaluator = Evaluator(GaussianNorm.from_bank(bank, pca_dims), bank)
    out = {"subject": subject, "pca_dims": pca_dims, "bank_size": len(bank)}
    for name, embeds, paths in (("typical", bank.embeds[:len(files.typical_images)], files.typical_images),
                                ("concept", samples, files.concept_images)):
        images = world.to_image_tensor(load_pixels(paths))
        m = evaluator.measure_embeddings(embeds, subject).as_dict()
        predictions = judge.predict(images)  # once: validity, rarity and the factor counts all read it
        m["validity"] = sum(shows(p, subject) for p in predictions) / len(predictions)
        m["rare"] = sum(map(world.is_rare, predictions)) / len(predictions)
        out[name] = {**m, "count": len(embeds), "rendered": len(paths), "judge_sees": _describe(predictions)}
    if files.log is not None:
        log = json.loads(files.log.read_text())
        entries = log["entries"]
        out["optimisation"] = {
            "stop_reason": log["stop_reason"], "steps_run": log["steps_run"], "accepted_step": log["accepted_step"],
            "log_likelihood": [entries[0]["log_likelihood"], entries[-1]["log_likelihood"]] if entries else None,
            "gate": [{"step": e["step"], "p_yes": e["gate_p_yes"], "passed": e["gate_passed"]}
                     for e in entries if "gate_p_yes" in e],
            "seconds": sum(e["seconds"] for e in entries)}
    return out


def _top(counts: dict[str, int], n: int = 4) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {v / total:.0%}" for k, v in list(counts.items())[:n])


def format_report(r: dict) -> str:
    """The report as Markdown: one table of the three numbers, what the judge sees, how the run went."""
    t, c = r["typical"], r["concept"]
    lines = [f"# Creative run on the mini world: \"{r['subject']}\"", "",
             f"Norm: PCA {r['pca_dims']} + Gaussian on the typical bank of {r['bank_size']} embeddings. "
             f"{t['rendered']} typical and {c['rendered']} concept samples rendered and judged.", "",
             "| measure | typical samples | creative concept |", "|---|---:|---:|",
             f"| novelty: median log-likelihood under the norm | {t['novelty_ll']:.4g} | {c['novelty_ll']:.4g} |",
             f"| novelty: % of the typical bank more likely than that (lower = rarer) | "
             f"{100 - t['novelty_percentile']:.1f} | {100 - c['novelty_percentile']:.1f} |",
             f"| validity: independent judge says \"{r['subject']}\" | {t['validity']:.0%} | {c['validity']:.0%} |",
             f"| diversity: pairwise spread relative to the bank (1 = typical) | {t['diversity']:.2f} | "
             f"{c['diversity']:.2f} |",
             f"| rare in the world: colour or background ≤ {world.RARE_THRESHOLD:.0%} likely for the judged kind | "
             f"{t['rare']:.0%} | {c['rare']:.0%} |", "", "What the independent judge sees:", "",
             "| factor | typical samples | creative concept |", "|---|---|---|"]
    lines += [f"| {f} | {_top(t['judge_sees'][f])} | {_top(c['judge_sees'][f])} |" for f in FACTORS]
    if opt := r.get("optimisation"):
        lines += ["", f"Optimisation: {opt['steps_run']} steps ({opt['seconds']:.1f} s), stopped by "
                      f"{opt['stop_reason']}, kept the state of step {opt['accepted_step']}."]
        if opt["log_likelihood"]:
            first, last = opt["log_likelihood"]
            lines.append(f"Log-likelihood of the training sample under the norm: {first:.4g} at step 1 -> "
                         f"{last:.4g} at step {opt['steps_run']}.")
        lines += [f"Gate at step {g['step']}: P(yes) {g['p_yes']:.3f} -> {'yes' if g['passed'] else 'NO'}"
                  for g in opt["gate"]]
    return "\n".join(lines) + "\n"
