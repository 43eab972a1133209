"""The optimiser's fast path against a plain eager loop written here.

The optimiser leaves each step's numbers on the device and reads them in batches, encodes the prompt once when the
token is frozen, and uses the multi-tensor (or fused) AdamW. None of that may change a result: the loop below does
every step the plain way (the prompt tokenised and encoded each step, every number read with ``float`` at once, the
default single-tensor AdamW, its own LoRA adapter) and the real optimiser must match it step for step, across a gate
check that says "no" and rolls back, to float tolerance.
"""

from __future__ import annotations

import pytest
import torch

from creative_generation.nodes.engine import optimizer
from creative_generation.nodes.engine.bank import PAPER_TEMPLATE, sample_bank
from creative_generation.nodes.engine.concept import Concept, activate_concept, add_lora, lora_state
from creative_generation.nodes.engine.gate import GateCheck, ValidityGate
from creative_generation.nodes.engine.losses import AnchorTerm, CreativeTerm
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig, step_seed
from creative_generation.nodes.engine.prior_training import PriorTraining, subject_embedding
from creative_generation.nodes.engine.sampling import build_prefix, denoise, initial_latents

TEMPLATE = "a photo of a {token}"
EVERY, STEPS, ANSWERS = 3, 8, (0.9, 0.1, 0.9)  # yes at 3, no at 6 (rolled back, lr halved), yes at 8
RTOL, ATOL = 1e-5, 1e-6


class Judge:
    """Answers a fixed script of P(yes), one per question."""

    def __init__(self, answers):
        self.answers = list(answers)

    def p_yes(self, images, question):
        return torch.full((images.shape[0],), self.answers.pop(0))


def render(e: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(e[:, :24].reshape(-1, 2, 4, 3) * 10)


@pytest.fixture(scope="module")
def parts(prior, one_thread):
    bank = sample_bank(prior, PAPER_TEMPLATE.format(subject="vehicle"), 128, batch_size=64, seed=0)
    norm = GaussianNorm.from_bank(bank, 8)
    anchor = AnchorTerm.from_prior(prior, PAPER_TEMPLATE.format(subject="vehicle"), weight=0.5)
    # the ceiling halfway down the log-likelihood an uncapped run travels (torch / diffusers versions move the
    # tiny prior's values), so the capped term pushes in the first steps and rests at 0 later
    lls = [r.log_likelihood for r in make_run(prior, (norm, (CreativeTerm(norm), anchor)), "both").run().records]
    ceiling = (lls[0] + min(lls)) / 2
    return norm, (CreativeTerm(norm), anchor, CreativeTerm(norm, 0.3, "bounded", ceiling=ceiling))


def make_run(prior, parts, train: str) -> CreativeRun:
    norm, terms = parts
    config = OptimConfig(steps=STEPS, lr=3e-3, seed=4, template=TEMPLATE, train=train, samples=2,
                         on_reject="rollback")
    return CreativeRun(prior, norm, "vehicle", terms, config, GateCheck(ValidityGate(Judge(ANSWERS), every=EVERY),
                                                                        render))


def eager(run: CreativeRun) -> dict:
    """The run the plain way: per step the prompt tokenised and encoded, the prior's steps, the terms, a
    single-tensor AdamW step, every number read at once; the gate every ``EVERY`` steps with rollback."""
    prior, config, norm = run.generator, run.config, run.norm
    tf, name, judge = prior.transformer, "reference_train", Judge(ANSWERS)
    activate_concept(tf, None)
    vector = torch.nn.Parameter(subject_embedding(prior, run.subject)) if config.train.token else None
    if config.train.lora:
        add_lora(tf, name, config.rank, config.lora_alpha, config.targets, config.seed)
        tf.set_adapter(name)
        tf.enable_adapters()
    lora = [p for n, p in tf.named_parameters() if name in n]
    for p in lora:
        p.requires_grad_(True)
    params = ([vector] if vector is not None else []) + lora
    view = prior.with_concept(Concept(run.token, vector) if vector is not None else None)

    def embed(seed: int) -> torch.Tensor:
        g = torch.Generator("cpu").manual_seed(seed)
        emb = view.encode_prompt([config.negative_prompt, run.prompt])
        return denoise(view, build_prefix(tf, emb), initial_latents(view, config.samples, g), config.prior_steps,
                       config.guidance, g).float()

    def snapshot():
        return (None if vector is None else vector.detach().clone(), lora_state(tf, name) if lora else {})

    def restore(state):
        from peft import set_peft_model_state_dict

        with torch.no_grad():
            if vector is not None:
                vector.copy_(state[0])
            if state[1]:
                set_peft_model_state_dict(tf, state[1], adapter_name=name)

    try:
        lr = config.lr
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, foreach=False)
        good, records, path = snapshot(), [], []
        for step in range(1, config.steps + 1):
            e = embed(step_seed(config.seed, step))
            values = [term(e) for term in run.terms]
            loss = sum(term.weight * v.double() for term, v in zip(run.terms, values))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                record = {"step": step, "loss": float(loss),
                          "terms": {t.name: float(v) for t, v in zip(run.terms, values)},
                          "metrics": {"log_likelihood": float(norm.log_prob(e.double()).mean()),
                                      "mahalanobis": float(norm.mahalanobis(e.double()).mean()),
                                      "anchor_cos": float(run.terms[1].cosine(e).mean())}}
            path.append(e.detach()[0].clone())
            if step % EVERY == 0 or step == config.steps:
                with torch.no_grad():
                    p = float(judge.p_yes(render(embed(config.seed)), "").mean())
                record["gate"] = p
                if p >= 0.5:
                    good = snapshot()
                else:
                    restore(good)
                    lr /= 2
                    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, foreach=False)
            records.append(record)
        return {"records": records, "path": path, "vector": good[0], "lora": good[1]}
    finally:
        if name in (getattr(tf, "peft_config", None) or {}):
            tf.delete_adapters(name)
        tf.requires_grad_(False)


def as_plain(result: optimizer.OptimResult) -> dict:
    records = [{"step": r.step, "loss": r.loss, "terms": r.terms, "metrics": r.metrics,
                **({"gate": r.gate.p_yes} if r.gate is not None else {})} for r in result.records]
    return {"records": records, "path": result.path, "vector": result.concept.token_embedding,
            "lora": result.concept.lora_state}


def assert_same(ours: dict, ref: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert len(ours["records"]) == len(ref["records"]) == STEPS
    for a, b in zip(ours["records"], ref["records"]):
        assert a.keys() == b.keys() and a["terms"].keys() == b["terms"].keys(), (a, b)
        assert a["metrics"].keys() == b["metrics"].keys()
        assert a["step"] == b["step"] and a.get("gate") == b.get("gate")
        got = [a["loss"], *a["terms"].values(), *a["metrics"].values()]
        want = [b["loss"], *b["terms"].values(), *b["metrics"].values()]
        assert got == pytest.approx(want, rel=rtol, abs=atol), f"step {a['step']}"
    torch.testing.assert_close(torch.stack(ours["path"]), torch.stack(ref["path"]), rtol=rtol, atol=atol)
    if ref["vector"] is None:
        assert ours["vector"] is None
    else:
        torch.testing.assert_close(ours["vector"], ref["vector"], rtol=rtol, atol=atol)
    assert ours["lora"].keys() == ref["lora"].keys() and ref["lora"]
    for key in ref["lora"]:
        torch.testing.assert_close(ours["lora"][key], ref["lora"][key], rtol=rtol, atol=atol)


@pytest.mark.parametrize("train", ["both", "lora"])
def test_the_optimiser_matches_the_eager_loop(prior, parts, train):
    """Token + LoRA and LoRA only (text encoder run once), with and without a step callback (records read after
    every step, or only at the gate checks and the end): the same records, path and learned weights as the plain
    loop, and the callback hears every step in order."""
    run = make_run(prior, parts, train)
    ref = eager(run)
    events = []
    heard = as_plain(make_run(prior, parts, train).run(events.append, stage="s", total=STEPS))
    quiet = as_plain(make_run(prior, parts, train).run())
    assert [(e.record.step, e.done, e.stage) for e in events] == [(s, s, "s") for s in range(1, STEPS + 1)]
    assert [e.record.loss for e in events] == [r["loss"] for r in heard["records"]]
    assert_same(heard, ref)
    assert_same(quiet, ref)
    bounded = [r["terms"]["bounded"] for r in ref["records"]]
    assert 0.0 in bounded and max(bounded) > 0.0, "the ceiling term should be both active and at rest in this run"
    assert ref["records"][5]["gate"] < 0.5


def test_the_comparison_catches_a_stale_text_encoding(prior, parts, monkeypatch):
    """The check above has teeth: an optimiser that reused the first step's text encoding while the token is
    trained (the token then gets no gradient) is told apart from the eager loop."""
    ref = eager(make_run(prior, parts, "both"))

    def stale(self):
        if not hasattr(self, "stale"):
            with torch.no_grad():
                self.stale = self.view.encode_tokens(self.tokens)
        return self.stale

    monkeypatch.setattr(PriorTraining, "prompt_embeds", stale)
    wrong = as_plain(make_run(prior, parts, "both").run())
    with pytest.raises(AssertionError):
        assert_same(wrong, ref)


def test_fused_adamw_matches_and_its_absence_is_a_note(prior, parts, monkeypatch):
    """Where the fused AdamW is asked for (CUDA; forced here on the CPU) it gives the eager loop's results; where it
    is missing the run falls back to the multi-tensor AdamW and says why in its log, never an error."""
    ref = eager(make_run(prior, parts, "both"))
    monkeypatch.setattr(optimizer, "fused_wanted", lambda params: True)
    fused = make_run(prior, parts, "both").run()
    assert fused.log.notes == []
    assert_same(as_plain(fused), ref, rtol=1e-4, atol=1e-5)  # the fused kernel rounds differently (1.5e-6 seen)

    real = torch.optim.AdamW

    def no_fused(params, *args, fused=None, **kw):
        if fused:
            raise RuntimeError("no fused kernel in this build")
        return real(params, *args, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    fallen = make_run(prior, parts, "both").run()
    assert len(fallen.log.notes) == 1 and "no fused kernel in this build" in fallen.log.notes[0]
    assert fallen.log.to_json()["notes"] == fallen.log.notes
    assert_same(as_plain(fallen), ref)
