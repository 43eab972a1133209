"""Creative optimisation end to end on tiny models, the gate's roll-back, cancel, negative clusters."""

from __future__ import annotations

import pytest
import torch
from cancelling import Cancelled, assert_same_prior, prior_state, training_adapters

from creative_generation.nodes.engine import budget, cancel
from creative_generation.nodes.engine.bank import PAPER_TEMPLATE, sample_bank
from creative_generation.nodes.engine.concept import Concept
from creative_generation.nodes.engine.gate import NEEDS_RENDERER, GateCheck, ValidityGate
from creative_generation.nodes.engine.losses import AnchorTerm, CreativeTerm, negative_cluster
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import (CreativeRun, OptimConfig, StepEvent, StopReason, TrainMode,
                                                        placeholder_for)
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
    norm = GaussianNorm.from_bank(bank, 16)
    anchor = AnchorTerm.from_prior(prior, PAPER_TEMPLATE.format(subject="vehicle"))
    return bank, norm, [CreativeTerm(norm), anchor]


def _config(**kw):
    return OptimConfig(**{"steps": 50, "lr": 1e-3, "seed": 0, "template": TEMPLATE, **kw})


def _run(prior, norm, terms, config, gate=None, *, subject="vehicle", start=None) -> CreativeRun:
    """The run of these parts; a gate judges what the stand-in ``render`` draws."""
    return CreativeRun(prior, norm, subject, tuple(terms), config, None if gate is None else GateCheck(gate, render),
                       start)


def test_end_to_end(prior, setup, tmp_path):
    bank, norm, terms = setup
    judge = ScriptedJudge([0.9, 0.8])
    result = _run(prior, norm, terms, _config(), ValidityGate(judge, every=25)).run()
    bank_ll = norm.log_prob(bank.embeds.double())
    p5 = bank_ll.quantile(0.05)
    assert result.records[0].log_likelihood > p5, "the untrained token starts inside the typical region"
    assert result.stop_reason is StopReason.MAX_STEPS and result.steps_run == 50 and result.accepted_step == 50
    checked = [(r.step, r.gate.p_yes) for r in result.records if r.gate is not None]
    assert checked == [(25, pytest.approx(0.9)), (50, pytest.approx(0.8))]
    assert judge.questions == ["Is this still a vehicle? Yes or No."] * 2
    assert all(set(r.terms) == {"creative", "anchor"} for r in result.records)
    assert all(set(r.metrics) == {"log_likelihood", "mahalanobis", "anchor_cos"} and r.seconds > 0
               for r in result.records)
    result.concept.save(tmp_path / "concept.safetensors")
    concept = Concept.load(tmp_path / "concept.safetensors")
    assert concept.meta["base_prior"] == prior.identity and concept.meta["stop_reason"] == "max_steps"
    assert concept.meta["steps_run"] == 50 and concept.meta["subject"] == "vehicle"
    e = sample_embeddings(prior.with_concept(concept), TEMPLATE.format(token=concept.token), 32, seed=123)
    assert (norm.log_prob(e.double()) < p5).all()
    assert "creative_train" not in " ".join(prior.transformer.peft_config), "training adapter removed"


def test_gate_no_rolls_back_to_last_yes(prior, setup):
    _, norm, terms = setup
    stopped = _run(prior, norm, terms, _config(), ValidityGate(ScriptedJudge([0.9, 0.1]), every=25)).run()
    assert stopped.stop_reason is StopReason.GATE_REJECTED and stopped.steps_run == 50 and stopped.accepted_step == 25
    assert stopped.records[-1].gate.passed is False
    at25 = _run(prior, norm, terms, _config(steps=25)).run()
    assert torch.allclose(stopped.concept.token_embedding, at25.concept.token_embedding, atol=1e-6)
    for k, v in at25.concept.lora_state.items():
        assert torch.allclose(stopped.concept.lora_state[k], v, atol=1e-6)


def test_first_check_failing_returns_initial_state(prior, setup):
    _, norm, terms = setup
    result = _run(prior, norm, terms, _config(steps=10), ValidityGate(ScriptedJudge([0.0]), every=5)).run()
    assert result.accepted_step == 0 and result.steps_run == 5
    b_mats = [v for k, v in result.concept.lora_state.items() if "lora_B" in k]
    assert b_mats and all(float(v.abs().sum()) == 0.0 for v in b_mats), "LoRA B is zero at the start"


def test_cancel_raises_and_leaves_prior_clean(prior, setup, user_cancel):
    """A user's cancel raises from the engine's cancel point before the next step; the training adapter is removed
    and the shared prior is exactly as before (no adapter, no gradients, the same samples)."""
    _, norm, terms = setup
    before = prior_state(prior)
    check = user_cancel(lambda event: event.record.step == 7)
    with pytest.raises(Cancelled):
        _run(prior, norm, terms, _config()).run(check.on_step)
    assert [e.record.step for e in check.events] == list(range(1, 8)) and check.raised == 1
    assert training_adapters(prior) == []
    assert_same_prior(before, prior_state(prior))


@pytest.mark.parametrize("calls", [1, 9])
def test_cancel_inside_a_step_leaves_prior_clean(prior, setup, calls):
    """A cancel point inside a step (a denoising step of the prior, with gradients) raises through the run too;
    ``calls``: the cancel point that raises (1 = before the first step)."""
    
    _, norm, terms = setup
    before, seen = prior_state(prior), []

    def check():
        seen.append(1)
        if len(seen) == calls:
            raise Cancelled

    cancel.set_check(check)
    try:
        with pytest.raises(Cancelled):
            _run(prior, norm, terms, _config(steps=5)).run()
    finally:
        cancel.set_check(None)
    assert len(seen) == calls
    assert_same_prior(before, prior_state(prior))


def test_step_events_place_the_run_in_its_job(prior, setup):
    """``on_step`` hears a StepEvent per step: the record, the stage, and the steps done / total of the whole job."""
    _, norm, terms = setup
    events = []
    result = _run(prior, norm, terms, _config(steps=3)).run(events.append)
    assert all(isinstance(e, StepEvent) for e in events)
    assert [e.record for e in events] == result.records
    assert [(e.stage, e.done, e.total) for e in events] == [("", 1, 3), ("", 2, 3), ("", 3, 3)]
    events.clear()
    _run(prior, norm, terms, _config(steps=2)).run(events.append, stage="trial 2", offset=2, total=6)
    assert [(e.stage, e.done, e.total) for e in events] == [("trial 2", 3, 6), ("trial 2", 4, 6)]


def test_phases_are_announced(prior, setup):
    """``on_phase`` hears training before the steps and, around each gate check, its render and question."""
    _, norm, terms = setup
    phases = []
    _run(prior, norm, terms, _config(steps=4), ValidityGate(ScriptedJudge([0.9, 0.9]), every=2)).run(
        on_phase=phases.append)
    check = [budget.RENDER, budget.JUDGE, budget.TRAINING]
    assert phases == [budget.TRAINING, *check, *check]


@pytest.mark.parametrize("seed", [2**50, 2**63 - 1])
def test_every_seed_of_the_widget_runs(prior, setup, seed):
    """The frontend's 'randomize' draws seeds up to 2**50 and the widget allows 2**63 - 1; each step's
    noise seed derived from it must still fit the 64 bits a torch generator takes."""
    _, norm, terms = setup
    result = _run(prior, norm, terms, _config(steps=2, seed=seed)).run()
    assert result.steps_run == 2 and result.concept.meta["seed"] == seed


@pytest.mark.parametrize("mode", ["token", "lora"])
def test_train_modes(prior, setup, mode):
    _, norm, terms = setup
    result = _run(prior, norm, terms, _config(steps=3, train=mode)).run()
    assert (result.concept.token_embedding is None) == (mode == "lora")
    assert bool(result.concept.lora_state) == (mode == "lora")
    assert result.records[-1].log_likelihood != result.records[0].log_likelihood


def test_negative_cluster_steers_away(prior, setup):
    _, norm, terms = setup
    free = _run(prior, norm, terms, _config(steps=30)).run()
    ends = sample_embeddings(prior.with_concept(free.concept), TEMPLATE.format(token=free.concept.token), 64, seed=7)
    cluster = negative_cluster(norm, ends, alpha=1.0, label="ugly")
    steered = _run(prior, norm, terms + [cluster], _config(steps=30)).run()
    again = sample_embeddings(prior.with_concept(steered.concept), TEMPLATE.format(token=steered.concept.token), 64,
                              seed=7)
    assert cluster.cluster.log_prob(again.double()).mean() < cluster.cluster.log_prob(ends.double()).mean()
    assert "ugly" in steered.records[0].terms


def test_refusals(prior, setup, tiny_prior21_dir):
    from creative_generation.nodes.engine.prior import load_prior

    _, norm, terms = setup
    with pytest.raises(ValueError, match="subject is empty"):
        _run(prior, norm, terms, _config(), subject=" ")
    with pytest.raises(ValueError, match="renderer is not"):
        GateCheck.of(ValidityGate(ScriptedJudge([])), None)
    assert GateCheck.of(None, render) is None
    assert NEEDS_RENDERER.startswith("gate is connected but renderer is not")
    with pytest.raises(ValueError, match="fitted on embeddings of"):
        _run(load_prior(str(tiny_prior21_dir)), norm, terms, _config())
    with pytest.raises(ValueError, match="template must contain"):
        _config(template="a photo")
    with pytest.raises(ValueError, match="train must be one of"):
        _config(train="everything")
    with pytest.raises(ValueError, match="prior_steps must be at least 2"):
        _config(prior_steps=1)
    with pytest.raises(ValueError, match="steps and rank"):
        _config(rank=0)


def test_config_is_a_checked_value():
    """The config is frozen, its train mode an enum (from its saved string too), its LoRA alpha named as such."""
    import dataclasses

    config = _config(train="lora", targets=["to_q"], lora_alpha=3.0)
    assert config.train is TrainMode.LORA and config.train == "lora"
    assert (config.train.lora, config.train.token) == (True, False)
    assert (TrainMode.TOKEN.lora, TrainMode.TOKEN.token, TrainMode.BOTH.lora, TrainMode.BOTH.token) == (
        False, True, True, True)
    assert config.targets == ("to_q",) and config.lora_alpha == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3
    assert placeholder_for("Red car!") == "<creative-red-car>"


def test_snapshots_for_sweeps(prior, setup):
    _, norm, terms = setup
    result = _run(prior, norm, terms, _config(steps=6)).run(snapshot_at=frozenset({0, 3, 6, 9}))
    assert sorted(result.snapshots) == [0, 3, 6, 9]
    assert torch.equal(result.snapshots[6].token_embedding, result.concept.token_embedding)
    assert result.snapshots[9] is result.concept, "steps past the end get the final state"
    assert not torch.equal(result.snapshots[0].token_embedding, result.snapshots[3].token_embedding)
    short = _run(prior, norm, terms, _config(steps=3)).run()
    assert torch.allclose(short.concept.token_embedding, result.snapshots[3].token_embedding, atol=1e-6)
    gated = _run(prior, norm, terms, _config(steps=6), ValidityGate(ScriptedJudge([0.9, 0.1]), every=2)).run(
        snapshot_at=frozenset({3, 6}))
    assert gated.accepted_step == 2 and gated.steps_run == 4
    assert torch.equal(gated.snapshots[3].token_embedding, gated.concept.token_embedding)
    assert gated.snapshots[6] is gated.concept


def test_starts_from_a_given_concept(prior, setup):
    """``start``: token and LoRA begin where a learned concept ended (image variations start from an inversion)."""
    _, norm, terms = setup
    first = _run(prior, norm, terms, _config(steps=3, rank=2, lora_alpha=2.0)).run()
    still = _config(steps=1, lr=0.0, weight_decay=0.0, rank=2, lora_alpha=2.0)  # one step that changes nothing
    again = _run(prior, norm, terms, still, start=first.concept).run()
    assert torch.equal(again.concept.token_embedding, first.concept.token_embedding)
    assert again.concept.lora_state.keys() == first.concept.lora_state.keys()
    assert all(torch.equal(again.concept.lora_state[k], v) for k, v in first.concept.lora_state.items())
    assert any(bool(v.abs().sum() > 0) for k, v in first.concept.lora_state.items() if "lora_B" in k)
    with pytest.raises(ValueError, match="same rank"):
        _run(prior, norm, terms, _config(rank=4), start=first.concept)


def test_the_rejected_state_is_returned_beside_the_kept_one(prior, setup):
    _, norm, terms = setup
    gated = _run(prior, norm, terms, _config(steps=6), ValidityGate(ScriptedJudge([0.9, 0.1]), every=2)).run()
    assert gated.stop_reason is StopReason.GATE_REJECTED and gated.accepted_step == 2 and gated.steps_run == 4
    assert gated.rejected.meta["stop_reason"] == "gate_rejected" and gated.rejected.meta["steps_run"] == 4
    assert not torch.equal(gated.rejected.token_embedding, gated.concept.token_embedding)
    plain = _run(prior, norm, terms, _config(steps=4)).run()
    assert plain.rejected is None
    assert torch.allclose(gated.rejected.token_embedding, plain.concept.token_embedding, atol=1e-6)


def test_rollback_policy_returns_to_the_last_yes_halves_the_step_and_goes_on(prior, setup):
    """RejectPolicy.ROLLBACK: a "no" at step 4 restores step 2's state and the run continues at half the learning
    rate; step 5 then equals one step at lr/2 from step 2's state. The last "no" after ``rollbacks`` stops it."""
    _, norm, terms = setup
    judge = ScriptedJudge([0.9, 0.1, 0.9])
    rolled = _run(prior, norm, terms, _config(steps=6, on_reject="rollback"), ValidityGate(judge, every=2)).run()
    assert rolled.stop_reason is StopReason.MAX_STEPS and rolled.steps_run == 6 and rolled.accepted_step == 6
    assert [r.gate.passed for r in rolled.records if r.gate] == [True, False, True] and rolled.rejected is None
    at2 = _run(prior, norm, terms, _config(steps=2)).run()
    # from step 2's state, a fresh AdamW at lr/2 takes steps 5 and 6 (their noise seeds are the step numbers)
    resumed = _run(prior, norm, terms, _config(steps=6, lr=_config().lr / 2), start=at2.concept)
    again = _Loop_steps(resumed, first_step=5, steps=2)
    assert torch.allclose(rolled.concept.token_embedding, again.token_embedding, atol=1e-6)
    stopped = _run(prior, norm, terms, _config(steps=6, on_reject="rollback", rollbacks=1),
                   ValidityGate(ScriptedJudge([0.9, 0.1, 0.1]), every=2)).run()
    assert stopped.stop_reason is StopReason.GATE_REJECTED and stopped.accepted_step == 2 and stopped.steps_run == 6
    with pytest.raises(ValueError, match="on_reject"):
        _config(on_reject="retry")


def _Loop_steps(run: CreativeRun, *, first_step: int, steps: int) -> Concept:
    """``steps`` AdamW steps of ``run`` from its start, with the noise seeds of steps ``first_step``... of a run."""
    from creative_generation.nodes.engine.losses import objective
    from creative_generation.nodes.engine.optimizer import step_seed

    training = run.generator.open_training(run)
    try:
        opt = torch.optim.AdamW(training.params, lr=run.config.lr, weight_decay=run.config.weight_decay)
        for step in range(first_step, first_step + steps):
            loss, _ = objective(run.terms, training.embed(step_seed(run.config.seed, step)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return training.learned(training.snapshot(), {})
    finally:
        training.close()


def test_several_noise_samples_per_step(prior, setup):
    """``samples``: each step's loss is the mean over that many noise draws of the step's seed, the gate judges all their renders, and the memory estimate counts the batch."""
    _, norm, terms = setup
    judge = ScriptedJudge([0.9])
    judged = []
    counting = lambda images, question: judged.append(len(images)) or judge.p_yes(images, question)
    run = _run(prior, norm, terms, _config(steps=2, samples=3), ValidityGate(type("J", (), {"p_yes": staticmethod(
        counting)})(), every=2))
    training = run.generator.open_training(run)
    try:
        e = training.embed(7)
        assert e.shape == (3, norm.embed_dim) and not torch.allclose(e[0], e[1])
        assert torch.equal(e, training.embed(7))
    finally:
        training.close()
    result = run.run()
    assert result.steps_run == 2 and judged == [3]
    single = run.with_(config=_config(steps=2), check=None).memory_estimate(on_gpu=True)
    triple = run.with_(check=None).memory_estimate(on_gpu=True)
    assert triple.peak() > single.peak()
    with pytest.raises(ValueError, match="samples"):
        _config(samples=0)
