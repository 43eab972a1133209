"""Curation by clicking: the renders of a batch as a grid in the node; the tiles a person marks
become the negative cluster of the next trial (the paper's curator, "hot and cold", §5.4).

The marks are an ordinary STRING widget (positions, e.g. ``0, 3, 5-7``): the grid in the node
(``web/creative_generation.js``) only edits that text, so the marks are saved in the workflow JSON,
can be set through the API, and a re-queue after a change re-runs only what depends on them
(ComfyUI's cache keeps the bank, the norm and the renders).
"""

from __future__ import annotations

import random
import string

from comfy_api.latest import io, ui
from comfy_execution.graph_utils import ExecutionBlocker

from . import comfy_bridge as cb
from . import sockets as s
from .engine.bank import EmbeddingBank
from .file_nodes import parse_indices

TILES = "creative_tiles"  # ui key the grid reads: the saved preview of each tile, in order
MARKED = "creative_marked"  # ui key: the positions this run took as marked


def parse_marks(text: str, size: int) -> list[int]:
    """'0, 3, 5-7' -> sorted distinct positions; '' -> none marked."""
    return sorted(set(parse_indices(text, size))) if text.strip() else []


def _subset(bank: EmbeddingBank, picked: list[int], role: str) -> EmbeddingBank:
    return EmbeddingBank(bank.embeds[picked], dict(bank.provenance, selected=picked, curation=role))


class CurateEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeCurateEmbeds", display_name="Curate Embeddings (Creative)", category=s.CATEGORY,
            description="Shows the renders of a batch of embeddings as a grid in the node: click a tile to mark it "
                        "as unwanted (again to unmark), then queue. 'marked' goes to Negative Cluster, 'unmarked' "
                        "is the rest. The marks are the 'marks' text, saved with the workflow; only what depends "
                        "on them runs again. With nothing marked, 'marked' stops the nodes after it (no error); with "
                        "everything marked, 'unmarked' does.",
            inputs=[s.Embeds.Input("embeds", tooltip="The batch to curate, e.g. a concept's samples (Prior Sampler)."),
                    io.Image.Input("images", tooltip="Their renders in the same order (Render Embeddings, start 0): "
                                   "tile i is embedding i; embeddings without a render are never marked."),
                    io.String.Input("marks", default="", tooltip="Positions of the marked (unwanted) embeddings, "
                                    "e.g. '0, 3, 5-7'; clicking the tiles edits it. Empty = none marked.")],
            outputs=[s.Embeds.Output(display_name="marked"), s.Embeds.Output(display_name="unmarked")],
            is_output_node=True)

    @classmethod
    def validate_inputs(cls, marks=None):
        if not isinstance(marks, str):
            return True  # linked: checked when it runs
        try:
            parse_marks(marks, 1 << 31)
        except ValueError as e:
            return str(e).replace("indices", "marks")
        return True

    @classmethod
    def execute(cls, embeds, images, marks):
        if len(images) > len(embeds):
            raise ValueError(f"{len(images)} images for {len(embeds)} embeddings: the images must be the renders of "
                             "these embeddings, in order (Render Embeddings with start 0).")
        try:  # only what is shown can be marked: tile i is embedding i
            picked = parse_marks(marks, len(images))
        except ValueError as e:
            raise ValueError(str(e).replace("indices", "marks").replace("bank", "grid")) from None
        rest = [i for i in range(len(embeds)) if i not in picked]
        prefix = "creative_tiles_" + "".join(random.choices(string.ascii_lowercase, k=5))
        tiles = ui.ImageSaveHelper.save_images(cb.enlarged(images), filename_prefix=prefix,
                                               folder_type=io.FolderType.temp, cls=cls, compress_level=1)
        shown = {TILES: [dict(t) for t in tiles], MARKED: picked}
        marked = _subset(embeds, picked, "marked") if picked else ExecutionBlocker(None)
        unmarked = _subset(embeds, rest, "unmarked") if rest else ExecutionBlocker(None)  # never an empty bank
        return io.NodeOutput(marked, unmarked, ui=shown)


NODES = [CurateEmbeds]
