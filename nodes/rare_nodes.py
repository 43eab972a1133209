"""Rare Select: the training-free mode, the rarest samples of a bank that the gate accepts."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from . import comfy_bridge as cb
from . import inputs, memory, run_inputs
from . import sockets as s
from .engine.gate import GateCheck
from .engine.evaluation import format_table
from .engine.plots import annotate
from .engine.rare import select_rare, selection_bank


class RareSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeRareSelect", display_name="Rare Select (Creative)", category=s.CATEGORY,
            description="No training: scores every embedding of a bank under the norm, renders and gates the rarest "
                        "candidates (rarest first) and returns the k rarest that pass, with their log-likelihoods "
                        "and P(yes). Seconds instead of an optimisation run; the baseline the optimiser must beat.",
            inputs=[s.Norm.Input("norm", tooltip="The norm (Norm Gaussian Fit) that says how rare an embedding is."),
                    s.Embeds.Input("embeds", tooltip="The bank to pick from: the typical bank, or a larger one from "
                                   "the same prior (more samples reach further into the tails)."),
                    io.Int.Input("k", default=4, min=1, max=256, tooltip="How many rare samples to return."),
                    io.Int.Input("candidates", default=32, min=1, max=100_000,
                                 tooltip="At most this many of the rarest embeddings are rendered and gated; "
                                         "at least k."),
                    run_inputs.gate("Validity gate: only samples it accepts are kept (needs a renderer). Without "
                                    "it the k rarest are returned as they are."),
                    run_inputs.renderer("Draws the candidates for the gate and the output images (Decoder "
                                        "Renderer)."),
                    io.String.Input("subject", default="vehicle", optional=True,
                                    tooltip="What the samples must still be; the gate asks about it (unless the "
                                            "gate sets its own subject)."),
                    io.Int.Input("batch_size", default=8, min=1, max=256, optional=True,
                                 tooltip="Candidates rendered and judged per batch; the search stops after the "
                                         "batch in which k passed.")],
            outputs=[s.Embeds.Output(display_name="embeds"), io.Image.Output(display_name="images"),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, k=4, candidates=32, gate=None, renderer=None):
        if isinstance(k, int) and isinstance(candidates, int) and candidates < k:
            return f"candidates ({candidates}) must be at least k ({k}): raise candidates or lower k."
        return inputs.first(run_inputs.problem(gate=gate, renderer=renderer))

    @classmethod
    @cb.training_mode
    def execute(cls, norm, embeds, k=4, candidates=32, gate=None, renderer=None, subject="vehicle", batch_size=8):
        check = GateCheck.of(gate, renderer)  # a gate without a renderer is refused
        if gate is not None and not (gate.subject or str(subject).strip()):
            raise ValueError("subject is empty: name what the samples must still be, e.g. 'vehicle'.")
        pool = min(candidates if gate is not None else k, len(embeds))
        loader = memory.prepare_selection(check, renderer, str(subject), min(batch_size, max(pool, 1)))
        progress = cb.Progress(cls.hidden.unique_id, max(pool, 1))
        selection = select_rare(norm, embeds, k, candidates=min(candidates, len(embeds)), gate=gate,
                                renderer=renderer, subject=str(subject), batch_size=batch_size, on_phase=loader,
                                progress=lambda done, total: progress(done, f"checked {done}/{total} rarest", total=total))
        if not selection.samples:
            raise ValueError(f"None of the {len(selection.checked)} rarest embeddings passed the gate: raise "
                             "candidates, sample a larger bank, or lower the gate's threshold.")
        rows = [{"rank": i + 1, "bank index": r.index, "log p": r.log_likelihood, "P(yes)": r.p_yes}
                for i, r in enumerate(selection.samples)]
        report = (f"{len(selection.samples)} of {len(selection.checked)} checked candidates kept "
                  f"(bank of {selection.bank_size}); {selection.question or 'no gate'}\n"
                  + format_table(rows, ["rank", "bank index", "log p", "P(yes)"]))
        progress.text(report.splitlines()[0])
        images = selection.images if selection.images is not None else torch.zeros(1, 64, 64, 3)
        captions = [f"log p {r.log_likelihood:.1f}" + ("" if r.p_yes is None else f" P(yes) {r.p_yes:.2f}")
                    for r in selection.samples]
        preview = ui.PreviewImage(annotate(images, captions), cls=cls) if selection.images is not None else None
        return io.NodeOutput(selection_bank(selection, embeds), images, report, ui=preview)


NODES = [RareSelect]
