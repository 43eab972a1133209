"""Issue 10 through a real ComfyUI server's API: what a hostile or careless API client sends.

* ``"false"`` (a JSON string) for ``trust_remote_code`` / ``allow_download``: ComfyUI would turn it
  into ``True``; HTTP 400 naming the input, nothing is loaded or downloaded -- also when the
  loader's result is cached from an earlier run.
* NaN in a FLOAT and a value outside a dropdown: HTTP 400 naming the input.
* A bad widget value (NaN, a too-long or null file name prefix, a number for a text) is reported on
  that input alone (``extra_info.input_name``), so the frontend marks just it.
* A STRING linked from another node (None during validation) validates and runs.
* Two prompts saving a concept with one prefix: two files.
"""

from __future__ import annotations

import json

import pytest
import requests
from test_server_behaviour import Graph, _error, _ok, _rejected, _run, pipeline


@pytest.fixture(scope="module")
def models(comfy_server, tiny_models):
    return {name: tiny_models.install(comfy_server, name) for name in ("tiny-prior-a", "tiny-llava-next",
                                                                          "tiny-k22-decoder")}


def _marked_inputs(server, g: Graph, node: str) -> dict[str, str]:
    """``POST /prompt`` must answer 400; the inputs ``node``'s errors mark -> their details."""
    r = requests.post(server.url + "/prompt", data=json.dumps({"prompt": g.nodes}), timeout=30,
                      headers={"Content-Type": "application/json"})  # Python's json writes NaN; aiohttp reads it
    assert r.status_code == 400, r.text
    errors = r.json()["node_errors"][node]["errors"]
    return {e["extra_info"].get("input_name"): e["details"] for e in errors}


def test_string_false_never_turns_a_boolean_on(comfy_server, models):
    g, ids = pipeline(gate=True, steps=1)
    g.nodes[ids["mllm"]]["inputs"]["trust_remote_code"] = "false"
    _rejected(comfy_server, g, ids["mllm"], "trust_remote_code must be true or false", "false")
    g, ids = pipeline(gate=False, steps=1)
    g.nodes[ids["prior"]]["inputs"].update(allow_download="false", hf_repo_id="someone/some-prior")
    _rejected(comfy_server, g, ids["prior"], "allow_download must be true or false")


def test_a_non_boolean_is_refused_when_the_loader_result_is_cached(comfy_server, models):
    g, ids = pipeline(gate=True, steps=1)
    _ok(comfy_server, _run(comfy_server, g))  # the loader's result (trust_remote_code False) is now cached
    g.nodes[ids["mllm"]]["inputs"]["trust_remote_code"] = "yes"
    marked = _marked_inputs(comfy_server, g, ids["mllm"])
    assert list(marked) == ["trust_remote_code"] and "must be true or false" in marked["trust_remote_code"], marked


def test_a_bad_value_is_marked_on_its_own_input_only(comfy_server, models):
    g, ids = pipeline(gate=False, steps=1)
    g.nodes[ids["sampler"]]["inputs"]["guidance"] = float("nan")
    marked = _marked_inputs(comfy_server, g, ids["sampler"])
    assert list(marked) == ["guidance"] and "guidance must be a finite number" in marked["guidance"], marked
    g, ids = pipeline(gate=False, steps=1)
    g.nodes[ids["sampler"]]["inputs"]["prompt"] = 5  # a number in a text input: ComfyUI would make it "5"
    assert list(_marked_inputs(comfy_server, g, ids["sampler"])) == ["prompt"]
    for prefix, fragment in (("x" * 300, "too long"), ("a\x00b", "control character"), (None, "missing"),
                             ("../x", "is not allowed")):
        g, ids = pipeline(gate=False, steps=1)
        del g.nodes[ids["plot"]]  # the save is the only output: else ComfyUI runs the rest and answers 200
        save = g.add("CreativeSaveConcept", concept=Graph.out(ids["optimizer"], 1), filename_prefix=prefix)
        marked = _marked_inputs(comfy_server, g, save)
        assert list(marked) == ["filename_prefix"] and fragment in marked["filename_prefix"], (prefix, marked)
    assert not list(comfy_server.output_dir.rglob("None_*"))


def test_nan_and_unknown_dropdown_values_are_rejected_by_name(comfy_server, models):
    g, ids = pipeline(gate=False, steps=1)
    g.nodes[ids["sampler"]]["inputs"]["guidance"] = float("nan")  # Python's json writes NaN; aiohttp reads it
    r = requests.post(comfy_server.url + "/prompt", data=json.dumps({"prompt": g.nodes}), timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    errors = r.json()["node_errors"][ids["sampler"]]["errors"]
    assert "guidance must be a finite number" in errors[0]["details"], errors
    g, ids = pipeline(gate=False, steps=1)
    g.nodes[ids["optimizer"]]["inputs"]["train"] = "token+LoRA"
    _rejected(comfy_server, g, ids["optimizer"], "train:", "not one of its options")


def test_a_linked_prompt_validates_and_runs(comfy_server, models):
    g, ids = pipeline(gate=False, steps=1)
    text = g.add("PrimitiveStringMultiline", value="a photo of a vehicle")
    g.nodes[ids["sampler"]]["inputs"]["prompt"] = Graph.out(text)
    template = g.add("PrimitiveString", value="a photo of a {token}")
    g.nodes[ids["optimizer"]]["inputs"]["prompt_template"] = Graph.out(template)
    _ok(comfy_server, _run(comfy_server, g))
    empty = g.add("PrimitiveStringMultiline", value="   ")
    g.nodes[ids["sampler"]]["inputs"]["prompt"] = Graph.out(empty)
    _error(comfy_server, g, ids["sampler"], "prompt is empty")


def test_two_prompts_saving_one_prefix_keep_both(comfy_server, models):
    for seed in (0, 1):
        g, ids = pipeline(gate=False, steps=1, opt_seed=seed)
        g.add("CreativeSaveConcept", concept=Graph.out(ids["optimizer"], 1), filename_prefix="hardening-probe")
        _ok(comfy_server, _run(comfy_server, g))
    names = sorted(p.name for p in (comfy_server.output_dir / "creative" / "concepts").glob("hardening-probe_*"))
    assert names == ["hardening-probe_00001.safetensors", "hardening-probe_00002.safetensors"]
