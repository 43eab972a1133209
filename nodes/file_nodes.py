"""Saving and loading banks and concepts, picking embeddings, and the bridge into core unCLIP."""

from __future__ import annotations

import re
from pathlib import Path

from comfy_api.latest import io, ui

import folder_paths

from . import comfy_bridge as cb
from . import memory
from . import sockets as s
from .engine.bank import EmbeddingBank, encode_image_bank
from .engine.concept import Concept
from .engine.safetensors_io import save_json
from .engine.steplog import RunLog


def _save_path(kind: str, prefix: str) -> Path:
    folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, str(cb.output_folder(kind)))
    return Path(folder) / f"{name}_{counter:05}.safetensors"


def _saved(path: Path) -> ui.PreviewText:
    return ui.PreviewText(f"saved {path.name} in {path.parent}")


class SaveEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeSaveEmbeds", display_name="Save Embeddings (Creative)", category=f"{s.CATEGORY}/files",
            description="Writes a bank (embeddings + provenance) as safetensors to output/creative/embeds; it then "
                        "appears in Load Embeddings.",
            inputs=[s.Embeds.Input("embeds", tooltip="The bank to save (embeddings + where they came from)."),
                    io.String.Input("filename_prefix", default="bank",
                                    tooltip="File name start; a counter is appended (bank_00001.safetensors).")],
            outputs=[], is_output_node=True)

    @classmethod
    def execute(cls, embeds, filename_prefix):
        path = _save_path("embeds", filename_prefix)
        embeds.save(path)
        return io.NodeOutput(ui=_saved(path))


class LoadEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeLoadEmbeds", display_name="Load Embeddings (Creative)", category=f"{s.CATEGORY}/files",
            inputs=[io.Combo.Input("file", options=cb.file_options(cb.EMBEDS),
                                   tooltip="A bank from models/creative_embeds or output/creative/embeds.")],
            outputs=[s.Embeds.Output(display_name="embeds")])

    @classmethod
    def fingerprint_inputs(cls, file):
        return cb.folder_fingerprint(Path(folder_paths.get_full_path_or_raise(cb.EMBEDS, file)))

    @classmethod
    @cb.training_mode
    def execute(cls, file):
        return io.NodeOutput(EmbeddingBank.load(folder_paths.get_full_path_or_raise(cb.EMBEDS, file)))


class SaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeSaveConcept", display_name="Save Concept (Creative)", category=f"{s.CATEGORY}/files",
            description="Writes the concept (token embedding + LoRA + provenance in the metadata) as one safetensors "
                        "file to output/creative/concepts; it then appears in Load Concept.",
            inputs=[s.Concept.Input("concept", tooltip="The optimiser's concept output."),
                    io.String.Input("filename_prefix", default="concept",
                                    tooltip="File name start; a counter is appended (concept_00001.safetensors).")],
            outputs=[], is_output_node=True)

    @classmethod
    def execute(cls, concept, filename_prefix):
        path = _save_path("concepts", filename_prefix)
        concept.save(path)
        return io.NodeOutput(ui=_saved(path))


class LoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeLoadConcept", display_name="Load Concept (Creative)", category=f"{s.CATEGORY}/files",
            inputs=[io.Combo.Input("file", options=cb.file_options(cb.CONCEPTS),
                                   tooltip="A concept from models/creative_concepts or output/creative/concepts.")],
            outputs=[s.Concept.Output(display_name="concept"), io.String.Output(display_name="token")])

    @classmethod
    def fingerprint_inputs(cls, file):
        return cb.folder_fingerprint(Path(folder_paths.get_full_path_or_raise(cb.CONCEPTS, file)))

    @classmethod
    @cb.training_mode
    def execute(cls, file):
        concept = Concept.load(folder_paths.get_full_path_or_raise(cb.CONCEPTS, file))
        return io.NodeOutput(concept, concept.token)


class EncodeImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeEncodeImages", display_name="Encode Images (Creative)", category=f"{s.CATEGORY}",
            description="CLIP image embeddings of images with the prior's image encoder (e.g. images you marked as "
                        "unwanted, for a negative cluster).",
            inputs=[s.Prior.Input("prior", tooltip="The prior whose CLIP image encoder embeds the images."),
                    io.Image.Input("images", tooltip="Images to embed.")],
            outputs=[s.Embeds.Output(display_name="embeds")])

    @classmethod
    @cb.training_mode
    def execute(cls, prior, images):
        memory.use(prior)
        return io.NodeOutput(encode_image_bank(prior, images.clone()))


def parse_indices(text: str, size: int) -> list[int]:
    """'0, 3, 5-7' -> [0, 3, 5, 6, 7]; refuses what is out of range."""
    picked: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"indices: cannot read '{part}'; write e.g. '0, 3, 5-7'.")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi >= size:
            raise ValueError(f"indices: '{part}' is outside the bank (0-{size - 1}).")
        picked.extend(range(lo, hi + 1))
    if not picked:
        raise ValueError("indices is empty: list the embeddings to keep, e.g. '0, 3, 5-7'.")
    return picked


class SelectEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeSelectEmbeds", display_name="Select Embeddings (Creative)", category=f"{s.CATEGORY}",
            description="Keeps the embeddings at the given positions, e.g. the ones whose renders you marked as ugly.",
            inputs=[s.Embeds.Input("embeds", tooltip="The bank to pick from."),
                    io.String.Input("indices", default="0", tooltip="Positions to keep, e.g. '0, 3, 5-7'.")],
            outputs=[s.Embeds.Output(display_name="embeds")])

    @classmethod
    def execute(cls, embeds, indices):
        picked = parse_indices(indices, len(embeds))
        return io.NodeOutput(EmbeddingBank(embeds.embeds[picked], dict(embeds.provenance, selected=picked)))


class EmbedsToClipVision(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from .core_render_nodes import ANY, TARGETS

        return io.Schema(
            node_id="CreativeEmbedsToCLIPVision", display_name="Embeddings to CLIP Vision Output (Creative)",
            category=f"{s.CATEGORY}/render",
            description="Turns embeddings into a core CLIP_VISION_OUTPUT so core unCLIPConditioning -> KSampler can "
                        "render them: 768-d (Kandinsky 2.1 / Karlo priors) with SD 2.1 unCLIP-L, 1024-d with SD 2.1 "
                        "unCLIP-H, 1280-d (Kandinsky 2.2 prior) with SDXL (revision). Other widths are refused.",
            inputs=[s.Embeds.Input("embeds", tooltip="Embeddings from a prior, e.g. a concept's samples."),
                    io.Int.Input("start", default=0, min=0, tooltip="First embedding to pass on."),
                    io.Int.Input("count", default=1, min=1, max=64,
                                 tooltip="How many to pass on. unCLIPConditioning blends several into one "
                                         "conditioning (core sums them); for one image each use count 1 per node, "
                                         "or the Core Model Renderer."),
                    io.Combo.Input("target", options=list(TARGETS), default=ANY, optional=True,
                                   tooltip="The model the embeddings go to; their width must match it. 'any' accepts "
                                           "768, 1024 and 1280.")],
            outputs=[io.ClipVisionOutput.Output(display_name="clip_vision_output")])

    @classmethod
    def execute(cls, embeds, start, count, target="any"):
        from .core_render_nodes import check_width, clip_vision_output

        check_width(embeds.dim, target, embeds.prior_identity)
        chosen = embeds.embeds[start:start + count]
        if not len(chosen):
            raise ValueError(f"start={start} is past the end of the bank ({len(embeds)} embeddings).")
        return io.NodeOutput(clip_vision_output(chosen))


def log_summary(log: dict) -> str:
    """A few lines a person can read: how the run ended and where its numbers went."""
    run = RunLog.from_json(log)
    records = run.records
    lines = [f"stop: {run.stop_reason} after {run.steps_run} steps; kept the state of step {run.accepted_step}"]
    if records:
        first, last = records[0], records[-1]
        lines.append(f"log-likelihood under the norm: {first.log_likelihood:.4g} -> {last.log_likelihood:.4g}")
        if "anchor_cos" in last.metrics:
            lines.append(f"anchor cosine: {first.metrics['anchor_cos']:.3f} -> {last.metrics['anchor_cos']:.3f}")
        lines.append(f"seconds per step: {sum(r.seconds for r in records) / len(records):.3f}")
    lines += [f"gate at step {r.step}: P(yes) {r.gate.p_yes:.3f} -> {'yes' if r.gate.passed else 'NO'}"
              for r in records if r.gate is not None]
    return "\n".join(lines)


class SaveLog(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeSaveLog", display_name="Save Optimisation Log (Creative)", category=f"{s.CATEGORY}/files",
            description="Writes the optimiser's per-step log (every loss term, log-likelihood, Mahalanobis distance, "
                        "anchor cosine, gate P(yes) and decision, seconds) as JSON to output/creative/logs and shows "
                        "a summary.",
            inputs=[s.Log.Input("log", tooltip="The optimiser's log output."),
                    io.String.Input("filename_prefix", default="run", tooltip="File name prefix.")],
            outputs=[io.String.Output(display_name="summary")], is_output_node=True)

    @classmethod
    def execute(cls, log, filename_prefix):
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, str(cb.output_folder("logs")))
        path = save_json(Path(folder) / f"{name}_{counter:05}.json", log)
        summary = log_summary(log)
        return io.NodeOutput(summary, ui=ui.PreviewText(f"{summary}\nsaved {path.name} in {path.parent}"))


NODES = [SaveEmbeds, LoadEmbeds, SaveConcept, LoadConcept, EncodeImages, SelectEmbeds, EmbedsToClipVision, SaveLog]
