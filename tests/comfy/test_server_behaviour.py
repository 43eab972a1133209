"""How the pack behaves in a real ComfyUI server, seen through its HTTP + websocket API.

* Progress: the sampler and the optimiser send websocket ``progress`` messages and binary
  progress-text frames (step, losses, the gate's P(yes)).
* Interrupt: ``POST /interrupt`` during a long optimisation stops it within about one step
  (``execution_interrupted``), and the next prompt runs normally.
* Cache: an identical prompt is served from the cache (``execution_cached`` lists every node,
  none executes); a changed seed re-executes exactly the nodes downstream of it.
* Bad input comes back through the API with our message: ``node_errors`` (HTTP 400) for what
  ``validate_inputs`` refuses, ``execution_error`` for what only running can tell.
* A concept saved by ``CreativeSaveConcept`` loads in a *new* server process over the same
  model and output folders and samples the same embeddings for the same seed.

Models are tiny (32-d priors, ``example_models.TEST_MODELS``); graphs are API-format prompts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import comfy_harness
from conftest import SUPPORT_PACK, SUPPORT_PACK_DIR_NAME

PAPER_PROMPT = "Professional high-quality photo of a vehicle. photorealistic, 4k, HQ."
QUESTION = "Is this still a {subject}? Yes or No."


@pytest.fixture(scope="module")
def models(comfy_server, tiny_models):
    names = ("tiny-prior-a", "tiny-prior-b", "tiny-k22-decoder", "tiny-llava-next", "not-a-prior",
             "tiny-text-only-llama")
    return {name: tiny_models.install(comfy_server, name) for name in names}


class Graph:
    """An API-format prompt built node by node: ``g.add(class_type, **inputs) -> node id``;
    ``g.out(node, slot)`` is a link."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    @staticmethod
    def out(node: str, slot: int = 0) -> list:
        return [node, slot]

    def descendants(self, node: str) -> set[str]:
        found, frontier = {node}, [node]
        while frontier:
            cur = frontier.pop()
            for nid, n in self.nodes.items():
                if nid not in found and any(isinstance(v, list) and v[0] == cur for v in n["inputs"].values()):
                    found.add(nid)
                    frontier.append(nid)
        return found


def pipeline(prior="tiny-prior-a", *, count=32, bank_seed=0, pca=4, steps=3, opt_seed=0, gate=True, subject="vehicle",
             prompt=PAPER_PROMPT) -> tuple[Graph, dict[str, str]]:
    """Load -> sample -> fit -> anchor (+ gate + renderer) -> optimise -> loss plot + saved concept."""
    g, o = Graph(), Graph.out
    ids = {}
    ids["prior"] = g.add("CreativeLoadPrior", prior=prior, dtype="auto", allow_download=False, hf_repo_id="")
    ids["sampler"] = g.add("CreativePriorSampler", prior=o(ids["prior"]), prompt=prompt, count=count, batch_size=16,
                           steps=2, guidance=4.0, seed=bank_seed, negative_prompt="")
    ids["norm"] = g.add("CreativeNormGaussianFit", embeds=o(ids["sampler"]), pca_dims=pca)
    ids["anchor"] = g.add("CreativeAnchorLoss", prior=o(ids["prior"]), text="a photo of a vehicle", weight=1.0)
    extra = {}
    if gate:
        ids["mllm"] = g.add("CreativeLoadMLLM", model="tiny-llava-next", dtype="auto", trust_remote_code=False,
                            allow_download=False, hf_repo_id="", vision_check=False)
        ids["gate"] = g.add("CreativeMLLMValidityGate", mllm=o(ids["mllm"]), subject="", question=QUESTION,
                            check_every=1, threshold=0.0)
        ids["decoder"] = g.add("CreativeLoadDecoder", decoder="tiny-k22-decoder", dtype="auto", allow_download=False,
                               hf_repo_id="")
        ids["renderer"] = g.add("CreativeDecoderRenderer", decoder=o(ids["decoder"]), steps=1, guidance=4.0, width=32,
                                height=32, seed=0, prior=o(ids["prior"]))
        extra = {"gate": o(ids["gate"]), "renderer": o(ids["renderer"])}
    ids["optimizer"] = g.add("CreativeLoRAOptimizer", prior=o(ids["prior"]), norm=o(ids["norm"]), subject=subject,
                             steps=steps, learning_rate=1e-3, lora_rank=2, train="token + LoRA", seed=opt_seed,
                             prompt_template="a photo of a {token}", creative_weight=1.0, guidance=4.0, prior_steps=2,
                             loss_terms=o(ids["anchor"]), **extra)
    ids["plot"] = g.add("PreviewImage", images=o(ids["optimizer"], 5))
    return g, ids


def _run(server, g: Graph, timeout: float = 180):
    res = server.run(g.nodes, timeout=timeout)
    return res


def _ok(server, res):
    assert res.status == "success", f"{res}\n{server.log_tail(40)}"
    return res


def _error(server, g: Graph, node: str, *fragments: str):
    """Queue ``g``; it must fail at run time in ``node`` with a message holding ``fragments``."""
    res = _run(server, g)
    assert res.status == "error", f"{res}\n{server.log_tail(20)}"
    err = res.error
    assert err["node_id"] == node, err
    for fragment in fragments:
        assert fragment in err["exception_message"], err["exception_message"]
    return err


def _rejected(server, g: Graph, node: str, *fragments: str):
    """``POST /prompt`` must answer 400 with ``node_errors[node]`` holding ``fragments``."""
    body = server.post_prompt(g.nodes)
    assert isinstance(body, dict), f"prompt was accepted: {body}"
    errors = body["node_errors"].get(node, {}).get("errors", [])
    text = " ".join(f"{e.get('message')} {e.get('details')}" for e in errors)
    assert errors and all(f in text for f in fragments), body
    return errors


# --------------------------------------------------------------------------- progress


def test_sampler_and_optimiser_report_progress(comfy_server, models):
    g, ids = pipeline(steps=3, bank_seed=11)
    res = _ok(comfy_server, _run(comfy_server, g))
    sampler = [(p["value"], p["max"]) for p in res.progress if p["node"] == ids["sampler"]]
    assert sampler and sampler[-1] == (32, 32) and all(m == 32 for _, m in sampler), sampler
    optimiser = [(p["value"], p["max"]) for p in res.progress if p["node"] == ids["optimizer"]]
    assert optimiser == [(1, 3), (2, 3), (3, 3)], optimiser
    texts = [t for n, t in res.progress_text if n == ids["optimizer"]]
    steps = [t for t in texts if t.startswith("step ")]
    assert len(steps) == 3, texts
    for i, t in enumerate(steps, 1):
        assert t.startswith(f"step {i},") and "loss " in t and "log p " in t and "anchor cos " in t, t
        assert "gate P(yes) " in t, t  # check_every=1: the gate judged every step
    assert any(t.startswith("stopped: ") for t in texts), texts
    assert any("sampled 32/32" in t for n, t in res.progress_text if n == ids["sampler"]), res.progress_text


# --------------------------------------------------------------------------- interrupt


def test_interrupt_stops_the_optimiser_within_a_step(comfy_server, models):
    g, ids = pipeline(steps=100_000, gate=False, opt_seed=5)
    pid = comfy_server.post_prompt(g.nodes)
    assert isinstance(pid, str), pid
    opt = ids["optimizer"]

    def opt_progress():
        return [m for m in comfy_server.messages(pid) if m["type"] == "progress" and m["data"]["node"] == opt]

    deadline = time.monotonic() + 120
    while len(opt_progress()) < 3:  # a few steps in, so a step's duration is known
        assert time.monotonic() < deadline, comfy_server.log_tail(30)
        assert not any(m["type"] in comfy_harness.TERMINAL_EVENTS for m in comfy_server.messages(pid))
        time.sleep(0.05)
    seen = opt_progress()
    step_seconds = (seen[-1]["t"] - seen[0]["t"]) / (len(seen) - 1)
    sent = time.monotonic()
    comfy_server.interrupt()
    res = comfy_server.wait(pid, timeout=60)
    assert res.status == "interrupted", f"{res}\n{comfy_server.log_tail(30)}"
    stopped = next(m for m in res.messages if m["type"] == "execution_interrupted")
    assert stopped["data"]["node_id"] == opt, stopped
    after = [m for m in opt_progress() if m["t"] > sent]
    assert len(after) <= 2, f"{len(after)} more steps after the interrupt"  # the step under way, at most one more
    assert stopped["t"] - sent < max(3.0, 3 * step_seconds), (stopped["t"] - sent, step_seconds)
    # The server is healthy: the next prompt runs to the end.
    g2, _ = pipeline(steps=2, gate=False, opt_seed=6)
    _ok(comfy_server, _run(comfy_server, g2))


# --------------------------------------------------------------------------- cache


def test_identical_prompt_is_cached_and_a_seed_change_reruns_only_downstream(comfy_server, models):
    g, ids = pipeline(steps=2, bank_seed=21, opt_seed=21, gate=False)
    g.add("CreativeSaveConcept", concept=Graph.out(ids["optimizer"], 1), filename_prefix="cache-check")
    first = _ok(comfy_server, _run(comfy_server, g))
    assert set(first.executed_nodes) | set(first.cached_nodes) == set(g.nodes)
    again = _ok(comfy_server, _run(comfy_server, g))
    assert again.executed_nodes == [], again.executed_nodes
    assert set(again.cached_nodes) == set(g.nodes), again.cached_nodes
    # A new seed for the sampler: it and everything fed by it run; the rest comes from the cache.
    g.nodes[ids["sampler"]]["inputs"]["seed"] = 22
    changed = _ok(comfy_server, _run(comfy_server, g))
    downstream = g.descendants(ids["sampler"])
    assert set(changed.executed_nodes) == downstream, (sorted(changed.executed_nodes), sorted(downstream))
    assert set(changed.cached_nodes) == set(g.nodes) - downstream, changed.cached_nodes
    # A new seed for the optimiser only: the bank and the norm stay cached.
    g.nodes[ids["optimizer"]]["inputs"]["seed"] = 23
    changed = _ok(comfy_server, _run(comfy_server, g))
    assert set(changed.executed_nodes) == g.descendants(ids["optimizer"]), changed.executed_nodes


# --------------------------------------------------------------------------- bad input


def test_validation_errors_come_back_as_node_errors(comfy_server, models):
    g, ids = pipeline(gate=False, subject="  ")
    _rejected(comfy_server, g, ids["optimizer"], "subject is empty")
    g, ids = pipeline(gate=False, prompt="")
    _rejected(comfy_server, g, ids["sampler"], "prompt is empty")
    g, ids = pipeline(gate=False, prior="no-such-prior")
    _rejected(comfy_server, g, ids["prior"], "No prior 'no-such-prior'", "models/diffusers")
    g, ids = pipeline(gate=False)
    g.nodes[ids["sampler"]]["inputs"]["steps"] = 1
    _rejected(comfy_server, g, ids["sampler"], "steps is 1, below its minimum 2")


def test_pca_dims_not_below_bank_size(comfy_server, models):
    g, ids = pipeline(gate=False, count=8, pca=8, bank_seed=31)
    _error(comfy_server, g, ids["norm"], "PCA dims (8) must be smaller than the bank size (8)")


def test_embeddings_of_another_prior_than_the_norm(comfy_server, models):
    g, ids = pipeline(gate=False, steps=1)
    o = Graph.out
    other = g.add("CreativeLoadPrior", prior="tiny-prior-b", dtype="auto", allow_download=False, hf_repo_id="")
    bank_b = g.add("CreativePriorSampler", prior=o(other), prompt=PAPER_PROMPT, count=8, batch_size=8, steps=2,
                   guidance=4.0, seed=0, negative_prompt="")
    neg = g.add("CreativeNegativeCluster", norm=o(ids["norm"]), alpha=1.0, label="other prior", embeds=o(bank_b),
                loss_terms=o(ids["anchor"]))
    g.nodes[ids["optimizer"]]["inputs"]["loss_terms"] = o(neg)
    _error(comfy_server, g, neg, "embeds come from prior", "use embeddings of the same prior")


def test_a_folder_that_is_not_a_prior(comfy_server, models):
    g, ids = pipeline(gate=False, prior="not-a-prior")
    _error(comfy_server, g, ids["prior"], "not a complete diffusion prior", "prior/diffusion_pytorch_model.safetensors")


def test_a_text_only_llm_is_refused_as_gate(comfy_server, models):
    g, ids = pipeline(gate=True)
    g.nodes[ids["mllm"]]["inputs"]["model"] = "tiny-text-only-llama"
    _error(comfy_server, g, ids["mllm"], "cannot see images")


def test_a_concept_on_another_base_prior(comfy_server, models):
    g, ids = pipeline(gate=False, steps=1)
    o = Graph.out
    other = g.add("CreativeLoadPrior", prior="tiny-prior-b", dtype="auto", allow_download=False, hf_repo_id="")
    apply = g.add("CreativeApplyConcept", prior=o(other), concept=o(ids["optimizer"], 1))
    bank = g.add("CreativePriorSampler", prior=o(apply), prompt="a photo of a <creative-vehicle>", count=2,
                 batch_size=2, steps=2, guidance=4.0, seed=0, negative_prompt="")
    g.add("CreativeSaveEmbeds", embeds=o(bank), filename_prefix="never")
    _error(comfy_server, g, apply, "This concept was trained on prior", "Load the prior it was trained on")


# --------------------------------------------------------------------------- a concept in a new process


def _saved_name(res, node: str) -> str:
    text = " ".join(res.outputs[node]["text"])
    return text.split("saved ", 1)[1].split(" in ", 1)[0]


def test_saved_concept_loads_in_a_new_server_and_samples_the_same(comfy_server, models, tmp_path):
    from creative_generation.nodes.engine.bank import EmbeddingBank

    o = Graph.out
    g, ids = pipeline(gate=False, steps=2, opt_seed=41, bank_seed=41)
    save_c = g.add("CreativeSaveConcept", concept=o(ids["optimizer"], 1), filename_prefix="reload-check")
    sample = dict(prompt="a photo of a <creative-vehicle>", count=4, batch_size=4, steps=2, guidance=4.0, seed=7,
                  negative_prompt="")
    bank = g.add("CreativePriorSampler", prior=o(ids["optimizer"]), **sample)
    save_e = g.add("CreativeSaveEmbeds", embeds=o(bank), filename_prefix="reload-first")
    first = _ok(comfy_server, _run(comfy_server, g))
    concept_file = _saved_name(first, save_c)
    first_bank = Path(comfy_server.output_dir) / "creative" / "embeds" / _saved_name(first, save_e)

    second = comfy_harness.ComfyServer(tmp_path / "second_server", share_from=comfy_server,
                                       extra_packs={SUPPORT_PACK_DIR_NAME: SUPPORT_PACK})
    try:
        second.start()
        h = Graph()
        prior = h.add("CreativeLoadPrior", prior="tiny-prior-a", dtype="auto", allow_download=False, hf_repo_id="")
        concept = h.add("CreativeLoadConcept", file=concept_file)
        applied = h.add("CreativeApplyConcept", prior=o(prior), concept=o(concept))
        bank2 = h.add("CreativePriorSampler", prior=o(applied), **sample)
        save2 = h.add("CreativeSaveEmbeds", embeds=o(bank2), filename_prefix="reload-second")
        res = second.run(h.nodes, timeout=120)
        assert res.status == "success", f"{res}\n{second.log_tail(40)}"
        assert second.proc.pid != comfy_server.proc.pid
        second_bank = Path(second.output_dir) / "creative" / "embeds" / _saved_name(res, save2)
    finally:
        second.stop()
    a, b = EmbeddingBank.load(first_bank), EmbeddingBank.load(second_bank)
    assert a.embeds.shape == b.embeds.shape == (4, 32)
    assert (a.embeds - b.embeds).abs().max() < 1e-5, (a.embeds - b.embeds).abs().max()
