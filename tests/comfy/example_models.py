"""Tiny stand-ins for the models that ``example_workflows/*.json`` name, for running them in tests.

A workflow names a model by the value of a loader's widget (``CreativeLoadPrior.prior =
"kandinsky-2-1-prior"``, ``unCLIPCheckpointLoader.ckpt_name = "sd21-unclip-l.ckpt"``, ...) and
by its ``properties.models`` hints (``{name, url, directory}``). Here each such name maps to a
builder of a seeded tiny random model with the same architecture family and embedding width,
which the test installs under its own name (``install_name``) in the test server's model
folder and swaps into the prompt. **A name that is not registered fails the test**: never
skip, because a workflow that cannot be run in CI is a workflow nobody checked.

To support a new workflow, register its models, e.g.::

    @register("diffusers", "kandinsky-2-2-prior", install_name="tiny-kandinsky-2-2-prior")
    def _k22_prior(target: Path, models: TinyModels) -> None:
        build_tiny_prior(target, family="kandinsky-2.2", embed_dim=1280)

and, for a loader class not listed yet, add its model widgets to :data:`MODEL_INPUTS`.
Checkpoints built without a text encoder declare ``conditioning=(context_dim, pooled_dim)``:
the workflow test then replaces the ``CLIPTextEncode`` nodes fed by that checkpoint's CLIP
with the test-support node that outputs zero CONDITIONING of those widths.

``TEST_MODELS`` holds models the behaviour tests use that no workflow names (small 32-d priors,
broken folders, a text-only LLM).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# loader class_type -> {widget input: ComfyUI model folder it names a model of}
MODEL_INPUTS: dict[str, dict[str, str]] = {
    "CreativeLoadPrior": {"prior": "diffusers"},
    "CreativeLoadDecoder": {"decoder": "diffusers"},
    "CreativeLoadMLLM": {"model": "LLM"},
    "CreativeLoadConcept": {"file": "creative_concepts"},
    "CreativeLoadEmbeds": {"file": "creative_embeds"},
    "unCLIPCheckpointLoader": {"ckpt_name": "checkpoints"},
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "LoraLoader": {"lora_name": "loras"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "CreativeMiniWorldSDLoader": {},  # the bundled mini world in SD form: no file to choose
    "SaveLoRA": {},  # core files it under "loaders", but it writes a LoRA and reads none
}
# Model folders whose files users make themselves (no download hint expected in a workflow).
USER_MADE_FOLDERS = {"creative_concepts", "creative_embeds"}
# The pack's own models (the mini world): listed by the loaders next to the user's, used as they are.
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "models"
BUNDLED_FOLDERS = {"diffusers", "LLM"}  # loader folders the bundled models are listed in
# Nodes that encode text with a loader's CLIP (input holding the prompt, CLIP input).
TEXT_ENCODERS: dict[str, tuple[str, str]] = {
    "CLIPTextEncode": ("text", "clip"),
    "CLIPTextEncodeSDXL": ("text_g", "clip"),
    "CLIPTextEncodeSDXLRefiner": ("text", "clip"),
}
ZERO_CONDITIONING = "TestSupportZeroConditioning"  # tests/comfy/test_support_pack


class UnknownModelError(LookupError):
    """A workflow names a model (or a loader) this registry has no tiny stand-in for."""


@dataclass(frozen=True)
class TinyModel:
    folder: str  # ComfyUI model folder kind: "diffusers", "LLM", "checkpoints", "creative_concepts", ...
    install_name: str  # file or folder name on the test server
    build: Callable[[Path, "TinyModels"], None] | None  # writes the model to the given path; None: bundled
    conditioning: tuple[int, int] | None = None  # (context_dim, pooled_dim) when built without a text encoder
    loader_overrides: tuple[tuple[str, object], ...] = ()  # loader inputs to set when this stand-in is swapped in
    doc: str = ""
    miniworld_sd: bool = False  # no tiny file: the rewrite swaps its loader for Load Mini-World SD (see MINIWORLD_SD)


WORKFLOW_MODELS: dict[tuple[str, str], TinyModel] = {}  # (folder, name the workflow uses) -> stand-in
TEST_MODELS: dict[str, TinyModel] = {}  # install_name -> model, for tests that name them directly


def register(folder: str, *workflow_names: str, install_name: str, conditioning: tuple[int, int] | None = None,
             loader_overrides: dict | None = None) -> Callable:
    """Decorator: ``build(target, models)`` makes the stand-in for ``workflow_names`` in ``folder``
    (no names: a test-only model, found by ``install_name`` in :data:`TEST_MODELS`).

    ``loader_overrides``: inputs of the loader node to set when the stand-in replaces a model
    (only where the loader has that input), for what a random tiny model cannot do."""

    def deco(build: Callable[[Path, "TinyModels"], None]):
        model = TinyModel(folder, install_name, build, conditioning, tuple((loader_overrides or {}).items()),
                          (build.__doc__ or "").strip())
        for name in workflow_names:
            key = (folder, name)
            if key in WORKFLOW_MODELS:
                raise ValueError(f"{key} registered twice")
            WORKFLOW_MODELS[key] = model
        TEST_MODELS[install_name] = model
        return build

    return deco


def is_bundled(folder: str, name: str) -> bool:
    """A model the pack ships (``models/miniworld/...``): no stand-in and no download hint needed."""
    return folder in BUNDLED_FOLDERS and "/" in name and (BUNDLED_DIR / name).is_dir()


# SD-path models (issue 17) with no tiny file stand-in: the SD optimiser needs the checkpoint's text encoder, and
# core's loaders recognise SD 1.5 text encoders and CLIP vision models only at full size (hundreds of MB). The
# rewrite swaps their loaders (CheckpointLoaderSimple, LoraLoader, CLIPVisionLoader) for Load Mini-World SD, whose
# MODEL, CLIP, VAE and CLIP_VISION are core's objects of an SD 1.5-family model: the graph after them runs unchanged.
MINIWORLD_SD = "CreativeMiniWorldSDLoader"
MINIWORLD_SD_STANDS_FOR = {
    ("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors"),  # Comfy-Org/stable-diffusion-v1-5-archive
    ("loras", "Hyper-SD15-4steps-lora.safetensors"),  # ByteDance/Hyper-SD
    ("clip_vision", "clip_vision_h.safetensors"),  # CLIP ViT-H/14 with projection (IP-Adapter's image encoder)
}


def resolve(folder: str, name: str) -> TinyModel:
    """The stand-in for model ``name`` of ``folder``, or :class:`UnknownModelError` saying what to add.
    A bundled model stands for itself."""
    if is_bundled(folder, name):
        return TinyModel(folder, name, None, doc="bundled with the pack")
    if (folder, name) in MINIWORLD_SD_STANDS_FOR:
        return TinyModel(folder, name, None, doc="the mini world in SD form (its loader is swapped)", miniworld_sd=True)
    try:
        return WORKFLOW_MODELS[(folder, name)]
    except KeyError:
        known = sorted(f"{f}/{n}" for f, n in WORKFLOW_MODELS)
        raise UnknownModelError(
            f"no tiny test model registered for '{name}' in models/{folder}. Register one in "
            f"tests/comfy/example_models.py (@register({folder!r}, {name!r}, install_name=...)). "
            f"Known: {known}") from None


def loader_inputs(class_type: str, object_info: dict) -> dict[str, str]:
    """Model widgets of a node type; :class:`UnknownModelError` for a loader we do not know.

    A node counts as a loader when its name says so (``*Loader*``, ``Load*``, ``CreativeLoad*``)
    or its category is ``loaders`` / ``*/loaders``: such nodes read files a test must provide.
    """
    if class_type in MODEL_INPUTS:
        return MODEL_INPUTS[class_type]
    category = str(object_info.get(class_type, {}).get("category", ""))
    if ("Loader" in class_type or class_type.startswith(("Load", "CreativeLoad"))
            or category == "loaders" or category.startswith("loaders/") or category.endswith("/loaders")):
        raise UnknownModelError(
            f"node type {class_type} loads files but tests/comfy/example_models.py has no entry for it: add its "
            f"model widgets to MODEL_INPUTS and register tiny stand-ins for the models it names.")
    return {}


class TinyModels:
    """Builds each stand-in once per test session, straight into a set of model folders.

    ``folders`` is ``{folder kind: Path}``, normally the session server's ``models`` dict, so a
    model is built where the server (and a second server sharing its folders) loads it from:
    same files, same path. ``install`` links a model into another server's folders if needed.
    """

    def __init__(self, folders: dict[str, Path]):
        self.folders = {k: Path(v) for k, v in folders.items()}
        self.timings: dict[str, float] = {}

    def path(self, model: TinyModel | str) -> Path:
        if isinstance(model, str):
            model = TEST_MODELS[model]
        target = self.folders[model.folder] / model.install_name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.{time.monotonic_ns()}.tmp"
            t0 = time.monotonic()
            model.build(tmp, self)
            tmp.rename(target)  # a half-built model never appears under its name
            self.timings[model.install_name] = time.monotonic() - t0
        return target

    def install(self, server, model: TinyModel | str) -> str:
        """Make the model available in ``server.models[folder]``; returns the name to write
        into the loader's widget."""
        if isinstance(model, str):
            model = TEST_MODELS[model]
        if model.miniworld_sd:
            raise AssertionError(f"{model.install_name} has no file stand-in: swap its loader for {MINIWORLD_SD} first")
        if model.build is None:  # bundled: the server lists it already
            return model.install_name
        source = self.path(model)
        link = Path(server.models[model.folder]) / model.install_name
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source, target_is_directory=source.is_dir())
        return model.install_name


# --------------------------------------------------------------------------- example workflow models


@register("diffusers", "kandinsky-2-1-prior", install_name="tiny-kandinsky-2-1-prior")
def _k21_prior(target: Path, models: TinyModels) -> None:
    """kandinsky-community/kandinsky-2-1-prior: a tiny Kandinsky 2.1 prior with the real 768-d
    embedding width (CLIP ViT-L/14), so its embeddings fit SD 2.1 unCLIP-L and the 2.1 decoder."""
    from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior

    build_tiny_prior(target, family="kandinsky-2.1", embed_dim=768)


@register("diffusers", "kandinsky-2-1", install_name="tiny-kandinsky-2-1")
def _k21_decoder(target: Path, models: TinyModels) -> None:
    """kandinsky-community/kandinsky-2-1: a tiny Kandinsky 2.1 decoder taking 768-d embeddings."""
    from creative_generation.nodes.testbed.tiny.decoder import build_tiny_k21_decoder

    build_tiny_k21_decoder(target, embed_dim=768)


@register("LLM", "llava-v1.6-mistral-7b-hf", install_name="tiny-llava-next", loader_overrides={"vision_check": False})
def _llava_next(target: Path, models: TinyModels) -> None:
    """llava-hf/llava-v1.6-mistral-7b-hf: a tiny LLaVA-NeXT (CLIP tower + Llama). Its weights are
    random, so it answers blind and Load MLLM's red/blue vision check would (rightly) refuse it:
    the test switches that check off."""
    from creative_generation.nodes.testbed.tiny.mllm import build_tiny_llava_next

    build_tiny_llava_next(target)


@register("checkpoints", "sd21-unclip-l.ckpt", install_name="tiny-sd21-unclip-l.safetensors",
          conditioning=(1024, 1024))
def _sd21_unclip_l(target: Path, models: TinyModels) -> None:
    """stabilityai/stable-diffusion-2-1-unclip-small: detected as SD21UNCLIP (unCLIP-L, 768-d
    image embeddings); no text encoder (CONDITIONING 77x1024 + pooled 1024 is made by hand)."""
    import comfy_harness
    import tiny_checkpoints

    comfy_harness.import_comfy()
    tiny_checkpoints.build_tiny_sd21_unclip_l(target)


# creative_k22_prior_to_sdxl: the Kandinsky 2.2 prior (1280-d) and the SDXL checkpoint it renders with.
@register("diffusers", "kandinsky-2-2-prior", install_name="tiny-kandinsky-2-2-prior")
def _k22_prior(target: Path, models: TinyModels) -> None:
    """kandinsky-community/kandinsky-2-2-prior: a tiny Kandinsky 2.2 prior with the real 1280-d
    embedding width (CLIP ViT-bigG/14), so its embeddings fit SDXL revision."""
    from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior

    build_tiny_prior(target, family="kandinsky-2.2", embed_dim=1280)


@register("checkpoints", "sd_xl_base_1.0.safetensors", install_name="tiny-sdxl.safetensors", conditioning=(2048, 1280))
def _sdxl(target: Path, models: TinyModels) -> None:
    """stabilityai/stable-diffusion-xl-base-1.0: detected as SDXL (1280-d image embeddings through
    unCLIPConditioning = revision); TAESD VAE, no text encoders (CONDITIONING 77x2048 + pooled 1280)."""
    import comfy_harness
    import tiny_sdxl

    comfy_harness.import_comfy()
    tiny_sdxl.save(tiny_sdxl.sdxl_state_dict(), target)


@register("creative_concepts", "creative-vehicle_00001.safetensors", install_name="tiny-creative-vehicle.safetensors")
def _concept(target: Path, models: TinyModels) -> None:
    """A concept as creative_paper_pipeline saves it: token <creative-vehicle> + rank-2 LoRA,
    trained for two steps on the tiny Kandinsky 2.1 prior (so it applies to that prior only)."""
    train_concept(models.path(WORKFLOW_MODELS[("diffusers", "kandinsky-2-1-prior")]), target)


def train_concept(prior_folder: Path, target: Path, subject: str = "vehicle", steps: int = 2, seed: int = 0) -> None:
    """Train a concept on a prior folder with the engine (no ComfyUI) and save it to ``target``."""
    from creative_generation.nodes.engine.bank import sample_bank
    from creative_generation.nodes.engine.losses import CreativeTerm
    from creative_generation.nodes.engine.norm import GaussianNorm
    from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig
    from creative_generation.nodes.engine.prior import load_prior

    prior = load_prior(str(prior_folder))
    bank = sample_bank(prior, f"a photo of a {subject}", 32, batch_size=32, steps=2, seed=seed)
    norm = GaussianNorm.from_bank(bank, 4)
    cfg = OptimConfig(steps=steps, lr=1e-2, rank=2, lora_alpha=2.0, prior_steps=2, seed=seed)
    result = CreativeRun(prior, norm, subject, (CreativeTerm(norm, 1.0),), cfg).run()
    result.concept.save(target)


# --------------------------------------------------------------------------- test-only models


@register("diffusers", install_name="tiny-prior-a")
def _prior_a(target: Path, models: TinyModels) -> None:
    """A 32-d Kandinsky-2.2-layout tiny prior (fast; behaviour tests)."""
    from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior

    build_tiny_prior(target, seed=0)


@register("diffusers", install_name="tiny-prior-b")
def _prior_b(target: Path, models: TinyModels) -> None:
    """Same architecture as tiny-prior-a, other weights: a *different* prior (other identity)."""
    from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior

    build_tiny_prior(target, seed=1)


@register("diffusers", install_name="tiny-k22-decoder")
def _k22_decoder(target: Path, models: TinyModels) -> None:
    """A tiny Kandinsky 2.2 decoder for 32-d embeddings (pairs with tiny-prior-a/b)."""
    from creative_generation.nodes.testbed.tiny.decoder import build_tiny_k22_decoder

    build_tiny_k22_decoder(target)


@register("diffusers", install_name="not-a-prior")
def _not_a_prior(target: Path, models: TinyModels) -> None:
    """Looks like a prior in the loader's list (``prior/config.json``) but has no weights."""
    source = models.path("tiny-prior-a")
    (target / "prior").mkdir(parents=True)
    shutil.copy2(source / "prior" / "config.json", target / "prior" / "config.json")
    shutil.copy2(source / "model_index.json", target / "model_index.json")


@register("LLM", install_name="tiny-text-only-llama")
def _text_only_llm(target: Path, models: TinyModels) -> None:
    """A text-only LlamaForCausalLM (it cannot see images, so the gate must refuse it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from creative_generation.nodes.testbed.tiny.mllm import word_tokenizer

    tokenizer = word_tokenizer(("<s>", "</s>"), bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64))
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
