"""Auto Trials: repeated optimisation runs where every rejection by the gate repels the next trial."""

from __future__ import annotations

import json

from comfy_api.latest import io, ui

from . import comfy_bridge as cb
from . import inputs
from . import memory
from . import sockets as s
from .engine.evaluation import format_table
from .engine.losses import CreativeTerm
from .engine.optimizer import OptimConfig
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
                    io.Int.Input("steps", default=50, min=1, max=100_000, tooltip="Maximum steps per trial."),
                    io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, round=1e-7,
                                   tooltip="AdamW learning rate (paper: 1e-4)."),
                    io.Int.Input("lora_rank", default=10, min=1, max=256, tooltip="LoRA rank (paper: 10)."),
                    io.Combo.Input("train", options=list(s.TRAIN_CHOICES), default="token + LoRA",
                                   tooltip="What to train (paper: token + LoRA)."),
                    io.Int.Input("seed", **s.SEED, control_after_generate=True,
                                 tooltip="Seed of the first trial; trial i uses seed + i."),
                    s.Loss.Input("loss_terms", optional=True, tooltip="Anchor / negative-cluster terms every trial "
                                 "uses (the clusters from rejections are added to them)."),
                    io.String.Input("prompt_template", default="a photo of a {token}", optional=True,
                                    tooltip="Prompt the concept is trained in; {token} is the placeholder."),
                    io.Float.Input("guidance", default=4.0, min=0.0, max=30.0, step=0.1, optional=True,
                                   tooltip="Prior guidance while training."),
                    io.Int.Input("prior_steps", default=5, min=2, max=100, optional=True,
                                 tooltip="Prior steps, with gradients (paper: 5).")],
            outputs=[s.Concept.Output(display_name="concepts", is_output_list=True,
                                      tooltip="Each trial's kept concept (the state its gate last accepted)."),
                     io.String.Output(display_name="trial_log"), io.Image.Output(display_name="trial_map")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, subject="vehicle", prompt_template="a photo of a {token}"):
        if subject is not None and not str(subject).strip():
            return "subject is empty: name what the concepts must remain, e.g. 'vehicle'."
        return inputs.first(inputs.template_problem("prompt_template", prompt_template, {"token"}, {"token"}))

    @classmethod
    @cb.training_mode
    def execute(cls, prior, norm, gate, renderer, subject="vehicle", trials=3, time_budget_s=0, alpha=1.0,
                cluster_samples=16, steps=50, learning_rate=1e-4, lora_rank=10, train="token + LoRA", seed=0,
                loss_terms=None, prompt_template="a photo of a {token}", guidance=4.0, prior_steps=5):
        cfg = OptimConfig(steps=steps, lr=learning_rate, train=s.TRAIN_CHOICES[train], rank=lora_rank,
                          alpha=float(lora_rank), prior_steps=prior_steps, guidance=guidance, seed=seed,
                          template=prompt_template)
        cfg.validate()
        terms = [CreativeTerm(norm), *(loss_terms or ())]
        gate, renderer = memory.prepare_optimisation(prior, subject, cfg, gate, renderer)  # refuses what cannot fit
        progress = cb.Progress(cls.hidden.unique_id, trials * steps)

        def report(trial: int, record) -> None:
            progress(trial * steps + record.step, f"trial {trial + 1}/{trials}, step {record.step}, "
                     f"log p {record.log_likelihood:.4g}"
                     + ("" if record.gate is None else f", gate P(yes) {record.gate.p_yes:.2f}"))

        result = run_trials(prior, norm, subject, terms, cfg, gate, renderer, trials=trials,
                            time_budget=float(time_budget_s), alpha=alpha, cluster_samples=cluster_samples,
                            callback=report)
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
