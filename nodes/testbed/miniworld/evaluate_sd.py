"""The SD path on the mini world, measured: python nodes/testbed/run.py evaluate_sd [options].

The prior path's evaluation (evaluate.py, baselines.py) on the mini world in SD form (issue 17):
the bundled SD 1.5-family model set, loaded as ComfyUI's own objects (``load_miniworld_sd``), with
ComfyUI imported into this process. For each subject and seed:

- **bank**: the SD Embedding Bank's code path (``sd_sample_bank``: core's sampler, the VAE, the CLIP
  vision model) renders the paper's prompt for the subject ``--bank`` times (bank seed 0, the same
  for every seed); the norm is fitted on its CLIP image embeddings;
- **typical**: ``--samples`` fresh renders of the same prompt (the base model's typical output);
- **rare select**: the rarest of a bank (seed 0: the reference bank, else one drawn with the seed)
  that the mini-world MLLM gate accepts (``engine.rare.select_rare``; the bank's own renders are what
  the gate sees, there is nothing to draw);
- **SD optimiser**: a rank-10 LoRA trained by the creative term plus the image anchor to the bank's
  mean (the SD path's pullback), without and with the MLLM gate, measured at ``--steps`` by
  rendering the LoRA (core's ``load_lora_for_models``, as the optimiser node's MODEL output) at the
  same fresh seeds as the typical row: step 0 (the LoRA at zero) renders exactly the typical row.

Every row is measured as the prior path measures (engine.evaluation.Evaluator): the norm scores the
renders' embeddings (novelty, diversity), the INDEPENDENT world judge (models/miniworld/judge, never
used in any loop) judges the renders themselves (validity, rare combinations, creativity). Each row
also has its wall-clock seconds and its count of UNet calls (one call per sampling step of a batch,
CFG's two rows in one call): for the optimiser, training up to that step, gate renders included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...engine.bank import PAPER_TEMPLATE, EmbeddingBank
from ...engine.evaluation import Evaluator, format_table, mean_by
from ...engine.gate import ValidityGate
from ...engine.losses import AnchorTerm, CreativeTerm
from ...engine.mllm import load_mllm
from ...engine.norm import GaussianNorm
from ...engine.rare import select_rare
from ..parts import run_parts
from .evaluate import MODELS, WorldJudge, mean_sd_by
from .judge import load_judge
from .train_sd import import_comfy

SUBJECTS = "vehicle,plant,animal"
MEASURE_SEED = 1_000_000  # fresh noise for measurements: + 1000 x seed (the bank uses seeds 0..count/batch)
BANK_SEED = 10_000  # rare select's bank for seed s > 0 starts at BANK_SEED x s
METRICS = ("novelty_ll", "novelty_percentile", "validity", "diversity", "rare", "creativity")
COSTS = ("seconds", "unet_calls", "measure_seconds")
COLUMNS = ["config", "step", *METRICS, *COSTS, "n"]


@dataclass
class World:
    """The mini world in SD form as core objects, the render settings, the MLLM gate and the judge."""

    model: object
    clip: object
    vae: object
    clip_vision: object
    render: object  # sd_generator.RenderSettings
    gate: ValidityGate
    judge: WorldJudge
    unet_calls: list  # one entry per UNet forward (a hook on the shared diffusion model)


def load_world(every: int = 25) -> World:
    """Import ComfyUI (CPU), load the bundled mini world as core objects, count every UNet call."""
    import_comfy()
    from ...miniworld_sd import load_miniworld_sd
    from ...sd_generator import RenderSettings

    sd = load_miniworld_sd(dtype="auto")
    rec, res = sd.config["recommended"], int(sd.config["resolution"])
    render = RenderSettings(int(rec["steps"]), float(rec["cfg"]), rec["sampler"], rec["scheduler"], res, res)
    calls: list = []
    sd.model.model.diffusion_model.register_forward_pre_hook(lambda *_: calls.append(1))
    gate = ValidityGate(load_mllm(str(MODELS / "mllm"), sanity_check=True), every=every)
    return World(sd.model, sd.clip, sd.vae, sd.clip_vision, render, gate, WorldJudge(load_judge(MODELS / "judge")),
                 calls)


def renders(world: World, model, prompt: str, count: int, seed: int,
            batch: int = 16) -> tuple[EmbeddingBank, torch.Tensor]:
    """``count`` renders of ``prompt`` by ``model`` and their CLIP image embeddings, by the SD Embedding Bank's own
    function, batch by batch (batch b at seed ``seed + b``, as the bank node draws), keeping every render."""
    from ...sd_generator import sd_sample_bank

    parts, images = [], []
    for b, start in enumerate(range(0, count, batch)):
        rows = min(batch, count - start)
        bank, shown = sd_sample_bank((model, world.clip, world.vae, world.clip_vision), prompt, "", world.render,
                                     count=rows, batch_size=rows, seed=seed + b)
        parts.append(bank.embeds)
        images.append(shown)
    provenance = dict(bank.provenance, seed=int(seed), count=int(count), batch_size=int(batch))
    return EmbeddingBank(torch.cat(parts), provenance), torch.cat(images)


@dataclass(frozen=True)
class BankRenders:
    """A renderer for rare select that draws nothing: an SD bank's embedding is the embedding of a render it
    already holds, so "drawing" a row returns that render (exact row match; any other embedding is refused)."""

    bank: EmbeddingBank
    images: torch.Tensor

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        hits = (embeds[:, None, :] == self.bank.embeds[None]).all(-1)
        if not bool(hits.any(1).all()):
            raise ValueError("BankRenders draws only the bank's own embeddings.")
        return self.images[hits.float().argmax(1)]

    def memory_estimate(self, count: int, *, on_gpu: bool) -> None:
        return None

    def check_time(self, count: int, *, on_gpu: bool, threads: int) -> None:
        return None


def timed(world: World, fn):
    """``fn()`` with its seconds and UNet calls."""
    t0, c0 = time.perf_counter(), len(world.unet_calls)
    out = fn()
    return out, time.perf_counter() - t0, len(world.unet_calls) - c0


def row(config: str, subject: str, seed: int, step, m, seconds: float, calls: int, **extra) -> dict:
    return {"config": config, "subject": subject, "seed": seed, "step": step, **m.as_dict(),
            "seconds": round(seconds, 2), "unet_calls": calls, **extra}


def measure(world: World, subject: str, seed: int, *, bank_size: int, dims: int, samples: int, steps: list[int],
            lr: float, rank: int, anchor_weight: float, gates: tuple[bool, ...] = (False, True)) -> list[dict]:
    """Every row of one subject and seed (see the module's docstring)."""
    from ... import run_inputs
    from ...sd_generator import SDGenerator
    import comfy.sd

    prompt = PAPER_TEMPLATE.format(subject=subject)
    fresh = MEASURE_SEED + 1000 * seed
    (bank, bank_images), bank_s, bank_calls = timed(world, lambda: renders(world, world.model, prompt, bank_size, 0))
    norm = GaussianNorm.from_bank(bank, dims)
    evaluator = Evaluator(norm, bank, None, world.judge, samples=samples, rendered=samples)
    rows = []

    (typical, images), seconds, calls = timed(world, lambda: renders(world, world.model, prompt, samples, fresh))
    rows.append(row("typical", subject, seed, None, evaluator.measure_embeddings(typical.embeds, subject,
                                                                                 images=images), seconds, calls))

    def rare_select():
        if seed == 0:
            source, source_images = bank, bank_images
        else:
            source, source_images = renders(world, world.model, prompt, bank_size, BANK_SEED * seed)
        return select_rare(norm, source, samples, candidates=len(source), gate=world.gate,
                           renderer=BankRenders(source, source_images), subject=subject, batch_size=32)

    sel, seconds, calls = timed(world, rare_select)
    if seed == 0:  # the reference bank was drawn for the norm; rare select drew it too
        seconds, calls = seconds + bank_s, calls + bank_calls
    if sel.samples:
        m = evaluator.measure_embeddings(sel.embeds, subject, images=sel.images)
        rows.append(row("rare select (MLLM gate)", subject, seed, None, m, seconds, calls,
                        selected=len(sel.samples), checked=len(sel.checked)))

    generator = SDGenerator(world.model, world.clip, world.vae, world.clip_vision, prompt, "", world.render)
    anchor = AnchorTerm.from_embeds(bank.embeds, generator.identity, anchor_weight)
    for gated in gates:
        label = "SD optimiser (anchor, MLLM gate)" if gated else "SD optimiser (anchor)"
        run = run_inputs.build_run(generator, norm, subject, [CreativeTerm(norm), anchor],
                                   gate=world.gate if gated else None, steps=max(steps), learning_rate=lr,
                                   lora_rank=rank, train="LoRA", seed=seed)
        t0, c0 = time.perf_counter(), len(world.unet_calls)
        marks = {0: (0.0, 0)}
        result = run.run(lambda ev: marks.setdefault(ev.record.step, (time.perf_counter() - t0,
                                                                      len(world.unet_calls) - c0)),
                         snapshot_at=frozenset(steps))
        for step, learned in sorted(result.snapshots.items()):
            model = comfy.sd.load_lora_for_models(world.model, None, learned.state, 1.0, 0)[0]
            (e, images), measure_s, _ = timed(world, lambda: renders(world, model, prompt, samples, fresh))
            seconds, calls = marks[min(step, max(marks))]
            rows.append(row(label, subject, seed, step, evaluator.measure_embeddings(e.embeds, subject, images=images),
                            seconds, calls, measure_seconds=round(measure_s, 2), stop_reason=str(result.stop_reason),
                            steps_run=result.steps_run, kept_step=learned.meta.get("accepted_step")))
    return rows


def table(rows: list[dict]) -> str:
    """Per configuration and step, mean ± sd over subjects and seeds; then validity and creativity per subject
    (means over seeds)."""
    overall = format_table(mean_sd_by(rows, ("config", "step"), METRICS + COSTS), COLUMNS)
    subjects = format_table(mean_by(rows, ("subject", "config", "step"), ("novelty_percentile", "validity",
                                                                          "creativity")),
                            ["subject", "config", "step", "novelty_percentile", "validity", "creativity", "n"])
    return f"{overall}\n\nper subject (means over seeds):\n{subjects}"


def run_parallel(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """Each (subject, seed) as a process of its own (:mod:`..parts`), ``args.jobs`` at once; their rows."""
    parts = args.out.parent / f"{args.out.stem}_parts"
    files = run_parts("evaluate_sd", argv, [(s, str(x)) for s in args.subjects for x in args.seeds], parts, args.jobs)
    return [r for f in files for r in json.loads(f.read_text())["rows"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", default=SUBJECTS)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", default="0,25,50,100", help="optimiser steps measured")
    p.add_argument("--bank", type=int, default=320, help="renders in the typical bank")
    p.add_argument("--dims", type=int, default=16, help="PCA dims of the norm")
    p.add_argument("--samples", type=int, default=32, help="renders per measurement (and rare select's k)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--anchor", type=float, default=1.0, help="weight of the image anchor to the bank's mean")
    p.add_argument("--gates", default="off,on", help="optimiser runs without (off) and/or with (on) the MLLM gate")
    p.add_argument("--every", type=int, default=25, help="gate interval (steps)")
    p.add_argument("--out", type=Path, default=Path("output/miniworld_sd_eval.json"))
    p.add_argument("--show", type=Path, default=None, help="instead of running: print the tables of a saved --out")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="run each (subject, seed) as its own process, this many at once (1 = all in this process)")
    argv = sys.argv[1:]
    args = p.parse_args()
    if args.show is not None:
        return print(table(json.loads(args.show.read_text())["rows"]))
    args.subjects = [x.strip() for x in args.subjects.split(",") if x.strip()]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    steps = sorted({int(x) for x in args.steps.split(",")})
    gates = tuple({"off": False, "on": True}[g.strip()] for g in args.gates.split(","))
    t0 = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1 and len(args.subjects) * len(args.seeds) > 1:
        rows = run_parallel(args, argv)
    else:
        torch.set_num_threads(1)
        world = load_world(args.every)
        rows = [r for subject in args.subjects for seed in args.seeds
                for r in measure(world, subject, seed, bank_size=args.bank, dims=args.dims, samples=args.samples,
                                 steps=steps, lr=args.lr, rank=args.rank, anchor_weight=args.anchor, gates=gates)]
    print(table(rows))
    print(f"\nsubjects {','.join(args.subjects)}; seeds {args.seeds}; bank {args.bank}; PCA {args.dims}; "
          f"{args.samples} renders per measurement; lr {args.lr}; rank {args.rank}; anchor {args.anchor}; "
          f"{time.perf_counter() - t0:.0f} s")
    args.out.write_text(json.dumps({"rows": rows, "summary": mean_by(rows, ("config", "step"), METRICS + COSTS),
                                    "args": {k: str(v) for k, v in vars(args).items()}}, indent=1, default=str))


if __name__ == "__main__":
    main()
