"""The pack loads in a real ComfyUI server and registers exactly the nodes it declares.

Also exercises the harness itself on core nodes (prompt round trip, 400 validation body,
UI -> API conversion) so a broken harness is told apart from a broken node.
"""

from __future__ import annotations

import json
from pathlib import Path

import comfy_harness

PACK_MODULE = f"custom_nodes.{comfy_harness.PACK_DIR_NAME}"


def _our_path(comfy_server) -> str:
    return str(comfy_server.pack_dir)


def test_server_starts(comfy_server):
    stats = comfy_server.get_json("/system_stats")
    assert stats["system"]["comfyui_version"], stats
    assert [d["type"] for d in stats["devices"]] == ["cpu"], stats["devices"]
    assert comfy_server.proc.poll() is None
    assert comfy_server.startup_seconds < 120


def test_pack_imported_without_failure(comfy_server):
    log = comfy_server.log_text()
    ours = _our_path(comfy_server)
    bad = [line for line in log.splitlines()
           if ours in line and ("IMPORT FAILED" in line or "Cannot import" in line or "comfy_entrypoint" in line)]
    assert not bad, "pack failed to load:\n" + "\n".join(bad) + "\n--- log tail ---\n" + comfy_server.log_tail(80)
    times = comfy_server.import_times()
    assert ours in times, f"pack missing from the import-times block {times}\n{comfy_server.log_tail(80)}"
    seconds, ok = times[ours]
    assert ok, comfy_server.log_tail(80)
    # Registration must stay import-cheap (docs/comfyui.md §11; ComfyUI reports it at start-up):
    # only a pathological import (models loaded at import time, ...) trips this generous bound.
    assert seconds < 15.0, f"pack import + comfy_entrypoint took {seconds:.1f}s"


def test_every_declared_node_is_registered(comfy_server, object_info, pack_nodes):
    ours_on_server = {k for k, v in object_info.items() if v.get("python_module") == PACK_MODULE}
    declared = set(pack_nodes)
    assert declared == ours_on_server, (
        f"declared but not served: {sorted(declared - ours_on_server)}; "
        f"served but not declared: {sorted(ours_on_server - declared)}")
    for node_id in declared:
        assert object_info[node_id]["python_module"] == PACK_MODULE


def test_served_schemas_match_the_classes(object_info, pack_nodes):
    mismatches = {}
    for node_id, cls in pack_nodes.items():
        local = comfy_harness.schema_signature(comfy_harness.node_info_v1(cls))
        served = comfy_harness.schema_signature(object_info[node_id])
        if local != served:
            mismatches[node_id] = {k: (local[k], served[k]) for k in local if local[k] != served[k]}
    assert not mismatches, json.dumps(mismatches, indent=1, default=str)


def test_schemas_are_consistent(pack_nodes):
    for node_id, cls in pack_nodes.items():
        schema = cls.GET_SCHEMA()
        assert schema.node_id == node_id
        assert schema.display_name, f"{node_id} has no display_name"
        assert schema.category, f"{node_id} has no category"


# --------------------------------------------------------------------------- harness self-checks


def _tiny_ui_workflow() -> dict:
    """UI-format workflow of core nodes needing no model: EmptyImage -> SaveImage."""
    return {
        "id": "00000000-0000-0000-0000-000000000000", "revision": 0, "last_node_id": 2, "last_link_id": 1,
        "nodes": [
            {"id": 1, "type": "EmptyImage", "pos": [0, 0], "size": [300, 130], "flags": {}, "order": 0, "mode": 0,
             "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
             "properties": {"Node name for S&R": "EmptyImage"}, "widgets_values": [16, 8, 1, 16711680]},
            {"id": 2, "type": "SaveImage", "pos": [400, 0], "size": [300, 270], "flags": {}, "order": 1, "mode": 0,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": [],
             "properties": {"Node name for S&R": "SaveImage"}, "widgets_values": ["harness_check"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
        "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }


def test_harness_ui_to_api_and_prompt_round_trip(comfy_server, ui_to_api):
    api = ui_to_api(_tiny_ui_workflow())
    assert api["1"]["class_type"] == "EmptyImage"
    assert api["1"]["inputs"] == {"width": 16, "height": 8, "batch_size": 1, "color": 16711680}
    assert api["2"]["inputs"]["images"] == ["1", 0]
    res = comfy_server.run(api, timeout=60)
    assert res.status == "success", f"{res}\n{comfy_server.log_tail()}"
    images = res.outputs["2"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith("harness_check")
    assert (Path(comfy_server.output_dir) / images[0]["subfolder"] / images[0]["filename"]).is_file()
    assert res.executed_nodes[:2] == ["1", "2"] or set(res.executed_nodes) >= {"1", "2"}
    # Same prompt again: everything comes from the cache.
    again = comfy_server.run(api, timeout=60)
    assert again.status == "success"
    assert set(again.cached_nodes) == {"1", "2"}


def test_harness_validation_error_body(comfy_server):
    body = comfy_server.post_prompt({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 10 ** 9, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    })
    assert isinstance(body, dict), body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"
