"""Saving and loading banks, concepts and logs, and picking embeddings."""

from __future__ import annotations

import re
from pathlib import Path

from comfy_api.latest import io, ui

import folder_paths

from . import comfy_bridge as cb
from . import inputs, memory
from . import sockets as s
from .engine.bank import EmbeddingBank, encode_image_bank
from .engine.concept import Concept
from .engine.safetensors_io import save_json
from .engine.steplog import RunLog


def _save_base(kind: str, prefix: str, suffix: str = ".safetensors") -> Path:
    """``output/creative/<kind>/<subfolders>/<name><suffix>``: the savers number it (never overwriting)."""
    folder, name, _, _, _ = folder_paths.get_save_image_path(prefix, str(cb.output_folder(kind)))
    return Path(folder) / f"{name}{suffix}"


def _saved(path: Path) -> ui.PreviewText:
    return ui.PreviewText(f"saved {path.name} in {path.parent}")


class SaveEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeSaveEmbeds", display_name="Save Embeddings (Creative)", category=f"{s.CATEGORY}/files",
            description="Writes a bank (embeddings + provenance) as safetensors to output/creative/embeds; it then "
                        "appears in Load Embeddings.",
            inputs=[s.Embeds.Input("embeds", tooltip="The bank to save (embeddings + where they came from)."),
                    io.String.Input("filename_prefix", default="bank",
                                    tooltip="File name start; a counter is appended (bank_00001.safetensors).")],
            outputs=[], is_output_node=True)

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        return inputs.first(inputs.filename_prefix_problem(filename_prefix))

    @classmethod
    def execute(cls, embeds, filename_prefix) -> io.NodeOutput:
        path = embeds.save(_save_base("embeds", filename_prefix), numbered=True)
        return io.NodeOutput(ui=_saved(path))


class LoadEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeLoadEmbeds", display_name="Load Embeddings (Creative)", category=f"{s.CATEGORY}/files",
            inputs=[io.Combo.Input("file", options=cb.file_options(cb.EMBEDS),
                                   tooltip="A bank from models/creative_embeds or output/creative/embeds.")],
            outputs=[s.Embeds.Output(display_name="embeds")])

    @classmethod
    def fingerprint_inputs(cls, file) -> str:
        return cb.folder_fingerprint(Path(folder_paths.get_full_path_or_raise(cb.EMBEDS, file)))

    @classmethod
    @cb.training_mode
    def execute(cls, file) -> io.NodeOutput:
        return io.NodeOutput(EmbeddingBank.load(folder_paths.get_full_path_or_raise(cb.EMBEDS, file)))


class SaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeSaveConcept", display_name="Save Concept (Creative)", category=f"{s.CATEGORY}/files",
            description="Writes the concept (token embedding + LoRA + provenance in the metadata) as one safetensors "
                        "file to output/creative/concepts; it then appears in Load Concept.",
            inputs=[s.Concept.Input("concept", tooltip="The optimiser's concept output."),
                    io.String.Input("filename_prefix", default="concept",
                                    tooltip="File name start; a counter is appended (concept_00001.safetensors).")],
            outputs=[], is_output_node=True)

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        return inputs.first(inputs.filename_prefix_problem(filename_prefix))

    @classmethod
    def execute(cls, concept, filename_prefix) -> io.NodeOutput:
        path = concept.save(_save_base("concepts", filename_prefix), numbered=True)
        return io.NodeOutput(ui=_saved(path))


class LoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeLoadConcept", display_name="Load Concept (Creative)", category=f"{s.CATEGORY}/files",
            inputs=[io.Combo.Input("file", options=cb.file_options(cb.CONCEPTS),
                                   tooltip="A concept from models/creative_concepts or output/creative/concepts.")],
            outputs=[s.Concept.Output(display_name="concept"), io.String.Output(display_name="token")])

    @classmethod
    def fingerprint_inputs(cls, file) -> str:
        return cb.folder_fingerprint(Path(folder_paths.get_full_path_or_raise(cb.CONCEPTS, file)))

    @classmethod
    @cb.training_mode
    def execute(cls, file) -> io.NodeOutput:
        concept = Concept.load(folder_paths.get_full_path_or_raise(cb.CONCEPTS, file))
        return io.NodeOutput(concept, concept.token)


class EncodeImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeEncodeImages", display_name="Encode Images (Creative)", category=f"{s.CATEGORY}",
            description="CLIP image embeddings of images with the prior's image encoder (e.g. images you marked as "
                        "unwanted, for a negative cluster).",
            inputs=[s.Prior.Input("prior", tooltip="The prior whose CLIP image encoder embeds the images."),
                    io.Image.Input("images", tooltip="Images to embed.")],
            outputs=[s.Embeds.Output(display_name="embeds")])

    @classmethod
    @cb.training_mode
    def execute(cls, prior, images) -> io.NodeOutput:
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
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeSelectEmbeds", display_name="Select Embeddings (Creative)", category=f"{s.CATEGORY}",
            description="Keeps the embeddings at the given positions, e.g. the ones whose renders you marked as ugly.",
            inputs=[s.Embeds.Input("embeds", tooltip="The bank to pick from."),
                    io.String.Input("indices", default="0", tooltip="Positions to keep, e.g. '0, 3, 5-7'.")],
            outputs=[s.Embeds.Output(display_name="embeds")])

    @classmethod
    def execute(cls, embeds, indices) -> io.NodeOutput:
        picked = parse_indices(indices, len(embeds))
        return io.NodeOutput(EmbeddingBank(embeds.embeds[picked], dict(embeds.provenance, selected=picked)))


def log_summary(run: RunLog) -> str:
    """A few lines a person can read: how the run ended and where its numbers went."""
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
    lines += [f"note: {note}" for note in run.notes]
    return "\n".join(lines)


class SaveLog(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeSaveLog", display_name="Save Optimisation Log (Creative)", category=f"{s.CATEGORY}/files",
            description="Writes the optimiser's per-step log (every loss term, log-likelihood, Mahalanobis distance, "
                        "anchor cosine, gate P(yes) and decision, seconds) as JSON to output/creative/logs and shows "
                        "a summary.",
            inputs=[s.Log.Input("log", tooltip="The optimiser's log output."),
                    io.String.Input("filename_prefix", default="run", tooltip="File name prefix.")],
            outputs=[io.String.Output(display_name="summary")], is_output_node=True)

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        return inputs.first(inputs.filename_prefix_problem(filename_prefix))

    @classmethod
    def execute(cls, log, filename_prefix) -> io.NodeOutput:
        path = save_json(_save_base("logs", filename_prefix, ".json"), log.to_json(), numbered=True)
        summary = log_summary(log)
        return io.NodeOutput(summary, ui=ui.PreviewText(f"{summary}\nsaved {path.name} in {path.parent}"))


NODES = [SaveEmbeds, LoadEmbeds, SaveConcept, LoadConcept, EncodeImages, SelectEmbeds, SaveLog]
