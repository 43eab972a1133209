"""Fast checks of the pack's nodes with ComfyUI imported in this process (no server).

* Schemas: ids prefixed ``Creative``, categories under ``creative``, every input has a tooltip,
  the paper's numbers are the defaults (5,000 samples in batches of 500, 5 prior steps, 50 PCA
  dims, LoRA rank 10, lr 1e-4, a gate check every 25 steps), seeds have
  ``control_after_generate``.
* Execution, as ComfyUI's executor calls a V3 node (a locked class clone with the hidden
  ``unique_id``, under ``torch.inference_mode()``): the whole chain on tiny 32-d models, its
  progress reports, and the input checks' messages.
* Cancel: with ComfyUI's interrupt flag set, the optimiser raises
  ``InterruptProcessingException`` at its first progress point and leaves no training adapter
  (``creative_train_*``) on the shared prior.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import comfy_harness
import pytest
import torch

from creative_generation.nodes.engine.steplog import RunLog

PAPER_DEFAULTS = {
    ("CreativePriorSampler", "count"): 5000,
    ("CreativePriorSampler", "batch_size"): 500,
    ("CreativePriorSampler", "steps"): 5,
    ("CreativePriorSampler", "prompt"): "Professional high-quality photo of a vehicle. photorealistic, 4k, HQ.",
    ("CreativeNormGaussianFit", "pca_dims"): 50,
    ("CreativeLoRAOptimizer", "lora_rank"): 10,
    ("CreativeLoRAOptimizer", "learning_rate"): 1e-4,
    ("CreativeLoRAOptimizer", "train"): "token + LoRA",
    ("CreativeLoRAOptimizer", "prior_steps"): 5,
    ("CreativeLoRAOptimizer", "prompt_template"): "a photo of a {token}",
    ("CreativeMLLMValidityGate", "check_every"): 25,
    ("CreativeMLLMValidityGate", "question"): "Is this still a {subject}? Yes or No.",
    ("CreativeAnchorLoss", "weight"): 1.0,
}
MISSION_NODES = ("CreativePriorSampler", "CreativeNormGaussianFit", "CreativeLoRAOptimizer", "CreativeAnchorLoss",
                 "CreativeMLLMValidityGate", "CreativeNegativeCluster")


def _inputs(cls) -> dict:
    info = cls.GET_NODE_INFO_V1()
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


# --------------------------------------------------------------------------- schemas


def test_the_six_mission_nodes_exist(pack_nodes):
    assert set(MISSION_NODES) <= set(pack_nodes)


def test_ids_and_categories(pack_nodes):
    for node_id, cls in pack_nodes.items():
        schema = cls.GET_SCHEMA()
        assert node_id.startswith("Creative"), node_id
        assert schema.category == "creative" or schema.category.startswith("creative/"), (node_id, schema.category)
        assert schema.description or node_id in ("CreativeLoadEmbeds", "CreativeLoadConcept"), node_id


def test_every_input_has_a_tooltip(pack_nodes):
    missing = {node_id: [name for name, spec in _inputs(cls).items()
                         if not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip"))]
               for node_id, cls in pack_nodes.items()}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"inputs without a tooltip: {missing}"


def test_defaults_are_the_papers_numbers(pack_nodes):
    got = {key: _inputs(pack_nodes[key[0]])[key[1]][1].get("default") for key in PAPER_DEFAULTS}
    assert got == PAPER_DEFAULTS


def test_seeds_have_control_after_generate(pack_nodes):
    for node_id in ("CreativePriorSampler", "CreativeLoRAOptimizer"):
        assert _inputs(pack_nodes[node_id])["seed"][1].get("control_after_generate") is True, node_id


def test_prior_steps_start_at_two(pack_nodes):
    """diffusers' UnCLIPScheduler divides by (steps - 1): one step would crash mid-run."""
    assert _inputs(pack_nodes["CreativePriorSampler"])["steps"][1]["min"] == 2
    assert _inputs(pack_nodes["CreativeLoRAOptimizer"])["prior_steps"][1]["min"] == 2


# --------------------------------------------------------------------------- execution


@pytest.fixture(scope="module")
def models(comfy_inprocess, tmp_path_factory):
    """Tiny 32-d prior (two, with different weights), Kandinsky 2.2 decoder and LLaVA-NeXT,
    registered in this process's ComfyUI model folders."""
    return comfy_harness.register_tiny_models(comfy_inprocess.folder_paths, tmp_path_factory.mktemp("inprocess_models"),
                                              {"prior-a": 0, "prior-b": 1}, "decoder", "llava")


@pytest.fixture(scope="module")
def chain(models, pack_nodes, comfy_inprocess):
    """Loaded models, a bank and a norm (shared by the execution tests)."""

    def call(node_id, **inputs):
        return comfy_harness.execute_node(pack_nodes[node_id], "chain", **inputs)

    prior, = call("CreativeLoadPrior", prior="prior-a", dtype="auto")
    decoder, = call("CreativeLoadDecoder", decoder="decoder", dtype="auto")
    mllm, = call("CreativeLoadMLLM", model="llava", dtype="auto", trust_remote_code=False,
                 vision_check=False)  # random weights: blind, as the check would (rightly) find
    bank, = call("CreativePriorSampler", prior=prior, prompt="a photo of a vehicle", count=24, batch_size=12, steps=2,
                 guidance=4.0, seed=0, negative_prompt="")
    norm, norm_map = call("CreativeNormGaussianFit", embeds=bank, pca_dims=4)
    return dict(prior=prior, decoder=decoder, mllm=mllm, bank=bank, norm=norm, norm_map=norm_map)


def _optimiser_inputs(chain, **over):
    kw = dict(prior=chain["prior"], norm=chain["norm"], subject="vehicle", steps=2, learning_rate=1e-3, lora_rank=2,
              train="token + LoRA", seed=0, prompt_template="a photo of a {token}", creative_weight=1.0,
              guidance=4.0, prior_steps=2)
    kw.update(over)
    return kw


def _training_adapters(prior) -> list[str]:
    tf = prior.transformer
    names = set(getattr(tf, "peft_config", None) or {})
    names |= {n for n, _ in tf.named_modules() if "creative_train_" in n}
    return sorted(n for n in names if "creative_train_" in n)


def test_whole_chain_runs_in_process(chain, run, progress_log):
    prior, bank, norm = chain["prior"], chain["bank"], chain["norm"]
    assert bank.embeds.shape == (24, prior.embedding_dim)
    assert chain["norm_map"].ndim == 4 and chain["norm_map"].shape[-1] == 3
    terms, = run("CreativeAnchorLoss", prior=prior, text="a photo of a vehicle", weight=1.0)
    picked, = run("CreativeSelectEmbeds", embeds=bank, indices="0, 2-5")
    assert picked.embeds.shape[0] == 5
    terms, = run("CreativeNegativeCluster", norm=norm, alpha=0.5, label="unwanted", embeds=picked, loss_terms=terms)
    assert len(terms) == 2
    gate, = run("CreativeMLLMValidityGate", mllm=chain["mllm"], subject="", question="Is this still a {subject}? Yes "
                "or No.", check_every=1, threshold=0.0)
    renderer, = run("CreativeDecoderRenderer", decoder=chain["decoder"], steps=1, guidance=4.0, width=32, height=32,
                    seed=0, prior=prior)
    progress_log.clear()
    out = run("CreativeLoRAOptimizer", **_optimiser_inputs(chain, loss_terms=terms, gate=gate, renderer=renderer))
    new_prior, concept, log, token, gate_images, loss_plot, embedding_map = out
    assert token == concept.token == "<creative-vehicle>"
    assert isinstance(log, RunLog) and log.steps_run == 2 and len(log.records) == 2  # the typed log, not JSON
    assert all(r.gate is not None for r in log.records)  # check_every=1: judged every step
    assert gate_images.shape[1:] == (32, 32, 3) and loss_plot.shape[-1] == 3 and embedding_map.shape[-1] == 3
    assert [v for node, v, _ in progress_log if node == "test-CreativeLoRAOptimizer"] == [1, 2]
    assert new_prior.concept is concept and chain["prior"].concept is None  # the input prior is untouched
    assert not _training_adapters(new_prior)
    samples, = run("CreativePriorSampler", prior=new_prior, prompt=f"a photo of a {token}", count=3, batch_size=3,
                   steps=2, guidance=4.0, seed=1, negative_prompt="")
    images, = run("CreativeRenderEmbeds", renderer=renderer, embeds=samples, start=0, count=2)
    assert images.shape == (2, 32, 32, 3) and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    applied, token2 = run("CreativeApplyConcept", prior=chain["prior"], concept=concept)
    again, = run("CreativePriorSampler", prior=applied, prompt=f"a photo of a {token2}", count=3, batch_size=3,
                 steps=2, guidance=4.0, seed=1, negative_prompt="")
    assert torch.allclose(again.embeds, samples.embeds, atol=1e-6)  # the concept alone reproduces the samples


def test_sampler_reports_progress_per_batch(chain, run, progress_log):
    run("CreativePriorSampler", prior=chain["prior"], prompt="a photo of a car", count=10, batch_size=4, steps=2,
        guidance=1.0, seed=3, negative_prompt="")
    mine = [(v, t) for node, v, t in progress_log if node == "test-CreativePriorSampler"]
    assert mine and mine[-1] == (10, 10) and all(t == 10 for _, t in mine), mine


def test_optimiser_cancel_raises_and_leaves_no_training_adapter(chain, run, comfy_inprocess):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run("CreativeLoRAOptimizer", **_optimiser_inputs(chain, steps=50))
    finally:
        mm.interrupt_current_processing(False)
    assert not _training_adapters(chain["prior"])
    # and the prior still trains normally afterwards
    out = run("CreativeLoRAOptimizer", **_optimiser_inputs(chain, steps=1))
    assert out[2].steps_run == 1 and not _training_adapters(chain["prior"])


def test_input_checks_have_messages(pack_nodes, chain, run):
    assert "prompt is empty" in pack_nodes["CreativePriorSampler"].validate_inputs(prompt="  ")
    assert "text is empty" in pack_nodes["CreativeAnchorLoss"].validate_inputs(text="")
    opt = pack_nodes["CreativeLoRAOptimizer"]
    assert "subject is empty" in opt.validate_inputs(subject=" ", prompt_template="a {token}")
    assert "{token}" in opt.validate_inputs(subject="car", prompt_template="a photo")
    assert opt.validate_inputs(subject="car", prompt_template="a {token}") is True
    assert "No prior 'nope'" in pack_nodes["CreativeLoadPrior"].validate_inputs(prior="nope")
    with pytest.raises(ValueError, match=r"PCA dims \(24\) must be smaller than the bank size \(24\)"):
        run("CreativeNormGaussianFit", embeds=chain["bank"], pca_dims=24)
    with pytest.raises(ValueError, match="outside the bank"):
        run("CreativeSelectEmbeds", embeds=chain["bank"], indices="0, 99")
    with pytest.raises(ValueError, match="connect a renderer"):
        gate, = run("CreativeMLLMValidityGate", mllm=chain["mllm"], subject="", question="Is it a {subject}?",
                    check_every=1, threshold=0.5)
        run("CreativeLoRAOptimizer", **_optimiser_inputs(chain, gate=gate))


def test_other_prior_is_refused(chain, run):
    other, = run("CreativeLoadPrior", prior="prior-b", dtype="auto")
    bank_b, = run("CreativePriorSampler", prior=other, prompt="a photo of a vehicle", count=6, batch_size=6, steps=2,
                  guidance=1.0, seed=0, negative_prompt="")
    with pytest.raises(ValueError, match="embeds come from prior"):
        run("CreativeNegativeCluster", norm=chain["norm"], alpha=1.0, label="x", embeds=bank_b)
    concept = run("CreativeLoRAOptimizer", **_optimiser_inputs(chain, steps=1))[1]
    with pytest.raises(ValueError, match="trained on prior"):
        run("CreativeApplyConcept", prior=other, concept=concept)


def test_concept_applies_to_the_same_prior_in_another_folder(models, chain, run):
    shutil.copytree(models / "diffusers" / "prior-a", models / "diffusers" / "prior-a-copy", dirs_exist_ok=True)
    moved, = run("CreativeLoadPrior", prior="prior-a-copy", dtype="auto")
    concept = run("CreativeLoRAOptimizer", **_optimiser_inputs(chain, steps=1))[1]
    run("CreativeApplyConcept", prior=moved, concept=concept)


def test_log_is_saved_as_json_with_a_summary(chain, run, comfy_inprocess):
    import json

    log = run("CreativeLoRAOptimizer", **_optimiser_inputs(chain, steps=3))[2]
    assert isinstance(log, RunLog)
    summary, = run("CreativeSaveLog", log=log, filename_prefix="unit-log")
    saved = sorted((Path(comfy_inprocess.folder_paths.get_output_directory()) / "creative" / "logs").glob("unit-log_*.json"))
    assert saved and not list(saved[-1].parent.glob("*.tmp"))
    data = json.loads(saved[-1].read_text())
    assert [e["step"] for e in data["entries"]] == [1, 2, 3] and data["stop_reason"] == "max_steps"
    assert {"loss", "creative", "log_likelihood", "mahalanobis", "seconds"} <= set(data["entries"][0])
    assert summary.startswith("stop: max_steps after 3 steps; kept the state of step 3")
    assert "log-likelihood under the norm" in summary
    assert RunLog.from_json(data) == log  # the file is the log's JSON form, read back to the same records


def test_wundt_sweep_node(chain, run, pack_nodes):
    gate, = run("CreativeMLLMValidityGate", mllm=chain["mllm"], subject="", question="Is this still a {subject}?",
                check_every=2, threshold=0.0)
    renderer, = run("CreativeDecoderRenderer", decoder=chain["decoder"], steps=2, guidance=4.0, width=32, height=32,
                    seed=0, prior=chain["prior"])
    plot, table = run("CreativeWundtSweep", prior=chain["prior"], norm=chain["norm"], embeds=chain["bank"],
                      subject="vehicle", steps="0, 2", configs="none, both", seeds="0", anchor_text="a vehicle",
                      learning_rate=1e-3, train="token + LoRA", samples=4, gate=gate, renderer=renderer,
                      judge=chain["mllm"])
    lines = table.splitlines()
    assert lines[0].split() == ["config", "step", "novelty_ll", "novelty_percentile", "validity", "diversity", "n"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["none", "0"], ["none", "2"], ["both", "0"], ["both", "2"]]
    assert plot.ndim == 4 and plot.shape[-1] == 3
    terms, = run("CreativeNegativeCluster", norm=chain["norm"], alpha=1.0, label="ugly", embeds=chain["bank"])
    _, table = run("CreativeWundtSweep", prior=chain["prior"], norm=chain["norm"], embeds=chain["bank"],
                   subject="vehicle", steps="0", configs="none", seeds="0", anchor_text="a vehicle",
                   learning_rate=1e-3, train="token", samples=4, loss_terms=terms)
    header, row = table.splitlines()
    assert header.split()[-2:] == ["cluster_distance", "n"] and float(row.split()[-2]) > 0
    validate = pack_nodes["CreativeWundtSweep"].validate_inputs
    assert "configs" in validate(subject="car", steps="0", configs="none, sometimes", seeds="0")
    assert "steps" in validate(subject="car", steps="0, x", configs="none", seeds="0")
    assert "{token}" in validate(subject="car", steps="0", configs="none", seeds="0", prompt_template="a car")
    with pytest.raises(ValueError, match="no gate is connected"):
        run("CreativeWundtSweep", prior=chain["prior"], norm=chain["norm"], embeds=chain["bank"], subject="vehicle",
            steps="0", configs="gate", seeds="0", anchor_text="a vehicle", learning_rate=1e-3, train="token",
            samples=4)


@pytest.mark.transformers5
def test_bundled_mini_world_is_listed_and_loads(run, pack_nodes):
    """The pack's own models/miniworld shows up in the loaders' lists and works offline."""
    from creative_generation.nodes import comfy_bridge

    assert "miniworld/prior" in comfy_bridge.prior_folders()
    assert "miniworld/decoder" in comfy_bridge.decoder_folders()
    assert "miniworld/mllm" in comfy_bridge.mllm_folders() and "miniworld/judge" not in comfy_bridge.mllm_folders()
    prior, = run("CreativeLoadPrior", prior="miniworld/prior", dtype="auto")
    mllm, = run("CreativeLoadMLLM", model="miniworld/mllm", dtype="auto", trust_remote_code=False, vision_check=True)
    bank, = run("CreativePriorSampler", prior=prior, prompt="a photo of a red car", count=8, batch_size=8, steps=5,
                guidance=4.0, seed=0, negative_prompt="")
    decoder, = run("CreativeLoadDecoder", decoder="miniworld/decoder", dtype="auto")
    renderer, = run("CreativeDecoderRenderer", decoder=decoder, steps=10, guidance=2.0, width=32, height=32, seed=0,
                    prior=prior)
    images, = run("CreativeRenderEmbeds", renderer=renderer, embeds=bank, start=0, count=2)
    assert images.shape == (2, 32, 32, 3)
    assert float(mllm.p_yes(images, "Is this a car? Yes or No.").mean()) > float(
        mllm.p_yes(images, "Is this a tree? Yes or No.").mean())
