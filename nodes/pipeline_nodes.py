"""The six nodes of the paper's pipeline: sample, fit, anchor, negative cluster, gate, optimise."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from . import comfy_bridge as cb
from . import inputs, memory, run_inputs
from . import sockets as s
from .engine.bank import EmbeddingBank, encode_image_bank, sample_bank
from .engine.gate import PAPER_QUESTION, ValidityGate
from .engine.losses import AnchorTerm, CreativeTerm, NegativeClusterTerm, negative_cluster
from .engine.norm import GaussianNorm
from .engine.plots import annotate, plot_embedding_map, plot_log
from .engine.rare_start import BANK_BATCH, INVERSION_STEPS, SELECT_BATCH, rare_start, rarest_accepted


class PriorSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativePriorSampler", display_name="Prior Sampler (Creative)", category=s.CATEGORY,
            description="Samples N CLIP image embeddings for a prompt from the prior: the 'typical' set of §5.1.",
            inputs=[s.Prior.Input("prior", tooltip="The diffusion prior (Load Diffusion Prior, or an optimiser's "
                                  "prior that knows its concept's token)."),
                    io.String.Input("prompt", default=s.PAPER_PROMPT, multiline=True,
                                    tooltip="The paper's template: 'Professional high-quality photo of a {subject}. "
                                            "photorealistic, 4k, HQ.' With a concept applied, use its token."),
                    io.Int.Input("count", default=5000, min=1, max=1_000_000, tooltip="Embeddings to sample (paper: 5,000)."),
                    io.Int.Input("batch_size", default=500, min=1, max=10_000, tooltip="Embeddings per batch (paper: 500)."),
                    io.Int.Input("steps", default=5, min=2, max=1000,
                                 tooltip="Prior denoising steps (paper: 5; the unCLIP scheduler needs at least 2)."),
                    io.Float.Input("guidance", default=4.0, min=0.0, max=30.0, step=0.1,
                                   tooltip="Prior classifier-free guidance (1 = off; ConceptLab used 4)."),
                    io.Int.Input("seed", **s.SEED, control_after_generate=True,
                                 tooltip="Same seed and settings give the same bank."),
                    io.String.Input("negative_prompt", default="", tooltip="Unconditional prompt of the guidance.")],
            outputs=[s.Embeds.Output(display_name="embeds")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, prompt=None) -> bool | str:
        return inputs.first(inputs.text_problem("prompt", prompt, "describe the subject, e.g. the paper's template."))

    @classmethod
    @cb.training_mode
    def execute(cls, prior, prompt, count, batch_size, steps, guidance, seed, negative_prompt) -> io.NodeOutput:
        memory.prepare_sampling(prior, prompt, negative_prompt, count=count, batch_size=batch_size, steps=steps,
                                guidance=guidance)  # refuses a run that cannot fit, then loads the prior
        progress = cb.Progress(cls.hidden.unique_id, count)
        bank = sample_bank(prior, prompt, count, batch_size=batch_size, steps=steps, guidance=guidance, seed=seed,
                           negative_prompt=negative_prompt,
                           progress=lambda done, n: progress(done, f"sampled {done}/{n} embeddings"))
        return io.NodeOutput(bank)


class NormGaussianFit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeNormGaussianFit", display_name="Norm Gaussian Fit (Creative)", category=s.CATEGORY,
            description="PCA of the bank plus a full-covariance Gaussian in PCA space (Eq. 3-4): the norm whose "
                        "low-probability regions the optimiser seeks.",
            inputs=[s.Embeds.Input("embeds", tooltip="The typical set: a bank from Prior Sampler (paper: 5,000)."),
                    io.Int.Input("pca_dims", default=50, min=2, max=4096, tooltip="PCA dimensions k (paper: 50); "
                                 "must be smaller than the bank size; at least 2 (the map plots two).")],
            outputs=[s.Norm.Output(display_name="norm"), io.Image.Output(display_name="map")])

    @classmethod
    @cb.training_mode
    def execute(cls, embeds, pca_dims) -> io.NodeOutput:
        norm = GaussianNorm.from_bank(embeds, pca_dims)
        return io.NodeOutput(norm, plot_embedding_map(norm, embeds.embeds))


def _chain(loss_terms, term) -> tuple:
    return tuple(loss_terms or ()) + (term,)


class AnchorLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeAnchorLoss", display_name="Anchor Loss (Creative)", category=s.CATEGORY,
            description="1 − cos(e, φ(category text)) with the prior's own text encoder (Eq. 6): keeps the concept "
                        "in its category.",
            inputs=[s.Prior.Input("prior", tooltip="The prior whose text encoder embeds the category prompt."),
                    io.String.Input("text", default=s.PAPER_PROMPT, multiline=True,
                                    tooltip="The category prompt P_pos, e.g. the paper's template for the subject."),
                    io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.05, tooltip="Weight (paper: 1)."),
                    s.Loss.Input("loss_terms", optional=True, tooltip="Other loss terms to chain with.")],
            outputs=[s.Loss.Output(display_name="loss_terms")])

    @classmethod
    def validate_inputs(cls, text=None) -> bool | str:
        return inputs.first(inputs.text_problem("text", text, "give the category, e.g. 'a photo of a vehicle'."))

    @classmethod
    @cb.training_mode
    def execute(cls, prior, text, weight, loss_terms=None) -> io.NodeOutput:
        memory.use(prior)
        return io.NodeOutput(_chain(loss_terms, AnchorTerm.from_prior(prior, text, weight)))


class NegativeCluster(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeNegativeCluster", display_name="Negative Cluster (Creative)", category=s.CATEGORY,
            description="Repels the optimiser from a region you marked as unwanted: a Gaussian of those embeddings in "
                        "the norm's PCA space, added as +α·log Ĝ_neg (the paper's Eq. 7 prints the sign that would "
                        "attract; this implements its stated intent).",
            inputs=[s.Norm.Input("norm", tooltip="The norm the optimiser uses; the cluster is fitted in its PCA space."),
                    io.Float.Input("alpha", default=1.0, min=0.0, max=100.0, step=0.05, tooltip="Repulsion weight α."),
                    io.String.Input("label", default="negative", tooltip="Name shown in logs and plots."),
                    s.Embeds.Input("embeds", optional=True, tooltip="Unwanted embeddings (e.g. selected from a bank)."),
                    io.Image.Input("images", optional=True, tooltip="Unwanted images; encoded with the prior's "
                                   "image encoder (connect the prior)."),
                    s.Prior.Input("prior", optional=True, tooltip="Needed only to encode images."),
                    s.Loss.Input("loss_terms", optional=True, tooltip="Other loss terms to chain with.")],
            outputs=[s.Loss.Output(display_name="loss_terms")])

    @classmethod
    @cb.training_mode
    def execute(cls, norm, alpha, label, embeds=None, images=None, prior=None, loss_terms=None) -> io.NodeOutput:
        banks = [] if embeds is None else [embeds]
        if images is not None:
            if prior is None:
                raise ValueError("images were given but no prior: connect the prior so its image encoder can embed them.")
            memory.use(prior)
            banks.append(encode_image_bank(prior, images.clone()))
        if not banks:
            raise ValueError("Give the unwanted region: connect embeds and/or images.")
        for bank in banks:
            if norm.prior_identity and bank.prior_identity and bank.prior_identity != norm.prior_identity:
                raise ValueError(f"embeds come from prior '{bank.prior_identity}' but the norm was fitted on "
                                 f"'{norm.prior_identity}': use embeddings of the same prior.")
        return io.NodeOutput(_chain(loss_terms, negative_cluster(norm, EmbeddingBank.concat(banks), alpha, label)))


class MLLMValidityGate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeMLLMValidityGate", display_name="MLLM Validity Gate (Creative)", category=s.CATEGORY,
            description="Every few steps the optimiser renders its concept and asks the MLLM whether it is still the "
                        "subject; P(yes) comes from the yes/no next-token logits. 'No' stops the run and keeps the "
                        "last state that passed.",
            inputs=[s.MLLM.Input("mllm", tooltip="The judge: an image-text-to-text model (Load Multimodal LLM)."),
                    io.String.Input("subject", default="", tooltip="Subject in the question; empty = the optimiser's."),
                    io.String.Input("question", default=PAPER_QUESTION, tooltip="Question template; {subject} is filled in."),
                    io.Int.Input("check_every", default=25, min=1, max=10_000, tooltip="Steps between checks (paper: 25)."),
                    io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                                   tooltip="P(yes) needed to pass.")],
            outputs=[s.Gate.Output(display_name="gate")])

    @classmethod
    def validate_inputs(cls, question=None) -> bool | str:
        return inputs.first(inputs.template_problem("question", question, {"subject"}))

    @classmethod
    def execute(cls, mllm, subject, question, check_every, threshold) -> io.NodeOutput:
        return io.NodeOutput(ValidityGate(mllm, question, check_every, threshold, subject.strip()))


PAPER_START, RARE_START = "subject word (paper)", "rarest accepted bank sample"
START_CHOICES = (PAPER_START, RARE_START)


class LoRAOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeLoRAOptimizer", display_name="Creative LoRA Optimizer (Creative)", category=s.CATEGORY,
            description="Trains a placeholder token and a rank-10 LoRA on the prior so its embedding moves to "
                        "low-probability regions of the norm (§5.2), held back by the loss terms and the gate.",
            inputs=[s.Prior.Input("prior", tooltip="The prior to train the token and LoRA on (it is not modified: the "
                                  "output prior carries the concept)."),
                    s.Norm.Input("norm", tooltip="The norm (Norm Gaussian Fit) whose low-probability regions to seek."),
                    io.String.Input("subject", default="vehicle", tooltip="What the concept must remain (the gate "
                                    "asks about it; the token starts from this word)."),
                    run_inputs.loss_terms(), run_inputs.gate(), run_inputs.renderer(),
                    run_inputs.steps(), run_inputs.learning_rate(), run_inputs.lora_rank(), run_inputs.train(),
                    run_inputs.seed(), run_inputs.prompt_template(optional=False),
                    io.Float.Input("creative_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                                   tooltip="Weight of log Ĝ(ẽ) (Eq. 5)."),
                    run_inputs.guidance(optional=False), run_inputs.prior_steps(optional=False),
                    io.Int.Input("samples_per_step", default=1, min=1, max=64, optional=True,
                                 tooltip="Noise draws per step; the loss is their mean and the gate judges them all "
                                         "(paper: 1; docs/evaluation.md §6 chose 4)."),
                    io.Boolean.Input("beyond_bank_ceiling", default=False, optional=True,
                                     tooltip="Stop pushing a sample once it is rarer than every sample of the bank the "
                                             "norm was fitted on, so the pullbacks keep it valid (paper: off; §6: on)."),
                    io.Combo.Input("start", options=list(START_CHOICES), default=PAPER_START, optional=True,
                                   tooltip="Where training starts: the subject word (paper), or the rarest sample of a "
                                           "fresh bank that the gate accepts, inverted into token + LoRA in "
                                           f"{INVERSION_STEPS} steps first. On the evaluation's held-out seeds the rare "
                                           "start (with 4 samples per step and the ceiling) beat rare select at equal "
                                           "compute, but its concept renders close to one image."),
                    io.Int.Input("start_bank", default=1000, min=1, max=100_000, optional=True,
                                 tooltip="Samples of the fresh bank a rare start picks from (drawn with the seed).")],
            outputs=[s.Prior.Output(display_name="prior"), s.Concept.Output(display_name="concept"),
                     s.Log.Output(display_name="log"), io.String.Output(display_name="token"),
                     io.Image.Output(display_name="gate_images"), io.Image.Output(display_name="loss_plot"),
                     io.Image.Output(display_name="embedding_map")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, subject=None, prompt_template=None, gate=None, renderer=None) -> bool | str:
        return inputs.first(run_inputs.problem(subject, prompt_template, gate, renderer))

    @classmethod
    @cb.training_mode
    def execute(cls, prior, norm, subject, steps, learning_rate, lora_rank, train, seed, prompt_template,
                creative_weight, guidance, prior_steps, loss_terms=None, gate=None, renderer=None, samples_per_step=1,
                beyond_bank_ceiling=False, start=None, start_bank=1000) -> io.NodeOutput:
        creative = (CreativeTerm.beyond(norm, weight=creative_weight) if beyond_bank_ceiling is True
                    else CreativeTerm(norm, creative_weight))
        terms = [creative, *(loss_terms or ())]
        run = run_inputs.build_run(prior, norm, subject, terms, gate=gate, renderer=renderer, steps=steps,
                                   learning_rate=learning_rate, lora_rank=lora_rank, train=train, seed=seed,
                                   prompt_template=prompt_template, guidance=guidance, prior_steps=prior_steps,
                                   samples=samples_per_step)
        loader = memory.prepare_run(run)  # refuses a run that cannot fit
        rare = start == RARE_START
        progress = cb.Progress(cls.hidden.unique_id, steps + (INVERSION_STEPS if rare else 0))
        if rare:
            progress.text(f"rare start: drawing {start_bank} samples, picking the rarest the gate accepts")
            memory.prepare_sampling(prior, run.config.prompt("", subject), "", count=start_bank, batch_size=BANK_BATCH,
                                    steps=prior_steps, guidance=guidance)  # refuses what cannot fit, loads the prior
            select = memory.prepare_selection(run.check, renderer if gate is not None else None, subject,
                                              SELECT_BATCH)
            rarest = rarest_accepted(run, start_bank, seed, on_phase=select)
            started = rare_start(run, rarest, on_step=run_inputs.reporter(progress), on_phase=loader)
            result, path = started.creative, started.inversion.path + started.creative.path
            begun = (f"started from the rarest accepted of {start_bank} samples (log p "
                     f"{started.rarest.log_likelihoods[0]:.4g}, {len(started.rarest.checked)} checked); ")
        else:
            result = run.run(run_inputs.reporter(progress), on_phase=loader)
            path, begun = result.path, ""
        progress.text(f"{begun}stopped: {result.stop_reason} after {result.steps_run} steps; kept step "
                      f"{result.accepted_step}")
        checks = [r.gate for r in result.records if r.gate is not None and r.gate.image is not None]
        gate_images = torch.stack([v.image for v in checks]) if checks else torch.zeros(1, 64, 64, 3)
        captions = [f"step {v.step}: P(yes) {v.p_yes:.2f} {'yes' if v.passed else 'NO'}" for v in checks]
        clusters = [(t.name, t.cluster) for t in terms if isinstance(t, NegativeClusterTerm)]
        return io.NodeOutput(prior.with_concept(result.concept), result.concept, result.log, result.concept.token,
                             gate_images, plot_log(result.records), plot_embedding_map(norm, None, path, clusters),
                             ui=ui.PreviewImage(annotate(cb.enlarged(gate_images), captions), cls=cls) if checks else None)


NODES = [PriorSampler, NormGaussianFit, AnchorLoss, NegativeCluster, MLLMValidityGate, LoRAOptimizer]
