"""Issue 10 at the node level, with ComfyUI imported in this process: every input of every node
the pack lists may arrive linked (None during validation), missing, of the wrong JSON type, NaN,
outside its dropdown or as the wrong object on a socket; booleans count only when truly True;
saves never overwrite; damaged files name themselves; an interrupt stops every loop.

The sweeps over "every node" take the list from the pack's extension, so nodes added later are
checked too.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import comfy_harness
import pytest
import torch

from creative_generation.nodes.engine.steplog import RunLog

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def models(comfy_inprocess, tmp_path_factory):
    return comfy_harness.register_tiny_models(comfy_inprocess.folder_paths, tmp_path_factory.mktemp("hardening_models"),
                                              {"hard-prior": 0}, "hard-decoder", "hard-llava")


@pytest.fixture(scope="module")
def chain(models, pack_nodes, comfy_inprocess):
    def call(node_id, **inputs):
        return comfy_harness.execute_node(pack_nodes[node_id], "hard", **inputs)

    prior, = call("CreativeLoadPrior", prior="hard-prior", dtype="auto")
    bank, = call("CreativePriorSampler", prior=prior, prompt="a photo of a vehicle", count=12, batch_size=12,
                 steps=2, guidance=4.0, seed=0, negative_prompt="")
    norm, _ = call("CreativeNormGaussianFit", embeds=bank, pca_dims=3)
    decoder, = call("CreativeLoadDecoder", decoder="hard-decoder", dtype="auto")
    return dict(prior=prior, bank=bank, norm=norm, decoder=decoder)


def _specs(cls) -> list:
    return list(cls.GET_SCHEMA().inputs)


def _error_text(cls, **values) -> str:
    verdict = cls.validate_inputs(**values)
    return "" if verdict is True else str(verdict)


# --------------------------------------------------------------------------- linked and missing inputs


def test_every_validate_inputs_takes_linked_and_missing_inputs(pack_nodes):
    """ComfyUI passes None for a linked input and nothing for a missing one; neither may crash."""
    for node_id, cls in pack_nodes.items():
        names = [spec.id for spec in _specs(cls)]
        assert cls.validate_inputs(**{n: None for n in names}) is True, node_id
        cls.validate_inputs()  # a missing required input: ComfyUI reports it; the check must not raise


def test_linked_text_is_checked_when_the_node_runs(chain, run):
    from creative_generation.nodes.inputs import InputError

    with pytest.raises(InputError, match="prompt is empty"):
        run("CreativePriorSampler", prior=chain["prior"], prompt="  ", count=2, batch_size=2, steps=2, guidance=4.0,
            seed=0, negative_prompt="")
    with pytest.raises(InputError, match="prompt is missing"):
        run("CreativePriorSampler", prior=chain["prior"], prompt=None, count=2, batch_size=2, steps=2, guidance=4.0,
            seed=0, negative_prompt="")


# --------------------------------------------------------------------------- strict booleans


def test_booleans_count_only_when_truly_true(pack_nodes, models, run, monkeypatch):
    from creative_generation.nodes import model_nodes
    from creative_generation.nodes.inputs import InputError

    loaded = []
    monkeypatch.setattr(model_nodes, "load_mllm", lambda *a, **k: loaded.append(k) or pytest.fail("loaded"))
    for bad in ("false", "False", 0, 1, "", [], None):
        with pytest.raises(InputError, match="trust_remote_code"):
            run("CreativeLoadMLLM", model="hard-llava", dtype="auto", trust_remote_code=bad, vision_check=False)
        with pytest.raises(InputError, match="allow_download"):
            run("CreativeLoadPrior", prior="hard-prior", dtype="auto", allow_download=bad, hf_repo_id="x/y")
    assert not loaded
    booleans = {(node_id, spec.id) for node_id, cls in pack_nodes.items() for spec in _specs(cls)
                if type(spec).__name__ == "Input" and spec.get_io_type() == "BOOLEAN"}
    assert {("CreativeLoadMLLM", "trust_remote_code"), ("CreativeLoadMLLM", "vision_check")} <= booleans
    for node_id, name in booleans:
        assert name in _error_text(pack_nodes[node_id], **{name: "false"}), (node_id, name)


def test_raw_widget_values_are_refused_on_their_own_input(pack_nodes):
    """The server's on-prompt check: a value at fault becomes a RefusedValue, whose conversion by ComfyUI
    (bool(), str(), float()) raises the problem, so ComfyUI reports it on that input alone."""
    import copy
    import json

    from creative_generation.nodes.inputs import (
        InputError,
        RefusedValue,
        refuse_bad_widgets,
    )

    prompt = {"1": {"class_type": "CreativeLoadMLLM",
                    "inputs": {"model": "hard-llava", "dtype": "auto", "trust_remote_code": "false",
                               "vision_check": ["9", 0]}},
              "2": {"class_type": "CreativeSaveEmbeds", "inputs": {"embeds": ["3", 0], "filename_prefix": None}},
              "3": {"class_type": "CreativePriorSampler",
                    "inputs": {"prior": ["4", 0], "prompt": 5, "count": 8, "batch_size": 8, "steps": 2,
                               "guidance": NAN, "seed": 0, "negative_prompt": ""}},
              "5": {"class_type": "CreativeSaveConcept", "inputs": {"concept": ["6", 1], "filename_prefix": "../x"}},
              "7": {"class_type": "CreativeSaveLog", "inputs": {"log": ["6", 2], "filename_prefix": "runs/ok"}}}
    refuse_bad_widgets({"prompt": prompt}, pack_nodes)
    refused = {(node, name): value for node, entry in prompt.items() for name, value in entry["inputs"].items()
               if isinstance(value, RefusedValue)}
    assert sorted(refused) == [("1", "trust_remote_code"), ("2", "filename_prefix"), ("3", "guidance"),
                               ("3", "prompt"), ("5", "filename_prefix")]
    assert prompt["1"]["inputs"]["vision_check"] == ["9", 0] and prompt["7"]["inputs"]["filename_prefix"] == "runs/ok"
    for convert, (key, fragment) in ((bool, (("1", "trust_remote_code"), "must be true or false")),
                                     (str, (("2", "filename_prefix"), "filename_prefix is missing")),
                                     (str, (("3", "prompt"), "prompt must be text, got int 5")),
                                     (float, (("3", "guidance"), "guidance must be a finite number")),
                                     (str, (("5", "filename_prefix"), "filename_prefix '../x' is not allowed"))):
        with pytest.raises(InputError, match=fragment):
            convert(refused[key])
    value = refused[("1", "trust_remote_code")]
    assert json.dumps({"received_value": value}) == '{"received_value": "\\"false\\""}'  # the 400 answer echoes it
    assert f"{value}" == '"false"' and copy.deepcopy(value).problem == value.problem
    # what ComfyUI then hands the node's check: a refused value counts as already reported
    assert pack_nodes["CreativeSaveConcept"].validate_inputs(filename_prefix=refused[("5", "filename_prefix")]) is True


# --------------------------------------------------------------------------- numbers, dropdowns, sockets


def test_non_finite_numbers_are_refused_on_every_float_input(pack_nodes):
    floats = [(node_id, spec.id) for node_id, cls in pack_nodes.items() for spec in _specs(cls)
              if spec.get_io_type() == "FLOAT"]
    assert len(floats) >= 10, floats
    for node_id, name in floats:
        for bad in (NAN, INF, -INF):
            assert name in _error_text(pack_nodes[node_id], **{name: bad}), (node_id, name, bad)


def test_numpy_numbers_from_other_packs_pass_the_number_checks(pack_nodes):
    """A linked INT/FLOAT may come from another pack's node as a numpy scalar; only its value is checked."""
    import numpy as np
    from creative_generation.nodes.inputs import value_problem

    specs = {spec.id: spec for spec in _specs(pack_nodes["CreativeLoRAOptimizer"])}
    assert value_problem(specs["steps"], np.int64(50)) is None
    assert value_problem(specs["learning_rate"], np.float32(1e-4)) is None
    assert "steps" in value_problem(specs["steps"], np.float64(2.5))
    assert "learning_rate" in value_problem(specs["learning_rate"], np.float32("nan"))
    assert "steps" in value_problem(specs["steps"], True)


@pytest.mark.parametrize("node_id, name, bad", [
    ("CreativeLoRAOptimizer", "train", "token+LoRA"),
    ("CreativeWundtSweep", "train", "both"),
    ("CreativeLoadEmbeds", "file", 0),
    ("CreativeLoadConcept", "file", "../secret.safetensors"),
    ("CreativeLoadPrior", "dtype", "float64"),
    ("CreativeLoadMLLM", "dtype", "fp64"),
    ("CreativeCoreRenderer", "sampler_name", "no_such_sampler"),
    ("CreativeCoreRenderer", "scheduler", 3),
    ("CreativeEmbedsToCLIPVision", "target", "SD 3"),
])
def test_dropdown_values_are_checked(pack_nodes, node_id, name, bad):
    assert f"{name}: " in _error_text(pack_nodes[node_id], **{name: bad})


def test_pca_dims_of_one_is_refused_with_its_range(pack_nodes):
    assert "pca_dims is 1, below its minimum 2" in _error_text(pack_nodes["CreativeNormGaussianFit"], pca_dims=1)


def test_wrong_objects_on_sockets_name_the_input(pack_nodes):
    from creative_generation.nodes.inputs import InputError

    checked = 0
    for node_id, cls in pack_nodes.items():
        for spec in _specs(cls):
            if spec.get_io_type() not in ("CREATIVE_PRIOR", "CREATIVE_EMBEDS", "CREATIVE_NORM", "CREATIVE_LOSS",
                                          "CREATIVE_GATE", "CREATIVE_MLLM", "CREATIVE_DECODER", "CREATIVE_RENDERER",
                                          "CREATIVE_CONCEPT", "CREATIVE_LOG", "IMAGE", "MODEL", "VAE",
                                          "CONDITIONING"):
                continue
            for wrong in ("a string", 3):
                assert f"{spec.id} must be" in _error_text(cls, **{spec.id: wrong}), (node_id, spec.id)
                with pytest.raises(InputError, match=f"{spec.id} must be"):
                    comfy_harness.execute_node(cls, "hard", **{spec.id: wrong})
            checked += 1
    assert checked >= 25


def test_the_log_socket_takes_the_typed_log_only(pack_nodes):
    """The log travels between nodes as a RunLog; its JSON form (what a file holds) is no log on a socket."""
    from creative_generation.nodes.inputs import InputError

    as_json = RunLog([], "max_steps", 0, 0).to_json()
    assert "log must be" in _error_text(pack_nodes["CreativeSaveLog"], log=as_json)
    with pytest.raises(InputError, match="log must be"):
        comfy_harness.execute_node(pack_nodes["CreativeSaveLog"], "hard", log=as_json, filename_prefix="x")


@pytest.mark.parametrize("node_id, inputs, fragment", [
    ("CreativeLoRAOptimizer", {"subject": "car", "prompt_template": "a {style} photo of a {token}"},
     "unknown field(s) {style}; allowed: {token}"),
    ("CreativeLoRAOptimizer", {"subject": "car", "prompt_template": "a { photo of a {token}"}, "allowed fields: {token}"),
    ("CreativeLoRAOptimizer", {"subject": "car", "prompt_template": "a photo of a car"}, "must contain {token}"),
    ("CreativeWundtSweep", {"prompt_template": "{token} {thing}"}, "unknown field(s) {thing}"),
    ("CreativeAutoTrials", {"prompt_template": "a {style} {token}"}, "unknown field(s) {style}"),
    ("CreativeImageVariations", {"prompt_template": "a {token"}, "allowed fields: {token}"),
    ("CreativeMLLMValidityGate", {"question": "Is this a {thing}?"}, "unknown field(s) {thing}; allowed: {subject}"),
    ("CreativeMLLMValidityGate", {"question": "Is this a {subject"}, "allowed fields: {subject}"),
])
def test_format_strings_name_the_allowed_fields(pack_nodes, node_id, inputs, fragment):
    assert fragment in _error_text(pack_nodes[node_id], **inputs)


@pytest.mark.parametrize("repo", ["no-owner", "a/b/c", "owner/na me", "owner/..", "-owner/name", "owner/name.git",
                                  "own--er/name", "owner/" + "n" * 97, "owner/", "owner/name\x00"])
@pytest.mark.parametrize("node_id", ["CreativeLoadPrior", "CreativeLoadDecoder", "CreativeLoadMLLM"])
def test_malformed_repo_ids_are_refused_by_name_before_any_download(pack_nodes, node_id, repo):
    from creative_generation.nodes.inputs import InputError

    cls = pack_nodes[node_id]
    choice = next(spec.id for spec in _specs(cls))  # the folder dropdown comes first
    assert _error_text(cls, **{choice: "anything", "allow_download": True, "hf_repo_id": repo}).startswith("hf_repo_id")
    with pytest.raises(InputError, match="hf_repo_id .* is not a Hugging Face repo id"):
        comfy_harness.execute_node(cls, "hard", **{choice: "anything", "dtype": "auto", "allow_download": True,
                                                   "hf_repo_id": repo, "trust_remote_code": False})


@pytest.mark.parametrize("repo", ["kandinsky-community/kandinsky-2-1-prior", " llava-hf/llava-v1.6-mistral-7b-hf ",
                                  "a_b/c.d-e_1"])
def test_well_formed_repo_ids_pass_validation(pack_nodes, repo):
    assert pack_nodes["CreativeLoadPrior"].validate_inputs(prior="x", allow_download=True, hf_repo_id=repo) is True


@pytest.mark.parametrize("token", ["two words", "mix", "<mix", "<a\tb>"])
def test_mix_token_format_is_checked_at_validation(pack_nodes, token):
    """Before both optimisers upstream have run, not after."""
    assert "token" in _error_text(pack_nodes["CreativeMixConcepts"], token=token)
    assert pack_nodes["CreativeMixConcepts"].validate_inputs(token=" <creative-mix> ") is True


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("prefix", ["", ".", "./.", "..", "../escape", "/tmp/abs", "sub/.hidden", "a//b", "x" * 300,
                                    "runs/" + "é" * 101, "a\x00b", "tab\there"])
def test_prefixes_that_write_hidden_or_outside_files_are_refused(pack_nodes, prefix):
    for node_id in ("CreativeSaveConcept", "CreativeSaveEmbeds", "CreativeSaveLog"):
        assert "filename_prefix" in _error_text(pack_nodes[node_id], filename_prefix=prefix), (node_id, prefix)


def test_a_long_prefix_split_into_folders_saves(chain, run, comfy_inprocess):
    prefix = "/".join(["p" * 200] * 2)  # each part fits a file name
    run("CreativeSaveEmbeds", embeds=chain["bank"], filename_prefix=prefix)
    out = Path(comfy_inprocess.folder_paths.get_output_directory()) / "creative" / "embeds" / ("p" * 200)
    assert [p.name for p in out.iterdir()] == ["p" * 200 + "_00001.safetensors"]


def test_saves_with_one_prefix_never_overwrite(chain, run, comfy_inprocess):
    out = Path(comfy_inprocess.folder_paths.get_output_directory()) / "creative"
    bank = chain["bank"]
    run("CreativeSaveEmbeds", embeds=bank, filename_prefix="probe")
    run("CreativeSaveEmbeds", embeds=bank, filename_prefix="probe")
    log = RunLog([], "max_steps", 0, 0)
    for _ in range(2):
        run("CreativeSaveLog", log=log, filename_prefix="probe")
    errors = []

    def save():
        try:
            run("CreativeSaveEmbeds", embeds=bank, filename_prefix="probe")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in (out / "embeds").glob("probe_*")) == [f"probe_{i:05}.safetensors" for i in range(1, 7)]
    assert sorted(p.name for p in (out / "logs").glob("probe_*")) == ["probe_00001.json", "probe_00002.json"]


def test_listing_cleans_our_leftovers(pack_nodes, comfy_inprocess):
    folder = Path(comfy_inprocess.folder_paths.get_output_directory()) / "creative" / "concepts"
    folder.mkdir(parents=True, exist_ok=True)
    leftover, other = folder / ".concept_00001.safetensors.k2j4h5g6.tmp", folder / ".mine.tmp"
    for p in (leftover, other):
        p.write_bytes(b"")
        os.utime(p, (time.time() - 600, time.time() - 600))
    pack_nodes["CreativeLoadConcept"].GET_SCHEMA()  # lists the folder
    assert not leftover.exists() and other.exists()


# --------------------------------------------------------------------------- damaged files


def test_a_damaged_file_in_the_concepts_folder_names_itself(pack_nodes, run, comfy_inprocess):
    folder = Path(comfy_inprocess.folder_paths.get_output_directory()) / "creative" / "concepts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="broken.safetensors is damaged or not a safetensors file"):
        run("CreativeLoadConcept", file="broken.safetensors")


def test_a_replaced_file_is_loaded_again(pack_nodes, comfy_inprocess):
    """A concept or bank copied over one of the same name must not come from ComfyUI's cache."""
    folder = Path(comfy_inprocess.folder_paths.get_output_directory()) / "creative" / "concepts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "replaced.safetensors"
    path.write_bytes(b"first")
    node = pack_nodes["CreativeLoadConcept"]
    before = node.fingerprint_inputs(file="replaced.safetensors")
    path.write_bytes(b"second version")
    assert node.fingerprint_inputs(file="replaced.safetensors") != before


# --------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("node", ["sampler", "renderer", "sweep"])
def test_an_interrupt_stops_inside_the_first_step(chain, run, comfy_inprocess, monkeypatch, node):
    """With the interrupt already set, no denoising step completes: every step of every loop (inside a
    batch, inside a decoder step, inside the sweep's optimiser runs) is a cancel point. Before, a
    whole batch of 1,000 steps, a decoder step or a whole sweep ran first."""
    from creative_generation.nodes.engine import sampling

    mm = comfy_inprocess.model_management
    prior, bank, norm = chain["prior"], chain["bank"], chain["norm"]
    done = []
    if node == "renderer":
        renderer, = run("CreativeDecoderRenderer", decoder=chain["decoder"], steps=50, guidance=4.0, width=64,
                        height=64, seed=0)
        handle = chain["decoder"].pipeline.unet.register_forward_hook(lambda *_: done.append(1))
        call = lambda: run("CreativeRenderEmbeds", renderer=renderer, embeds=bank, start=0, count=1)
    else:
        predict = sampling.predict
        monkeypatch.setattr(sampling, "predict", lambda *a, **k: done.append(1) or predict(*a, **k))
        handle = None
        if node == "sampler":
            call = lambda: run("CreativePriorSampler", prior=prior, prompt="a photo", count=64, batch_size=64,
                               steps=1000, guidance=4.0, seed=0, negative_prompt="")
        else:
            call = lambda: run("CreativeWundtSweep", prior=prior, norm=norm, embeds=bank, subject="vehicle",
                               steps="0, 20", configs="none", seeds="0", anchor_text="a vehicle", learning_rate=1e-3,
                               train="token", samples=4)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            call()
    finally:
        mm.interrupt_current_processing(False)
        if handle is not None:
            handle.remove()
    assert done == [], f"{len(done)} denoising forward(s) ran after the interrupt"


# --------------------------------------------------------------------------- CPU threads


def test_small_cpu_work_runs_on_one_thread_and_restores_comfyuis_setting(chain, run, monkeypatch):
    """Beside a busy core, two OpenMP threads on tiny operations spin-wait for a descheduled peer
    (issue 10: 252 s instead of 22 s). Our nodes use one thread for small models, then restore."""
    import creative_generation.nodes.engine.bank as bank_module

    seen = []
    inner = bank_module.sample_embeddings
    monkeypatch.setattr(bank_module, "sample_embeddings",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or inner(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run("CreativePriorSampler", prior=chain["prior"], prompt="a photo", count=2, batch_size=2, steps=2,
            guidance=4.0, seed=0, negative_prompt="")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_concept_of_another_width_is_refused_when_applied_naming_its_file(models, run, comfy_inprocess):
    """Issue 18: a 7-wide token embedding without a base-prior tag passed Apply Concept and failed at sampling
    with "The expanded size of the tensor (32) must match ...", naming no file."""
    from creative_generation.nodes.engine.concept import Concept

    folder = Path(comfy_inprocess.folder_paths.get_output_directory()) / "creative" / "concepts"
    folder.mkdir(parents=True, exist_ok=True)
    Concept("<narrow>", torch.randn(7)).save(folder / "narrow.safetensors")
    prior, = run("CreativeLoadPrior", prior="hard-prior", dtype="auto")
    concept, _ = run("CreativeLoadConcept", file="narrow.safetensors")
    with pytest.raises(ValueError, match=r"narrow\.safetensors: the token embedding of '<narrow>' is 7 wide, "
                                         r"but this prior's text encoder takes 32-wide"):
        run("CreativeApplyConcept", prior=prior, concept=concept)
