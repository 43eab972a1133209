"""Benchmark (not a test): our prior sampler and optimiser step vs diffusers, side by side in one run.

    .venv/bin/python tests/benchmarks/bench_prior.py [--width 256 --layers 6 --count 500 --batch 100]

Prints one table: best of 3 rounds in which the two sides run alternately (same machine load). Sampling: ``sample_embeddings`` (prompt encoded once, prefix keys/values
cached, padding dropped) against ``KandinskyV22PriorPipeline`` called batch after batch with the
same generator, on the same random prior (moderate size), with the max difference of the
outputs. Optimisation: seconds per ``CreativeRun`` step (text encoder + prior steps with
gradients + loss + AdamW + logging) against a bare forward+backward of the same prior steps
through diffusers' own ``PriorTransformer.forward``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import importlib.util
_RUN = importlib.util.spec_from_file_location(
    "creative_run", Path(__file__).resolve().parents[2] / "nodes" / "testbed" / "run.py")
run = importlib.util.module_from_spec(_RUN)
_RUN.loader.exec_module(run)
run.import_pack()  # the pack as `creative_generation`, never as top-level `nodes`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from creative_generation.nodes.engine.bank import PAPER_TEMPLATE, sample_bank  # noqa: E402
from creative_generation.nodes.engine.losses import AnchorTerm, CreativeTerm  # noqa: E402
from creative_generation.nodes.engine.norm import GaussianNorm  # noqa: E402
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig  # noqa: E402
from creative_generation.nodes.engine.prior import load_prior  # noqa: E402
from creative_generation.nodes.engine.sampling import initial_latents, sample_embeddings  # noqa: E402
from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior  # noqa: E402

PROMPT = PAPER_TEMPLATE.format(subject="vehicle")


def side_by_side(ref, ours, repeats: int = 3):
    """Best time of each over ``repeats`` rounds run alternately, so both see the same machine load."""
    best, outs = [float("inf"), float("inf")], [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((ref, ours)):
            t = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best, outs


def diffusers_bank(prior, count, batch, steps, guidance, seed):
    from diffusers import KandinskyV22PriorPipeline

    pipe = KandinskyV22PriorPipeline(prior=prior.transformer, text_encoder=prior.text_encoder,
                                     tokenizer=prior.tokenizer, scheduler=prior.scheduler,
                                     image_encoder=prior.image_encoder, image_processor=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.cat([pipe(PROMPT, num_images_per_prompt=min(batch, count - i), num_inference_steps=steps,
                               guidance_scale=guidance, generator=g, output_type="pt").image_embeds
                          for i in range(0, count, batch)])


def bare_step(prior, steps, guidance, seed):
    """Forward + backward of the prior's denoising steps through diffusers' full forward, no optimiser."""
    ids = prior.tokenizer(["", "a photo of a vehicle"], padding="max_length", max_length=77, return_tensors="pt")
    out = prior.text_encoder(ids.input_ids)
    mask = ids.attention_mask.bool()
    g = torch.Generator().manual_seed(seed)
    lat = initial_latents(prior, 1, g)
    sched = prior.scheduler
    sched.set_timesteps(steps)
    for i, t in enumerate(sched.timesteps):
        pred = prior.transformer(torch.cat([lat, lat]), timestep=t, proj_embedding=out.text_embeds,
                                 encoder_hidden_states=out.last_hidden_state, attention_mask=mask).predicted_image_embedding
        u, c = pred.chunk(2)
        prev = None if i + 1 == len(sched.timesteps) else sched.timesteps[i + 1]
        lat = sched.step(u + guidance * (c - u), t, lat, generator=g, prev_timestep=prev).prev_sample
    prior.transformer.post_process_latents(lat).pow(2).sum().backward()


def main() -> None:
    p = argparse.ArgumentParser(description="prior sampler / optimiser benchmark")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--embed-dim", type=int, default=768)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--opt-steps", type=int, default=10)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp()) / "prior"
    build_tiny_prior(folder, width=args.width, layers=args.layers, heads=4, embed_dim=args.embed_dim,
                     text_layers=args.layers)
    prior = load_prior(str(folder))
    params = sum(p.numel() for p in prior.transformer.parameters()) / 1e6
    n_tokens = len(prior.tokenizer(PROMPT).input_ids)
    print(f"prior: width {args.width}, {args.layers} layers, embedding {args.embed_dim}, {params:.1f} M params; "
          f"prompt {n_tokens} tokens of 77; torch threads {torch.get_num_threads()}")

    kw = dict(count=args.count, batch=args.batch, steps=args.steps, guidance=args.guidance, seed=0)
    diffusers_bank(prior, 2 * args.batch // args.batch, 2, args.steps, args.guidance, 1)  # warm-up
    (t_ref, t_ours), (ref, ours) = side_by_side(
        lambda: diffusers_bank(prior, **kw),
        lambda: sample_embeddings(prior, PROMPT, args.count, batch_size=args.batch, steps=args.steps,
                                  guidance=args.guidance, seed=0))
    diff = float((ours - ref).abs().max())

    bank = sample_bank(prior, PROMPT, 256, batch_size=128, seed=0)
    norm = GaussianNorm.from_bank(bank, 16)
    terms = [CreativeTerm(norm), AnchorTerm.from_prior(prior, PROMPT)]
    cfg = OptimConfig(steps=args.opt_steps, prior_steps=args.steps, guidance=args.guidance, template="a photo of a {token}")

    def bare():
        prior.transformer.requires_grad_(True)
        try:
            for s in range(args.opt_steps):
                bare_step(prior, args.steps, args.guidance, s)
        finally:
            prior.transformer.requires_grad_(False)

    (t_bare, t_opt), _ = side_by_side(bare, lambda: CreativeRun(prior, norm, "vehicle", tuple(terms), cfg).run())

    rows = [("bank sampling", f"{args.count / t_ref:.1f} emb/s", f"{args.count / t_ours:.1f} emb/s", t_ref / t_ours,
             f"max |diff| {diff:.2e}"),
            ("optimiser step", f"{t_bare / args.opt_steps * 1e3:.0f} ms/step", f"{t_opt / args.opt_steps * 1e3:.0f} ms/step",
             t_bare / t_opt, "bare fwd+bwd vs full step")]
    print(f"\n{'what':<16}{'diffusers':>18}{'ours':>18}{'speed-up':>10}  note")
    for what, ref_s, ours_s, ratio, note in rows:
        print(f"{what:<16}{ref_s:>18}{ours_s:>18}{ratio:>9.2f}x  {note}")
    print(f"\n(sampling: N={args.count}, {args.steps} steps, batch {args.batch}, CFG {args.guidance}; "
          f"optimiser: {args.opt_steps} steps, token + LoRA rank 10)")


if __name__ == "__main__":
    main()
