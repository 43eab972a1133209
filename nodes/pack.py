"""The ComfyUI extension: registers our model folders and lists every node."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import (comfy_bridge, core_render_nodes, curation_nodes, evaluation_nodes, file_nodes, inputs, miniworld_sd,
               mixing_nodes, model_nodes, pipeline_nodes, rare_nodes, sd_nodes, trials_nodes, variation_nodes)


class CreativeExtension(ComfyExtension):
    async def on_load(self) -> None:
        """At start-up (ComfyUI imports the pack): our folders, and what a killed save left in them."""
        comfy_bridge.register_folders()
        comfy_bridge.clean_leftovers()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        comfy_bridge.register_folders()
        nodes = [inputs.guard(cls) for cls in (*pipeline_nodes.NODES, *model_nodes.NODES, *file_nodes.NODES,
                                               *core_render_nodes.NODES, *evaluation_nodes.NODES, *rare_nodes.NODES,
                                               *mixing_nodes.NODES, *trials_nodes.NODES, *curation_nodes.NODES,
                                               *variation_nodes.NODES, *miniworld_sd.NODES, *sd_nodes.NODES)]
        comfy_bridge.install_checks({cls.GET_SCHEMA().node_id: cls for cls in nodes})
        return nodes
