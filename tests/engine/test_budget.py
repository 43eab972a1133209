"""The memory estimate (``engine/budget.py``) against measurements on small real models.

There is no GPU (and so no ``torch.cuda.max_memory_allocated``) here, so memory is measured
two ways on the CPU:

* **live tensor bytes** (``testbed.live_bytes.LiveTensorBytes``): a ``TorchDispatchMode`` sees every
  tensor an op creates and a finalizer sees it freed; its peak is what a device allocator would
  have to hold (minus allocator rounding). Weights exist before the block, so they are not
  counted.
* **process RSS** (psutil, sampled in a thread) in a subprocess, for parameter bytes and for
  the activations of one large sampling batch (with glibc told to map large blocks one by one,
  so that RSS shows live memory rather than the allocator's cache).

Weights and LoRA sizes must match exactly; the prior's activation formulas within
-10 %/+50 % (they are meant to err high); the renderer and MLLM heuristics within a factor 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from creative_generation.nodes.engine import budget, model_shapes
from creative_generation.nodes.engine.bank import sample_bank
from creative_generation.nodes.engine.concept import LORA_TARGETS, add_lora
from creative_generation.nodes.engine.losses import CreativeTerm
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig
from creative_generation.nodes.engine.prior import load_prior
from creative_generation.nodes.engine.sampling import sample_embeddings
from creative_generation.nodes.testbed.live_bytes import LiveTensorBytes
from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior

PROMPT = "a photo of a car"


LiveBytes = LiveTensorBytes


@pytest.fixture(scope="module", params=[(256, 4, 4, 64), (128, 6, 2, 96)], ids=["w256-l4", "w128-l6"])
def sized_prior(request, tmp_path_factory):
    width, layers, heads, embed = request.param
    folder = build_tiny_prior(tmp_path_factory.mktemp("budget") / "prior", width=width, layers=layers, heads=heads,
                              embed_dim=embed, text_layers=2)
    return load_prior(str(folder))


def test_tracker_sees_allocations_and_frees():
    x = torch.ones(1000, 1000)
    with LiveBytes() as live:
        y = x @ x
        z = y + 1
        del y
        w = z * 2
    assert live.peak == 2 * 4_000_000 and live.current == 2 * 4_000_000
    del z, w


def test_dtype_bytes_and_formatting():
    assert budget.dtype_bytes(torch.float32) == 4 and budget.dtype_bytes("bf16") == 2
    assert budget.dtype_bytes(torch.float16) == 2 and budget.dtype_bytes("fp32") == 4
    assert budget.fmt_bytes(3 * budget.GIB) == "3.00 GiB" and budget.fmt_bytes(1.5 * budget.MIB) == "1.5 MiB"


def test_weights_are_the_parameter_bytes(sized_prior):
    prior = sized_prior
    shape = model_shapes.PriorShape.of(prior)
    modules = (prior.transformer, prior.text_encoder, prior.image_encoder)
    params = sum(p.numel() for m in modules for p in m.parameters())
    buffers = sum(b.numel() * b.element_size() for m in modules for b in m.buffers())
    assert shape.params == params
    assert shape.weight_bytes == params * 4 + buffers
    est = budget.sampling_estimate(shape, prompt_tokens=7, batch=1, steps=5, guidance=4.0)
    assert est.part("prior weights").bytes == shape.weight_bytes
    assert shape.width == prior.transformer.config.num_attention_heads * prior.transformer.config.attention_head_dim


def test_tied_weights_are_counted_once():
    emb = torch.nn.Embedding(100, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    assert model_shapes.module_bytes(emb, head) == (800, 3200)


def test_lora_parameter_count_is_exact(sized_prior):
    tf = sized_prior.transformer
    c = tf.config
    add_lora(tf, "budget_probe", 10, 10.0, LORA_TARGETS, 0)
    try:
        count = sum(p.numel() for n, p in tf.named_parameters() if "budget_probe" in n)
    finally:
        tf.delete_adapters("budget_probe")
    width = c.num_attention_heads * c.attention_head_dim
    assert count == budget.lora_parameters(width, c.num_layers, 10)


@pytest.mark.parametrize("batch", [1, 16, 128])
def test_sampling_activations_match_the_measured_peak(sized_prior, batch):
    shape = model_shapes.PriorShape.of(sized_prior)
    tokens = budget.prompt_token_count(sized_prior.tokenizer, PROMPT, "")
    estimate = budget.prior_sampling_activation_bytes(
        width=shape.width, layers=shape.layers, heads=shape.heads, ff_width=shape.ff_width, prompt_tokens=tokens,
        batch=batch, guided=True, dtype=shape.dtype, embed_dim=shape.embed_dim)
    with LiveBytes() as live:
        sample_embeddings(sized_prior, PROMPT, batch, batch_size=batch, steps=5, guidance=4.0)
    assert 0.9 <= estimate / live.peak <= 1.5, (estimate, live.peak)


@pytest.fixture(scope="module")
def sized_norm(sized_prior):
    return GaussianNorm.from_bank(sample_bank(sized_prior, PROMPT, 64, batch_size=64, steps=2), 6)


@pytest.mark.parametrize("train, prior_steps", [("both", 2), ("both", 5), ("lora", 3), ("token", 3)])
def test_optimiser_step_memory_matches_the_measured_peak(sized_prior, sized_norm, train, prior_steps):
    prior, norm = sized_prior, sized_norm
    shape = model_shapes.PriorShape.of(prior)
    run = CreativeRun(prior, norm, "car", (CreativeTerm(norm),),
                      OptimConfig(steps=2, prior_steps=prior_steps, guidance=4.0, train=train, rank=10))
    est = run.memory_estimate(on_gpu=False)  # the run sizes itself from its parts (the prior's training estimate)
    assert [ph.name for ph in est.phases] == [budget.TRAINING]
    assert est.part("prior weights").bytes == shape.weight_bytes
    work = est.peak() - est.part("prior weights").bytes  # state + activations: what the run allocates
    with LiveBytes() as live:  # step 2's forward runs with AdamW's moments and step 1's gradients alive
        run.run()
    assert 0.9 <= work / live.peak <= 1.5, (train, work, live.peak)


def test_decoder_render_heuristic_is_within_a_factor_two(tmp_path):
    from creative_generation.nodes.engine.render import load_decoder
    from creative_generation.nodes.testbed.tiny.decoder import build_tiny_k22_decoder

    decoder = load_decoder(build_tiny_k22_decoder(tmp_path / "decoder", embed_dim=32))
    shape = model_shapes.DecoderShape.of(decoder)
    assert shape.weight_bytes == model_shapes.module_bytes(decoder.pipeline.unet, decoder.pipeline.movq)[1]
    for size in (64, 128):
        with torch.no_grad(), LiveBytes() as live:
            decoder.render(torch.randn(1, 32), steps=2, height=size, width=size, guidance=4.0)
        unet = budget.unet_activation_bytes(height=size, width=size, latent_factor=shape.latent_factor,
                                            channels=shape.unet_channels, layers_per_block=shape.layers_per_block)
        movq = budget.movq_activation_bytes(height=size, width=size, channels=shape.movq_channels)
        assert 0.8 <= max(unet, movq) / live.peak <= 2.0, (size, unet, movq, live.peak)


def test_mllm_forward_heuristic_is_within_a_factor_two(tmp_path):
    from creative_generation.nodes.engine.mllm import load_mllm
    from creative_generation.nodes.testbed.tiny.mllm import build_tiny_llava_next
    from PIL import Image

    judge = load_mllm(str(build_tiny_llava_next(tmp_path / "llava")))
    shape = model_shapes.MLLMShape.of(judge.model)
    assert shape.params == sum(p.numel() for p in judge.model.parameters())
    question = "Is this still a car? Yes or No."
    for size in (32, 64):
        inputs = judge.inputs(Image.new("RGB", (size, size)), question)
        tokens = inputs["input_ids"].shape[-1]
        patches = model_shapes.vision_patches(inputs["pixel_values"], shape.vision_patch)
        with torch.no_grad(), LiveBytes() as live:
            judge.p_yes(torch.rand(1, size, size, 3), question)
        est = budget.mllm_activation_bytes(tokens=tokens, hidden=shape.hidden, layers=shape.layers,
                                           intermediate=shape.intermediate, heads=shape.heads,
                                           kv_heads=shape.kv_heads, vision_tokens=patches,
                                           vision_hidden=shape.vision_hidden,
                                           vision_intermediate=shape.vision_intermediate,
                                           vision_heads=shape.vision_heads)
        assert 0.8 <= est / live.peak <= 2.0, (size, est, live.peak)


def test_phases_and_refusal_message():
    shape = model_shapes.PriorShape(params=1_000_000_000, weight_bytes=4 * 10**9, dtype=torch.float32, width=2048,
                              layers=20, heads=32, ff_width=8192, embed_dim=768, text_width=768, text_layers=12,
                              text_heads=12, text_ff_width=3072)
    mllm = model_shapes.MLLMShape(params=7_000_000_000, weight_bytes=14 * 10**9, dtype=torch.bfloat16, hidden=4096,
                            layers=32, intermediate=14336, heads=32, kv_heads=8, vision_hidden=1024,
                            vision_intermediate=4096, vision_heads=16)
    training_est = budget.training_estimate(shape, prompt_tokens=10, prior_steps=5, guidance=4.0, rank=10)
    asking_est = budget.mllm_estimate(mllm, tokens=2900, vision_tokens=2880)
    assert budget.optimisation_estimate(training_est) is training_est  # no gate: training alone
    assert budget.gate_check_estimate(None, None) is None
    est = budget.optimisation_estimate(training_est, budget.gate_check_estimate(None, asking_est))
    assert [(ph.name, ph.parts) for ph in est.phases] == [
        (budget.TRAINING, ("prior weights", budget.TRAINING_STATE, "training activations")),
        (budget.JUDGE, (budget.TRAINING_STATE, "MLLM weights", "MLLM forward"))]
    training = sum(est.part(n).bytes for n in ("prior weights", "training state", "training activations"))
    asking = sum(est.part(n).bytes for n in ("training state", "MLLM weights", "MLLM forward"))
    assert est.peak() == max(training, asking) == asking
    assert est.all_resident() == 18 * 10**9 + max(est.part("training state").bytes + est.part("training activations").bytes,
                                                  est.part("training state").bytes + est.part("MLLM forward").bytes)
    assert est.peak(resident={budget.PRIOR, budget.MLLM}) < est.peak()
    est.check(est.peak())  # exactly enough passes
    with pytest.raises(budget.InsufficientMemoryError) as refused:
        est.check(10 * budget.GIB, device="cuda:0", reclaimable=2 * budget.GIB)
    text = str(refused.value)
    assert "on cuda:0" in text and "(gate check: MLLM)" in text and "10.00 GiB is free" in text
    assert "+ 2.00 GiB ComfyUI can free by unloading models" in text
    assert "MLLM weights:" in text and "13.04 GiB" in text and "7.00 B params, bf16" in text
    assert "use a smaller MLLM" in text and "load the prior in bf16 or fp16" in text


def test_a_gated_run_keeps_its_training_state_through_render_and_question():
    """A gated run's phases: training, the gate's render, the gate's question; the training state lives through
    all three, the prior's weights and activations only through training (a host may move them out)."""
    prior = model_shapes.PriorShape(params=10**8, weight_bytes=4 * 10**8, dtype=torch.float32, width=512, layers=4,
                                    heads=8, ff_width=2048, embed_dim=64, text_width=128, text_layers=2, text_heads=2,
                                    text_ff_width=512)
    decoder = model_shapes.DecoderShape(params=10**8, weight_bytes=2 * 10**8, dtype=torch.float16, latent_factor=8,
                                        unet_channels=(64, 128), layers_per_block=1, movq_channels=(32, 64))
    mllm = model_shapes.MLLMShape(params=10**8, weight_bytes=2 * 10**8, dtype=torch.float16, hidden=256, layers=2,
                                  intermediate=512, heads=4, kv_heads=4, vision_hidden=128, vision_intermediate=256,
                                  vision_heads=2)
    training = budget.training_estimate(prior, prompt_tokens=8, prior_steps=5, guidance=4.0, rank=10)
    drawing = budget.render_estimate(decoder, height=256, width=256, guidance=4.0)
    asking = budget.mllm_estimate(mllm, tokens=100, vision_tokens=64)
    est = budget.optimisation_estimate(training, budget.gate_check_estimate(drawing, asking))
    assert [(ph.name, ph.parts) for ph in est.phases] == [
        (budget.TRAINING, ("prior weights", budget.TRAINING_STATE, "training activations")),
        (budget.RENDER, (budget.TRAINING_STATE, "decoder weights", "render activations")),
        (budget.JUDGE, (budget.TRAINING_STATE, "MLLM weights", "MLLM forward"))]
    assert budget.phase_models(est, budget.RENDER) == {budget.DECODER}
    assert budget.phase_models(est, budget.JUDGE) == {budget.MLLM}
    assert budget.phase_work(est, budget.RENDER) == (est.part(budget.TRAINING_STATE).bytes
                                                     + est.part("render activations").bytes)
    assert "render smaller" in " ".join(est.hints) and "use a smaller MLLM" in " ".join(est.hints)
    only_render = budget.gate_check_estimate(drawing, None)
    assert [ph.name for ph in only_render.phases] == [budget.RENDER]


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time, tempfile
    import psutil, torch
    import importlib.util
    spec = importlib.util.spec_from_file_location("creative_run", {run!r})
    run = importlib.util.module_from_spec(spec); spec.loader.exec_module(run); run.import_pack()
    from creative_generation.nodes.engine import budget, model_shapes
    from creative_generation.nodes.engine.prior import load_prior
    from creative_generation.nodes.engine.sampling import sample_embeddings
    from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior
    torch.set_num_threads(1)
    folder = build_tiny_prior(tempfile.mkdtemp() + "/prior", width=512, layers=8, heads=8, embed_dim=64,
                              text_layers=2)
    proc = psutil.Process()
    base = proc.memory_info().rss
    prior = load_prior(str(folder))
    for m in (prior.transformer, prior.text_encoder, prior.image_encoder):
        for p in m.parameters():
            float(p.sum())  # safetensors maps the files: touch every page so the weights count in RSS
    loaded = proc.memory_info().rss
    peak = [loaded]
    done = threading.Event()
    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    t = threading.Thread(target=watch); t.start()
    sample_embeddings(prior, "a photo of a car", 1500, batch_size=1500, steps=2, guidance=4.0)
    done.set(); t.join()
    shape = model_shapes.PriorShape.of(prior)
    est = budget.prior_sampling_activation_bytes(width=shape.width, layers=shape.layers, heads=shape.heads,
        ff_width=shape.ff_width, prompt_tokens=budget.prompt_token_count(prior.tokenizer, "a photo of a car"),
        batch=1500, embed_dim=shape.embed_dim)
    print(json.dumps(dict(weights=shape.weight_bytes, loaded=loaded - base, activations=est,
                          measured=peak[0] - loaded)))
""")


def test_process_rss_agrees_with_weights_and_sampling_activations():
    """psutil view in a fresh process: loading adds about the weights; one big batch about its activations."""
    from creative_generation.nodes.engine import budget as module

    repo = str(Path(module.__file__).resolve().parents[2])
    # glibc would keep freed blocks below its (growing) mmap threshold cached in the heap, so RSS
    # would show allocator caching (~1.5x here) rather than what is alive: give every block over
    # 64 KiB its own mapping, returned to the system when freed, as a device allocator would.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT.format(run=str(Path(repo) / "nodes" / "testbed" / "run.py"))], capture_output=True, text=True,
                         timeout=300, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.9 <= r["loaded"] / r["weights"] <= 1.4, r  # + the loaders' and libraries' own allocations
    assert 0.8 <= r["measured"] / r["activations"] <= 1.3, r
