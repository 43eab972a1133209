"""The SD path's nodes (issue 17): a bank of the user's own SD model's renders, an image anchor in its CLIP vision
space, and the creative LoRA optimiser on the model itself. ComfyUI's side is in ``sd_generator.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from comfy_api.latest import io, ui

import comfy.samplers
import comfy.sd

from . import comfy_bridge as cb
from . import inputs, memory, run_inputs
from . import sockets as s
from .engine import few_step
from .engine.losses import AnchorTerm, CreativeTerm
from .engine.plots import annotate, plot_log
from .sd_generator import (MAX_RENDER_STEPS, TRAIN_CHOICES, LoRAWeights, RenderSettings, SDGenerator, bank_estimate,
                           family, sd_sample_bank, vision_of)

LoraModel = io.Custom("LORA_MODEL")  # core's own type: core SaveLoRA writes it, LoraModelLoader applies it
SDEmbedding = io.Custom("CREATIVE_SD_EMBEDDING")  # a trained token; Save SD Embedding writes core's file
SD_PROMPT = "a photo of a {subject}"


def _core_inputs() -> list[io.Input]:
    return [io.Model.Input("model", tooltip="Your SD 1.5 or SDXL model (with a few-step LoRA applied, if any)."),
            io.Clip.Input("clip", tooltip="Its text encoder (the checkpoint's CLIP)."),
            io.Vae.Input("vae", tooltip="Its VAE."),
            io.ClipVision.Input("clip_vision", tooltip="A CLIP ViT vision model with projection (Load CLIP Vision, "
                                "e.g. CLIP-ViT-L-14 or -H-14): its image embeddings are the space the norm lives in.")]


def _render_inputs(samplers: list[str], default_sampler: str) -> list[io.Input]:
    return [io.Int.Input("render_steps", default=1, min=1, max=MAX_RENDER_STEPS,
                         tooltip="Sampling steps per render (a few-step model: 1 to 8)."),
            io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, tooltip="CFG scale (1 = no CFG, as "
                           "few-step LoRAs are mostly used)."),
            io.Combo.Input("sampler_name", options=samplers, default=default_sampler, tooltip="Core's sampler."),
            io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="sgm_uniform",
                           tooltip="Core's scheduler (few-step LoRAs: sgm_uniform)."),
            io.Int.Input("width", default=512, min=16, max=4096, step=8, tooltip="Render width."),
            io.Int.Input("height", default=512, min=16, max=4096, step=8, tooltip="Render height.")]


def _grid(images: torch.Tensor, columns: int = 4) -> torch.Tensor:
    """Up to ``columns`` x ``columns`` images in one IMAGE ``[1, rows*H, columns*W, 3]``."""
    images = images[:columns * columns]
    rows = -(-len(images) // columns)
    pad = torch.zeros(rows * columns - len(images), *images.shape[1:])
    tiles = torch.cat([images, pad]).reshape(rows, columns, *images.shape[1:])
    return tiles.permute(0, 2, 1, 3, 4).reshape(1, rows * images.shape[1], columns * images.shape[2], 3)


class SDEmbeddingBank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeSDEmbeddingBank", display_name="SD Embedding Bank (Creative)", category=s.CATEGORY,
            description="The typical set of your own SD model: renders of one prompt with core's sampler, embedded "
                        "by a CLIP vision model. Fit the norm on it; the bank names its embedding space, so a norm "
                        "from another space is refused downstream.",
            inputs=[*_core_inputs(),
                    io.String.Input("prompt", default="a photo of a vehicle", multiline=True,
                                    tooltip="What to render (the typical set of this prompt)."),
                    io.Int.Input("count", default=500, min=2, max=100_000, tooltip="How many renders."),
                    io.Int.Input("batch_size", default=8, min=1, max=1024, tooltip="Renders at once (batch b uses "
                                 "seed + b)."),
                    *_render_inputs(list(comfy.samplers.KSampler.SAMPLERS), "euler"),
                    run_inputs.seed("Noise seed of the first batch."),
                    io.String.Input("negative_prompt", default="", optional=True, tooltip="Negative prompt (CFG > 1).")],
            outputs=[s.Embeds.Output(display_name="embeds"), io.Image.Output(display_name="preview")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, prompt=None) -> bool | str:
        return inputs.first(inputs.text_problem("prompt", prompt, "describe what to render, e.g. 'a photo of a car'."))

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, prompt, count, batch_size, render_steps, cfg, sampler_name,
                scheduler, width, height, seed, negative_prompt="") -> io.NodeOutput:
        family(model)
        render = RenderSettings(render_steps, cfg, sampler_name, scheduler, width, height)
        render.check(differentiable=False)
        vision_of(clip_vision)  # refuses a CLIP vision model without projection before any render
        batch = min(batch_size, count)
        memory.prepare_sd_bank(bank_estimate(model, vae, clip_vision, render, batch),
                               (model, vae.patcher, clip_vision.patcher))
        progress = cb.Progress(cls.hidden.unique_id, count)
        bank, previews = sd_sample_bank((model, clip, vae, clip_vision), prompt, negative_prompt or "", render,
                                        count=count, batch_size=batch, seed=seed,
                                        progress=lambda done, total: progress(done, f"{done}/{total} renders"))
        return io.NodeOutput(bank, _grid(previews))


class SDImageAnchor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeSDImageAnchor", display_name="SD Image Anchor (Creative)", category=s.CATEGORY,
            description="The pullback of the SD path: 1 − cos(e, mean CLIP image embedding of the given images or "
                        "embeddings), in the CLIP vision model's space (a text anchor lives in a prior's space).",
            inputs=[io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the optimiser embeds with."),
                    io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.05, tooltip="Weight."),
                    io.Image.Input("images", optional=True, tooltip="Images of what the concept must stay."),
                    s.Embeds.Input("embeds", optional=True, tooltip="Or embeddings of it (an SD Embedding Bank "
                                   "with the same CLIP vision model)."),
                    s.Loss.Input("loss_terms", optional=True, tooltip="Other loss terms to chain with.")],
            outputs=[s.Loss.Output(display_name="loss_terms")])

    @classmethod
    @cb.training_mode
    def execute(cls, clip_vision, weight, images=None, embeds=None, loss_terms=None) -> io.NodeOutput:
        import comfy.model_management as mm

        if images is None and embeds is None:
            raise ValueError("Give what to anchor to: connect images and/or embeds.")
        mm.load_models_gpu([clip_vision.patcher], force_full_load=True)
        vision = vision_of(clip_vision)
        parts = []
        if embeds is not None:
            if embeds.prior_identity != vision.identity:
                raise ValueError(f"embeds come from '{embeds.prior_identity}' but this CLIP vision model's space is "
                                 f"'{vision.identity}': use a bank embedded by this CLIP vision model.")
            parts.append(embeds.embeds)
        if images is not None:
            with torch.no_grad():
                parts.append(vision(images[..., :3].clone()).float().cpu())
        return io.NodeOutput((*(loss_terms or ()), AnchorTerm.from_embeds(torch.cat(parts), vision.identity, weight)))


class SDLoRAOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeSDLoRAOptimizer", display_name="Creative SD LoRA Optimizer (Creative)",
            category=s.CATEGORY,
            description="The paper's method on your own few-step SD 1.5 / SDXL model: trains a LoRA so that the CLIP "
                        "image embedding of its renders moves into the norm's low-probability regions, held back "
                        "by the loss terms and the gate (which judges the model's own renders). The LoRA is core's "
                        "LORA_MODEL: Save LoRA writes it, LoraLoader applies it.",
            inputs=[*_core_inputs(),
                    s.Norm.Input("norm", tooltip="A norm fitted on an SD Embedding Bank with this CLIP vision model."),
                    io.String.Input("prompt", default=SD_PROMPT, multiline=True,
                                    tooltip="What the model renders while training; {subject} is the subject."),
                    io.String.Input("subject", default="vehicle", tooltip="What the renders must remain (the gate "
                                    "asks about it)."),
                    run_inputs.loss_terms("SD Image Anchor / Negative Cluster terms."),
                    run_inputs.gate("Validity gate: judges the model's own renders every check_every steps."),
                    run_inputs.steps(), run_inputs.learning_rate(), run_inputs.lora_rank(),
                    run_inputs.seed("Seeds the LoRA init, the per-step noise and the gate's render."),
                    *_render_inputs(list(few_step.SAMPLERS), "euler"),
                    io.Float.Input("creative_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                                   tooltip="Weight of log Ĝ(ẽ) (Eq. 5)."),
                    io.String.Input("negative_prompt", default="", optional=True, tooltip="Negative prompt (CFG > 1)."),
                    io.Combo.Input("train", options=list(TRAIN_CHOICES), default="lora", optional=True,
                                   tooltip="What to train: the LoRA; a token (a new text-encoder embedding, "
                                   "started from the subject word, put where {subject} is; save it with Save SD "
                                   "Embedding and write embedding:<name> in a prompt); or both."),
                    io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                     tooltip="Recompute each render step's UNet call and the VAE decode in the "
                                     "backward pass instead of keeping their activations: less memory, slower "
                                     "steps, the same gradients.")],
            outputs=[io.Model.Output(display_name="model"), LoraModel.Output(display_name="lora"),
                     s.Log.Output(display_name="log"), io.Image.Output(display_name="gate_images"),
                     io.Image.Output(display_name="loss_plot"), SDEmbedding.Output(display_name="embedding")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, subject=None, prompt=None) -> bool | str:
        return inputs.first(run_inputs.problem(subject),
                            inputs.template_problem("prompt", prompt, {"subject"}) if isinstance(prompt, str) else None)

    @classmethod
    @cb.training_mode
    def execute(cls, model, clip, vae, clip_vision, norm, prompt, subject, steps, learning_rate, lora_rank, seed,
                render_steps, cfg, sampler_name, scheduler, width, height, creative_weight, loss_terms=None,
                gate=None, negative_prompt="", train="lora", gradient_checkpointing=False) -> io.NodeOutput:
        render = RenderSettings(render_steps, cfg, sampler_name, scheduler, width, height)
        generator = SDGenerator(model, clip, vae, clip_vision, prompt.replace("{subject}", subject),
                                negative_prompt or "", render, template=prompt,
                                checkpointing=gradient_checkpointing is True)
        terms = [CreativeTerm(norm, creative_weight), *(loss_terms or ())]
        run = run_inputs.build_run(generator, norm, subject, terms, gate=gate, steps=steps,
                                   learning_rate=learning_rate, lora_rank=lora_rank, train=train, seed=seed,
                                   train_choices=TRAIN_CHOICES)
        loader = memory.prepare_run(run)  # refuses a run that cannot fit, naming what to change
        progress = cb.Progress(cls.hidden.unique_id, steps)
        result = run.run(run_inputs.reporter(progress), on_phase=loader)
        progress.text(f"stopped: {result.stop_reason} after {result.steps_run} steps; kept step {result.accepted_step}")
        lora = result.concept.weights()
        patched = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0] if lora else model.clone()
        checks = [r.gate for r in result.records if r.gate is not None and r.gate.image is not None]
        gate_images = torch.stack([v.image for v in checks]) if checks else torch.zeros(1, 64, 64, 3)
        captions = [f"step {v.step}: P(yes) {v.p_yes:.2f} {'yes' if v.passed else 'NO'}" for v in checks]
        return io.NodeOutput(patched, lora, result.log, gate_images, plot_log(result.records), result.concept.embedding,
                             ui=ui.PreviewImage(annotate(cb.enlarged(gate_images), captions), cls=cls) if checks else None)


def _save_in_model_folder(kind: str, prefix: str, save: Callable[[Path], Path]) -> tuple[Path, Path]:
    """``save(stem)`` inside the first of ComfyUI's ``kind`` folders (where core's loaders list its files);
    returns the written file and that folder."""
    import folder_paths

    root = folder_paths.get_folder_paths(kind)[0]
    folder, name, _, _, _ = folder_paths.get_save_image_path(prefix, root)
    return save(Path(folder) / name), Path(root)


class SaveSDEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeSaveSDEmbedding", display_name="Save SD Embedding (Creative)",
            category=f"{s.CATEGORY}/files",
            description="Writes the SD optimiser's trained token as core's embedding file (safetensors) into "
                        "ComfyUI's embeddings folder, never over another file; use it in any prompt as "
                        "embedding:<the saved name>, e.g. 'a photo of embedding:creative_vehicle_00001'.",
            inputs=[io.String.Input("filename_prefix", default="creative", tooltip="File name start; a counter is "
                                    "appended (creative_00001.safetensors)."),
                    # optional: a LoRA-only run sends None here, which deserves its own message
                    SDEmbedding.Input("embedding", optional=True, tooltip="The optimiser's embedding output (train: "
                                      "token or token+lora).")],
            outputs=[], is_output_node=True)

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        spaced = (f"filename_prefix {filename_prefix!r} has white space: core reads embedding:<name> up to the first "
                  "space, so the file could not be used in a prompt." if isinstance(filename_prefix, str)
                  and any(c.isspace() for c in filename_prefix) else None)
        return inputs.first(inputs.filename_prefix_problem(filename_prefix), spaced)

    @classmethod
    def execute(cls, filename_prefix, embedding=None) -> io.NodeOutput:
        if embedding is None:
            raise ValueError("No token to save: connect the SD optimiser's embedding output and set its train to "
                             "token or token+lora (a LoRA-only run trains no token).")
        path, root = _save_in_model_folder("embeddings", filename_prefix, embedding.save)
        usable = path.relative_to(root).with_suffix("").as_posix()
        return io.NodeOutput(ui=ui.PreviewText(f"saved {path.name} in {path.parent}; write embedding:{usable} in a "
                                               "prompt"))


class SaveSDLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeSaveSDLoRA", display_name="Save SD LoRA (Creative)",
            category=f"{s.CATEGORY}/files",
            description="Writes a LoRA into ComfyUI's loras folder, where core LoraLoader / LoraLoaderModelOnly "
                        "list it after a refresh (core Save LoRA writes to the output folder instead), never over "
                        "another file; from the SD optimiser, the file also records the model family, prompt and "
                        "settings it was trained with.",
            inputs=[LoraModel.Input("lora", tooltip="The SD optimiser's lora output (or any core LORA_MODEL)."),
                    io.String.Input("filename_prefix", default="creative_lora", tooltip="File name start inside "
                                    "the loras folder; a counter is appended (creative_lora_00001.safetensors).")],
            outputs=[], is_output_node=True)

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        return inputs.first(inputs.filename_prefix_problem(filename_prefix))

    @classmethod
    def execute(cls, lora, filename_prefix) -> io.NodeOutput:
        if not lora:
            raise ValueError("No LoRA to save: the SD optimiser trained only a token (train: token). Save the token "
                             "with Save SD Embedding, or set train to lora or token+lora.")
        weights = lora if isinstance(lora, LoRAWeights) else LoRAWeights(lora)
        path, root = _save_in_model_folder("loras", filename_prefix, weights.save)
        family_name = weights.meta.get("family")
        made_on = f"; trained on an {family_name} model: load it on that checkpoint" if family_name else ""
        return io.NodeOutput(ui=ui.PreviewText(f"saved {path.name} in {path.parent}; LoraLoader lists it as "
                                               f"{path.relative_to(root).as_posix()} (refresh the node list){made_on}"))


NODES = [SDEmbeddingBank, SDImageAnchor, SDLoRAOptimizer, SaveSDEmbedding, SaveSDLoRA]
