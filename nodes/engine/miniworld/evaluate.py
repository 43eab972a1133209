"""Creativity on the mini world, measured: python -m nodes.engine.miniworld.evaluate [options].

For each subject: sample a typical bank from the mini prior, fit the norm, then run the
optimiser without pullback, with the anchor, with the MLLM gate and with both, measuring at the
given steps novelty (log-likelihood under the norm, percentile within the bank), validity (the
INDEPENDENT judge's rate of "is the subject"; the optimiser never sees it) and diversity. The
typical bank itself is the reference row. Prints one table of means over subjects and seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bank import PAPER_TEMPLATE, sample_bank
from ..evaluation import Evaluator, format_table, mean_by, wundt_sweep
from ..gate import ValidityGate
from ..losses import AnchorTerm, CreativeTerm
from ..mllm import load_mllm
from ..norm import GaussianNorm
from ..optimizer import OptimConfig
from ..prior import load_prior
from ..render import DecoderRenderer, RenderSettings, load_decoder
from .judge import Judge, load_judge
from .world import CATEGORY

MODELS = Path(__file__).resolve().parents[3] / "models" / "miniworld"
RENDER = RenderSettings(steps=10, guidance=2.0, height=32, width=32, seed=0)  # what the decoder was trained for
COLUMNS = ["config", "step", "novelty_ll", "novelty_percentile", "validity", "diversity", "n"]


@dataclass(frozen=True)
class KindJudge:
    """The independent judge as a validity judge: predicted kind (or its category) is the subject."""

    judge: Judge

    def is_subject(self, images: torch.Tensor, subject: str) -> torch.Tensor:
        kinds = [p["kind"] for p in self.judge.predict(images)]
        return torch.tensor([k == subject or CATEGORY[k] == subject for k in kinds])


def evaluate_subject(prior, renderer, gate, judge, subject: str, args) -> list[dict]:
    prompt = PAPER_TEMPLATE.format(subject=subject)
    bank = sample_bank(prior, prompt, args.bank, batch_size=500, seed=0)
    norm = GaussianNorm.fit(bank, args.dims)
    evaluator = Evaluator(norm, bank, renderer, judge, samples=args.samples, rendered=args.samples)
    typical = evaluator.measure_embeddings(bank.embeds[-args.samples:], subject)
    rows = [{"config": "typical bank", "subject": subject, "seed": 0, "step": 0, **typical.as_dict()}]
    base = [CreativeTerm(norm)]
    anchor = AnchorTerm.from_prior(prior, prompt)
    configs = {"none": (base, None), "anchor": (base + [anchor], None), "gate": (base, gate),
               "both": (base + [anchor], gate)}
    # The concept is trained in the bank's own template, so step 0 starts inside the typical region
    # and the curve measures the optimiser, not the change of prompt.
    cfg = OptimConfig(lr=args.lr, train=args.train, template=PAPER_TEMPLATE.replace("{subject}", "{token}"))
    return rows + wundt_sweep(prior, evaluator, subject, {c: configs[c] for c in args.configs}, args.steps, cfg,
                              args.seeds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", default="car,fish,house")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", default="0,50,100,200")
    p.add_argument("--configs", default="none,anchor,gate,both")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--train", default="both", choices=["both", "token", "lora"])
    p.add_argument("--bank", type=int, default=1000)
    p.add_argument("--dims", type=int, default=32)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("output/miniworld_eval.json"))
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.steps = sorted({int(s) for s in args.steps.split(",")})
    args.configs = [c.strip() for c in args.configs.split(",")]
    torch.set_num_threads(1)  # many tiny ops: a second thread only spin-waits on a shared 2-core machine
    t0 = time.perf_counter()
    prior = load_prior(str(MODELS / "prior"))
    renderer = DecoderRenderer(load_decoder(str(MODELS / "decoder")), RENDER, prior.zero_image_embed())
    gate = ValidityGate(load_mllm(str(MODELS / "mllm"), sanity_check=True), every=25)
    judge = KindJudge(load_judge(MODELS / "judge"))
    rows = [r for subject in args.subjects.split(",") for r in evaluate_subject(prior, renderer, gate, judge,
                                                                                  subject.strip(), args)]
    summary = mean_by(rows, ("config", "step"), ("novelty_ll", "novelty_percentile", "validity", "diversity"))
    print(format_table(summary, COLUMNS))
    print(f"\nsubjects {args.subjects}; seeds {args.seeds}; lr {args.lr}; train {args.train}; bank {args.bank}; "
          f"PCA {args.dims}; {args.samples} samples per measurement; {time.perf_counter() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()
