"""Creativity on the mini world, measured: python nodes/testbed/run.py evaluate [options].

For each subject: sample a typical bank from the mini prior and fit the norm, then run the
optimiser and measure, at the given steps, novelty (log-likelihood under the norm, percentile
within the bank), validity (the INDEPENDENT judge's rate of "is the subject"; the optimiser never
sees it), diversity, the share of renders the judge calls a rare combination of the world, and
creativity (the share of renders both valid and novel; engine.evaluation). The typical bank itself
is the reference row. Seven studies, one table each (means over subjects and seeds):

- wundt: no pullback, anchor, MLLM gate, both (the paper's creativity-vs-steps curve);
- train: what is trained (token, LoRA, both), with both pullbacks (the paper's ablation);
- negative: the full method without and with a negative cluster placed where the run without
  it ended, with the samples' distance to that marked cluster;
- baselines: typical samples, the rarest gated bank samples, a ConceptLab-style token, the
  paper's method and its ablations (baselines.py), with seconds and the spread over runs;
- variants: the method's variants against rare select at equal compute, with the beyond-the-bank
  and rare-combination bars (variants.py, issue 20's protocol);
- rankers: whether any density in CLIP space (Gaussians, mixtures, nearest neighbours) ranks the
  world's rare combinations among a typical pool's rarest (rankers.py);
- named: each rare combination named in the prompt, whether the prior's embeddings hold it and the
  decoder draws it (named.py): the most any creative method could show.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...engine.bank import PAPER_TEMPLATE, sample_bank
from ...engine.evaluation import (
    Evaluator,
    format_table,
    mean_by,
    measure_snapshots,
    sweep_columns,
    sweep_summary,
    wundt_sweep,
)
from ...engine.gate import GateCheck, ValidityGate
from ...engine.losses import AnchorTerm, CreativeTerm, negative_cluster
from ...engine.mllm import load_mllm
from ...engine.norm import GaussianNorm
from ...engine.optimizer import CreativeRun, OptimConfig
from ...engine.prior import load_prior
from ...engine.render import DecoderRenderer, RenderSettings, load_decoder
from ...engine.sampling import sample_embeddings
from ..parts import run_parts
from . import world
from .baselines import baselines as baseline_rows
from .named import VALUES as NAMED_VALUES, named_rows
from .rankers import POOL, ranker_rows
from .variants import EQUAL_TO, REFERENCE_COUNT
from .variants import variants as variant_rows
from .judge import KindJudge, load_judge

MODELS = Path(__file__).resolve().parents[3] / "models" / "miniworld"
RENDER = RenderSettings(steps=10, guidance=2.0, height=32, width=32, seed=0)  # what the decoder was trained for
JUDGES = ("judge", "judge_balanced")
TIMING = ("seconds",)  # averaged beside the sweep's metrics
STUDIES = ("wundt", "train", "negative", "baselines", "variants", "rankers", "named")
WUNDT_CONFIGS = ("none", "anchor", "gate", "both")
DEFAULT_STEPS = {"wundt": "0,25,50,100,200,300,500,1000", "train": "0,25,50,100", "negative": "0,25,50,100",
                 "baselines": "0,25,50,100,200", "variants": "0,25,50,100"}
SPREAD = ("novelty_ll", "novelty_percentile", "validity", "diversity", "rare", "creativity", "seconds")  # baselines: mean ± sd
VARIANT_SPREAD = ("novelty_percentile", "validity", "diversity", "rare", "creativity", "beyond", "creativity_beyond",
                  "creativity_rare", "seconds", "cpu_seconds", "prior_rows")
RANKER_SPREAD = ("rare", "validity", "creativity_rare", "rare_percentile", "seconds")
NAMED_SPREAD = (*NAMED_VALUES, "seconds")


@dataclass(frozen=True)
class WorldJudge(KindJudge):
    """The independent judge as validity judge and as rarity judge: does a render show a combination
    rare in the world (colour or background <= 2 % likely for the kind the judge sees)?"""

    def is_rare(self, images: torch.Tensor, subject: str) -> torch.Tensor:
        return torch.tensor([world.is_rare(p) for p in self.judge.predict(images)])


@dataclass
class Subject:
    """What every study of one subject shares: its prompt, typical bank, norm and evaluator."""

    name: str
    prompt: str
    evaluator: Evaluator
    anchor: AnchorTerm
    bank_seconds: float  # sampling the bank and fitting the norm, which every method but "typical" needs


def prepare(prior, renderer, judge, name: str, args) -> tuple[Subject, dict]:
    prompt = PAPER_TEMPLATE.format(subject=name)
    t0 = time.perf_counter()
    bank = sample_bank(prior, prompt, args.bank, batch_size=500, seed=0)
    norm = GaussianNorm.from_bank(bank, args.dims)
    seconds = time.perf_counter() - t0
    evaluator = Evaluator(norm, bank, renderer, judge, samples=args.samples, rendered=args.samples)
    typical = evaluator.measure_embeddings(bank.embeds[-args.samples:], name)
    row = {"config": "typical bank", "subject": name, "seed": 0, "step": 0, **typical.as_dict(), "seconds": seconds}
    return Subject(name, prompt, evaluator, AnchorTerm.from_prior(prior, prompt), seconds), row


def config(args, **changes) -> OptimConfig:
    # The concept is trained in the bank's own template, so step 0 starts inside the typical region
    # and the curve measures the optimiser, not the change of prompt.
    cfg = OptimConfig(lr=args.lr, train=args.train, template=PAPER_TEMPLATE.replace("{subject}", "{token}"))
    return replace(cfg, **changes)


def make_run(prior, subj: Subject, terms: list, gate, cfg: OptimConfig) -> CreativeRun:
    """A run on the subject's norm; a gate judges what the evaluator's renderer draws."""
    return CreativeRun(prior, subj.evaluator.norm, subj.name, tuple(terms), cfg,
                       GateCheck.of(gate, subj.evaluator.renderer))


def wundt(prior, gate, subj: Subject, args) -> list[dict]:
    base = [CreativeTerm(subj.evaluator.norm)]
    configs = {"none": (base, None), "anchor": (base + [subj.anchor], None), "gate": (base, gate),
               "both": (base + [subj.anchor], gate)}
    runs = {name: make_run(prior, subj, *configs[name], config(args)) for name in args.configs}
    return wundt_sweep(runs, subj.evaluator, args.steps["wundt"], args.seeds)


def train(prior, gate, subj: Subject, args) -> list[dict]:
    terms = [CreativeTerm(subj.evaluator.norm), subj.anchor]
    rows = []
    for mode, label in (("token", "token"), ("lora", "LoRA"), ("both", "token + LoRA")):
        both = {"both": make_run(prior, subj, terms, gate, config(args, train=mode))}
        for r in wundt_sweep(both, subj.evaluator, args.steps["train"], args.seeds):
            rows.append({**r, "config": label})
    return rows


def negative(prior, gate, subj: Subject, args) -> list[dict]:
    """Mark where the full method ends as "ugly" (as a user would), then run it again repelled from there."""
    terms = [CreativeTerm(subj.evaluator.norm), subj.anchor]
    steps, rows = args.steps["negative"], []
    for seed in args.seeds:
        cfg = config(args, steps=max(steps), seed=seed)
        run = make_run(prior, subj, terms, gate, cfg)
        first = run.run(snapshot_at=frozenset(steps))
        marked = sample_embeddings(prior.with_concept(first.concept), cfg.template.format(token=first.concept.token),
                                   64, batch_size=64, seed=1000 + seed)
        cluster = negative_cluster(subj.evaluator.norm, marked, alpha=args.alpha, label="marked")
        evaluator = replace(subj.evaluator, marked=cluster.cluster)
        rows += measure_snapshots(run, evaluator, first, "without negative")
        rows += wundt_sweep({"with negative": run.with_(terms=(*terms, cluster))}, evaluator, steps, [seed])
    return rows


def baselines(prior, gate, subj: Subject, args) -> list[dict]:
    return baseline_rows(prior, gate, subj, config(args), args.steps["baselines"], args.seeds, args.samples,
                         args.methods)


def variants(prior, gate, subj: Subject, args) -> list[dict]:
    return variant_rows(prior, gate, subj, config(args), args.steps["variants"], args.seeds, args.samples,
                        args.methods, args.equal_to, args.reference)


def rankers(prior, gate, subj: Subject, args) -> list[dict]:
    return ranker_rows(prior, subj, args.seeds, args.samples, args.pool)


def named(prior, gate, subj: Subject, args) -> list[dict]:
    return named_rows(prior, subj, args.seeds, args.samples)


def mean_sd_by(rows: list[dict], keys: tuple[str, ...], values: tuple[str, ...]) -> list[dict]:
    """Like ``mean_by``, with each value shown as "mean ± sample standard deviation" over the group."""
    out = []
    for row in mean_by(rows, keys, values):
        members = [r for r in rows if all(r[k] == row[k] for k in keys)]
        for v in values:
            present = [float(m[v]) for m in members if m.get(v) is not None]
            if len(present) > 1:
                sd = float(torch.tensor(present, dtype=torch.float64).std())
                row[v] = f"{row[v]:.3g} ± {sd:.2g}"
        out.append(row)
    return out


def peaks(rows: list[dict], value: str = "creativity") -> dict[str, tuple[int, float]]:
    """Per configuration, the measured step where the mean ``value`` is highest (the earliest on ties)."""
    best: dict[str, tuple[int, float]] = {}
    for r in sorted(mean_by(rows, ("config", "step"), (value,)), key=lambda r: (r["config"], r["step"] or 0)):
        if r[value] is not None and (r["config"] not in best or r[value] > best[r["config"]][1]):
            best[r["config"]] = (r["step"], r[value])
    return best


def table(rows: list[dict], study: str) -> str:
    if study in ("rankers", "named"):
        spread = RANKER_SPREAD if study == "rankers" else NAMED_SPREAD
        return format_table(mean_sd_by(rows, ("config", "step"), spread), ["config", *spread, "n"])
    if study in ("baselines", "variants"):
        spread = SPREAD if study == "baselines" else VARIANT_SPREAD
        return format_table(mean_sd_by(rows, ("config", "step"), spread), ["config", "step", *spread, "n"])
    return format_table(sweep_summary(rows, TIMING), sweep_columns(rarity=True, cluster=study == "negative"))


def print_tables(results: dict[str, list[dict]]) -> None:
    for st, rows in results.items():
        print(f"\n== {st} ==\n{table(rows, st)}")
        if st == "wundt":
            print("creativity peaks (step, mean): " + "; ".join(f"{c} {s} ({v:.3f})" for c, (s, v) in peaks(rows).items()))


def merge(files: list[Path]) -> dict[str, list[dict]]:
    """The rows of several saved runs, per study; a row measured twice (the typical bank, in every file) once."""
    results: dict[str, dict[tuple, dict]] = {}
    for f in files:
        for st, data in json.loads(f.read_text()).items():
            for r in data["rows"]:
                results.setdefault(st, {}).setdefault((r["config"], r["subject"], r["seed"], r["step"]), r)
    return {st: list(rows.values()) for st, rows in results.items()}


def run_parallel(args: argparse.Namespace) -> None:
    """Each (subject, seed) in a process of its own (:mod:`..parts`), ``args.jobs`` at a time; their files are
    merged into ``--out`` and the tables printed as one run prints them."""
    t0 = time.perf_counter()
    parts_dir = args.out.parent / f"{args.out.stem}_parts"
    pairs = [(s.strip(), x.strip()) for s in args.subjects.split(",") for x in args.seeds.split(",")]
    files = run_parts("evaluate", sys.argv[1:], pairs, parts_dir, args.jobs)
    results = merge(files)
    print_tables(results)
    print(f"\n{len(files)} processes, {args.jobs} at a time; {time.perf_counter() - t0:.0f} s; parts in {parts_dir}")
    args.out.write_text(json.dumps({st: {"rows": rows, "summary": sweep_summary(rows, TIMING)}
                                    for st, rows in results.items()}, indent=1, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", default="wundt,train,negative", help=f"any of {', '.join(STUDIES)}")
    p.add_argument("--subjects", default="car,fish,house")
    p.add_argument("--seeds", default="0,1")
    for study in DEFAULT_STEPS:
        p.add_argument(f"--{study}-steps", default=DEFAULT_STEPS[study], help=f"measurement steps of {study}")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--train", default="both", choices=["both", "token", "lora"], help="wundt / negative studies")
    p.add_argument("--configs", default=",".join(WUNDT_CONFIGS), help=f"wundt: any of {', '.join(WUNDT_CONFIGS)}")
    p.add_argument("--methods", default="", help="baselines, variants: labels to run, separated by ';' (labels "
                   "hold commas; default: all but the broken ones)")
    p.add_argument("--alpha", type=float, default=1.0, help="negative cluster weight")
    p.add_argument("--equal-to", default=EQUAL_TO, help="variants: LABEL@STEP whose training CPU seconds size the "
                                                        "equal-compute rare select's bank")
    p.add_argument("--reference", type=int, default=REFERENCE_COUNT, help="variants: samples of the reference bank "
                                                                          "of the beyond-the-bank bar")
    p.add_argument("--pool", type=int, default=POOL, help="rankers: typical samples ranked per subject and seed")
    p.add_argument("--models", type=Path, default=MODELS,
                   help="the mini world's models folder (default: the shipped one; e.g. one built by `train --set "
                        "balanced=True`)")
    p.add_argument("--judge", default="judge", choices=JUDGES,
                   help="the independent judge's folder in --models: judge (trained on the world's own "
                        "frequencies, the tables before 2026-12-06) or judge_balanced (colour and background "
                        "independent of the kind: it reads a rare combination's kind)")
    p.add_argument("--bank", type=int, default=1000)
    p.add_argument("--dims", type=int, default=32)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("output/miniworld_eval.json"))
    p.add_argument("--merge", default="", help="instead of running: print the tables of saved --out files together "
                                               "(comma-separated; e.g. one file per seed run in parallel)")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="run each (subject, seed) as its own process, this many at once, and merge the tables "
                        "(default: the cores this process may use; 1 = all in this process)")
    args = p.parse_args()
    if args.merge:
        print_tables(merge([Path(f) for f in args.merge.split(",")]))
        return
    if args.jobs > 1 and len(args.subjects.split(",")) * len(args.seeds.split(",")) > 1:
        return run_parallel(args)
    studies = [x.strip() for x in args.studies.split(",")]
    if unknown := set(studies) - set(STUDIES):
        p.error(f"unknown studies {sorted(unknown)}")
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.configs = [x.strip() for x in args.configs.split(",")]
    if unknown := set(args.configs) - set(WUNDT_CONFIGS):
        p.error(f"unknown configs {sorted(unknown)}")
    args.methods = [x.strip() for x in args.methods.split(";") if x.strip()] or None
    args.steps = {st: sorted({int(x) for x in getattr(args, f"{st}_steps").split(",")}) for st in DEFAULT_STEPS}
    torch.set_num_threads(1)  # many tiny ops: a second thread only spin-waits on a shared 2-core machine
    t0 = time.perf_counter()
    prior = load_prior(str(args.models / "prior"))
    renderer = DecoderRenderer(load_decoder(str(args.models / "decoder")), RENDER, prior.zero_image_embed())
    gate = ValidityGate(load_mllm(str(args.models / "mllm"), sanity_check=True), every=25)
    judge = WorldJudge(load_judge(args.models / args.judge))
    results: dict[str, list[dict]] = {st: [] for st in studies}
    for name in args.subjects.split(","):
        subj, typical = prepare(prior, renderer, judge, name.strip(), args)
        for st in studies:
            study = {"wundt": wundt, "train": train, "negative": negative, "baselines": baselines,
                     "variants": variants, "rankers": rankers, "named": named}[st]
            results[st] += [typical] + study(prior, gate, subj, args)
    print_tables(results)
    print(f"\nsubjects {args.subjects}; seeds {args.seeds}; lr {args.lr}; bank {args.bank}; PCA {args.dims}; "
          f"{args.samples} samples per measurement; models {args.models}, {args.judge}; {time.perf_counter() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({st: {"rows": rows, "summary": sweep_summary(rows, TIMING)}
                                    for st, rows in results.items()}, indent=1, default=str))


if __name__ == "__main__":
    main()
