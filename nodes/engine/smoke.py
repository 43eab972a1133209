"""Smoke run of the whole engine on tiny RANDOM models: python -m nodes.engine.smoke --out DIR.

This proves the pipeline runs end to end offline (bank -> norm -> anchor + negative cluster +
MLLM gate -> token + LoRA optimisation -> concept saved, reloaded, sampled, rendered). The
models are random, so the images are noise and the gate's answers mean nothing: it is a smoke
run, not a demonstration of creativity. Real results need real weights (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .bank import PAPER_TEMPLATE, sample_bank
from .concept import Concept
from .gate import ValidityGate
from .losses import AnchorTerm, CreativeTerm, negative_cluster
from .mllm import load_mllm
from .norm import GaussianNorm
from .optimizer import CreativeOptimizer, OptimConfig
from .plots import plot_embedding_map, plot_log
from .prior import load_prior
from .render import DecoderRenderer, RenderSettings, load_decoder
from .sampling import sample_embeddings
from .tiny.decoder import build_tiny_k22_decoder
from .tiny.mllm import build_tiny_llava_next
from .tiny.prior import build_tiny_prior


def _save_png(images: torch.Tensor, path: Path) -> None:
    """A row of images ``[B,H,W,3]`` as one PNG."""
    row = torch.cat(list(images), dim=1).clamp(0, 1).numpy()
    Image.fromarray((row * 255).round().astype(np.uint8)).save(path)


def build_models(folder: Path) -> dict[str, Path]:
    paths = {"prior": folder / "tiny-prior", "decoder": folder / "tiny-decoder", "mllm": folder / "tiny-llava"}
    if not paths["prior"].exists():
        build_tiny_prior(paths["prior"], family="kandinsky-2.2", width=64, layers=2, embed_dim=32)
        build_tiny_k22_decoder(paths["decoder"], embed_dim=32)
        build_tiny_llava_next(paths["mllm"])
    return paths


def run(out: Path, subject: str, count: int, dims: int, steps: int, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    paths = build_models(out / "models")
    prior = load_prior(str(paths["prior"]))
    decoder = load_decoder(str(paths["decoder"]))
    judge = load_mllm(str(paths["mllm"]))
    timings["build + load tiny models"] = time.perf_counter() - t

    t = time.perf_counter()
    prompt = PAPER_TEMPLATE.format(subject=subject)
    bank = sample_bank(prior, prompt, count, batch_size=256, seed=seed)
    bank.save(out / "bank.safetensors")
    timings[f"sample bank (N={count})"] = time.perf_counter() - t

    norm = GaussianNorm.fit(bank, dims)
    norm.save(out / "norm.safetensors")
    renderer = DecoderRenderer(decoder, RenderSettings(steps=3, height=64, width=64, seed=seed), prior.zero_image_embed())
    _save_png(renderer(bank.embeds[:6]), out / "typical.png")

    template = PAPER_TEMPLATE.replace("{subject}", "{token}")
    terms = [CreativeTerm(norm), AnchorTerm.from_prior(prior, prompt),
             negative_cluster(norm, bank.embeds[:32], alpha=0.1, label="marked-unwanted")]
    gate = ValidityGate(judge, every=25, threshold=0.0)  # random MLLM: P(yes) is noise, so never stop on it
    cfg = OptimConfig(steps=steps, lr=1e-3, seed=seed, template=template)
    t = time.perf_counter()
    result = CreativeOptimizer(prior, norm, subject, terms, cfg, gate, renderer).run()
    timings[f"optimise ({result.steps_run} steps, {len([r for r in result.log if 'gate_p_yes' in r])} gate checks)"] = (
        time.perf_counter() - t)
    result.concept.save(out / "concept.safetensors")

    concept = Concept.load(out / "concept.safetensors")
    samples = sample_embeddings(prior.with_concept(concept), template.format(token=concept.token), 64, seed=seed + 1)
    _save_png(renderer(samples[:6]), out / "concept.png")
    _save_png(plot_log(result.log), out / "losses.png")
    clusters = [(t.name, t.cluster) for t in terms[2:]]
    _save_png(plot_embedding_map(norm, bank.embeds, result.path, clusters), out / "embedding_map.png")

    bank_ll = norm.log_prob(bank.embeds.double())
    concept_ll = norm.log_prob(samples.double())
    report = {
        "note": "SMOKE RUN on tiny random models: numbers show the pipeline works, not creativity.",
        "subject": subject, "bank_size": count, "pca_dims": dims, "stop_reason": result.stop_reason,
        "steps_run": result.steps_run, "accepted_step": result.accepted_step,
        "bank_log_likelihood_p5_p50": [float(bank_ll.quantile(0.05)), float(bank_ll.median())],
        "concept_log_likelihood_median": float(concept_ll.median()),
        "concept_samples_below_bank_p5": float((concept_ll < bank_ll.quantile(0.05)).float().mean()),
        "gate_checks": [{"step": r["step"], "p_yes": r["gate_p_yes"]} for r in result.log if "gate_p_yes" in r],
        "seconds": timings,
    }
    (out / "log.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "gate_image"}
                                              for r in result.log], indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("output/smoke"))
    parser.add_argument("--subject", default="vehicle")
    parser.add_argument("--count", type=int, default=1024)
    parser.add_argument("--dims", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("SMOKE RUN: the whole engine on tiny random models (images are noise; see README for real models).")
    report = run(args.out, args.subject, args.count, args.dims, args.steps, args.seed)
    for key, value in report.items():
        if key != "seconds":
            print(f"  {key}: {value}")
    for what, seconds in report["seconds"].items():
        print(f"  {what:<45} {seconds:8.2f} s")
    print(f"Wrote bank, norm, concept (.safetensors), typical.png, concept.png, losses.png, embedding_map.png, "
          f"log.json and report.json to {args.out}/")


if __name__ == "__main__":
    main()
