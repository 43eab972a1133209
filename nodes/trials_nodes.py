"""Auto Trials: repeated optimisation runs where every rejection by the gate repels the next trial."""

from __future__ import annotations

import json

from comfy_api.latest import io, ui

from . import comfy_bridge as cb
from . import inputs, memory, run_inputs
from . import sockets as s
from .engine.evaluation import format_table
from .engine.losses import CreativeTerm
from .engine.trials import plot_trials, run_trials



class AutoTrials(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeAutoTrials", display_name="Auto Trials (Creative)", category=s.CATEGORY,
            description="Runs the creative optimisation again and again: when the gate rejects a trial, the "
                        "embeddings of the rejected state become a negative cluster (as Negative Cluster fits them) "
                        "and a fresh trial starts with the next seed, the same settings and every cluster so far; up "
                        "to N trials or a time budget. Outputs each trial's kept concept, the trial log and a map.",
            inputs=[s.Prior.Input("prior", tooltip="The prior to train on (it is not modified)."),
                    s.Norm.Input("norm", tooltip="The norm (Norm Gaussian Fit) whose low-probability regions to seek."),
                    s.Gate.Input("gate", tooltip="The validity gate: its 'no' ends a trial and marks a region to avoid."),
                    s.Renderer.Input("renderer", tooltip="Draws each trial's concept for the gate (Decoder Renderer)."),
                    io.String.Input("subject", default="vehicle", tooltip="What every concept must remain."),
                    io.Int.Input("trials", default=3, min=1, max=100, tooltip="At most this many trials."),
                    io.Int.Input("time_budget_s", default=0, min=0, max=7 * 24 * 3600,
                                 tooltip="No new trial starts after this many seconds (0 = no limit)."),
                    io.Float.Input("alpha", default=1.0, min=0.0, max=100.0, step=0.05,
                                   tooltip="Repulsion weight α of each cluster made from a rejection."),
                    io.Int.Input("cluster_samples", default=16, min=2, max=4096,
                                 tooltip="Embeddings sampled from a rejected state to fit its cluster."),
                    run_inputs.steps("Maximum steps per trial."), run_inputs.learning_rate(),
                    run_inputs.lora_rank(), run_inputs.train(),
                    run_inputs.seed("Seed of the first trial; trial i uses seed + i."),
                    run_inputs.loss_terms("Anchor / negative-cluster terms every trial uses (the clusters from "
                                          "rejections are added to them)."),
                    run_inputs.prompt_template(), run_inputs.guidance(), run_inputs.prior_steps()],
            outputs=[s.Concept.Output(display_name="concepts", is_output_list=True,
                                      tooltip="Each trial's kept concept (the state its gate last accepted)."),
                     io.String.Output(display_name="trial_log"), io.Image.Output(display_name="trial_map")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, subject="vehicle", prompt_template=run_inputs.TEMPLATE):
        return inputs.first(run_inputs.problem(subject, prompt_template,
                                               subject_hint="name what the concepts must remain, e.g. 'vehicle'."))

    @classmethod
    @cb.training_mode
    def execute(cls, prior, norm, gate, renderer, subject="vehicle", trials=3, time_budget_s=0, alpha=1.0,
                cluster_samples=16, steps=50, learning_rate=1e-4, lora_rank=10, train="token + LoRA", seed=0,
                loss_terms=None, prompt_template=run_inputs.TEMPLATE, guidance=4.0, prior_steps=5):
        run = run_inputs.build_run(prior, norm, subject, [CreativeTerm(norm), *(loss_terms or ())], gate=gate,
                                   renderer=renderer, steps=steps, learning_rate=learning_rate, lora_rank=lora_rank,
                                   train=train, seed=seed, prompt_template=prompt_template, guidance=guidance,
                                   prior_steps=prior_steps)
        loader = memory.prepare_run(run)  # refuses what cannot fit
        progress = cb.Progress(cls.hidden.unique_id, trials * steps)
        result = run_trials(run, trials=trials, time_budget=float(time_budget_s), alpha=alpha,
                            cluster_samples=cluster_samples, on_step=run_inputs.reporter(progress), on_phase=loader)
        columns = ["trial", "seed", "stop_reason", "steps_run", "accepted_step", "end_log_likelihood",
                   "cluster_added", "seconds"]
        table = format_table([dict(r, trial=r["trial"] + 1) for r in result.log], columns)
        text = (f"{len(result.trials)} trial(s), stopped by {result.stop_reason}; clusters added: "
                f"{[label for label, _ in result.clusters] or 'none'}\n{table}\n"
                + json.dumps({"stop_reason": result.stop_reason, "trials": result.log}, default=str))
        progress.text(text.splitlines()[0])
        trial_map = plot_trials(norm, result)
        return io.NodeOutput(result.concepts, text, trial_map, ui=ui.PreviewImage(trial_map, cls=cls))


NODES = [AutoTrials]
