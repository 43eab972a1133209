"""Issue 10 through a real ComfyUI server's API: what a hostile or careless API client sends.

* ``"false"`` (a JSON string) for ``trust_remote_code`` / ``allow_download``: ComfyUI would turn it
  into ``True``; the node refuses to run, naming the input, and nothing is loaded or downloaded.
* NaN in a FLOAT and a value outside a dropdown: HTTP 400 naming the input.
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


def test_string_false_never_turns_a_boolean_on(comfy_server, models):
    g, ids = pipeline(gate=True, steps=1)
    g.nodes[ids["mllm"]]["inputs"]["trust_remote_code"] = "false"
    _error(comfy_server, g, ids["mllm"], "trust_remote_code must be true or false", "'false'")
    g, ids = pipeline(gate=False, steps=1)
    g.nodes[ids["prior"]]["inputs"].update(allow_download="false", hf_repo_id="someone/some-prior")
    _error(comfy_server, g, ids["prior"], "allow_download must be true or false")


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
