"""Evaluation: novelty/validity/diversity measurements and the Wundt sweep on the tiny prior."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from creative_generation.nodes.engine.bank import PAPER_TEMPLATE, sample_bank
from creative_generation.nodes.engine.evaluation import AskingJudge, Evaluator, format_table, mean_by, wundt_sweep
from creative_generation.nodes.engine.losses import AnchorTerm, CreativeTerm
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig

TEMPLATE = PAPER_TEMPLATE.replace("{subject}", "{token}")


class BrightnessJudge:
    """Independent stand-in judge: an image 'is the subject' when its mean is above 0.5."""

    def is_subject(self, images, subject):
        return images.mean(dim=(1, 2, 3)) > 0.5


def render(e):
    return torch.sigmoid(e[:, :24].reshape(-1, 2, 4, 3))


@pytest.fixture(scope="module")
def evaluator(prior):
    bank = sample_bank(prior, PAPER_TEMPLATE.format(subject="vehicle"), 256, batch_size=128, seed=0)
    return Evaluator(GaussianNorm.from_bank(bank, 16), bank, render, BrightnessJudge(), samples=16, rendered=8)


def test_measure_bank_itself_is_typical(evaluator):
    m = evaluator.measure_embeddings(evaluator.bank.embeds[:64], "vehicle")
    assert 30 < m.novelty_percentile < 70, "the bank's own median sits mid-bank"
    assert 0.7 < m.diversity < 1.3
    expected = float(BrightnessJudge().is_subject(render(evaluator.bank.embeds[:8]), "vehicle").float().mean())
    assert m.validity == pytest.approx(expected)


def test_given_renders_are_judged_without_a_renderer(evaluator):
    """The SD path renders first and embeds after: its renders are judged as given, no renderer asked."""
    embeds = evaluator.bank.embeds[:16]
    images = torch.zeros(16, 2, 4, 3)  # all dark: the brightness judge says no to every one
    images[:4] = 1.0  # ...but to these
    m = replace(evaluator, renderer=None).measure_embeddings(embeds, "vehicle", images=images)
    assert m.validity == pytest.approx(4 / 8)  # the first ``rendered`` (8) are judged
    with pytest.raises(ValueError, match="the render of every row"):
        evaluator.measure_embeddings(embeds, "vehicle", images=images[:3])


def test_far_samples_are_novel_and_collapsed_samples_not_diverse(evaluator):
    far = evaluator.bank.embeds[:16] + 5.0
    m = evaluator.measure_embeddings(far, "vehicle")
    assert m.novelty_percentile == 0.0 and m.novelty_ll < float(evaluator.norm.log_prob(evaluator.bank.embeds.double()).min())
    same = evaluator.bank.embeds[:1].repeat(8, 1)
    assert evaluator.measure_embeddings(same, "vehicle").diversity == 0.0


def test_sweep_rows_and_novelty_rises(prior, evaluator):
    terms_free = [CreativeTerm(evaluator.norm)]
    terms_anchor = terms_free + [AnchorTerm.from_prior(prior, PAPER_TEMPLATE.format(subject="vehicle"))]
    cfg = OptimConfig(lr=1e-3, template=TEMPLATE)
    runs = {name: CreativeRun(prior, evaluator.norm, "vehicle", terms, cfg)
            for name, terms in (("none", terms_free), ("anchor", terms_anchor))}
    events = []
    rows = wundt_sweep(runs, evaluator, [0, 5, 10], [0, 1], on_step=events.append)
    assert len(rows) == 2 * 2 * 3
    assert [(r["config"], r["seed"], r["step"]) for r in rows[:4]] == [("none", 0, 0), ("none", 0, 5),
                                                                       ("none", 0, 10), ("none", 1, 0)]
    assert all(r["stop_reason"] == "max_steps" and r["steps_run"] == 10 for r in rows)
    assert [e.done for e in events] == list(range(1, 41)) and {e.total for e in events} == {40}
    assert [e.stage for e in events[::10]] == ["none, seed 0", "none, seed 1", "anchor, seed 0", "anchor, seed 1"]
    means = {(r["config"], r["step"]): r for r in mean_by(rows, ("config", "step"), ("novelty_percentile", "validity"))}
    assert means[("none", 0)]["n"] == 2
    assert means[("none", 0)]["novelty_percentile"] > means[("none", 10)]["novelty_percentile"]
    assert means[("none", 10)]["novelty_percentile"] < 5
    text = format_table(rows[:3], ["config", "seed", "step", "novelty_percentile", "validity"])
    assert text.splitlines()[0].split() == ["config", "seed", "step", "novelty_percentile", "validity"]


def test_asking_judge_thresholds_p_yes():
    class Fixed:
        def p_yes(self, images, question):
            assert question == "Is this a car? Yes or No."
            return torch.tensor([0.2, 0.7])

    assert AskingJudge(Fixed()).is_subject(torch.zeros(2, 4, 4, 3), "car").tolist() == [False, True]


def test_distance_to_a_marked_cluster(evaluator):
    from dataclasses import replace

    region = evaluator.bank.embeds[:64] + 3.0
    marked = replace(evaluator, marked=evaluator.norm.fit_cluster(region))
    inside = marked.measure_embeddings(region[:16], "vehicle").cluster_distance
    away = marked.measure_embeddings(evaluator.bank.embeds[64:80], "vehicle").cluster_distance
    assert inside < away
    assert evaluator.measure_embeddings(region[:16], "vehicle").cluster_distance is None


def test_the_beyond_the_bank_bar_and_its_creativity(evaluator):
    """With a reference bank, a sample counts beyond only when rarer than every reference sample; its creativity
    needs the judge's yes too. The reference's own rarest sample is not beyond it; without a reference the
    bar is not measured."""
    bank = evaluator.bank
    ref = replace(evaluator, reference=bank)
    lls = evaluator.norm.log_prob(bank.embeds.double())
    rarest = bank.embeds[lls.argmin()][None]
    assert ref.measure_embeddings(rarest.repeat(8, 1), "vehicle").beyond == 0.0
    far = bank.embeds[:16] + 5.0
    m = ref.measure_embeddings(far, "vehicle")
    valid = BrightnessJudge().is_subject(render(far[:8]), "vehicle").float().mean()
    assert m.beyond == 1.0 and m.creativity_beyond == pytest.approx(float(valid))
    mixed = torch.cat([far[:4], bank.embeds[:4]])  # 4 beyond, 4 typical
    assert ref.measure_embeddings(mixed, "vehicle").beyond == 0.5
    plain = evaluator.measure_embeddings(far, "vehicle")
    assert plain.beyond is None and plain.creativity_beyond is None and plain.creativity_rare is None


class RareBrightJudge(BrightnessJudge):
    """Also a rarity judge: an image is a rare combination when its mean is above 0.7."""

    def is_rare(self, images, subject):
        return images.mean(dim=(1, 2, 3)) > 0.7


def test_creativity_on_the_rare_combination_bar(evaluator):
    embeds = torch.cat([evaluator.bank.embeds[:8] + 5.0, evaluator.bank.embeds[8:16]])
    m = replace(evaluator, judge=RareBrightJudge(), rendered=16).measure_embeddings(embeds, "vehicle")
    images = render(embeds)
    expected = ((images.mean(dim=(1, 2, 3)) > 0.5) & (images.mean(dim=(1, 2, 3)) > 0.7)).float().mean()
    assert m.creativity_rare == pytest.approx(float(expected)) and m.creativity_rare <= m.rare
