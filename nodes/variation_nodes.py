"""Creative variations of a given image, and the image anchor loss term they use."""

from __future__ import annotations

from comfy_api.latest import io

from . import comfy_bridge as cb
from . import inputs, memory, run_inputs
from . import sockets as s
from .engine.bank import EmbeddingBank
from .engine.losses import AnchorTerm
from .engine.plots import plot_embedding_map
from .engine.variations import image_variations

TRAIN_CHOICES = {k: v for k, v in s.TRAIN_CHOICES.items() if v != "lora"}  # inversion needs the token


def _no_encoder(prior) -> None:
    if prior.image_encoder is None:
        raise ValueError(f"The prior '{prior.source}' has no image encoder, so it cannot read images: load a prior "
                         "folder with image_encoder/ (the Kandinsky 2.1 / 2.2 priors and the mini world ship one).")


def _image(images):
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[-1] != 3:
        raise ValueError(f"image must be an RGB IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}: convert "
                         "it to RGB first.")
    return images.clone()


class ImageAnchorLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeImageAnchorLoss", display_name="Image Anchor Loss (Creative)", category=s.CATEGORY,
            description="1 − cos(e, the image's CLIP embedding) with the prior's own image encoder: holds the concept "
                        "to a given image, instead of or beside the text anchor. Several images: their mean.",
            inputs=[s.Prior.Input("prior", tooltip="The prior whose CLIP image encoder embeds the image."),
                    io.Image.Input("image", tooltip="The image to stay close to."),
                    io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.05, tooltip="Weight of the term."),
                    s.Loss.Input("loss_terms", optional=True, tooltip="Other loss terms to chain with.")],
            outputs=[s.Loss.Output(display_name="loss_terms")])

    @classmethod
    @cb.training_mode
    def execute(cls, prior, image, weight=1.0, loss_terms=None):
        _no_encoder(prior)
        memory.use(prior)
        return io.NodeOutput(tuple(loss_terms or ()) + (AnchorTerm.from_images(prior, _image(image), weight),))


class ImageVariations(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeImageVariations", display_name="Image Variations (Creative)", category=s.CATEGORY,
            description="Creative variations of a given image: encodes it with the prior's image encoder, inverts it "
                        "into a token (and LoRA) whose 'a photo of a {token}' reproduces it, then optimises creatively "
                        "from there, anchored to the image (1 − cos to its embedding) and gated as usual.",
            inputs=[s.Prior.Input("prior", tooltip="A prior with an image encoder (Kandinsky 2.1 / 2.2, the mini world); "
                                  "it is not modified."),
                    s.Norm.Input("norm", tooltip="The norm (Norm Gaussian Fit) of the image's category."),
                    io.Image.Input("image", tooltip="The image to vary (several: their mean embedding)."),
                    io.String.Input("subject", default="vehicle", tooltip="What the image shows and the variations "
                                    "must remain (the gate asks about it; the token starts from this word)."),
                    io.Int.Input("inversion_steps", default=200, min=1, max=100_000,
                                 tooltip="Steps of the inversion that finds the image's token (and LoRA)."),
                    io.Float.Input("inversion_lr", default=1e-2, min=1e-7, max=1.0, step=1e-4, round=1e-7,
                                   tooltip="Learning rate of the inversion."),
                    io.Float.Input("image_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                                   tooltip="Weight of the image anchor during the creative steps."),
                    run_inputs.steps("Maximum creative steps (the gate may stop earlier)."),
                    run_inputs.learning_rate("AdamW learning rate of the creative steps (paper: 1e-4)."),
                    run_inputs.lora_rank(), run_inputs.train(TRAIN_CHOICES, "What the inversion and the creative "
                                                                            "steps train."),
                    run_inputs.seed(), run_inputs.gate("Validity gate for the creative steps (needs a renderer)."),
                    run_inputs.renderer("Draws the variation for the gate."),
                    run_inputs.loss_terms("More terms for the creative steps, e.g. a text Anchor Loss beside the "
                                          "image anchor."),
                    run_inputs.prompt_template(tooltip="Prompt of the token; {token} is the placeholder."),
                    run_inputs.guidance(), run_inputs.prior_steps()],
            outputs=[s.Prior.Output(display_name="prior"), s.Concept.Output(display_name="concept"),
                     s.Concept.Output(display_name="inversion"), io.String.Output(display_name="token"),
                     s.Embeds.Output(display_name="image_embeds"), io.Image.Output(display_name="embedding_map"),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, subject="vehicle", prompt_template=run_inputs.TEMPLATE, gate=None, renderer=None):
        return inputs.first(run_inputs.problem(subject, prompt_template, gate, renderer,
                                               subject_hint="name what the image shows, e.g. 'car'."))

    @classmethod
    @cb.training_mode
    def execute(cls, prior, norm, image, subject="vehicle", inversion_steps=200, inversion_lr=1e-2, image_weight=1.0,
                steps=50, learning_rate=1e-4, lora_rank=10, train="token + LoRA", seed=0, gate=None, renderer=None,
                loss_terms=None, prompt_template=run_inputs.TEMPLATE, guidance=4.0, prior_steps=5):
        run = run_inputs.build_run(prior, norm, subject, tuple(loss_terms or ()), gate=gate, renderer=renderer,
                                   steps=steps, learning_rate=learning_rate, lora_rank=lora_rank, train=train,
                                   seed=seed, prompt_template=prompt_template, guidance=guidance,
                                   prior_steps=prior_steps, train_choices=TRAIN_CHOICES)
        _no_encoder(prior)
        image = _image(image)
        loader = memory.prepare_run(run)  # refuses what cannot fit
        progress = cb.Progress(cls.hidden.unique_id, inversion_steps + steps)
        result = image_variations(run, image, inversion_steps=inversion_steps, inversion_lr=inversion_lr,
                                  image_weight=image_weight, on_step=run_inputs.reporter(progress), on_phase=loader)
        inv, cre = result.inversion, result.creative
        text = (f"image log-likelihood {result.image_log_likelihood:.4g}; inversion: {inv.stop_reason} after "
                f"{inv.steps_run} steps, last log p {inv.records[-1].log_likelihood:.4g}; variation: {cre.stop_reason} "
                f"after {cre.steps_run} steps, kept step {cre.accepted_step}, last log p {cre.records[-1].log_likelihood:.4g}")
        progress.text(text)
        bank = EmbeddingBank(result.image_embeds, {"kind": "images", "prior": prior.identity, "count": 1})
        view = prior.with_concept(result.concept)
        return io.NodeOutput(view, result.concept, inv.concept, result.concept.token, bank,
                             plot_embedding_map(norm, result.image_embeds, inv.path + cre.path), text)


NODES = [ImageAnchorLoss, ImageVariations]
