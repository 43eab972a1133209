"""Creative optimisation end to end on tiny models, the gate's roll-back, cancel, negative clusters."""

from __future__ import annotations

import pytest
import torch

from creative_generation.nodes.engine.bank import PAPER_TEMPLATE, sample_bank
from creative_generation.nodes.engine.concept import Concept
from creative_generation.nodes.engine.gate import ValidityGate
from creative_generation.nodes.engine.losses import AnchorTerm, CreativeTerm, negative_cluster
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeOptimizer, OptimConfig, StopOptimisation
from creative_generation.nodes.engine.sampling import sample_embeddings

TEMPLATE = PAPER_TEMPLATE.replace("{subject}", "{token}")


class ScriptedJudge:
    """Answers from a script of P(yes) values and records every question."""

    def __init__(self, answers):
        self.answers, self.questions = list(answers), []

    def p_yes(self, images, question):
        assert images.ndim == 4 and images.shape[-1] == 3
        self.questions.append(question)
        return torch.full((images.shape[0],), self.answers.pop(0))


def render(e: torch.Tensor) -> torch.Tensor:
    """A stand-in decoder: a deterministic image from the embedding."""
    return torch.sigmoid(e[:, :24].reshape(-1, 2, 4, 3) * 10)


@pytest.fixture(scope="module")
def setup(prior):
    bank = sample_bank(prior, PAPER_TEMPLATE.format(subject="vehicle"), 256, batch_size=128, seed=0)
    norm = GaussianNorm.fit(bank, 16)
    anchor = AnchorTerm.from_prior(prior, PAPER_TEMPLATE.format(subject="vehicle"))
    return bank, norm, [CreativeTerm(norm), anchor]


def _config(**kw):
    return OptimConfig(**{"steps": 50, "lr": 1e-3, "seed": 0, "template": TEMPLATE, **kw})


def test_end_to_end(prior, setup, tmp_path):
    bank, norm, terms = setup
    judge = ScriptedJudge([0.9, 0.8])
    result = CreativeOptimizer(prior, norm, "vehicle", terms, _config(), ValidityGate(judge, every=25), render).run()
    bank_ll = norm.log_prob(bank.embeds.double())
    p5 = bank_ll.quantile(0.05)
    assert result.log[0].log_likelihood > p5, "the untrained token starts inside the typical region"
    assert result.stop_reason == "max_steps" and result.steps_run == 50 and result.accepted_step == 50
    checked = [(r.step, r.gate.p_yes) for r in result.log if r.gate is not None]
    assert checked == [(25, pytest.approx(0.9)), (50, pytest.approx(0.8))]
    assert judge.questions == ["Is this still a vehicle? Yes or No."] * 2
    assert all(set(r.terms) == {"creative", "anchor"} for r in result.log)
    assert all(set(r.metrics) == {"log_likelihood", "mahalanobis", "anchor_cos"} and r.seconds > 0 for r in result.log)
    result.concept.save(tmp_path / "concept.safetensors")
    concept = Concept.load(tmp_path / "concept.safetensors")
    assert concept.meta["base_prior"] == prior.identity and concept.meta["stop_reason"] == "max_steps"
    assert concept.meta["steps_run"] == 50 and concept.meta["subject"] == "vehicle"
    e = sample_embeddings(prior.with_concept(concept), TEMPLATE.format(token=concept.token), 32, seed=123)
    assert (norm.log_prob(e.double()) < p5).all()
    assert "creative_train" not in " ".join(prior.transformer.peft_config), "training adapter removed"


def test_gate_no_rolls_back_to_last_yes(prior, setup):
    _, norm, terms = setup
    stopped = CreativeOptimizer(prior, norm, "vehicle", terms, _config(),
                                ValidityGate(ScriptedJudge([0.9, 0.1]), every=25), render).run()
    assert stopped.stop_reason == "gate_rejected" and stopped.steps_run == 50 and stopped.accepted_step == 25
    assert stopped.log[-1].gate.passed is False
    at25 = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=25)).run()
    assert torch.allclose(stopped.concept.token_embedding, at25.concept.token_embedding, atol=1e-6)
    for k, v in at25.concept.lora_state.items():
        assert torch.allclose(stopped.concept.lora_state[k], v, atol=1e-6)


def test_first_check_failing_returns_initial_state(prior, setup):
    _, norm, terms = setup
    result = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=10),
                               ValidityGate(ScriptedJudge([0.0]), every=5), render).run()
    assert result.accepted_step == 0 and result.steps_run == 5
    b_mats = [v for k, v in result.concept.lora_state.items() if "lora_B" in k]
    assert b_mats and all(float(v.abs().sum()) == 0.0 for v in b_mats), "LoRA B is zero at the start"


def test_cancel_returns_state_and_leaves_prior_clean(prior, setup):
    _, norm, terms = setup
    before = sample_embeddings(prior, "a photo of a car", 4, seed=2)

    def cancel_at_7(entry):
        if entry.step == 7:
            raise StopOptimisation

    result = CreativeOptimizer(prior, norm, "vehicle", terms, _config()).run(cancel_at_7)
    assert result.stop_reason == "cancelled" and result.steps_run == 7 and len(result.log) == 7
    assert torch.equal(sample_embeddings(prior, "a photo of a car", 4, seed=2), before)
    assert not any(p.requires_grad for p in prior.transformer.parameters())


@pytest.mark.parametrize("seed", [2**50, 2**63 - 1])
def test_every_seed_of_the_widget_runs(prior, setup, seed):
    """The frontend's 'randomize' draws seeds up to 2**50 and the widget allows 2**63 - 1; each step's
    noise seed derived from it must still fit the 64 bits a torch generator takes."""
    _, norm, terms = setup
    result = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=2, seed=seed)).run()
    assert result.steps_run == 2 and result.concept.meta["seed"] == seed


@pytest.mark.parametrize("mode", ["token", "lora"])
def test_train_modes(prior, setup, mode):
    _, norm, terms = setup
    result = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=3, train=mode)).run()
    assert (result.concept.token_embedding is None) == (mode == "lora")
    assert bool(result.concept.lora_state) == (mode == "lora")
    assert result.log[-1].log_likelihood != result.log[0].log_likelihood


def test_negative_cluster_steers_away(prior, setup):
    _, norm, terms = setup
    free = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=30)).run()
    ends = sample_embeddings(prior.with_concept(free.concept), TEMPLATE.format(token=free.concept.token), 64, seed=7)
    cluster = negative_cluster(norm, ends, alpha=1.0, label="ugly")
    steered = CreativeOptimizer(prior, norm, "vehicle", terms + [cluster], _config(steps=30)).run()
    again = sample_embeddings(prior.with_concept(steered.concept), TEMPLATE.format(token=steered.concept.token), 64,
                              seed=7)
    assert cluster.cluster.log_prob(again.double()).mean() < cluster.cluster.log_prob(ends.double()).mean()
    assert "ugly" in steered.log[0].terms


def test_refusals(prior, setup, tiny_prior21_dir):
    from creative_generation.nodes.engine.prior import load_prior

    _, norm, terms = setup
    with pytest.raises(ValueError, match="subject is empty"):
        CreativeOptimizer(prior, norm, " ", terms, _config())
    with pytest.raises(ValueError, match="needs a renderer"):
        CreativeOptimizer(prior, norm, "vehicle", terms, _config(), ValidityGate(ScriptedJudge([])))
    with pytest.raises(ValueError, match="fitted on embeddings of prior"):
        CreativeOptimizer(load_prior(str(tiny_prior21_dir)), norm, "vehicle", terms, _config())
    with pytest.raises(ValueError, match="template must contain"):
        CreativeOptimizer(prior, norm, "vehicle", terms, _config(template="a photo"))


def test_snapshots_for_sweeps(prior, setup):
    _, norm, terms = setup
    result = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=6)).run(snapshot_at=frozenset({0, 3, 6, 9}))
    assert sorted(result.snapshots) == [0, 3, 6, 9]
    assert torch.equal(result.snapshots[6].token_embedding, result.concept.token_embedding)
    assert result.snapshots[9] is result.concept, "steps past the end get the final state"
    assert not torch.equal(result.snapshots[0].token_embedding, result.snapshots[3].token_embedding)
    short = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=3)).run()
    assert torch.allclose(short.concept.token_embedding, result.snapshots[3].token_embedding, atol=1e-6)
    gated = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=6),
                              ValidityGate(ScriptedJudge([0.9, 0.1]), every=2), render).run(snapshot_at=frozenset({3, 6}))
    assert gated.accepted_step == 2 and gated.steps_run == 4
    assert torch.equal(gated.snapshots[3].token_embedding, gated.concept.token_embedding)
    assert gated.snapshots[6] is gated.concept


def test_starts_from_a_given_concept(prior, setup):
    """``start``: token and LoRA begin where a learned concept ended (image variations start from an inversion)."""
    _, norm, terms = setup
    first = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=3, rank=2, alpha=2.0)).run()
    still = _config(steps=1, lr=0.0, weight_decay=0.0, rank=2, alpha=2.0)  # one step that changes nothing
    again = CreativeOptimizer(prior, norm, "vehicle", terms, still, start=first.concept).run()
    assert torch.equal(again.concept.token_embedding, first.concept.token_embedding)
    assert again.concept.lora_state.keys() == first.concept.lora_state.keys()
    assert all(torch.equal(again.concept.lora_state[k], v) for k, v in first.concept.lora_state.items())
    assert any(bool(v.abs().sum() > 0) for k, v in first.concept.lora_state.items() if "lora_B" in k)
    with pytest.raises(ValueError, match="same rank"):
        CreativeOptimizer(prior, norm, "vehicle", terms, _config(rank=4), start=first.concept)


def test_the_rejected_state_is_returned_beside_the_kept_one(prior, setup):
    _, norm, terms = setup
    gated = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=6),
                              ValidityGate(ScriptedJudge([0.9, 0.1]), every=2), render).run()
    assert gated.stop_reason == "gate_rejected" and gated.accepted_step == 2 and gated.steps_run == 4
    assert gated.rejected.meta["stop_reason"] == "gate_rejected" and gated.rejected.meta["steps_run"] == 4
    assert not torch.equal(gated.rejected.token_embedding, gated.concept.token_embedding)
    plain = CreativeOptimizer(prior, norm, "vehicle", terms, _config(steps=4)).run()
    assert plain.rejected is None
    assert torch.allclose(gated.rejected.token_embedding, plain.concept.token_embedding, atol=1e-6)
