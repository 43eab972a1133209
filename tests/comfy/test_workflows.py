"""Every ``example_workflows/*.json`` is a well-formed UI workflow that runs on a real ComfyUI.

Two tests per file:

* ``test_workflow_is_well_formed`` (static, against the live server's ``/object_info``): only
  core nodes and ours; ``widgets_values`` positional in each node's schema order, including the
  ``control_after_generate`` companion after seed widgets, with values of the right type and
  range; links consistent on both ends and type-correct; every required socket connected; each
  model a loader names has a ``properties.models`` download hint, and each hint names a model
  the tiny-model registry knows; and comfy-cli's UI -> API conversion keeps every node.
* ``test_workflow_runs_on_tiny_models``: the file converted UI -> API, rewritten by
  :func:`rewrite_for_test` (tiny models swapped in, big counts shrunk, text encoders of
  checkpoints without one replaced), queued with ``POST /prompt`` and run to success; then the
  outputs are checked (saved images exist with the expected size and count, previews exist,
  saved concepts load, token previews show the token).
* ``test_tiny_sd21_unclip_l_is_detected_as_sd21_unclip_l``: the SD 2.1 unCLIP-L stand-in goes
  through core's detection as ``SD21UnclipL`` (else the image embedding would be ignored and the
  workflow would still "succeed").

The rewrite, rule by rule (nothing else in the workflow changes):

0. **SD-path loaders.** Where every model a ``CheckpointLoaderSimple`` / ``LoraLoader`` /
   ``CLIPVisionLoader`` names is one the mini world in SD form stands for
   (``example_models.MINIWORLD_SD_STANDS_FOR``: the SD optimiser needs a real text encoder and a
   CLIP vision model, which core loads only at full size), those loaders become one
   ``CreativeMiniWorldSDLoader`` and their outputs its MODEL / CLIP / VAE / CLIP_VISION.
1. **Models.** Each loader widget listed in ``example_models.MODEL_INPUTS`` names a model; the
   registry there maps it to a tiny seeded stand-in of the same family and embedding width,
   installed in the test server's model folder; the widget gets the stand-in's name. Loader
   inputs a random stand-in cannot honour are set as its registry entry says (the tiny LLaVA
   answers blind, so Load MLLM's ``vision_check`` goes off). ``allow_download`` must be off in
   the committed file (tests never download). An unknown model name, or an unknown loader node
   type, fails the test (never a skip).
2. **Text encoders.** Tiny checkpoints carry no text encoder (a real one is hundreds of MB), so
   their loader's CLIP output is ``None`` and ``CLIPTextEncode`` would fail. Each
   ``CLIPTextEncode`` fed by such a checkpoint becomes ``TestSupportZeroConditioning`` (from
   ``tests/comfy/test_support_pack``, loaded only in the test server) with the checkpoint's
   conditioning widths: the zero CONDITIONING the real encoder's output has the shape of.
3. **Sizes.** INT inputs above the caps in :data:`SHRINK` are lowered to them (5,000 samples
   -> 64, 50 PCA dims -> 8, 50 optimiser steps -> 2, 512 px renders -> 32 px, 25-50 denoising
   steps -> 2, a sweep's steps -> "0, 2", ...). Afterwards every INT input except seeds must be <= 64 px / 77 tokens:
   a new workflow with a big number and no rule fails loudly instead of running for minutes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import comfy_harness
import example_models as em

WORKFLOW_DIR = comfy_harness.REPO / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
REQUIRED = {"creative_paper_pipeline", "creative_negative_clusters", "creative_concept_via_sd21_unclip",
            "creative_sd_lora", "creative_sd_lora_real"}
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
DOWNLOADABLE = (".safetensors", ".sft")  # what the frontend's Missing Models dialog can download
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
OUR_MODULE = f"custom_nodes.{comfy_harness.PACK_DIR_NAME}"
TEST_SIZE = 32  # px of every image the rewritten workflows render
RENDERS = {"CreativeRenderEmbeds", "VAEDecode"}  # nodes that render at TEST_SIZE (plots keep their size)
SAVED_TOKENS = {"<creative-vehicle>", "<creative-mix-car-boat>", "<creative-car>"}  # tokens of the concepts example workflows save

# class_type -> {INT input: cap}: values above the cap are lowered to it (rule 3 above).
SHRINK: dict[str, dict[str, int]] = {
    "CreativePriorSampler": {"count": 64, "batch_size": 64, "steps": 2},
    "CreativeNormGaussianFit": {"pca_dims": 8},
    "CreativeLoRAOptimizer": {"steps": 2, "prior_steps": 2, "lora_rank": 4, "start_bank": 16},
    "CreativeMLLMValidityGate": {"check_every": 1},
    "CreativeDecoderRenderer": {"steps": 2, "width": TEST_SIZE, "height": TEST_SIZE},
    "CreativeCoreRenderer": {"steps": 2, "width": TEST_SIZE, "height": TEST_SIZE},
    "CreativeRenderEmbeds": {"count": 2},
    "EmptyLatentImage": {"width": TEST_SIZE, "height": TEST_SIZE, "batch_size": 1},
    "KSampler": {"steps": 2},
    "KSamplerAdvanced": {"steps": 2, "end_at_step": 2},
    "CreativeWundtSweep": {"samples": 4},
    "CreativeAutoTrials": {"steps": 2, "prior_steps": 2, "lora_rank": 4, "trials": 2, "cluster_samples": 4},
    "CreativeImageVariations": {"inversion_steps": 2, "steps": 2, "prior_steps": 2, "lora_rank": 4},
    "CreativeSDEmbeddingBank": {"count": 16, "batch_size": 16, "render_steps": 2, "width": TEST_SIZE, "height": TEST_SIZE},
    "CreativeSDLoRAOptimizer": {"steps": 2, "lora_rank": 4, "render_steps": 2, "width": TEST_SIZE, "height": TEST_SIZE},
    "SaveLoRA": {"steps": 2},
}
# Loaders rule 0 swaps: their output slot -> Load Mini-World SD's (MODEL 0, CLIP 1, VAE 2, CLIP_VISION 3).
SD_LOADER_OUTPUTS: dict[str, tuple[int, ...]] = {"CheckpointLoaderSimple": (0, 1, 2), "LoraLoader": (0, 1),
                                                 "CLIPVisionLoader": (3,)}
# class_type -> {STRING input: value}: lists of steps/seeds replaced (rule 3 above, for text inputs).
SHRINK_TEXT: dict[str, dict[str, str]] = {"CreativeWundtSweep": {"steps": "0, 2", "seeds": "0"}}
INT_LIMIT = 64  # after the rewrite, no INT input (but seeds and the exceptions below) is larger
INT_LIMIT_EXCEPT = {("TestSupportZeroConditioning", "tokens"), ("TestSupportZeroConditioning", "context_dim"),
                    ("TestSupportZeroConditioning", "pooled_dim")}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _spec_opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or (spec[0] in WIDGET_TYPES and not _spec_opts(spec).get("forceInput"))


def _has_control(name: str, spec) -> bool:
    """The frontend's rule: an explicit ``control_after_generate``, else INT ``seed``/``noise_seed``."""
    flag = _spec_opts(spec).get("control_after_generate")
    if flag is not None:
        return bool(flag)
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def _inputs_in_order(info: dict):
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            yield section, name, specs[name]


def _combo_options(spec) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return _spec_opts(spec).get("options")
    return None


def _id(path: Path) -> str:
    return path.stem


def test_the_required_example_workflows_exist():
    assert REQUIRED <= {p.stem for p in WORKFLOWS}, sorted(p.stem for p in WORKFLOWS)


# --------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("path", WORKFLOWS, ids=_id)
def test_workflow_is_well_formed(path, object_info, ui_to_api):
    wf = _load(path)
    problems: list[str] = []
    assert wf.get("version") == 0.4 and isinstance(wf.get("nodes"), list) and isinstance(wf.get("links"), list)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max((lk[0] for lk in wf["links"]), default=0)

    for node in wf["nodes"]:
        where = f"node {node['id']} {node['type']}"
        if node["type"] in UI_ONLY:
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"{where}: unknown node type")
            continue
        module = info.get("python_module", "")
        if not (module == "nodes" or module.startswith("comfy_extras") or module == OUR_MODULE):
            problems.append(f"{where}: from {module}; example workflows use only core nodes and ours")
        problems += _check_widgets(node, info, where)
        problems += _check_model_hints(node, object_info, where, _note_text(wf))
        # every required socket is connected
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for section, name, spec in _inputs_in_order(info):
            if section == "required" and not _is_widget(spec) and name not in linked:
                problems.append(f"{where}: required input '{name}' ({spec[0]}) is not connected")

    for link in wf["links"]:
        problems += _check_link(link, nodes, object_info)

    api = ui_to_api(wf)
    runnable = {str(n["id"]) for n in wf["nodes"] if n["type"] not in UI_ONLY and n.get("mode", 0) == 0}
    assert set(api) == runnable, f"UI -> API lost or invented nodes: {sorted(set(api) ^ runnable)}"
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def _check_widgets(node: dict, info: dict, where: str) -> list[str]:
    """``widgets_values`` must be positional over the schema's widgets (plus control companions)."""
    values = list(node.get("widgets_values") or [])
    expected: list[tuple[str, object]] = []
    for _, name, spec in _inputs_in_order(info):
        if _is_widget(spec):
            expected.append((name, spec))
            if _has_control(name, spec):
                expected.append((f"{name}:control_after_generate", None))
    names = [n for n, _ in expected]
    if len(values) != len(expected):
        return [f"{where}: {len(values)} widgets_values for {len(expected)} widget slots {names}: {values}"]
    problems = []
    loader = em.MODEL_INPUTS.get(node["type"], {})
    for (name, spec), value in zip(expected, values):
        if spec is None:
            if value not in CONTROL_VALUES:
                problems.append(f"{where}: slot {name} must be one of {sorted(CONTROL_VALUES)}, got {value!r}")
            continue
        kind, opts = spec[0], _spec_opts(spec)
        options = _combo_options(spec)
        if options is not None:
            if name not in loader and value not in options:
                problems.append(f"{where}: {name}={value!r} not among {options}")
        elif kind == "INT":
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{where}: {name}={value!r} is not an INT")
            elif not opts.get("min", value) <= value <= opts.get("max", value):
                problems.append(f"{where}: {name}={value} outside [{opts.get('min')}, {opts.get('max')}]")
        elif kind == "FLOAT":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                problems.append(f"{where}: {name}={value!r} is not a FLOAT")
            elif not opts.get("min", value) <= value <= opts.get("max", value):
                problems.append(f"{where}: {name}={value} outside [{opts.get('min')}, {opts.get('max')}]")
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            problems.append(f"{where}: {name}={value!r} is not a BOOLEAN")
        elif kind == "STRING" and not isinstance(value, str):
            problems.append(f"{where}: {name}={value!r} is not a STRING")
    if node["type"] in em.MODEL_INPUTS and dict(zip(names, values)).get("allow_download") is True:
        problems.append(f"{where}: allow_download is on; example workflows ship with downloads off")
    return problems


def _note_text(wf: dict) -> str:
    return " ".join(str(v) for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote") for v in n.get("widgets_values") or [])


def _check_model_hints(node: dict, object_info: dict, where: str, note: str = "") -> list[str]:
    """Download hints (``properties.models``) only for what the frontend can download: a single
    ``.safetensors``/``.sft`` file with a Hugging Face URL (others show a red error row in its Missing
    Models dialog). Every other model (diffusers/LLM folders, ``.ckpt``) is named in the note with its
    place: ``models/<folder>/<name>``."""
    problems = []
    hints = (node.get("properties") or {}).get("models") or []
    for hint in hints:
        if not {"name", "url", "directory"} <= set(hint):
            problems.append(f"{where}: model hint {hint} needs name, url and directory")
            continue
        if not str(hint["name"]).endswith(DOWNLOADABLE):
            problems.append(f"{where}: model hint {hint['name']!r}: the frontend downloads only single "
                            f"{'/'.join(DOWNLOADABLE)} files; say in the note where it goes instead")
        if not str(hint["url"]).startswith("https://huggingface.co/"):
            problems.append(f"{where}: model hint url {hint['url']} is not a Hugging Face address")
        try:
            em.resolve(hint["directory"], hint["name"])
        except em.UnknownModelError as e:
            problems.append(f"{where}: {e}")
    try:
        inputs = em.loader_inputs(node["type"], object_info)
    except em.UnknownModelError as e:
        return problems + [f"{where}: {e}"]
    values = _widget_values_by_name(node, object_info[node["type"]])
    for name, folder in inputs.items():
        value = values.get(name)
        try:
            em.resolve(folder, value)
        except em.UnknownModelError as e:
            problems.append(f"{where}: {e}")
        if folder in em.USER_MADE_FOLDERS or em.is_bundled(folder, value):
            continue
        if not str(value).endswith(DOWNLOADABLE):
            if f"models/{folder}/{value}" not in note:
                problems.append(f"{where}: the note does not say where {value!r} goes (models/{folder}/{value})")
        elif not any(h.get("name") == value and h.get("directory") == folder for h in hints):
            problems.append(f"{where}: no properties.models hint {{name: {value!r}, directory: {folder!r}, url}} "
                            "telling users where to download it")
    return problems


def _widget_values_by_name(node: dict, info: dict) -> dict:
    values = iter(node.get("widgets_values") or [])
    out = {}
    for _, name, spec in _inputs_in_order(info):
        if _is_widget(spec):
            out[name] = next(values, None)
            if _has_control(name, spec):
                next(values, None)
    return out


def _check_link(link: list, nodes: dict, object_info: dict) -> list[str]:
    lid, src, src_slot, dst, dst_slot, kind = link
    where = f"link {lid} ({src}:{src_slot} -> {dst}:{dst_slot} {kind})"
    if src not in nodes or dst not in nodes:
        return [f"{where}: unknown node"]
    s, d = nodes[src], nodes[dst]
    problems = []
    outs, ins = s.get("outputs") or [], d.get("inputs") or []
    if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
        problems.append(f"{where}: not listed in the source's outputs[{src_slot}].links")
    elif outs[src_slot]["type"] != kind:
        problems.append(f"{where}: source slot type {outs[src_slot]['type']}")
    if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
        problems.append(f"{where}: not the link of the target's inputs[{dst_slot}]")
    info_s, info_d = object_info.get(s["type"]), object_info.get(d["type"])
    if info_s and src_slot < len(info_s["output"]) and info_s["output"][src_slot] != kind:
        problems.append(f"{where}: {s['type']} output {src_slot} is {info_s['output'][src_slot]}, not {kind}")
    if info_d and dst_slot < len(ins):
        name = ins[dst_slot]["name"]
        spec = {**info_d["input"].get("required", {}), **info_d["input"].get("optional", {})}.get(name)
        if spec is None:
            problems.append(f"{where}: {d['type']} has no input '{name}'")
        else:
            want = "COMBO" if isinstance(spec[0], list) else spec[0]
            if want not in (kind, "*"):
                problems.append(f"{where}: {d['type']}.{name} takes {want}, not {kind}")
    return problems


# --------------------------------------------------------------------------- the rewrite


def rewrite_for_test(api: dict, object_info: dict, server, tiny_models) -> tuple[dict, list[str]]:
    """The documented rewrite (module docstring); returns the new prompt and a change log."""
    api = copy.deepcopy(api)
    changes: list[str] = []
    _swap_sd_loaders(api, object_info, changes)  # 0. SD-path loaders
    stand_in: dict[str, em.TinyModel] = {}  # loader node id -> its (last) tiny model
    for nid, node in api.items():  # 1. models
        kind, inputs = node["class_type"], node["inputs"]
        for name, folder in em.loader_inputs(kind, object_info).items():
            value = inputs.get(name)
            assert isinstance(value, str), f"node {nid} {kind}.{name} is {value!r}, expected a model name"
            model = em.resolve(folder, value)
            inputs[name] = tiny_models.install(server, model)
            stand_in[nid] = model
            changes.append(f"{nid} {kind}.{name}: {value} -> {inputs[name]}")
            schema = {**object_info[kind]["input"].get("required", {}), **object_info[kind]["input"].get("optional", {})}
            for key, forced in model.loader_overrides:
                if key in schema:
                    changes.append(f"{nid} {kind}.{key}: {inputs.get(key)!r} -> {forced!r} (tiny stand-in)")
                    inputs[key] = forced
        if inputs.get("allow_download") is True:
            raise AssertionError(f"node {nid} {kind} has allow_download on")
    for nid, node in api.items():  # 2. text encoders of checkpoints without one
        if node["class_type"] not in em.TEXT_ENCODERS:
            continue
        text_input, clip_input = em.TEXT_ENCODERS[node["class_type"]]
        src = node["inputs"].get(clip_input)
        model = stand_in.get(src[0]) if isinstance(src, list) else None
        if model is None or model.conditioning is None:
            continue
        context_dim, pooled_dim = model.conditioning
        api[nid] = {"class_type": em.ZERO_CONDITIONING, "_meta": node.get("_meta", {}),
                    "inputs": {"text": node["inputs"].get(text_input, ""), "tokens": 77,
                               "context_dim": context_dim, "pooled_dim": pooled_dim}}
        changes.append(f"{nid} {node['class_type']} -> {em.ZERO_CONDITIONING}({context_dim}, {pooled_dim})")
    for nid, node in api.items():  # 3. sizes
        for name, text in SHRINK_TEXT.get(node["class_type"], {}).items():
            if node["inputs"].get(name) != text:
                changes.append(f"{nid} {node['class_type']}.{name}: {node['inputs'].get(name)!r} -> {text!r}")
                node["inputs"][name] = text
        for name, cap in SHRINK.get(node["class_type"], {}).items():
            value = node["inputs"].get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                node["inputs"][name] = cap
                changes.append(f"{nid} {node['class_type']}.{name}: {value} -> {cap}")
        for name, value in node["inputs"].items():
            if (isinstance(value, int) and not isinstance(value, bool) and value > INT_LIMIT
                    and "seed" not in name and (node["class_type"], name) not in INT_LIMIT_EXCEPT):
                raise AssertionError(f"node {nid} {node['class_type']}.{name}={value} after the rewrite: add a "
                                     f"SHRINK rule in tests/comfy/test_workflows.py so the test stays small")
    return api, changes


def _swap_sd_loaders(api: dict, object_info: dict, changes: list[str]) -> None:
    """Rule 0: loaders of models the mini world in SD form stands for become one Load Mini-World SD."""
    swapped = {nid: node["class_type"] for nid, node in api.items() if node["class_type"] in SD_LOADER_OUTPUTS
               and all(em.resolve(folder, node["inputs"].get(name)).miniworld_sd
                       for name, folder in em.loader_inputs(node["class_type"], object_info).items())}
    if not swapped:
        return
    mini = str(max(int(k) for k in api) + 1)
    for nid, kind in swapped.items():
        changes.append(f"{nid} {kind} -> {em.MINIWORLD_SD} {mini}")
        del api[nid]
    api[mini] = {"class_type": em.MINIWORLD_SD, "inputs": {"dtype": "auto"}, "_meta": {"title": "mini world SD"}}
    for node in api.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in swapped:
                node["inputs"][name] = [mini, SD_LOADER_OUTPUTS[swapped[value[0]]][value[1]]]


# --------------------------------------------------------------------------- run


@pytest.mark.parametrize("path", WORKFLOWS, ids=_id)
def test_workflow_runs_on_tiny_models(path, comfy_server, object_info, ui_to_api, tiny_models):
    api, changes = rewrite_for_test(ui_to_api(_load(path)), object_info, comfy_server, tiny_models)
    res = comfy_server.run(api, timeout=300)
    context = (f"{res}\nrewrite:\n  " + "\n  ".join(changes) + f"\n--- server log ---\n{comfy_server.log_tail(40)}")
    assert res.status == "success", context
    outputs = res.outputs
    checked = 0
    for nid, node in api.items():
        kind = node["class_type"]
        if kind == "SaveImage":
            images = outputs[nid]["images"]
            sizes = {_image_size(Path(comfy_server.output_dir) / i["subfolder"] / i["filename"]) for i in images}
            if api[node["inputs"]["images"][0]]["class_type"] in RENDERS:  # plots keep their own size
                assert sizes == {(TEST_SIZE, TEST_SIZE)}, (nid, sizes, context)
            assert images, (nid, context)
            want = _expected_images(api, node["inputs"]["images"][0])
            assert want is None or len(images) == want, (nid, len(images), want)
            checked += 1
        elif kind == "PreviewImage":
            images = outputs[nid]["images"]
            assert images, (nid, outputs.get(nid))
            for image in images:  # served back like the frontend fetches them
                r = comfy_server.get("/view", params={k: image[k] for k in ("filename", "subfolder", "type")})
                assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n", (nid, image, r.status_code)
        elif kind == "CreativeSaveConcept":
            from creative_generation.nodes.engine.concept import Concept

            text = " ".join(outputs[nid]["text"])
            name, folder = text.split("saved ", 1)[1].split(" in ", 1)
            saved = Path(folder.strip()) / name
            assert saved.is_relative_to(Path(comfy_server.output_dir) / "creative" / "concepts"), saved
            concept = Concept.load(saved)
            assert concept.token in SAVED_TOKENS and concept.meta.get("base_prior"), concept.meta
            checked += 1
        elif kind == "SaveLoRA":  # core's LoRA file, in the key format core's LoraLoader reads
            from safetensors.torch import load_file

            files = sorted(Path(comfy_server.output_dir).glob(f"{node['inputs']['prefix']}_*.safetensors"))
            assert files, (nid, node["inputs"]["prefix"], context)
            keys = load_file(files[-1]).keys()
            assert keys and any(k.endswith(".lora_up.weight") for k in keys), (files[-1], sorted(keys)[:5])
            checked += 1
        elif kind == "PreviewAny" and _source_output_name(api, object_info, node["inputs"]["source"]) == "token":
            assert "<creative-vehicle>" in " ".join(map(str, outputs[nid]["text"])), outputs[nid]
    assert checked, "the workflow saves nothing"
    # no node of the workflow was skipped
    assert set(res.executed_nodes) | set(res.cached_nodes) == set(api), sorted(set(api) - set(res.executed_nodes))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _expected_images(api: dict, src: str) -> int | None:
    """How many images a SaveImage should get from its source, where that is simple to know."""
    node = api[src]
    if node["class_type"] == "CreativeRenderEmbeds":
        sampler = api[node["inputs"]["embeds"][0]]
        if sampler["class_type"] == "CreativePriorSampler":
            return min(node["inputs"]["count"], sampler["inputs"]["count"] - node["inputs"]["start"])
    if node["class_type"] == "VAEDecode":
        ks = api[node["inputs"]["samples"][0]]
        latent = api[ks["inputs"]["latent_image"][0]] if "latent_image" in ks["inputs"] else None
        if latent and latent["class_type"] == "EmptyLatentImage":
            return latent["inputs"]["batch_size"]
    return None


def _source_output_name(api: dict, object_info: dict, link) -> str | None:
    if not isinstance(link, list):
        return None
    info = object_info.get(api[link[0]]["class_type"], {})
    names = info.get("output_name") or []
    return names[link[1]] if link[1] < len(names) else None


def test_tiny_sd21_unclip_l_is_detected_as_sd21_unclip_l(tiny_models):
    """The stand-in for sd21-unclip-l.ckpt loads through core's detection as SD 2.1 unCLIP-L:
    a model that were not unCLIP would ignore the image embedding and the workflow would still
    "succeed"."""
    import comfy.sd
    import comfy.supported_models

    path = tiny_models.path(em.resolve("checkpoints", "sd21-unclip-l.ckpt"))
    model, clip, vae, clip_vision = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, output_clipvision=True)[:4]
    assert type(model.model).__name__ == "SD21UNCLIP"
    assert type(model.model.model_config) is comfy.supported_models.SD21UnclipL
    assert model.model.model_config.unet_config["adm_in_channels"] == 1536  # 768-d embedding + noise level
    assert clip is None and clip_vision is None and vae is not None
