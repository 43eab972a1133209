"""Queued from the Run button, as a user does: the mini-world workflow runs and the page shows its
previews and save messages; curation by clicking tiles steers the second trial (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import comfy_harness

EXAMPLES = comfy_harness.REPO / "example_workflows"

NODE_STATE_JS = r"""
() => app.graph._nodes.map(n => ({
  id: String(n.id), type: n.type,
  images: (n.imgs ?? []).filter(i => i.complete && i.naturalWidth > 0).map(i => [i.naturalWidth, i.naturalHeight]),
  message: n.widgets?.find(w => w.name === 'creative_message')?.element?.textContent ?? null,
  bounding: Array.from(n.getBounding ? n.getBounding() : n.boundingRect),
}))
"""


def _nodes(page) -> dict[str, dict]:
    return {n["id"]: n for n in page.page.evaluate(NODE_STATE_JS)}


def _run_example(page, artefacts, name: str) -> tuple[dict, dict, dict[str, dict]]:
    """Open an example workflow, press Run, and require success and an image on every SaveImage / PreviewImage
    node (renders, plots, gate images); returns the workflow, the run's events and the nodes' state."""
    path = EXAMPLES / f"{name}.json"
    wf = json.loads(path.read_text())
    page.load(path)
    page.listen()
    run = page.queue()
    page.screenshot(artefacts / f"{name}-after-run.png")
    assert run["status"] == "success", run
    nodes = _nodes(page)
    for n in wf["nodes"]:
        if n["type"] in ("SaveImage", "PreviewImage"):
            assert nodes[str(n["id"])]["images"], f"node {n['id']} {n['type']} shows no image after the run"
    return wf, run, nodes


def test_the_mini_world_runs_from_the_run_button(page, artefacts):
    wf, run, nodes = _run_example(page, artefacts, "creative_miniworld")
    kinds = {str(n["id"]): n["type"] for n in wf["nodes"]}
    optimiser = next(i for i, k in kinds.items() if k == "CreativeLoRAOptimizer")
    assert nodes[optimiser]["images"] and min(nodes[optimiser]["images"][0]) >= 256  # gate images, enlarged
    assert run["previews"] >= 2, "the optimiser showed no progress preview at its gate checks"
    for nid, kind in kinds.items():
        if kind in ("CreativeSaveConcept", "CreativeSaveEmbeds", "CreativeSaveLog"):
            assert "saved " in (nodes[nid]["message"] or ""), f"node {nid} {kind} shows no save message"
    # the optimiser grew (its preview) without running into the nodes below it
    ox, oy, ow, oh = nodes[optimiser]["bounding"]
    for nid, n in nodes.items():
        x, y, w, h = n["bounding"]
        if nid != optimiser and x < ox + ow and ox < x + w and y >= oy:
            assert y - 24 > oy + oh, f"the optimiser (bottom {oy + oh:.0f}) runs into node {nid} (top {y:.0f})"
    assert not page.our_errors(), page.our_errors()


def _latest(folder: Path, pattern: str) -> Path:
    files = sorted(folder.glob(pattern))
    assert files, f"nothing matches {folder}/{pattern}"
    return files[-1]


def _cluster_term(entry: dict, label: str) -> float:
    return entry["terms"][label] if label in entry.get("terms", {}) else entry[label]


def test_curation_by_clicking_repels_the_second_trial(page, browser_server, artefacts):
    from creative_generation.nodes.engine.bank import EmbeddingBank

    path = EXAMPLES / "creative_curation.json"
    wf = json.loads(path.read_text())
    ids = {n["type"]: str(n["id"]) for n in wf["nodes"]}
    curate, cluster = ids["CreativeCurateEmbeds"], ids["CreativeNegativeCluster"]
    page.load(path)
    page.listen()
    first = page.queue()
    assert first["status"] == "success", first
    tiles = page.page.locator("img.creative-tile")
    tiles.first.wait_for(timeout=30_000)
    assert tiles.count() == 12
    page.page.wait_for_function("() => [...document.querySelectorAll('img.creative-tile')].every(i => i.complete && i.naturalWidth >= 256)")
    page.screenshot(artefacts / "creative_curation-grid.png")
    for i in (0, 1, 3, 5, 7):  # the file marks 0, 1: unmark them, mark 3, 5, 7
        tiles.nth(i).click()
    marks = page.page.evaluate(f"() => app.graph.getNodeById({curate}).widgets.find(w => w.name === 'marks').value")
    assert marks == "3, 5, 7"
    shown = [tiles.nth(i).get_attribute("data-marked") == "true" for i in range(12)]
    assert [i for i, on in enumerate(shown) if on] == [3, 5, 7]
    page.screenshot(artefacts / "creative_curation-marked.png")

    second = page.queue()
    page.screenshot(artefacts / "creative_curation-after-rerun.png")
    assert second["status"] == "success", second
    # only what depends on the marks ran again; trial 1 and its batch came from the cache
    assert {curate, cluster, ids["CreativeLoRAOptimizer"]} & set(second["executed"]) >= {curate, cluster}
    assert "10" in second["cached"] and "16" in second["cached"] and "10" not in second["executed"]
    # the Negative Cluster got exactly the marked embeddings (saved from the same output)
    link = page.page.evaluate(f"() => {{ const n = app.graph.getNodeById({cluster}); const l = app.graph.links.get?.(n.inputs.find(i => i.name === 'embeds').link) ?? app.graph.links[n.inputs.find(i => i.name === 'embeds').link]; return [l.origin_id, l.origin_slot]; }}")
    assert link == [int(curate), 0]
    embeds_dir = Path(browser_server.output_dir) / "creative" / "embeds" / "curation"
    batch = EmbeddingBank.load(_latest(embeds_dir, "batch_*.safetensors"))
    marked = EmbeddingBank.load(_latest(embeds_dir, "marked_*.safetensors"))
    assert marked.provenance["selected"] == [3, 5, 7] and torch.equal(marked.embeds, batch.embeds[[3, 5, 7]])
    # trial 2 moved away from them: the marked cluster's log-likelihood fell over its run
    logs = Path(browser_server.output_dir) / "creative" / "logs" / "curation"
    entries = json.loads(_latest(logs, "trial2_*.json").read_text())["entries"]
    first_ll, last_ll = _cluster_term(entries[0], "marked"), _cluster_term(entries[-1], "marked")
    assert last_ll < first_ll, (first_ll, last_ll)
    # control: the same trial 2 (same seed, same marks) with the cluster's weight set to 0 in the frontend; its log
    # still reads the cluster's log-likelihood, which must end higher than with the repulsion on
    page.page.evaluate(f"() => {{ const w = app.graph.getNodeById({cluster}).widgets.find(w => w.name === 'alpha'); "
                       "w.value = 0; w.callback?.(0); }")
    control = page.queue()
    assert control["status"] == "success", control
    assert cluster in control["executed"] and curate not in control["executed"]
    control_entries = json.loads(_latest(logs, "trial2_*.json").read_text())["entries"]
    assert len(control_entries) == len(entries)
    assert _cluster_term(control_entries[0], "marked") == pytest.approx(first_ll, abs=1e-6)  # one start: only the repulsion differs
    control_ll = _cluster_term(control_entries[-1], "marked")
    assert last_ll < control_ll, ("the marked cluster made no difference", last_ll, control_ll)
    assert not page.our_errors(), page.our_errors()


def test_the_sd_lora_workflow_runs_from_the_run_button(page, browser_server, artefacts):
    """creative_sd_lora (issue 17) queued from the Run button: it succeeds, every preview and save node shows an
    image, and core SaveLoRA wrote a LoRA file in the key format core's LoraLoader reads."""
    from safetensors.torch import load_file

    wf, _, _ = _run_example(page, artefacts, "creative_sd_lora")
    prefix = next(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "SaveLoRA")
    lora = _latest(Path(browser_server.output_dir), f"{prefix}_*.safetensors")
    assert any(k.endswith(".lora_up.weight") for k in load_file(lora)), lora
    assert not page.our_errors(), page.our_errors()
