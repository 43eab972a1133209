"""Curate Embeddings (clicking tiles edits its ``marks`` text) and the enlarged previews (issue 11)."""

from __future__ import annotations

import pytest
import torch


def _bank(n: int = 6, d: int = 8):
    from creative_generation.nodes.engine.bank import EmbeddingBank

    return EmbeddingBank(torch.arange(n * d, dtype=torch.float32).reshape(n, d), {"prior": "p", "prompt": "x"})


def test_marked_and_unmarked_embeddings_come_out_apart(pack_nodes):
    node = pack_nodes["CreativeCurateEmbeds"]
    bank, images = _bank(), torch.rand(6, 32, 32, 3)
    out = node.PREPARE_CLASS_CLONE({}).execute(embeds=bank, images=images, marks="4, 0-1")
    marked, unmarked = out.result
    assert torch.equal(marked.embeds, bank.embeds[[0, 1, 4]]) and marked.provenance["selected"] == [0, 1, 4]
    assert torch.equal(unmarked.embeds, bank.embeds[[2, 3, 5]])
    tiles = out.ui["creative_tiles"]
    assert len(tiles) == 6 and {t["type"] for t in tiles} == {"temp"} and out.ui["creative_marked"] == [0, 1, 4]


def test_tiles_are_enlarged_but_nothing_downstream_changes(pack_nodes, comfy_inprocess):
    from PIL import Image

    node = pack_nodes["CreativeCurateEmbeds"]
    images = torch.rand(2, 32, 32, 3)
    before = images.clone()
    out = node.PREPARE_CLASS_CLONE({}).execute(embeds=_bank(2), images=images, marks="1")
    tile = out.ui["creative_tiles"][0]
    path = comfy_inprocess.folder_paths.get_temp_directory() + "/" + tile["subfolder"] + "/" + tile["filename"]
    with Image.open(path) as im:
        assert im.size == (256, 256)  # 32 px shown 8x, nearest neighbour
    assert torch.equal(images, before)


def test_nothing_marked_stops_only_the_marked_branch(pack_nodes):
    from comfy_execution.graph_utils import ExecutionBlocker

    marked, unmarked = pack_nodes["CreativeCurateEmbeds"].PREPARE_CLASS_CLONE({}).execute(
        embeds=_bank(3), images=torch.rand(3, 8, 8, 3), marks=" ").result
    assert isinstance(marked, ExecutionBlocker) and len(unmarked) == 3


def test_everything_marked_stops_only_the_unmarked_branch(pack_nodes):
    """An empty bank would flow on (Save Embeddings wrote a file Load Embeddings then refused)."""
    from comfy_execution.graph_utils import ExecutionBlocker

    marked, unmarked = pack_nodes["CreativeCurateEmbeds"].PREPARE_CLASS_CLONE({}).execute(
        embeds=_bank(3), images=torch.rand(3, 8, 8, 3), marks="0-2").result
    assert len(marked) == 3 and isinstance(unmarked, ExecutionBlocker)


@pytest.mark.parametrize("marks, message", [("0, x", "cannot read"), ("7", "outside")])
def test_bad_marks_are_refused_with_what_to_change(pack_nodes, marks, message):
    node = pack_nodes["CreativeCurateEmbeds"]
    if message == "cannot read":
        assert message in node.validate_inputs(marks=marks)
    with pytest.raises(ValueError, match=message):
        node.PREPARE_CLASS_CLONE({}).execute(embeds=_bank(3), images=torch.rand(3, 8, 8, 3), marks=marks)
    assert node.validate_inputs(marks=None) is True  # linked: checked when it runs


def test_only_shown_tiles_can_be_marked(pack_nodes):
    node = pack_nodes["CreativeCurateEmbeds"]
    with pytest.raises(ValueError, match="outside"):  # 2 renders of 4 embeddings: tile 3 is not shown
        node.PREPARE_CLASS_CLONE({}).execute(embeds=_bank(4), images=torch.rand(2, 8, 8, 3), marks="3")
    with pytest.raises(ValueError, match="renders of"):
        node.PREPARE_CLASS_CLONE({}).execute(embeds=_bank(1), images=torch.rand(2, 8, 8, 3), marks="")


def test_progress_preview_is_what_comfyui_sends(comfy_inprocess):
    from creative_generation.nodes import comfy_bridge as cb

    kind, image, max_size = cb.progress_preview(torch.rand(32, 32, 3))
    assert kind == "JPEG" and image.size == (256, 256) and image.mode == "RGB" and max_size == 512
    big = torch.rand(1, 300, 400, 3)
    assert cb.enlarged(big) is big  # large enough already


def test_progress_hands_comfyui_an_enlarged_preview(comfy_inprocess, monkeypatch):
    """A preview given to Progress (the optimiser gives each gate render) reaches ComfyUI's hook as ("JPEG", image, size)."""
    import comfy.utils

    from creative_generation.nodes import comfy_bridge as cb

    sent = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, t, preview, **kw: sent.append(preview))
    progress = cb.Progress("7", 3)
    progress(1)
    progress(2, preview=torch.rand(32, 32, 3))
    assert sent[0] is None and sent[1][0] == "JPEG" and sent[1][1].size == (256, 256)
