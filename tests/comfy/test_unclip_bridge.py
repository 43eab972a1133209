"""Prior embeddings into the user's own ComfyUI models: the CLIP_VISION_OUTPUT bridge's width
check, core ``unCLIPConditioning -> KSampler -> VAEDecode`` on tiny SD 2.1 unCLIP-L/-H and SDXL
checkpoints (core's own classes and detection, no text encoder, hand-made CONDITIONING), the
``CreativeCoreRenderer`` (parity with that core chain, inside the optimiser with its gate), and
the SDXL example workflow against a live server's ``/object_info``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny_sdxl

REPO = Path(__file__).resolve().parents[2]
SDXL_WORKFLOW = REPO / "example_workflows" / "creative_k22_prior_to_sdxl.json"
SIZE = 64


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def core(comfy_inprocess):
    import creative_generation.nodes.core_render_nodes as crn

    return crn


@pytest.fixture(scope="module")
def bridge(pack_nodes):
    return pack_nodes["CreativeEmbedsToCLIPVision"]


@pytest.fixture(scope="module")
def models(comfy_inprocess):
    """``{name: (MODEL, VAE, positive, negative, width)}``, loaded lazily through core detection."""
    built = {}
    recipes = {
        "unclip-l": (lambda: tiny_sdxl.sd21_unclip_state_dict("L"), tiny_sdxl.sd21_conditioning, 768),
        "unclip-h": (lambda: tiny_sdxl.sd21_unclip_state_dict("H"), tiny_sdxl.sd21_conditioning, 1024),
        "sdxl": (tiny_sdxl.sdxl_state_dict, tiny_sdxl.sdxl_conditioning, 1280),
    }

    def get(name):
        if name not in built:
            state_dict, conditioning, width = recipes[name]
            with torch.inference_mode():  # as the executor runs CheckpointLoaderSimple
                model, vae = tiny_sdxl.load(state_dict())
            built[name] = (model, vae, conditioning(seed=1), conditioning(seed=2), width)
        return built[name]

    return get


def _bank(width: int, n: int = 3, seed: int = 0, prior: str = "tiny-prior"):
    from creative_generation.nodes.engine.bank import EmbeddingBank

    g = torch.Generator().manual_seed(seed)
    return EmbeddingBank(torch.randn(n, width, generator=g), {"prior": prior})


def _ksampler_chain(model, vae, positive, negative, clip_vision_output, *, seed=3, steps=1, cfg=2.0,
                    strength=1.0, noise_augmentation=0.0):
    """Core nodes, exactly as a graph would wire them (under inference mode like the executor)."""
    import nodes

    with torch.inference_mode():
        cond = nodes.unCLIPConditioning().apply_adm(positive, clip_vision_output, strength, noise_augmentation)[0]
        latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
        samples = nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", cond, negative, latent)[0]
        return nodes.VAEDecode().decode(vae, samples)[0].clone()


# --------------------------------------------------------------------------- the bridge's width check


def test_bridge_schema_keeps_id_and_adds_target_last(bridge, core):
    info = bridge.GET_NODE_INFO_V1()
    assert info["name"] == "CreativeEmbedsToCLIPVision"
    assert info["input_order"]["required"] == ["embeds", "start", "count"]
    assert info["input_order"]["optional"] == ["target"]
    kind, opts = info["input"]["optional"]["target"]
    assert kind == "COMBO" and opts["options"] == ["any", "SD 2.1 unCLIP-L (768)", "SD 2.1 unCLIP-H (1024)", "SDXL revision (1280)"]
    assert opts["default"] == "any"
    assert info["output"] == ["CLIP_VISION_OUTPUT"]


@pytest.mark.parametrize("width,target,ok", [
    (768, "any", True), (1024, "any", True), (1280, "any", True), (32, "any", False), (512, "any", False),
    (768, "SD 2.1 unCLIP-L (768)", True), (1280, "SD 2.1 unCLIP-L (768)", False),
    (1024, "SD 2.1 unCLIP-H (1024)", True), (768, "SD 2.1 unCLIP-H (1024)", False),
    (1280, "SDXL revision (1280)", True), (768, "SDXL revision (1280)", False), (1024, "SDXL revision (1280)", False),
])
def test_bridge_checks_width_against_target(bridge, width, target, ok):
    bank = _bank(width, prior="my-prior")
    if ok:
        out = bridge.execute(bank, 1, 2, target).args[0]
        assert out.image_embeds.shape == (2, width) and out["image_embeds"].dtype == torch.float32
        torch.testing.assert_close(out.image_embeds, bank.embeds[1:3])
        assert out.image_embeds.data_ptr() != bank.embeds.data_ptr()  # a copy, not the bank itself
        return
    with pytest.raises(ValueError) as err:
        bridge.execute(bank, 0, 1, target)
    msg = str(err.value)
    assert f"{width}-d" in msg and "my-prior" in msg
    for name in ("Kandinsky 2.1", "Karlo", "SD 2.1 unCLIP-L", "SD 2.1 unCLIP-H", "Kandinsky 2.2", "SDXL revision"):
        assert name in msg, (name, msg)


def test_bridge_default_target_is_any(bridge):
    assert bridge.execute(_bank(1280), 0, 1).args[0].image_embeds.shape == (1, 1280)
    with pytest.raises(ValueError, match="no unCLIP/revision model takes that width"):
        bridge.execute(_bank(32), 0, 1)
    with pytest.raises(ValueError, match="past the end"):
        bridge.execute(_bank(768, n=2), 5, 1)


# --------------------------------------------------------------------------- core unCLIP paths


@pytest.mark.parametrize("name,target,model_class", [
    ("unclip-l", "SD 2.1 unCLIP-L (768)", "SD21UNCLIP"),
    ("unclip-h", "SD 2.1 unCLIP-H (1024)", "SD21UNCLIP"),
    ("sdxl", "SDXL revision (1280)", "SDXL"),
])
def test_bridge_drives_core_unclip_ksampler_vaedecode(models, bridge, core, name, target, model_class):
    """Bank -> CreativeEmbedsToCLIPVision -> unCLIPConditioning -> KSampler -> VAEDecode; and the
    CoreRenderer draws each row exactly as that chain does (cfg 1 on SDXL: one UNet pass a step)."""
    model, vae, positive, negative, width = models(name)
    assert type(model.model).__name__ == model_class  # core's detection, as for a downloaded file
    assert core.model_embed_width(model) == width
    cfg = 1.0 if name == "sdxl" else 2.0
    bank = _bank(width, n=2, seed=5)
    chain = [_ksampler_chain(model, vae, positive, negative, bridge.execute(bank, i, 1, target).args[0], cfg=cfg)
             for i in range(2)]
    for image in chain:
        assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert (chain[0] - chain[1]).abs().max() > 1e-3, "the embedding must reach the UNet (adm / SDXL pooled slot)"
    renderer = core.CoreRenderer(model, vae, positive, negative,
                                 core.CoreRenderSettings(steps=1, cfg=cfg, width=SIZE, height=SIZE, seed=3))
    torch.testing.assert_close(renderer(bank.embeds), torch.cat(chain))


def test_wrong_width_is_what_core_would_choke_on(models, core):
    """Without the check a 768-d embedding dies inside SDXL's noise augmentor; the renderer says why."""
    model, vae, positive, negative, _ = models("sdxl")
    with pytest.raises(RuntimeError):
        _ksampler_chain(model, vae, positive, negative, core.clip_vision_output(torch.randn(1, 768)))
    renderer = core.CoreRenderer(model, vae, positive, negative, core.CoreRenderSettings(steps=1, width=SIZE, height=SIZE))
    with pytest.raises(ValueError) as err:
        renderer(torch.randn(1, 768))
    assert "768-d" in str(err.value) and "1280-d" in str(err.value) and "Kandinsky 2.2" in str(err.value)


def test_core_renderer_refuses_models_without_unclip(pack_nodes, core, models):
    import comfy.model_patcher

    # e.g. an SD 1.5 model: a MODEL whose module has no CLIP-embedding noise augmentor
    not_unclip = comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), "cpu", "cpu")
    node = pack_nodes["CreativeCoreRenderer"]
    _, vae, positive, negative, _ = models("unclip-l")
    with pytest.raises(ValueError, match="does not take CLIP image embeddings.*SD 2.1 unCLIP"):
        node.execute(not_unclip, vae, positive, negative, 0, 1, 1.0, "euler", "normal", SIZE, SIZE, 1.0, 0.0)


# --------------------------------------------------------------------------- CreativeCoreRenderer


def test_core_renderer_node_schema(pack_nodes):
    info = pack_nodes["CreativeCoreRenderer"].GET_NODE_INFO_V1()
    assert info["input_order"]["required"] == ["model", "vae", "positive", "negative", "seed", "steps", "cfg",
                                               "sampler_name", "scheduler", "width", "height", "strength",
                                               "noise_augmentation"]
    req = info["input"]["required"]
    assert [req[k][0] for k in ("model", "vae", "positive", "negative")] == ["MODEL", "VAE", "CONDITIONING",
                                                                            "CONDITIONING"]
    import comfy.samplers

    assert req["sampler_name"][1]["options"] == comfy.samplers.SAMPLER_NAMES
    assert req["scheduler"][1]["options"] == comfy.samplers.SCHEDULER_NAMES
    assert req["seed"][1].get("control_after_generate") is True
    assert info["output"] == ["CREATIVE_RENDERER"]


def test_core_renderer_node_equals_the_core_chain(pack_nodes, core, models):
    model, vae, positive, negative, width = models("unclip-l")
    node = pack_nodes["CreativeCoreRenderer"]
    renderer = node.execute(model, vae, positive, negative, 3, 1, 2.0, "euler", "normal", SIZE, SIZE, 0.8,
                            0.1).args[0]
    assert renderer.settings.steps == 1 and renderer.embed_width == width
    embeds = _bank(width, n=2, seed=7).embeds
    seen = []
    images = renderer(embeds, progress=lambda done, total: seen.append((done, total)))
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert not images.is_inference() and not images.requires_grad
    assert seen == [(1, 2), (2, 2)]
    for i in range(2):  # each row exactly as unCLIPConditioning -> KSampler -> VAEDecode draws it
        expected = _ksampler_chain(model, vae, positive, negative, core.clip_vision_output(embeds[i:i + 1]),
                                   seed=3, steps=1, cfg=2.0, strength=0.8, noise_augmentation=0.1)
        torch.testing.assert_close(images[i:i + 1], expected)
    torch.testing.assert_close(renderer(embeds[1:]), images[1:])  # position in the batch does not matter


def test_core_renderer_in_training_mode(core, models):
    """The optimiser calls renderers with inference mode off and grad possibly on."""
    model, vae, positive, negative, width = models("unclip-l")
    renderer = core.CoreRenderer(model, vae, positive, negative, core.CoreRenderSettings(steps=1, width=SIZE, height=SIZE))
    with torch.inference_mode(False), torch.enable_grad():
        embeds = torch.nn.Parameter(torch.randn(1, width))
        images = renderer(embeds * 2)
        assert not images.requires_grad and not images.is_inference()
        (images.sum() * embeds.sum()).backward()  # the images can enter autograd-recorded ops afterwards
    assert embeds.grad is not None


def test_core_renderer_is_cancellable(core, models, comfy_inprocess):
    model, vae, positive, negative, width = models("unclip-l")
    renderer = core.CoreRenderer(model, vae, positive, negative, core.CoreRenderSettings(steps=2, width=SIZE, height=SIZE))
    mm = comfy_inprocess.model_management
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            renderer(torch.randn(1, width))
    finally:
        mm.interrupt_current_processing(False)


class RecordingJudge:
    """A stand-in MLLM: P(yes) from the images, and a record of what it was shown."""

    def __init__(self):
        self.images = []

    def p_yes(self, images, question):
        self.images.append(images)
        return torch.full((images.shape[0],), 0.9)


def test_optimiser_gate_renders_through_core_model(pack_nodes, models, tiny_models):
    """LoRA optimiser node + the tiny Kandinsky 2.1 prior (768-d) + core renderer on unCLIP-L + gate."""
    import example_models as em
    from creative_generation.nodes.engine.bank import sample_bank
    from creative_generation.nodes.engine.gate import ValidityGate
    from creative_generation.nodes.engine.norm import GaussianNorm
    from creative_generation.nodes.engine.prior import load_prior

    prior = load_prior(str(tiny_models.path(em.resolve("diffusers", "kandinsky-2-1-prior"))))
    bank = sample_bank(prior, "a photo of a vehicle", 24, batch_size=24, steps=2, seed=0)
    assert bank.dim == 768  # CLIP ViT-L/14 width, as SD 2.1 unCLIP-L takes
    norm = GaussianNorm.from_bank(bank, 4)
    model, vae, positive, negative, _ = models("unclip-l")
    renderer = pack_nodes["CreativeCoreRenderer"].execute(model, vae, positive, negative, 0, 1, 1.0, "euler",
                                                          "normal", SIZE, SIZE, 1.0, 0.0).args[0]
    judge = RecordingJudge()
    optimiser = pack_nodes["CreativeLoRAOptimizer"].PREPARE_CLASS_CLONE({"UNIQUE_ID": "9"})
    with torch.inference_mode():  # as the executor calls every node
        out = optimiser.execute(prior, norm, "vehicle", 2, 1e-3, 2, "token + LoRA", 0, "a photo of a {token}", 1.0,
                                1.0, 2, loss_terms=None, gate=ValidityGate(judge, every=1), renderer=renderer)
    log, gate_images = out.args[2], out.args[4]
    assert log.stop_reason == "max_steps" and log.steps_run == 2
    assert [None if r.gate is None else r.gate.p_yes for r in log.records] == [pytest.approx(0.9)] * 2
    assert len(judge.images) == 2 and all(i.shape == (1, SIZE, SIZE, 3) for i in judge.images)
    assert gate_images.shape == (2, SIZE, SIZE, 3) and torch.isfinite(gate_images).all()
    assert (judge.images[0] - judge.images[1]).abs().max() > 0, "the trained concept changes the render"


def test_optimiser_rare_start_inverts_the_rarest_accepted_sample_first(pack_nodes, models, tiny_models):
    """start = rarest accepted bank sample: a bank of 16 is drawn, the gate judges its rarest, the inversion
    runs before the creative steps (one progress job), with 2 samples per step and the bank ceiling."""
    import example_models as em
    from creative_generation.nodes.engine.bank import sample_bank
    from creative_generation.nodes.engine.gate import ValidityGate
    from creative_generation.nodes.engine.norm import GaussianNorm
    from creative_generation.nodes.engine.prior import load_prior
    from creative_generation.nodes.engine.rare_start import INVERSION_STEPS
    from creative_generation.nodes.pipeline_nodes import RARE_START

    prior = load_prior(str(tiny_models.path(em.resolve("diffusers", "kandinsky-2-1-prior"))))
    norm = GaussianNorm.from_bank(sample_bank(prior, "a photo of a vehicle", 24, batch_size=24, steps=2, seed=0), 4)
    model, vae, positive, negative, _ = models("unclip-l")
    renderer = pack_nodes["CreativeCoreRenderer"].execute(model, vae, positive, negative, 0, 1, 1.0, "euler",
                                                          "normal", SIZE, SIZE, 1.0, 0.0).args[0]
    judge = RecordingJudge()
    optimiser = pack_nodes["CreativeLoRAOptimizer"].PREPARE_CLASS_CLONE({"UNIQUE_ID": "9"})
    with torch.inference_mode():
        out = optimiser.execute(prior, norm, "vehicle", 2, 1e-3, 2, "token + LoRA", 0, "a photo of a {token}", 1.0,
                                1.0, 2, loss_terms=None, gate=ValidityGate(judge, every=1), renderer=renderer,
                                samples_per_step=2, beyond_bank_ceiling=True, start=RARE_START, start_bank=16)
    log = out.args[2]
    assert log.stop_reason == "max_steps" and log.steps_run == 2
    # the selection judged its first batch (the whole bank of 16; the rarest passed), then each creative
    # step's gate judged its 2 samples
    assert [i.shape[0] for i in judge.images] == [16, 2, 2]
    assert set(log.records[0].terms) == {"creative"} and log.records[0].loss >= 0  # the ceiling's hinge
    assert len(out.args[0].concept.token) > 0 and INVERSION_STEPS == 100


# --------------------------------------------------------------------------- example workflow, live server


def _workflow() -> dict:
    return json.loads(SDXL_WORKFLOW.read_text())


def test_sdxl_example_workflow_converts_against_live_object_info(ui_to_api, object_info):
    wf = _workflow()
    api = ui_to_api(wf)
    by_type = {}
    for node_id, node in api.items():
        by_type.setdefault(node["class_type"], []).append((node_id, node))
    for needed in ("CreativeLoadPrior", "CreativePriorSampler", "CreativeNormGaussianFit", "CreativeLoRAOptimizer",
                   "CreativeCoreRenderer", "CreativeEmbedsToCLIPVision", "unCLIPConditioning", "KSampler",
                   "VAEDecode", "CheckpointLoaderSimple"):
        assert needed in by_type, (needed, sorted(by_type))
    for class_type, nodes in by_type.items():  # every input the server requires is set, no unknown ones
        info = object_info[class_type]
        for _, node in nodes:
            required = set(info["input"].get("required", {}))
            known = required | set(info["input"].get("optional", {}))
            assert required <= set(node["inputs"]), (class_type, required - set(node["inputs"]))
            assert set(node["inputs"]) <= known, (class_type, set(node["inputs"]) - known)
    (bridge_id, bridge), = by_type["CreativeEmbedsToCLIPVision"]
    assert bridge["inputs"]["target"] == "SDXL revision (1280)"
    (_, unclip), = by_type["unCLIPConditioning"]
    assert unclip["inputs"]["clip_vision_output"][0] == bridge_id
    (renderer_id, renderer), = by_type["CreativeCoreRenderer"]
    (optimiser_id, optimiser), = by_type["CreativeLoRAOptimizer"]
    assert optimiser["inputs"]["renderer"] == [renderer_id, 0]
    (ckpt_id, _), = by_type["CheckpointLoaderSimple"]
    assert renderer["inputs"]["model"] == [ckpt_id, 0] and renderer["inputs"]["vae"] == [ckpt_id, 2]
    models = [m for n in wf["nodes"] for m in n.get("properties", {}).get("models", [])]
    urls = " ".join(m["url"] for m in models)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in urls  # a single .safetensors: the frontend can fetch it
    # the prior is a diffusers folder, which the frontend's download hints cannot hold: the note names it
    note = " ".join(str(v) for n in wf["nodes"] if "Note" in n["type"] for v in n.get("widgets_values", []))
    assert "kandinsky-community/kandinsky-2-2-prior" in note and "kandinsky-community/kandinsky-2-2-prior" not in urls


def test_server_runs_sdxl_revision_and_refuses_a_wrong_target(comfy_server, tiny_models):
    """On a real server: a saved 1280-d bank -> CreativeEmbedsToCLIPVision -> unCLIPConditioning
    -> KSampler -> VAEDecode -> SaveImage on the tiny SDXL checkpoint; then the same graph with
    target unCLIP-L fails in the bridge with the compatible priors in the message."""
    import example_models as em
    from PIL import Image

    ckpt = tiny_models.install(comfy_server, em.resolve("checkpoints", "sd_xl_base_1.0.safetensors"))
    folder = Path(comfy_server.output_dir) / "creative" / "embeds"
    folder.mkdir(parents=True, exist_ok=True)
    _bank(1280, n=2, prior="tiny-k22").save(folder / "bridge_k22_1280.safetensors")
    zero = {"text": "", "tokens": 77, "context_dim": 2048, "pooled_dim": 1280}
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": em.ZERO_CONDITIONING, "inputs": zero},
        "3": {"class_type": "CreativeLoadEmbeds", "inputs": {"file": "bridge_k22_1280.safetensors"}},
        "4": {"class_type": "CreativeEmbedsToCLIPVision",
              "inputs": {"embeds": ["3", 0], "start": 1, "count": 1, "target": "SDXL revision (1280)"}},
        "5": {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["2", 0], "clip_vision_output": ["4", 0],
                                                             "strength": 1.0, "noise_augmentation": 0.0}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["5", 0],
                                                   "negative": ["2", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bridge_sdxl"}},
    }
    res = comfy_server.run(api, timeout=240)
    assert res.status == "success", f"{res}\n{comfy_server.log_tail(40)}"
    (saved,) = res.outputs["9"]["images"]
    with Image.open(Path(comfy_server.output_dir) / saved["subfolder"] / saved["filename"]) as im:
        assert im.size == (SIZE, SIZE)

    api["4"]["inputs"]["target"] = "SD 2.1 unCLIP-L (768)"
    res = comfy_server.run(api, timeout=120)
    assert res.status == "error" and res.error["node_id"] == "4", res
    msg = res.error["exception_message"]
    for part in ("1280-d", "tiny-k22", "SD 2.1 unCLIP-L (768)", "Kandinsky 2.1", "Karlo", "Kandinsky 2.2"):
        assert part in msg, (part, msg)
