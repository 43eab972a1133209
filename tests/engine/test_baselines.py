"""The evaluation script's baselines study and the creativity score, tiny: one subject, a few steps.

The measured study (docs/evaluation.md) runs 3 subjects x 3 seeds to 200 steps; here the table's
shape is checked, and that a deliberately broken method (the paper's, with a zero learning rate)
scores lower creativity than the real one, so the score can tell a method that does nothing.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

MODELS = Path(__file__).resolve().parents[2] / "models" / "miniworld"
PAPER, BROKEN, CONCEPTLAB = "paper (token+LoRA, anchor, gate)", "broken: lr 0", "ConceptLab-style (token)"


@pytest.fixture(scope="module")
def world(one_thread):
    """The mini world's prior and a 2-step renderer, in one thread (tiny models: one thread is faster, on a
    shared CPU much faster)."""
    from creative_generation.nodes.engine.prior import load_prior
    from creative_generation.nodes.engine.render import DecoderRenderer, RenderSettings, load_decoder

    prior = load_prior(str(MODELS / "prior"))
    return prior, DecoderRenderer(load_decoder(str(MODELS / "decoder")), RenderSettings(2, 2.0, 32, 32, 0),
                                  prior.zero_image_embed())


def world_subject(world, name: str, args: Namespace, judge: str = "judge"):
    """The evaluation script's subject ``name`` on the mini world, judged by the judge folder ``judge``."""
    from creative_generation.nodes.testbed.miniworld import evaluate as E
    from creative_generation.nodes.testbed.miniworld.judge import load_judge

    prior, renderer = world
    return E.prepare(prior, renderer, E.WorldJudge(load_judge(MODELS / judge)), name, args)


@pytest.fixture(scope="module")
def study(world):
    from creative_generation.nodes.engine.gate import ValidityGate
    from creative_generation.nodes.engine.mllm import load_mllm
    from creative_generation.nodes.testbed.miniworld import evaluate as E

    gate = ValidityGate(load_mllm(str(MODELS / "mllm")), every=25)
    args = Namespace(bank=128, dims=8, samples=8, lr=1e-3, train="both", seeds=[0], steps={"baselines": [0, 4]},
                     methods=["typical", "rare select", PAPER, BROKEN, CONCEPTLAB])
    subject, typical = world_subject(world, "vehicle", args)
    return E, [typical] + E.baselines(world[0], gate, subject, args)


@pytest.mark.transformers5
def test_table_has_every_method_and_step(study):
    E, rows = study
    assert sorted({(r["config"], r["step"]) for r in rows}, key=str) == sorted(
        [("typical bank", 0), ("typical", None), ("rare select", None)]
        + [(m, s) for m in (PAPER, BROKEN, CONCEPTLAB) for s in (0, 4)], key=str)
    for r in rows:
        assert 0 <= r["creativity"] <= r["validity"] and 0 <= r["rare"] <= 1 and r["seconds"] >= 0, r
    header, *lines = E.table(rows, "baselines").splitlines()
    assert header.split() == ["config", "step", *E.SPREAD, "n"] and len(lines) == 9
    rare = next(r for r in rows if r["config"] == "rare select")
    assert rare["selected"] == 8 and rare["novelty_percentile"] < 10, rare


@pytest.mark.transformers5
def test_broken_method_loses_to_the_real_one(study):
    _, rows = study
    at = {(r["config"], r["step"]): r for r in rows}
    assert at[(BROKEN, 4)]["novelty_ll"] == at[(BROKEN, 0)]["novelty_ll"]  # lr 0: nothing moves
    assert at[(PAPER, 4)]["creativity"] > at[(BROKEN, 4)]["creativity"], (at[(PAPER, 4)], at[(BROKEN, 4)])


@pytest.mark.transformers5
def test_conceptlab_names_kinds_of_the_category_as_negatives(study):
    from creative_generation.nodes.testbed.miniworld import world

    _, rows = study
    named = next(r["negatives"] for r in rows if r["config"] == CONCEPTLAB).split(", ")
    assert named and all(world.CATEGORY[k] == "vehicle" for k in named), named


def test_conceptlab_loss_clamps_as_conceptlab_does():
    from creative_generation.nodes.testbed.miniworld.baselines import ConceptLabLoss

    pos, neg = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    loss = ConceptLabLoss(pos, [neg])
    on_pos, on_neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(loss(on_pos)) == pytest.approx((1 - 0.28) + 0.2)  # pull saturated at 0.28, push floored at 0.2
    assert float(loss(on_neg)) == pytest.approx(1.0 + 1.0)
    assert float(ConceptLabLoss(pos)(on_neg)) == pytest.approx(1.0)  # no negatives named yet


LORA_VARIANT = "LoRA, 4 samples/step, rollback"
RARE_START = "token+LoRA, rare start (50 inversion steps), 4 samples/step, beyond-bank ceiling"


@pytest.mark.transformers5
def test_variants_study_rows_costs_and_bars(world):
    """Issue 20's study, tiny: every row has its costs (wall, CPU, prior rows) and the three bars; the
    equal-compute rare select draws a bank sized by the chosen method's CPU seconds; more samples per step
    cost more prior rows than one; a trained method then rare-selected samples its own concept and costs
    its training plus the selection; a rare start's step 0 already carries its bank, selection and inversion."""
    from creative_generation.nodes.engine.gate import ValidityGate
    from creative_generation.nodes.engine.mllm import load_mllm
    from creative_generation.nodes.testbed.miniworld import evaluate as E
    from creative_generation.nodes.testbed.miniworld import variants as E_variants

    gate = ValidityGate(load_mllm(str(MODELS / "mllm")), every=2)
    args = Namespace(bank=128, dims=8, samples=8, lr=1e-3, train="both", seeds=[0], steps={"variants": [0, 4]},
                     methods=[PAPER, LORA_VARIANT, RARE_START], equal_to=f"{PAPER}@4", reference=300)
    rows = E.variants(world[0], gate, world_subject(world, "vehicle", args)[0], args)
    assert sorted({(r["config"], r["step"]) for r in rows}, key=str) == sorted(
        [("typical", None), ("rare select (bank 1,000)", None), ("rare select (equal compute)", None)]
        + [(m, s) for m in (PAPER, LORA_VARIANT, RARE_START) for s in (0, 4)]
        + [(m + E_variants.THEN_SELECT, 4) for m in (PAPER, LORA_VARIANT, RARE_START)], key=str)
    for r in rows:
        assert 0 <= r["creativity_beyond"] <= r["validity"] and 0 <= r["creativity_rare"] <= r["rare"], r
        assert 0 <= r["beyond"] <= 1 and r["cpu_seconds"] >= 0 and r["prior_rows"] >= 0, r
    at = {(r["config"], r["step"]): r for r in rows}
    assert at[(PAPER, 0)]["prior_rows"] == 0 and at[(PAPER, 4)]["prior_rows"] > 0
    assert at[(LORA_VARIANT, 4)]["prior_rows"] > at[(PAPER, 4)]["prior_rows"]  # 4 noise draws per step
    assert at[(RARE_START, 0)]["prior_rows"] > 1000 + 50  # its bank of 1,000 and 50 inversion steps
    equal = at[("rare select (equal compute)", None)]
    assert equal["bank"] >= 1 and equal["equal_to"].startswith(f"{PAPER}@4")
    assert at[("rare select (bank 1,000)", None)]["bank"] == 1000
    then = at[(PAPER + E_variants.THEN_SELECT, 4)]
    assert then["bank"] == 1000 and then["selected"] == 8
    assert then["prior_rows"] > at[(PAPER, 4)]["prior_rows"] + 1000  # training, then a bank of the concept
    assert then["cpu_seconds"] > at[(PAPER, 4)]["cpu_seconds"]
    header = E.table(rows, "variants").splitlines()[0]
    assert header.split() == ["config", "step", *E.VARIANT_SPREAD, "n"]


def test_every_ranker_scores_a_far_sample_rarest():
    """The rankers study's densities all read low = rare (a sign slip would rank the typical first)."""
    from creative_generation.nodes.testbed.miniworld.rankers import rankers

    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(400, 8, generator=gen, dtype=torch.float64).numpy()
    pool = torch.randn(50, 8, generator=gen, dtype=torch.float64).numpy()
    pool[17] = 6.0
    scores = {label: score(bank, pool) for label, score in rankers(8).items()}
    assert len(scores) == 8 and all(s.shape == (50,) and s.argmin() == 17 for s in scores.values()), scores


def test_kind_gaussians_see_what_is_rare_for_its_kind_only():
    """A sample typical of the category but of neither kind's own shape (the middle of two kinds' clusters) is
    rarest under the kind Gaussians, while the category's own Gaussian reads it typical; the rare percentile
    says where such samples sit."""
    from creative_generation.nodes.engine.norm import GaussianNorm
    from creative_generation.nodes.testbed.miniworld.rankers import KIND_RANKERS, _kind_rankers, _mean_percentile

    gen = torch.Generator().manual_seed(0)
    kinds = [torch.randn(300, 4, generator=gen, dtype=torch.float64) * 0.3 + shift
             for shift in (torch.tensor([3.0, 0, 0, 0]), torch.tensor([-3.0, 0, 0, 0]))]
    category = GaussianNorm.from_bank(torch.cat(kinds), 4)
    pool = torch.cat(kinds)[::20].clone()
    pool[5] = 0.0  # between the two kinds: at the category's centre
    rankers = _kind_rankers([GaussianNorm.from_bank(k, 4) for k in kinds])
    assert set(rankers) == set(KIND_RANKERS)
    for score in rankers.values():
        s = score(None, pool.numpy())
        assert s.argmin() == 5 and _mean_percentile(s, np.arange(len(s)) == 5) == 0.0
    whole = category.log_prob(pool).numpy()
    assert _mean_percentile(whole, np.arange(len(whole)) == 5) == 1.0  # the category's densest point
    assert _mean_percentile(whole, np.zeros(len(whole), bool)) is None


@pytest.mark.transformers5
def test_rankers_study_rows_and_bounds(world):
    """The rankers study, tiny: the pool, the best-possible bound and every ranker, each row's bars in range and
    none above the bound."""
    from creative_generation.nodes.testbed.miniworld import evaluate as E
    from creative_generation.nodes.testbed.miniworld.rankers import AGAIN, KIND_RANKERS, rankers

    args = Namespace(bank=128, dims=8, samples=8, seeds=[0], pool=60)
    rows = E.rankers(world[0], None, world_subject(world, "vehicle", args)[0], args)
    assert [r["config"] for r in rows] == ["pool (60)", "best possible", AGAIN, *rankers(8), *KIND_RANKERS]
    best = rows[1]["creativity_rare"]
    for r in rows:
        assert 0 <= r["creativity_rare"] <= min(r["rare"], r["validity"]), r
        assert r["creativity_rare"] <= best or r["config"] == AGAIN, r  # a new draw of the picks is no ranking
        assert r["rare_percentile"] is None or 0 <= r["rare_percentile"] <= 1, r


def test_typical_parts_pull_back_only_a_part_outside_its_typical_range():
    """The round-5 pullback: zero while every axis is inside the bank's typical range, positive (and with a
    gradient back) once one axis is pushed past it."""
    from creative_generation.nodes.testbed.miniworld.variants import TypicalParts

    rng = np.random.default_rng(3)
    bank = torch.from_numpy(rng.normal(size=(400, 12)))
    axes = [torch.from_numpy(rng.normal(size=(3, 12))), torch.from_numpy(rng.normal(size=(4, 12)))]
    parts = TypicalParts.of(bank, axes, quantile=0.05)
    assert len(parts.parts) == 2 and all(p.dims == n - 1 for p, n in zip(parts.parts, (3, 4)))
    centre = bank.mean(0, keepdim=True)
    assert float(parts(centre)) == 0.0
    far = (centre + 20 * (axes[0][0] - axes[0][1])).requires_grad_(True)
    loss = parts(far)
    loss.backward()
    assert loss.item() > 0 and far.grad.abs().sum().item() > 0


@pytest.mark.transformers5
def test_named_study_rows_and_bounds(world):
    """The named study, tiny: one row per rare combination of the subject's kinds and one mean per seed, every
    share in range."""
    from creative_generation.nodes.testbed.miniworld import evaluate as E
    from creative_generation.nodes.testbed.miniworld.named import VALUES, named_combinations

    args = Namespace(bank=64, dims=8, samples=4, seeds=[0])
    rows = E.named(world[0], None, world_subject(world, "animal", args, "judge_balanced")[0], args)
    combos = named_combinations("animal")
    assert ("fish", "background", "sky") in combos and ("fish", "colour", "white") in combos
    assert named_combinations("fish") == combos and ("bus", "colour", "purple") in named_combinations("bus")
    with pytest.raises(ValueError, match="no kind or category"):
        named_combinations("dragon")
    assert [r["config"] for r in rows] == [
        *(f"a photo of a {v} {k}" if a == "colour" else f"a photo of a {k} {E.world.BACKGROUND_PHRASE[v]}"
          for k, a, v in combos), "animal: every named"]
    for r in rows:
        assert all(0 <= r[v] <= 1 for v in VALUES) and r["creativity_rare"] <= min(r["rare"], r["validity"]), r
    assert rows[-1]["rare"] == pytest.approx(np.mean([r["rare"] for r in rows[:-1]]))
    assert E.table(rows, "named").splitlines()[0].split() == ["config", *E.NAMED_SPREAD, "n"]
