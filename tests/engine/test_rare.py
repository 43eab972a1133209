"""Training-free rare samples: rarity order, the gate's filter, early stop, cancel, refusals, the mini world."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from creative_generation.nodes.engine.bank import EmbeddingBank
from creative_generation.nodes.engine.gate import ValidityGate
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.rare import rarity_order, select_rare, selection_bank

MINIWORLD = Path(__file__).resolve().parents[2] / "models" / "miniworld"


class AlternatingJudge:
    """Says no, yes, no, yes, ... over every image it is shown, and counts them."""

    def __init__(self):
        self.seen, self.questions = 0, []

    def p_yes(self, images, question):
        assert images.ndim == 4 and images.shape[-1] == 3
        self.questions.append(question)
        out = torch.tensor([float((self.seen + i) % 2) for i in range(images.shape[0])])
        self.seen += images.shape[0]
        return out


def render(e: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(e[:, :12].reshape(-1, 2, 2, 3))


@pytest.fixture(scope="module")
def bank_and_norm():
    g = torch.Generator().manual_seed(0)
    bank = EmbeddingBank(torch.randn(200, 16, generator=g) * torch.linspace(3, 0.5, 16), {"prior": "p"})
    return bank, GaussianNorm.from_bank(bank, 8)


def test_without_gate_returns_the_k_rarest(bank_and_norm):
    bank, norm = bank_and_norm
    sel = select_rare(norm, bank, 5)
    ll = norm.log_prob(bank.embeds.double())
    assert [s.index for s in sel.samples] == ll.argsort()[:5].tolist()
    assert sel.log_likelihoods == sorted(sel.log_likelihoods) and max(sel.log_likelihoods) < float(ll.median())
    assert all(s.p_yes is None and s.passed for s in sel.samples) and sel.images is None
    assert torch.equal(sel.embeds, bank.embeds[[s.index for s in sel.samples]])


def test_gate_filters_in_rarity_order_and_stops_once_k_passed(bank_and_norm):
    bank, norm = bank_and_norm
    judge = AlternatingJudge()
    gate = ValidityGate(judge, threshold=0.5)
    sel = select_rare(norm, bank, 3, candidates=20, gate=gate, renderer=render, subject="vehicle", batch_size=4)
    order, _ = rarity_order(norm, bank.embeds)
    # rarity order 0..7 checked in two batches of 4; odd positions pass; three passed after the second batch
    assert [s.index for s in sel.checked] == order[:8].tolist()
    assert [s.index for s in sel.samples] == order[[1, 3, 5]].tolist()
    assert [s.p_yes for s in sel.samples] == [1.0, 1.0, 1.0] and not any(s.passed for s in sel.checked[0::2])
    assert sel.images.shape == (3, 2, 2, 3) and torch.allclose(sel.images, render(sel.embeds))
    assert judge.questions == ["Is this still a vehicle? Yes or No."] * 2
    saved = selection_bank(sel, bank)
    assert saved.provenance["selected"] == [s.index for s in sel.samples] and saved.prior_identity == "p"


def test_fewer_than_k_pass_when_candidates_run_out(bank_and_norm):
    bank, norm = bank_and_norm
    sel = select_rare(norm, bank, 4, candidates=5, gate=ValidityGate(AlternatingJudge()), renderer=render,
                      subject="vehicle", batch_size=2)
    assert len(sel.checked) == 5 and len(sel.samples) == 2


def test_progress_reports_and_can_cancel(bank_and_norm):
    bank, norm = bank_and_norm
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        select_rare(norm, bank, 10, candidates=12, gate=ValidityGate(AlternatingJudge()), renderer=render,
                    subject="x", batch_size=2, progress=progress)
    assert calls == [(2, 12), (4, 12)]


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "k must be at least 1"),
    ({"k": 5, "candidates": 3}, "candidates"),
    ({"k": 1, "gate": "gate"}, "renderer"),
    ({"k": 1, "gate": "gate", "renderer": render}, "subject"),
])
def test_refuses_bad_input_with_advice(bank_and_norm, kwargs, message):
    bank, norm = bank_and_norm
    if kwargs.get("gate") == "gate":
        kwargs["gate"] = ValidityGate(AlternatingJudge())
    with pytest.raises(ValueError, match=message):
        select_rare(norm, bank, **kwargs)


def test_refuses_a_bank_of_another_prior_or_width(bank_and_norm):
    bank, norm = bank_and_norm
    with pytest.raises(ValueError, match="sample the bank from the norm's prior"):
        select_rare(norm, EmbeddingBank(bank.embeds, {"prior": "other"}), 2)
    with pytest.raises(ValueError, match="16-d"):
        select_rare(norm, EmbeddingBank(torch.zeros(4, 8), {}), 2)


@pytest.mark.transformers5
def test_mini_world_rare_samples_pass_the_real_gate_in_seconds():
    """The bundled prior, decoder and MLLM: the selected samples are far rarer than the bank's median and each
    got P(yes) >= 0.5 from the mini LLaVA."""
    from creative_generation.nodes.engine.bank import sample_bank
    from creative_generation.nodes.engine.mllm import load_mllm
    from creative_generation.nodes.engine.prior import load_prior
    from creative_generation.nodes.engine.render import DecoderRenderer, RenderSettings, load_decoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prior = load_prior(str(MINIWORLD / "prior"))
        renderer = DecoderRenderer(load_decoder(str(MINIWORLD / "decoder")), RenderSettings(10, 2.0, 32, 32, 0),
                                   prior.zero_image_embed())
        gate = ValidityGate(load_mllm(str(MINIWORLD / "mllm")))
        bank = sample_bank(prior, "Professional high-quality photo of a vehicle. photorealistic, 4k, HQ.", 256,
                           batch_size=256, seed=0)
        norm = GaussianNorm.from_bank(bank, 16)
        t0 = time.perf_counter()
        sel = select_rare(norm, bank, 4, candidates=32, gate=gate, renderer=renderer, subject="vehicle")
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    ll = norm.log_prob(bank.embeds.double())
    assert len(sel.samples) == 4 and all(s.p_yes >= 0.5 for s in sel.samples)
    assert max(sel.log_likelihoods) < float(ll.quantile(0.25))
    assert sel.images.shape == (4, 32, 32, 3)
    print(f"mini world: {len(sel.checked)} checked, {seconds:.1f} s, ll {sel.log_likelihoods}, "
          f"bank median {float(ll.median()):.1f}, p_yes {[round(s.p_yes, 3) for s in sel.samples]}")
