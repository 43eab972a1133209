"""The SD path (issue 17) in-process: bank, optimiser, image anchor on tiny SD 1.5 core objects.

Everything a user's checkpoint goes through after its loaders: core MODEL / CLIP / VAE / CLIP_VISION
objects (built small by ``tiny_sd15``), core's KSampler, SaveLoRA and LoraLoaderModelOnly.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tiny_sd15

RENDER = dict(render_steps=2, cfg=1.0, sampler_name="euler", scheduler="sgm_uniform", width=32, height=32)


@pytest.fixture(scope="module")
def sd(comfy_inprocess, tmp_path_factory):
    return tiny_sd15.objects(tmp_path_factory.mktemp("tiny_sd15"))


@pytest.fixture(scope="module")
def bank(sd, pack_nodes):
    from comfy_harness import execute_node

    return execute_node(pack_nodes["CreativeSDEmbeddingBank"], "bank", model=sd.model, clip=sd.clip, vae=sd.vae,
                        clip_vision=sd.clip_vision, prompt="a photo of a car", count=40, batch_size=8, seed=0,
                        **RENDER)


@pytest.fixture(scope="module")
def norm(bank, pack_nodes):
    from comfy_harness import execute_node

    return execute_node(pack_nodes["CreativeNormGaussianFit"], "norm", embeds=bank[0], pca_dims=8)[0]


def _optimise(run, sd, norm, **changes):
    inputs = dict(model=sd.model, clip=sd.clip, vae=sd.vae, clip_vision=sd.clip_vision, norm=norm,
                  prompt="a photo of a {subject}", subject="car", steps=6, learning_rate=1e-1, lora_rank=4, seed=0,
                  creative_weight=1.0, **RENDER)
    inputs.update(changes)
    return run("CreativeSDLoRAOptimizer", **inputs)


def _core_render(model, sd, seed, render=RENDER, batch=1, text="a photo of a car"):
    """Core's own chain: CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode."""
    import nodes

    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(sd.clip, text)[0]
        latent = nodes.EmptyLatentImage().generate(render["width"], render["height"], batch)[0]
        samples = nodes.common_ksampler(model, seed, render["render_steps"], render["cfg"], render["sampler_name"],
                                        render["scheduler"], cond, cond, latent)[0]
        return sd.vae.decode(samples["samples"]).clone()


def _unet_calls(sd):
    calls = []
    handle = sd.model.model.diffusion_model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def _untouched(model):
    """The input MODEL carries no patch, wrapper or weight function of a run."""
    layers = [m for m in model.model.diffusion_model.modules() if hasattr(m, "weight_function")]
    return not model.patches and not model.weight_wrapper_patches and all(not m.weight_function for m in layers)


def test_clip_vision_embeddings_match_core(sd):
    from creative_generation.nodes.sd_generator import vision_of

    images = torch.rand(2, 40, 48, 3, generator=torch.Generator().manual_seed(0))  # unseeded it drew 0.011 once
    with torch.inference_mode():
        ours = vision_of(sd.clip_vision)(images).clone()
        core = sd.clip_vision.encode_image(images)["image_embeds"].float().clone()
    assert ours.shape == core.shape == (2, 32)
    assert torch.allclose(ours, core, atol=1e-2), (ours - core).abs().max()


def test_bank_embeds_core_renders_in_the_clip_vision_space(sd, bank):
    from creative_generation.nodes.sd_generator import vision_of

    embeds, preview = bank
    assert embeds.embeds.shape == (40, 32) and embeds.dim == 32
    assert embeds.prior_identity == vision_of(sd.clip_vision).identity
    assert embeds.provenance["family"] == "SD 1.5" and preview.shape == (1, 4 * 32, 4 * 32, 3)
    images = _core_render(sd.model, sd, 0, batch=8)  # the first batch is core KSampler at the seed
    with torch.inference_mode():
        expected = sd.clip_vision.encode_image(images)["image_embeds"].float().clone()
    assert torch.allclose(embeds.embeds[:8], expected, atol=1e-2)
    assert not torch.allclose(embeds.embeds[:8], embeds.embeds[8:16])  # batch b draws with seed + b


def test_bank_renders_keep_no_autograd_graph_outside_the_executor(sd):
    """The evaluation and scripts call the bank outside ComfyUI's inference mode, where core's VAE weights
    require grad: a recorded decode graph kept alive by the previews grew memory without bound."""
    from creative_generation.nodes.sd_generator import RenderSettings, sd_sample_bank

    render = RenderSettings(2, 1.0, "euler", "sgm_uniform", 32, 32)
    assert torch.is_grad_enabled()
    bank, previews = sd_sample_bank((sd.model, sd.clip, sd.vae, sd.clip_vision), "a photo of a car", "", render,
                                    count=4, batch_size=2, seed=0)
    assert previews.grad_fn is None and not previews.requires_grad
    assert bank.embeds.grad_fn is None


@pytest.fixture(scope="module")
def sdxl(comfy_inprocess, tmp_path_factory):
    return tiny_sd15.sdxl_objects(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.mark.parametrize("family, sampler, cfg", [("SD 1.5", "euler", 1.0), ("SD 1.5", "lcm", 2.0),
                                                  ("SDXL", "euler", 2.0)])
def test_the_differentiable_render_is_cores(request, norm, family, sampler, cfg):
    """With the LoRA still at zero, the optimiser's render (with gradients) is core's KSampler + VAEDecode, for
    SD 1.5 and for SDXL (its pooled text embedding and size conditioning go through core's own conds)."""
    from creative_generation.nodes import run_inputs
    from creative_generation.nodes.engine.losses import CreativeTerm
    from creative_generation.nodes.sd_generator import RenderSettings, SDGenerator

    sd = request.getfixturevalue("sd" if family == "SD 1.5" else "sdxl")
    render = dict(RENDER, sampler_name=sampler, cfg=cfg, render_steps=3)
    with torch.inference_mode(False):
        gen = SDGenerator(sd.model, sd.clip, sd.vae, sd.clip_vision, "a photo of a car", "a photo of a car",
                          RenderSettings(3, cfg, sampler, "sgm_uniform", 32, 32))
        assert gen.family == family
        run = run_inputs.build_run(gen, norm, "car", [CreativeTerm(norm)], steps=1, lora_rank=4, train="LoRA")
        training = gen.open_training(run)
        try:
            images = training.images(5)
            e = training.embed(5)
            e.sum().backward()
            grads = [p.grad for p in training.params if p.grad is not None]
        finally:
            training.close()
    assert torch.allclose(images.detach(), _core_render(sd.model, sd, 5, render), atol=1e-4)
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert _untouched(sd.model)


def test_optimiser_moves_renders_into_the_tails(run, sd, norm):
    from creative_generation.nodes.sd_generator import vision_of

    model, lora, log, gate_images, plot, embedding = _optimise(run, sd, norm)
    assert embedding is None  # a LoRA run trains no token
    assert log.steps_run == 6 and plot.ndim == 4 and len(lora) == 7 * 8 * 3  # 7 transformer blocks x 8 projections x up/down/alpha
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
               for k in lora)
    vision = vision_of(sd.clip_vision)
    with torch.no_grad():
        base = norm.log_prob(vision(_core_render(sd.model, sd, 100, batch=4)).double()).mean()
        learned = norm.log_prob(vision(_core_render(model, sd, 100, batch=4)).double()).mean()
    print(f"log-likelihood under the norm, 4 seeds: base {float(base):.2f}, with the LoRA {float(learned):.2f}")
    assert learned < base - 2.0, (float(base), float(learned))
    assert _untouched(sd.model)


def test_saved_lora_reloads_through_core(run, sd, norm, comfy_inprocess):
    import nodes
    from comfy_extras.nodes_train import SaveLoRA

    model, lora, *_ = _optimise(run, sd, norm, steps=2)
    with torch.inference_mode():
        SaveLoRA.execute(lora, "loras/creative_sd_test")
    folder = Path(comfy_inprocess.folder_paths.get_output_directory()) / "loras"
    saved = sorted(folder.glob("creative_sd_test_*.safetensors"))
    assert saved
    comfy_inprocess.folder_paths.add_model_folder_path("loras", str(saved[-1].parent))
    with torch.inference_mode():
        reloaded = nodes.LoraLoaderModelOnly().load_lora_model_only(sd.model, saved[-1].name, 1.0)[0]
    ours, core = _core_render(model, sd, 11), _core_render(reloaded, sd, 11)
    assert torch.allclose(ours, core, atol=1e-5)
    assert not torch.allclose(core, _core_render(sd.model, sd, 11), atol=1e-3)  # the LoRA changes the render


def test_save_sd_lora_writes_into_the_loras_folder_with_the_runs_settings(run, sd, norm, comfy_inprocess):
    """The pack's Save SD LoRA: the file lands where core LoraLoader lists it, reproduces the optimiser's MODEL
    through it, records how it was trained, and a second save never touches the first."""
    import nodes
    from creative_generation.nodes.engine.safetensors_io import load_tensors

    fp = comfy_inprocess.folder_paths
    model, lora, *_ = _optimise(run, sd, norm, steps=2)
    before = set(fp.get_filename_list("loras"))
    run("CreativeSaveSDLoRA", lora=lora, filename_prefix="creative_saved/car")
    name, = set(fp.get_filename_list("loras")) - before
    first = Path(fp.get_full_path("loras", name))
    written = first.read_bytes()
    run("CreativeSaveSDLoRA", lora=lora, filename_prefix="creative_saved/car")
    second, = set(fp.get_filename_list("loras")) - before - {name}
    number = int(name.removesuffix(".safetensors").rsplit("_", 1)[1])
    assert name.startswith("creative_saved/car_") and second == f"creative_saved/car_{number + 1:05}.safetensors"
    assert first.read_bytes() == written
    with torch.inference_mode():
        reloaded = nodes.LoraLoaderModelOnly().load_lora_model_only(sd.model, name, 1.0)[0]
    assert torch.allclose(_core_render(model, sd, 11), _core_render(reloaded, sd, 11), atol=1e-5)
    tensors, meta = load_tensors(first)
    assert tensors.keys() == lora.keys()
    assert meta["family"] == "SD 1.5" and meta["space"] == norm.prior_identity and meta["steps_run"] == 2
    assert meta["config"]["rank"] == 4 and meta["prompt"] == "a photo of a car" and meta["package_version"], meta
    assert not {"guidance", "prior_steps", "template"} & meta["config"].keys() and "prompt_template" not in meta
    before = set(fp.get_filename_list("loras"))
    run("CreativeSaveSDLoRA", lora=dict(lora), filename_prefix="creative_saved/plain")  # core TrainLoraNode's dict
    plain, = set(fp.get_filename_list("loras")) - before
    assert load_tensors(fp.get_full_path("loras", plain))[1] == {}
    with pytest.raises(ValueError, match="No LoRA to save"):  # what a token-only run sends
        run("CreativeSaveSDLoRA", lora={}, filename_prefix="creative_saved/none")


class ScriptedJudge:
    """Yes at the first question, no afterwards; records the images it was shown."""

    def __init__(self):
        self.seen = []

    def p_yes(self, images, question):
        self.seen.append(images.shape)
        return torch.tensor([1.0 if len(self.seen) == 1 else 0.0])


def test_the_gate_stops_a_run_that_leaves_the_subject(run, sd, norm):
    from creative_generation.nodes.engine.gate import ValidityGate

    judge = ScriptedJudge()
    _, lora, log, gate_images, *_ = _optimise(run, sd, norm, steps=9, gate=ValidityGate(judge, every=2))
    assert str(log.stop_reason) == "gate_rejected" and log.steps_run == 4 and log.accepted_step == 2
    assert judge.seen == [(1, 32, 32, 3)] * 2 and gate_images.shape == (2, 32, 32, 3)
    _, kept, *_ = _optimise(run, sd, norm, steps=2)  # the state the gate accepted is what the run returns
    assert all(torch.equal(lora[k], kept[k]) for k in kept)


def test_cancel_stops_within_one_step_and_leaves_the_model(run, sd, norm):
    from creative_generation.nodes.engine import cancel

    class Cancelled(Exception):
        pass

    points = []

    def check():
        points.append(1)
        if len(points) == 3:
            raise Cancelled

    previous = cancel._check
    calls, handle = _unet_calls(sd)
    cancel.set_check(check)
    try:
        with pytest.raises(Cancelled):
            _optimise(run, sd, norm, steps=50)
    finally:
        cancel.set_check(previous)
        handle.remove()
    assert len(calls) == 2 * RENDER["render_steps"]  # two steps ran, the third never started
    assert _untouched(sd.model)
    assert torch.allclose(_core_render(sd.model, sd, 3), _core_render(sd.model.clone(), sd, 3))


def test_refusals_before_any_render(run, sd, norm, bank, tmp_path):
    import comfy.supported_models

    from creative_generation.nodes.engine.bank import EmbeddingBank
    from creative_generation.nodes.engine.budget import InsufficientMemoryError
    from creative_generation.nodes.engine.losses import AnchorTerm
    from creative_generation.nodes.engine.norm import GaussianNorm

    with torch.inference_mode():
        pix2pix = tiny_sd15.model(family=comfy.supported_models.SD15_instructpix2pix)
        wide = tiny_sd15.clip_vision(tmp_path, config=dict(tiny_sd15.VISION, projection_dim=48))
    other = GaussianNorm.from_bank(EmbeddingBank(torch.randn(40, 32), {"prior": "kandinsky-2-1:abc"}), 8)
    calls, handle = _unet_calls(sd)
    try:
        with pytest.raises(ValueError, match="supports SD 1.5 and SDXL"):
            _optimise(run, sd, norm, model=pix2pix)
        with pytest.raises(ValueError, match="fitted on embeddings of 'kandinsky"):
            _optimise(run, sd, other)
        with pytest.raises(ValueError, match="32-d but the generator makes 48-d"):
            _optimise(run, sd, norm, clip_vision=wide)
        with pytest.raises(ValueError, match="sampler"):
            _optimise(run, sd, norm, sampler_name="dpmpp_2m")
        with pytest.raises(ValueError, match="image anchor"):
            _optimise(run, sd, norm, loss_terms=(AnchorTerm(torch.randn(32), "a car", space="kandinsky-2-1:abc"),))
        with pytest.raises(InsufficientMemoryError, match="render smaller"):
            _optimise(run, sd, norm, width=4096, height=4096, render_steps=8)
    finally:
        handle.remove()
    assert not calls and _untouched(sd.model)


def test_image_anchor_lives_in_the_clip_vision_space(run, sd, norm, bank):
    from creative_generation.nodes.sd_generator import vision_of

    images = _core_render(sd.model, sd, 1)
    ((term,),) = run("CreativeSDImageAnchor", clip_vision=sd.clip_vision, weight=0.5, images=images)
    assert term.space == vision_of(sd.clip_vision).identity and term.weight == 0.5 and term.target.shape == (32,)
    ((from_bank,),) = run("CreativeSDImageAnchor", clip_vision=sd.clip_vision, weight=1.0, embeds=bank[0])
    assert torch.allclose(from_bank.target, bank[0].embeds.mean(0))
    _, _, log, *_ = _optimise(run, sd, norm, steps=1, loss_terms=(term,))
    assert "image_anchor" in log.records[0].terms and "anchor_cos" in log.records[0].metrics


def test_the_training_estimate_reads_comfyuis_numbers(sd, norm):
    """The UNet's share is the LoRA-merged weights plus ComfyUI's own formula (equal to ``memory_required`` on a
    CPU in fp32) times the factor measured for a step with gradients; the decode is the VAE's own
    ``memory_used_decode`` times its factor."""
    from creative_generation.nodes import run_inputs
    from creative_generation.nodes.engine import budget
    from creative_generation.nodes.engine.losses import CreativeTerm
    from creative_generation.nodes.sd_generator import (RenderSettings, SDGenerator, attention_map_bytes,
                                                        attention_weights, unet_call_bytes, vision_bytes)

    shape = (2, 4, 64, 64)
    assert unet_call_bytes(sd.model, shape) == int(sd.model.model.memory_required(shape))
    gen = SDGenerator(sd.model, sd.clip, sd.vae, sd.clip_vision, "a car", "", RenderSettings(3, 2.0, "euler",
                                                                                             "sgm_uniform", 512, 512))
    run = run_inputs.build_run(gen, norm, "car", [CreativeTerm(norm)], steps=1, lora_rank=4, train="LoRA")
    act = run.memory_estimate(on_gpu=False).part("training activations").bytes
    merged = 4 * sum(m.weight.numel() for m in attention_weights(sd.model).values())  # fp32 LoRA-merged weights
    maps = attention_map_bytes(sd.model, shape)
    assert maps > 0  # ComfyUI on a CPU: sub-quadratic attention, which materialises its maps
    expected = (3 * (merged + budget.SD_UNET_GRAD * unet_call_bytes(sd.model, shape) + maps)
                + budget.SD_DECODE_GRAD * sd.vae.memory_used_decode((1, 4, 64, 64), sd.vae.vae_dtype)
                + vision_bytes(gen.vision, 1))
    assert act == int(expected)


@pytest.mark.parametrize("family", ["SD 1.5", "SDXL"])
def test_attention_maps_are_counted_at_each_layers_resolution(request, family, monkeypatch):
    """The estimate's self-attention maps equal heads x tokens² summed over the self-attention calls a real UNet
    forward makes (tokens read at each call, on a latent whose sides do not halve evenly); none are counted
    where ComfyUI's attention does not keep them (PyTorch's scaled-dot-product attention)."""
    import comfy.ldm.modules.attention as attention

    from creative_generation.nodes.sd_generator import attention_map_bytes

    model = request.getfixturevalue("sd" if family == "SD 1.5" else "sdxl").model
    unet = model.model.diffusion_model
    shape = (3, 4, 10, 14)
    seen = []
    hooks = [m.attn1.register_forward_pre_hook(lambda mod, args: seen.append(mod.heads * args[0].shape[1] ** 2))
             for m in unet.modules() if isinstance(m, attention.BasicTransformerBlock)]
    dtype = model.model.get_dtype()
    extra = ({"y": torch.zeros(shape[0], unet.label_emb[0][0].in_features, dtype=dtype)}
             if unet.num_classes is not None else {})
    width = next(m.attn2.to_k.in_features for m in unet.modules() if isinstance(m, attention.BasicTransformerBlock))
    try:
        with torch.inference_mode():
            unet(torch.randn(shape, dtype=dtype), timesteps=torch.full((shape[0],), 500.0),
                 context=torch.randn(shape[0], 77, width, dtype=dtype), **extra)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) > 1
    assert attention_map_bytes(model, shape) == shape[0] * sum(seen) * torch.empty((), dtype=dtype).element_size()
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    assert attention_map_bytes(model, shape) == 0


def test_the_sd_path_runs_on_the_bundled_mini_world(run):
    """Loader -> bank -> norm -> SD optimiser on the mini world in SD form (the recommended few-step setting)."""
    model, clip, vae, clip_vision = run("CreativeMiniWorldSDLoader", dtype="auto")
    render = dict(render_steps=4, cfg=2.0, sampler_name="lcm", scheduler="sgm_uniform", width=64, height=64)
    embeds, preview = run("CreativeSDEmbeddingBank", model=model, clip=clip, vae=vae, clip_vision=clip_vision,
                          prompt="a photo of a car", count=24, batch_size=8, seed=0, **render)
    assert embeds.embeds.shape == (24, 64) and torch.isfinite(embeds.embeds).all()
    norm = run("CreativeNormGaussianFit", embeds=embeds, pca_dims=8)[0]
    patched, lora, log, *_ = run("CreativeSDLoRAOptimizer", model=model, clip=clip, vae=vae, clip_vision=clip_vision,
                                   norm=norm, prompt="a photo of a {subject}", subject="car", steps=3,
                                   learning_rate=1e-3, lora_rank=10, seed=0, creative_weight=1.0, **render)
    assert log.steps_run == 3 and lora and patched.patches and not model.patches


@pytest.fixture
def embeddings_folder(comfy_inprocess, monkeypatch, tmp_path):
    """ComfyUI's embeddings folder pointed at a scratch dir for one test (never the shared install's)."""
    folder_paths = comfy_inprocess.folder_paths
    _, extensions = folder_paths.folder_names_and_paths["embeddings"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(tmp_path)], extensions))
    return tmp_path


def _core_encode(clip, text):
    import nodes

    with torch.inference_mode():
        ((cond, extra),) = nodes.CLIPTextEncode().encode(clip, text)[0]
    return cond.clone(), extra["pooled_output"].clone()


@pytest.mark.parametrize("family", ["SD 1.5", "SDXL"])
def test_a_saved_token_is_cores_embedding_and_encodes_as_the_optimiser_did(request, run, norm, pack_nodes, family,
                                                                          embeddings_folder):
    """A token run's embedding, saved by Save SD Embedding, is core's file (SD 1.5: emb_params [1, w]; SDXL:
    clip_l and clip_g): core CLIPTextEncode of 'a photo of embedding:<name>' with the embeddings folder on that
    file gives the conditioning (and pooled output) the optimiser encodes with the same vectors."""
    from safetensors.torch import load_file

    from creative_generation.nodes import run_inputs
    from creative_generation.nodes.engine.losses import CreativeTerm
    from creative_generation.nodes.sd_generator import TRAIN_CHOICES, RenderSettings, SDGenerator

    sd = request.getfixturevalue("sd" if family == "SD 1.5" else "sdxl")
    if family == "SD 1.5":
        _, _, _, _, _, embedding = _optimise(run, sd, norm, steps=2, train="token")
    else:  # the tiny SDXL set embeds in the same CLIP vision space (same seed), so the norm serves it too
        embedding = _optimise(run, sd, norm, steps=2, train="token+lora")[5]
    run("CreativeSaveSDEmbedding", embedding=embedding, filename_prefix="creative_car")
    (saved,) = embeddings_folder.glob("creative_car_*.safetensors")
    tensors = load_file(saved)
    widths = {"SD 1.5": {"emb_params": 64}, "SDXL": {"clip_l": 64, "clip_g": 1280}}[family]
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: (1, w) for k, w in widths.items()}

    with torch.inference_mode():  # a CLIP as a checkpoint loader makes it: its tokenizer reads the embeddings folder
        clip = (tiny_sd15.clip if family == "SD 1.5" else tiny_sd15.sdxl_clip)(0)
    for tower in clip.tokenize("x"):
        getattr(clip.tokenizer, f"clip_{tower}").embedding_directory = [str(embeddings_folder)]
    core_cond, core_pooled = _core_encode(clip, f"a photo of embedding:{saved.stem}")
    assert not torch.allclose(core_cond, _core_encode(clip, "a photo of")[0][:, :core_cond.shape[1]])

    with torch.inference_mode(False):
        gen = SDGenerator(sd.model, sd.clip, sd.vae, sd.clip_vision, "a photo of car", "",
                          RenderSettings(2, 1.0, "euler", "sgm_uniform", 32, 32), template="a photo of {subject}")
        training = gen.open_training(run_inputs.build_run(gen, norm, "car", [CreativeTerm(norm)], steps=1,
                                                          lora_rank=4, train="token", train_choices=TRAIN_CHOICES))
        try:
            keys = {"emb_params": "l", "clip_l": "l", "clip_g": "g"}
            with torch.no_grad():
                for key, value in tensors.items():
                    training.token[keys[key]].copy_(value)
            ((cond, extra),) = training.conditioning()
        finally:
            training.close()
    assert torch.allclose(cond.detach(), core_cond, atol=1e-5)
    assert torch.allclose(extra["pooled_output"].detach(), core_pooled, atol=1e-5)


def test_a_token_run_moves_renders_into_the_tails(run, embeddings_folder):
    """The token alone (no LoRA) lowers the norm's log-likelihood of core's renders of its prompt, against the
    subject word it started from (step 0), at the same seeds; the MODEL output carries no LoRA. On the mini
    world in SD form: its text encoder was trained with its UNet, so the prompt steers the renders (the tiny
    random set's renders hardly depend on the text)."""
    from creative_generation.nodes.sd_generator import vision_of

    model, clip, vae, clip_vision = run("CreativeMiniWorldSDLoader", dtype="auto")
    render = dict(render_steps=4, cfg=2.0, sampler_name="lcm", scheduler="sgm_uniform", width=64, height=64)
    embeds, _ = run("CreativeSDEmbeddingBank", model=model, clip=clip, vae=vae, clip_vision=clip_vision,
                    prompt="a photo of a car", count=24, batch_size=8, seed=0, **render)
    norm = run("CreativeNormGaussianFit", embeds=embeds, pca_dims=8)[0]
    patched, lora, log, _, _, embedding = run(
        "CreativeSDLoRAOptimizer", model=model, clip=clip, vae=vae, clip_vision=clip_vision, norm=norm,
        prompt="a photo of a {subject}", subject="car", steps=6, learning_rate=1e-1, lora_rank=4, seed=0,
        creative_weight=1.0, train="token", **render)
    assert log.steps_run == 6 and lora == {} and not patched.patches and embedding is not None
    run("CreativeSaveSDEmbedding", embedding=embedding, filename_prefix="token")
    (saved,) = embeddings_folder.glob("token_*.safetensors")
    tokenizers = [getattr(clip.tokenizer, f"clip_{tower}") for tower in clip.tokenize("x")]
    folders = [t.embedding_directory for t in tokenizers]
    for tokenizer in tokenizers:
        tokenizer.embedding_directory = [str(embeddings_folder)]
    vision = vision_of(clip_vision)

    def log_likelihood(text):
        with torch.no_grad():
            images = _core_render(model, SimpleNamespace(clip=clip, vae=vae), 100, render=render, batch=4, text=text)
            return float(norm.log_prob(vision(images).double()).mean())

    try:
        base, learned = log_likelihood("a photo of a car"), log_likelihood(f"a photo of a embedding:{saved.stem}")
    finally:
        for tokenizer, folder in zip(tokenizers, folders):
            tokenizer.embedding_directory = folder
    print(f"log-likelihood under the norm, 4 seeds: subject word {base:.2f}, trained token {learned:.2f}")
    assert learned < base - 1.0, (base, learned)


def test_train_mode_and_embedding_name_are_checked(pack_nodes, run, sd, norm):
    optimiser, saver = pack_nodes["CreativeSDLoRAOptimizer"], pack_nodes["CreativeSaveSDEmbedding"]
    assert isinstance(optimiser.validate_inputs(train="tokens"), str)
    assert optimiser.validate_inputs(train="token+lora") is True
    assert isinstance(optimiser.validate_inputs(gradient_checkpointing="true"), str)  # only a real boolean
    assert isinstance(saver.validate_inputs(filename_prefix="my token"), str)
    with pytest.raises(ValueError, match="trains no token"):
        run("CreativeSaveSDEmbedding", embedding=None, filename_prefix="x")
    with pytest.raises(ValueError, match="place for it in the prompt"):
        _optimise(run, sd, norm, prompt="a photo of a thing", train="token")


def test_gradient_checkpointing_gives_the_same_run_in_less_estimated_memory(run, sd, norm):
    """Recomputing the render steps and the decode in the backward pass changes no gradient: the same LoRA and
    token after a few steps; the preflight's estimate of the activations is smaller with it."""
    from creative_generation.nodes import run_inputs
    from creative_generation.nodes.engine.losses import CreativeTerm
    from creative_generation.nodes.sd_generator import TRAIN_CHOICES, RenderSettings, SDGenerator

    first_block = sd.model.model.diffusion_model.input_blocks[0][0]  # the first conv
    calls = []
    handle = first_block.register_forward_pre_hook(lambda *a: calls.append(1))  # inside the UNet's own forward
    try:
        plain = _optimise(run, sd, norm, steps=3, train="token+lora")
        runs_without = len(calls)
        checkpointed = _optimise(run, sd, norm, steps=3, train="token+lora", gradient_checkpointing=True)
    finally:
        handle.remove()
    assert runs_without == 3 * RENDER["render_steps"]
    assert len(calls) - runs_without == 2 * runs_without  # each UNet call ran again in the backward pass
    assert _untouched(sd.model) and not sd.model.wrappers
    assert plain[1].keys() == checkpointed[1].keys()
    assert all(torch.allclose(plain[1][k], checkpointed[1][k], atol=1e-5) for k in plain[1])
    assert torch.allclose(plain[5].tensors["emb_params"], checkpointed[5].tensors["emb_params"], atol=1e-5)
    assert not torch.allclose(plain[5].tensors["emb_params"], _optimise(run, sd, norm, steps=1, train="token")[5]
                              .tensors["emb_params"])  # three steps moved the token

    def activations(checkpointing, train="lora"):
        gen = SDGenerator(sd.model, sd.clip, sd.vae, sd.clip_vision, "a car", "",
                          RenderSettings(4, 2.0, "euler", "sgm_uniform", 512, 512), checkpointing=checkpointing)
        r = run_inputs.build_run(gen, norm, "car", [CreativeTerm(norm)], steps=1, lora_rank=4, train=train,
                                 train_choices=TRAIN_CHOICES)
        return r.memory_estimate(on_gpu=False).part("training activations").bytes

    assert activations(True) < activations(False) / 2
    assert activations(True, "token+lora") > activations(True)  # the text encoding's activations count too


def test_old_saved_workflows_keep_their_meaning(pack_nodes):
    """The new inputs come last and optional (widgets_values of saved workflows keep their positions), the new
    output last (links to outputs 0-4 stay)."""
    schema = pack_nodes["CreativeSDLoRAOptimizer"].FINALIZE_SCHEMA()
    names = [i.id for i in schema.inputs]
    assert names[-3:] == ["negative_prompt", "train", "gradient_checkpointing"]
    assert all(i.optional for i in schema.inputs[-2:])
    assert [o.io_type for o in schema.outputs] == ["MODEL", "LORA_MODEL", "CREATIVE_LOG", "IMAGE", "IMAGE",
                                                   "CREATIVE_SD_EMBEDDING"]


def test_a_rollback_restores_the_token_with_the_lora(sd, norm):
    """A gate's rollback (``Training.restore``) puts back both parts of a token+lora snapshot."""
    from creative_generation.nodes import run_inputs
    from creative_generation.nodes.engine.losses import CreativeTerm
    from creative_generation.nodes.sd_generator import TRAIN_CHOICES, RenderSettings, SDGenerator

    with torch.inference_mode(False):
        gen = SDGenerator(sd.model, sd.clip, sd.vae, sd.clip_vision, "a photo of car", "",
                          RenderSettings(2, 1.0, "euler", "sgm_uniform", 32, 32), template="a photo of {subject}")
        training = gen.open_training(run_inputs.build_run(gen, norm, "car", [CreativeTerm(norm)], steps=1,
                                                          lora_rank=4, train="token+lora",
                                                          train_choices=TRAIN_CHOICES))
        try:
            kept = training.snapshot()
            with torch.no_grad():
                for p in training.params:
                    p.add_(1.0)
            assert not torch.equal(training.snapshot().token["l"], kept.token["l"])
            training.restore(kept)
            now = training.snapshot()
        finally:
            training.close()
    assert torch.equal(now.token["l"], kept.token["l"]) and all(torch.equal(now.lora[k], kept.lora[k]) for k in kept.lora)
