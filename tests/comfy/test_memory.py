"""One memory budget with ComfyUI (``nodes/memory.py``), on a CPU-only ComfyUI.

* The loaders wrap the prior, the decoder and the MLLM in ModelPatchers with ComfyUI's load
  and offload devices; a node that uses a model registers it in
  ``comfy.model_management.current_loaded_models``; ``unload_all_models()`` (what ``POST
  /free`` with ``unload_models`` runs) removes it; the next run loads it again and gives
  identical results.
* During an optimisation the MLLM is loaded only while it answers and offloaded after each
  gate check; the prior is back before the next step.
* Pre-flight: with ComfyUI's free memory patched to 1 MiB the sampler and the optimiser refuse
  to start, naming needed vs free per component and what to change; the GPU-side accounting
  (weights that must be moved in, memory ComfyUI can free by unloading) is checked with a
  pretend GPU device, since none is available here.
* A real server: ``POST /free {"unload_models": true}`` makes the next run load our prior again
  (ComfyUI logs "Requested to load CreativePrior") and the results are unchanged.
"""

from __future__ import annotations

import dataclasses
import time

import comfy_harness
import pytest
import torch
from safetensors.torch import load_file

MIB = 1024**2
QUESTION = "Is this still a {subject}? Yes or No."


@pytest.fixture(scope="module")
def mem(comfy_inprocess):
    from creative_generation.nodes import memory

    return memory


@pytest.fixture(scope="module")
def mm(comfy_inprocess):
    return comfy_inprocess.model_management


@pytest.fixture(scope="module")
def call(pack_nodes, comfy_inprocess):
    """``call(node_id, **inputs)`` -> outputs, executed as ComfyUI's executor does (class clone, inference mode)."""
    return lambda node_id, **inputs: comfy_harness.execute_node(pack_nodes[node_id], f"mem-{node_id}", **inputs)


@pytest.fixture(scope="module")
def loaded(comfy_inprocess, tmp_path_factory, call):
    """Tiny prior, Kandinsky 2.2 decoder and LLaVA-NeXT, loaded through the pack's loader nodes."""
    comfy_harness.register_tiny_models(comfy_inprocess.folder_paths, tmp_path_factory.mktemp("memory_models"),
                                       {"mem-prior": 3}, "mem-decoder", "mem-llava")
    prior, = call("CreativeLoadPrior", prior="mem-prior", dtype="auto")
    decoder, = call("CreativeLoadDecoder", decoder="mem-decoder", dtype="auto")
    mllm, = call("CreativeLoadMLLM", model="mem-llava", dtype="auto", trust_remote_code=False,
                 vision_check=False)  # random weights are blind; the check itself is tested elsewhere
    bank, = call("CreativePriorSampler", prior=prior, prompt="a photo of a vehicle", count=24, batch_size=12,
                 steps=2, guidance=4.0, seed=0, negative_prompt="")
    norm, _ = call("CreativeNormGaussianFit", embeds=bank, pca_dims=4)
    gate, = call("CreativeMLLMValidityGate", mllm=mllm, subject="", question=QUESTION, check_every=1,
                 threshold=0.0)
    renderer, = call("CreativeDecoderRenderer", decoder=decoder, steps=1, guidance=4.0, width=32, height=32, seed=0,
                     prior=prior)
    return dict(prior=prior, decoder=decoder, mllm=mllm, norm=norm, gate=gate, renderer=renderer)


def _sample(call, prior, seed=5, count=6, batch_size=3):
    bank, = call("CreativePriorSampler", prior=prior, prompt="a photo of a car", count=count, batch_size=batch_size,
                 steps=2, guidance=4.0, seed=seed, negative_prompt="")
    return bank.embeds


def _optimise(call, m, **over):
    kw = dict(prior=m["prior"], norm=m["norm"], subject="vehicle", steps=2, learning_rate=1e-3, lora_rank=2,
              train="token + LoRA", seed=0, prompt_template="a photo of a {token}", creative_weight=1.0,
              guidance=4.0, prior_steps=2, gate=m["gate"], renderer=m["renderer"])
    kw.update(over)
    return call("CreativeLoRAOptimizer", **kw)


def is_loaded(obj: object) -> bool:
    """Whether ComfyUI lists this model among its loaded models."""
    from comfy import model_management as mm

    from creative_generation.nodes import memory

    p = memory.patcher_of(obj)
    return p is not None and any(loaded.model is p for loaded in mm.current_loaded_models)


def _loaded_names(mm) -> list[str]:
    return [type(loaded.model.model).__name__ for loaded in mm.current_loaded_models if loaded.model is not None]


# --------------------------------------------------------------------------- registration


def test_loaders_wrap_models_in_patchers_with_comfys_devices(loaded, mem, mm):
    from creative_generation.nodes.engine import model_shapes

    cpu = torch.device("cpu")
    for key, holder in (("prior", "CreativePrior"), ("decoder", "CreativeDecoder"), ("mllm", "CreativeMLLM")):
        patcher = mem.patcher_of(loaded[key])
        assert isinstance(patcher, mem.WholeModelPatcher), key
        assert type(patcher.model).__name__ == holder
        assert patcher.load_device == mm.get_torch_device() == cpu  # CPU-only: a no-op move that still registers
        assert patcher.offload_device == cpu
        assert patcher.model.get_dtype() == torch.float32  # "auto" on the CPU
    prior = loaded["prior"]
    # ComfyUI sizes it from the state dict; the budget also counts non-persistent buffers (position ids)
    assert patcher_size(mem, prior) == pytest.approx(
        model_shapes.module_bytes(prior.transformer, prior.text_encoder, prior.image_encoder)[1], rel=0.01)
    # every view of the prior (a concept applied, the renderer, the gate) finds the same patcher
    assert mem.patcher_of(prior.with_concept(None)) is mem.patcher_of(prior)
    assert mem.patcher_of(loaded["renderer"]) is mem.patcher_of(loaded["decoder"])
    assert mem.patcher_of(loaded["gate"]) is mem.patcher_of(loaded["mllm"])


def patcher_size(mem, obj) -> int:
    return mem.patcher_of(obj).model_size()


def test_dtype_override_is_kept(loaded, call, mem):
    prior, = call("CreativeLoadPrior", prior="mem-prior", dtype="bf16")
    assert prior.dtype == torch.bfloat16 and mem.patcher_of(prior).model.get_dtype() == torch.bfloat16
    assert mem.patcher_of(prior) is not mem.patcher_of(loaded["prior"])


def test_sampler_registers_unload_all_removes_and_rerun_is_identical(loaded, call, mem, mm):
    prior = loaded["prior"]
    mm.unload_all_models()
    assert not is_loaded(prior) and "CreativePrior" not in _loaded_names(mm)
    first = _sample(call, prior)
    assert is_loaded(prior) and "CreativePrior" in _loaded_names(mm)
    mm.unload_all_models()  # what POST /free {"unload_models": true} runs
    assert not is_loaded(prior)
    again = _sample(call, prior)
    assert is_loaded(prior)
    assert torch.equal(first, again)


def test_optimiser_loads_the_mllm_only_while_it_answers(loaded, call, mem, mm, monkeypatch):
    mllm = loaded["mllm"]
    requests: list[list[str]] = []
    real_load = mm.load_models_gpu

    def spy_load(models, *args, **kwargs):
        requests.append([type(m.model).__name__ for m in models])
        return real_load(models, *args, **kwargs)

    answered_while_loaded: list[bool] = []
    real_p_yes = mllm.p_yes

    def spy_p_yes(images, question):
        answered_while_loaded.append(is_loaded(mllm))
        return real_p_yes(images, question)

    monkeypatch.setattr(mm, "load_models_gpu", spy_load)
    monkeypatch.setattr(mllm, "p_yes", spy_p_yes)
    mm.unload_all_models()
    _, concept, log, *_ = _optimise(call, loaded)
    assert log.steps_run == 2 and all(r.gate is not None for r in log.records)
    assert answered_while_loaded == [True, True]
    # training, then per check: decoder, MLLM, prior back for the next step
    assert requests[0] == ["CreativePrior"]
    assert requests.count(["CreativeDecoder"]) == 2 and requests.count(["CreativeMLLM"]) == 2
    assert requests[-1] == ["CreativePrior"]
    assert is_loaded(loaded["prior"]) and is_loaded(loaded["decoder"])
    assert not is_loaded(mllm)  # offloaded after each check
    # unloading everything and running again reloads and reproduces the run exactly
    mm.unload_all_models()
    assert _loaded_names(mm) == []
    _, concept2, log2, *_ = _optimise(call, loaded)
    assert is_loaded(loaded["prior"])
    assert [r.loss for r in log2.records] == [r.loss for r in log.records]
    assert torch.equal(concept2.token_embedding, concept.token_embedding)
    assert concept2.lora_state.keys() == concept.lora_state.keys()
    assert all(torch.equal(concept2.lora_state[k], concept.lora_state[k]) for k in concept.lora_state)


# --------------------------------------------------------------------------- pre-flight


@pytest.fixture
def tiny_free_memory(mm, monkeypatch):
    def get_free_memory(dev=None, torch_free_too=False):
        return (MIB, MIB) if torch_free_too else MIB

    monkeypatch.setattr(mm, "get_free_memory", get_free_memory)


def test_sampler_refuses_a_run_that_cannot_fit(loaded, call, mem, mm, tiny_free_memory):
    from creative_generation.nodes.engine.budget import InsufficientMemoryError

    mm.unload_all_models()
    with pytest.raises(InsufficientMemoryError) as refused:
        _sample(call, loaded["prior"], count=5000, batch_size=500)
    text = str(refused.value)
    assert "Not enough memory on cpu for this prior sampling run" in text
    assert "only 1.0 MiB is free" in text
    assert "sampling activations:" in text and "batch 500 x2 (CFG)" in text
    assert "prior weights:" in text and "(already in memory)" in text  # CPU: weights are in RAM already
    assert "lower batch_size" in text
    assert not is_loaded(loaded["prior"])  # refused before anything was loaded or run


def test_optimiser_refuses_with_numbers_per_component(loaded, call, mem, mm, tiny_free_memory):
    from creative_generation.nodes.engine.budget import InsufficientMemoryError

    mm.unload_all_models()
    with pytest.raises(InsufficientMemoryError) as refused:
        _optimise(call, loaded, steps=700)
    text = str(refused.value)
    assert "for this optimisation run" in text
    for part in ("training state:", "training activations:", "decoder weights:", "render activations:",
                 "MLLM weights:", "MLLM forward:"):
        assert part in text, part
    assert "gate check: MLLM" in text and "training step" in text
    assert "use a smaller MLLM" in text and "render smaller (Decoder Renderer width/height; now 32x32)" in text
    tf = loaded["prior"].transformer
    assert not [n for n in (getattr(tf, "peft_config", None) or {}) if n.startswith("creative_train_")]
    assert _loaded_names(mm) == []


def test_sweep_preflight_counts_each_phase_as_its_own_estimate_does(loaded, mem, monkeypatch):
    """The sweep's pre-flight joins the runs' estimate (training, the gate's render and question) with a
    measurement's (sampling, render, independent judge): every phase must need what it needs on its own. Parts of
    the two that share a name (the prior's weights, the decoder's, render activations of other batch sizes) must
    not be counted twice in a phase."""
    from creative_generation.nodes.engine.bank import sample_bank
    from creative_generation.nodes.engine.evaluation import AskingJudge, Evaluator
    from creative_generation.nodes.engine.gate import GateCheck
    from creative_generation.nodes.engine.losses import CreativeTerm
    from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig

    norm = loaded["norm"]
    bank = sample_bank(loaded["prior"], "a photo of a vehicle", 16, batch_size=16, steps=2, seed=0)
    run = CreativeRun(loaded["prior"], norm, "vehicle", (CreativeTerm(norm),), OptimConfig(steps=2, prior_steps=2),
                      GateCheck(loaded["gate"], loaded["renderer"]))
    evaluator = Evaluator(norm, bank, loaded["renderer"], AskingJudge(loaded["mllm"]), samples=8, rendered=4)
    checked = []
    monkeypatch.setattr(mem, "check", lambda estimate, models, device=None: checked.append(estimate) or estimate)
    mem.prepare_sweep(run, evaluator)
    combined, = checked
    alone = {}
    for own in (run.memory_estimate(on_gpu=False), evaluator.memory_estimate(run, on_gpu=False)):
        alone.update({(own.what, ph.name): own.phase_bytes(ph) for ph in own.phases})
    joined = [combined.phase_bytes(ph) for ph in combined.phases]
    assert joined == list(alone.values()), {ph.name: (j, a) for ph, j, a in zip(combined.phases, joined, alone.values())}


def test_gpu_accounting_counts_weights_to_move_and_what_comfy_can_free(loaded, mem, mm, monkeypatch):
    """No GPU here: pretend the prior's load device is one and check the arithmetic of the refusal."""
    from types import SimpleNamespace

    from creative_generation.nodes.engine import budget, model_shapes

    gpu = torch.device("cuda", 0)
    prior = loaded["prior"]
    monkeypatch.setattr(mem.patcher_of(prior), "load_device", gpu)
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 4 * MIB)

    def estimate():
        return budget.sampling_estimate(model_shapes.PriorShape.of(prior), prompt_tokens=8, batch=500, steps=5,
                                        guidance=4.0)

    need = estimate().peak()  # weights count: they must move onto the GPU
    assert need == sum(p.bytes for p in estimate().parts)
    free = need  # enough for the run, not for ComfyUI's reserve on top
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: free)
    monkeypatch.setattr(mm, "current_loaded_models", [])
    with pytest.raises(budget.InsufficientMemoryError) as refused:
        mem.check(estimate(), {budget.PRIOR: prior}, gpu)
    text = str(refused.value)
    assert "on cuda:0" in text and "ComfyUI reserve:" in text and "(already in memory)" not in text
    assert "load the prior in bf16 or fp16" in text  # fp32 weights on a GPU
    # a loaded model ComfyUI could unload makes it fit
    other = SimpleNamespace(device=gpu, model=object(), model_loaded_memory=lambda: 8 * MIB)
    monkeypatch.setattr(mm, "current_loaded_models", [other])
    mem.check(estimate(), {budget.PRIOR: prior}, gpu)


def test_core_renderer_refuses_a_render_larger_than_memory(call, comfy_inprocess, monkeypatch):
    """A 16384 x 16384 Core Model Renderer is refused with numbers before anything is sampled."""
    import tiny_sdxl

    from creative_generation.nodes.engine.bank import EmbeddingBank
    from creative_generation.nodes.engine.budget import InsufficientMemoryError

    with torch.inference_mode():
        model, vae = tiny_sdxl.load(tiny_sdxl.sd21_unclip_state_dict("L"))
    positive, negative = tiny_sdxl.sd21_conditioning(seed=1), tiny_sdxl.sd21_conditioning(seed=2)

    def never(*args, **kwargs):
        raise AssertionError("sampling started")

    import comfy.sample

    monkeypatch.setattr(comfy.sample, "sample", never)
    settings = dict(model=model, vae=vae, positive=positive, negative=negative, seed=0, steps=1, cfg=2.0,
                    sampler_name="euler", scheduler="normal", strength=1.0, noise_augmentation=0.0)
    with pytest.raises(InsufficientMemoryError) as refused:
        call("CreativeCoreRenderer", **settings, width=16384, height=16384)
    text = str(refused.value)
    assert "for this render" in text and "sampling:" in text and "16384x16384" in text
    assert "render smaller (Core Model Renderer width/height" in text
    renderer, = call("CreativeCoreRenderer", **settings, width=64, height=64)  # a size that fits is accepted
    big = dataclasses.replace(renderer, settings=dataclasses.replace(renderer.settings, width=16384, height=16384))
    embeds = EmbeddingBank(torch.randn(2, 768), {})
    with pytest.raises(InsufficientMemoryError):  # and drawing it is refused too, before it starts
        call("CreativeRenderEmbeds", renderer=big, embeds=embeds, start=0, count=2)


def test_decoder_render_that_cannot_fit_is_refused(loaded, call, mem, mm, tiny_free_memory):
    from creative_generation.nodes.engine.bank import EmbeddingBank
    from creative_generation.nodes.engine.budget import InsufficientMemoryError

    mm.unload_all_models()
    with pytest.raises(InsufficientMemoryError) as refused:
        call("CreativeRenderEmbeds", renderer=loaded["renderer"], embeds=EmbeddingBank(torch.randn(4, loaded["decoder"].embed_dim), {}),
             start=0, count=4)
    text = str(refused.value)
    assert "for this render" in text and "render activations:" in text and "decoder weights:" in text
    assert "render smaller (Decoder Renderer width/height; now 32x32) or fewer at once (count; now 4)" in text
    assert not is_loaded(loaded["decoder"])


# --------------------------------------------------------------------------- a real server


def test_post_free_unloads_our_prior_and_results_stay_the_same(comfy_server):
    from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior

    name = "mem-server-prior"
    if not (comfy_server.models["diffusers"] / name).exists():
        build_tiny_prior(comfy_server.models["diffusers"] / name, seed=7)

    def graph(seed: int, prefix: str) -> dict:
        return {"1": {"class_type": "CreativeLoadPrior", "inputs": {"prior": name, "dtype": "auto",
                                                                  "allow_download": False, "hf_repo_id": ""}},
                "2": {"class_type": "CreativePriorSampler",
                      "inputs": {"prior": ["1", 0], "prompt": "a photo of a car", "count": 4, "batch_size": 2,
                                 "steps": 2, "guidance": 4.0, "seed": seed, "negative_prompt": ""}},
                "3": {"class_type": "CreativeSaveEmbeds", "inputs": {"embeds": ["2", 0], "filename_prefix": prefix}}}

    def loads() -> int:
        return comfy_server.log_text().count("Requested to load CreativePrior")

    def run(seed: int, prefix: str) -> torch.Tensor:
        result = comfy_server.run(graph(seed, prefix), timeout=120)
        assert result.status == "success", result
        files = sorted((comfy_server.output_dir / "creative" / "embeds").glob(f"{prefix}_*.safetensors"))
        return load_file(files[-1])["embeds"]

    before = loads()
    a = run(0, "mem_a")
    assert loads() == before + 1  # our model went through ComfyUI's model management
    b = run(1, "mem_b")
    assert loads() == before + 1  # still loaded: not loaded twice
    comfy_server.post("/free", {"unload_models": True}).raise_for_status()
    c = run(0, "mem_c")  # the flag may be handled before or after this prompt ...
    d = run(1, "mem_d")
    deadline = time.time() + 10
    while loads() < before + 2 and time.time() < deadline:  # the log is flushed by the server process
        time.sleep(0.2)
    assert loads() == before + 2  # ... either way exactly one of c, d loaded the prior again
    assert torch.equal(a, c) and torch.equal(b, d)
