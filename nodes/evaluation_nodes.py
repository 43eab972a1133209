"""The creativity-vs-steps (Wundt) sweep as a node: draw the curve for your own subject."""

from __future__ import annotations

from comfy_api.latest import io, ui

from . import comfy_bridge as cb
from . import inputs, memory, run_inputs
from . import sockets as s
from .engine.evaluation import AskingJudge, Evaluator, format_table, sweep_columns, sweep_summary, wundt_sweep
from .engine.losses import AnchorTerm, CreativeTerm, NegativeClusterTerm
from .engine.plots import plot_sweep

CONFIGS = ("none", "anchor", "gate", "both")


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.replace(";", ",").split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"{name}: write whole numbers separated by commas, e.g. '0, 50, 100'.") from None
    if not values or values[0] < 0:
        raise ValueError(f"{name}: give at least one number, none negative.")
    return values


def parse_configs(text: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CONFIGS))
    if unknown or not chosen:
        raise ValueError(f"configs: unknown {unknown or 'empty list'}; choose from {', '.join(CONFIGS)}.")
    return chosen


class WundtSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeWundtSweep", display_name="Creativity Sweep (Creative)", category=f"{s.CATEGORY}/evaluate",
            description="Runs the optimiser for each pullback configuration and seed, and measures novelty (log-"
                        "likelihood under the norm, percentile in the bank), validity (an independent judge's "
                        "'is the subject' rate) and diversity at the given steps: the paper's Wundt curve.",
            inputs=[s.Prior.Input("prior", tooltip="The prior to optimise concepts on."),
                    s.Norm.Input("norm", tooltip="The norm novelty is measured against."),
                    s.Embeds.Input("embeds", tooltip="The typical bank the norm was fitted on."),
                    io.String.Input("subject", default="vehicle", tooltip="What the concepts must remain."),
                    io.String.Input("steps", default="0, 50, 100, 200, 300, 500, 1000",
                                    tooltip="Steps at which to measure (the paper's curve)."),
                    io.String.Input("configs", default="none, anchor, gate, both",
                                    tooltip="Pullbacks to compare: none, anchor, gate, both."),
                    io.String.Input("seeds", default="0", tooltip="Seeds, e.g. '0, 1, 2'."),
                    io.String.Input("anchor_text", default=s.PAPER_PROMPT, multiline=True,
                                    tooltip="Category text of the anchor configurations."),
                    run_inputs.learning_rate(), run_inputs.train(),
                    io.Int.Input("samples", default=32, min=2, max=4096, tooltip="Samples per measurement."),
                    s.Loss.Input("loss_terms", optional=True, tooltip="Extra terms for every configuration "
                                 "(e.g. negative clusters; the table then adds each run's median Mahalanobis "
                                 "distance to the first cluster)."),
                    run_inputs.gate("Needed by the gate / both configurations."),
                    run_inputs.renderer("Renders samples for the gate and the judge."),
                    s.MLLM.Input("judge", optional=True, tooltip="An independent judge of validity (ideally not the "
                                 "gate's model); without it validity is not measured."),
                    run_inputs.prompt_template(tooltip="Prompt the concept is trained and sampled in; {token} is its "
                                                       "token. Use the bank's prompt with {token} for the subject so "
                                                       "that step 0 is typical and the curve measures the optimiser "
                                                       "alone."),
                    run_inputs.lora_rank(optional=True), run_inputs.guidance(), run_inputs.prior_steps()],
            outputs=[io.Image.Output(display_name="plot"), io.String.Output(display_name="table")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, subject=None, steps=None, configs=None, seeds=None, prompt_template=None,
                        gate=None, renderer=None, judge=None) -> bool | str:
        try:
            for text, parse in ((steps, lambda t: parse_ints(t, "steps")), (seeds, lambda t: parse_ints(t, "seeds")),
                                (configs, parse_configs)):
                if text is not None:
                    parse(text)
        except ValueError as err:
            return str(err)
        return inputs.first(run_inputs.problem(subject, prompt_template, gate, renderer,
                                                subject_hint="name what the concept must remain."),
                            judge is not None and renderer is None and "the judge looks at rendered images: connect "
                                                                       "a renderer.")

    @classmethod
    @cb.training_mode
    def execute(cls, prior, norm, embeds, subject, steps, configs, seeds, anchor_text, learning_rate, train, samples,
                loss_terms=None, gate=None, renderer=None, judge=None, prompt_template=run_inputs.TEMPLATE,
                lora_rank=10, guidance=4.0, prior_steps=5) -> io.NodeOutput:
        chosen, seed_list, at = parse_configs(configs), parse_ints(seeds, "seeds"), parse_ints(steps, "steps")
        if gate is None and {"gate", "both"} & set(chosen):
            raise ValueError("configs include the gate but no gate is connected: connect one or drop gate/both.")
        base = [CreativeTerm(norm), *(loss_terms or ())]
        run = run_inputs.build_run(prior, norm, subject, base, gate=gate, renderer=renderer,
                                   steps=max(max(at), 1), learning_rate=learning_rate, lora_rank=lora_rank,
                                   train=train, prompt_template=prompt_template, guidance=guidance,
                                   prior_steps=prior_steps)
        evaluator = Evaluator(norm, embeds, renderer, AskingJudge(judge) if judge is not None else None, samples,
                              marked=next((t.cluster for t in loss_terms or () if isinstance(t, NegativeClusterTerm)),
                                          None))
        loader = memory.prepare_sweep(run, evaluator)  # refuses or loads
        with_anchor = (*base, AnchorTerm.from_prior(prior, anchor_text))
        table = {"none": run.with_(check=None), "anchor": run.with_(terms=with_anchor, check=None),
                 "gate": run, "both": run.with_(terms=with_anchor)}
        progress = cb.Progress(cls.hidden.unique_id, len(chosen) * len(seed_list) * max(max(at), 1))
        rows = wundt_sweep({c: table[c] for c in chosen}, evaluator, at, seed_list,
                           on_step=run_inputs.reporter(progress), on_phase=loader)
        summary = sweep_summary(rows)
        text = format_table(summary, sweep_columns(cluster=evaluator.marked is not None))
        return io.NodeOutput(plot_sweep(summary), text, ui=ui.PreviewText(text))


NODES = [WundtSweep]
